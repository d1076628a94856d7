"""The demo bundle shipped in the package: valid, small, still passing parity, copied into the cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from facemoe.bundle import Bundle
from facemoe.demo import ensure_demo_bundle, packaged_demo_bundle

from runtime_fixtures import invoke


def test_packaged_demo_bundle_is_the_tiny_random_model() -> None:
    bundle = Bundle(packaged_demo_bundle())
    model = bundle.manifest.model
    assert model["source"] == {"random_weights": True, "preset": "tiny", "seed": 0}
    assert bundle.precisions == ["fp32"] and bundle.artifact("fp32").parity["passed"] is True
    path = bundle.artifact_path("fp32", verify=True)
    assert path.stat().st_size < 15_000_000, "the demo bundle bloats every install"


def test_packaged_demo_bundle_passes_parity_against_pytorch() -> None:
    # Catches a model or exporter change that the committed bundle no longer matches: regenerate it with
    # scripts/make_demo_bundle.py.
    pytest.importorskip("torch")
    from facemoe.cli.main import app

    result = invoke(app, ["parity", packaged_demo_bundle(), "--count", "8"])
    assert result.exit_code == 0, result.output
    assert "pass" in result.stdout and "FAIL" not in result.stdout


def test_cache_copy_is_reused_and_repaired(tmp_path: Path) -> None:
    target = ensure_demo_bundle(tmp_path)
    model = target / "model.fp32.onnx"
    stamp = model.stat().st_mtime_ns
    assert ensure_demo_bundle(tmp_path) == target and model.stat().st_mtime_ns == stamp, "a good copy is reused"
    model.write_bytes(model.read_bytes()[:1000])  # an interrupted or damaged copy
    ensure_demo_bundle(tmp_path)
    Bundle(target).artifact_path("fp32", verify=True)
    assert [p.name for p in tmp_path.iterdir()] == ["demo-bundle"], "no staging directory left behind"
