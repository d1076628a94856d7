"""Shared fixtures: golden reference data, small models and their exported bundles."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# Keep the 2-core CI machine responsive and results reproducible.
os.environ.setdefault("OMP_NUM_THREADS", "2")
# Without a GPU, Triton kernels are checked by its interpreter; the switch must be set before triton loads.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from paths import GOLDEN


@pytest.fixture(scope="session")
def golden() -> dict:
    torch = pytest.importorskip("torch")
    return torch.load(GOLDEN, weights_only=True)


@pytest.fixture(scope="session")
def golden_model(golden):
    from facemoe.model import load_checkpoint

    return load_checkpoint(golden["state_dict"], config="infer")


@pytest.fixture(scope="session")
def tiny_model():
    """Tiny preset with realistic random weights (every tensor drawn; see model.random_weights)."""
    pytest.importorskip("torch")
    from facemoe.model import build_model
    from facemoe.model.random_weights import randomize

    return randomize(build_model("tiny"), seed=0)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_model) -> Path:
    """A tiny-preset bundle with fp32 and fp16 artifacts, exported once per test session."""
    from facemoe.export.bundle_writer import export_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    export_bundle(
        tiny_model,
        out,
        precisions=("fp32", "fp16"),
        random_weights=True,
        source={"random_weights": True, "preset": "tiny", "seed": 0},
    )
    return out
