"""Which back end and precision ``open_backend`` picks, and the one line saying why (runtime/backends/select.py).

Every branch runs on the stand-in TensorRT + CUDA stack (tests/fakes/trt_stack.py) and real ONNX Runtime.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fakes import trt_stack

from facemoe.bundle import MANIFEST_NAME, Bundle
from facemoe.errors import EngineMismatchError
from facemoe.export import tensorrt as trt_build
from facemoe.fileio import sha256_file
from facemoe.runtime.backends import select
from facemoe.runtime.backends.select import engine_precision, open_backend, trusted_precisions


def options(precision: str = "fp32", max_batch: int = 8, **kwargs: Any) -> trt_build.BuildOptions:
    return trt_build.BuildOptions(precision=precision, opt_batch=min(8, max_batch), max_batch=max_batch, **kwargs)


@pytest.fixture
def stack(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_bundle: Path) -> Any:
    """The tiny bundle plus an int8 artifact (a copy of the fp32 graph), on a fake GPU with TensorRT 10.13."""
    root = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, root)
    shutil.copyfile(root / "model.fp32.onnx", root / "model.int8.onnx")
    data = json.loads((root / MANIFEST_NAME).read_text())
    data["artifacts"]["int8"] = dict(
        data["artifacts"]["fp32"],
        precision="int8",
        file="model.int8.onnx",
        sha256=sha256_file(root / "model.int8.onnx"),
    )
    (root / MANIFEST_NAME).write_text(json.dumps(data))
    return trt_stack.install(monkeypatch, tmp_path, root, "10.13.3.9")


def _fail_parity(root: Path, precision: str) -> None:
    data = json.loads((root / MANIFEST_NAME).read_text())
    data["artifacts"][precision]["parity"] = {"passed": False, "failures": ["cosine_min 0.91 < 0.99"]}
    (root / MANIFEST_NAME).write_text(json.dumps(data))


def _open(root: Path, backend: str = "auto", **kwargs: Any) -> tuple[Any, str]:
    lines: list[str] = []
    opened = open_backend(root, backend, threads=1, report=lines.append, **kwargs)
    assert lines == [opened.selection]  # reported once, and kept on the backend for the CLI to print
    return opened, lines[0]


def test_auto_uses_the_only_engine_built(stack: Any) -> None:
    """A bundle exported with --fp16 --int8 --engine holds an fp16 engine: auto runs it, and says why not int8."""
    trt_build.build_engine(stack.root, options(precision="fp16", max_batch=8))
    backend, line = _open(stack.root, max_batch=8)
    assert (backend.name, backend.precision) == ("tensorrt", "fp16")
    assert line.startswith("backend: tensorrt (fp16, sm_87, max batch 8) engine model.fp16.sm_87.")
    assert (
        "skipped tensorrt int8: " in line and "no int8 TensorRT engine in the bundle (it has engines for: fp16)" in line
    )
    batch = np.random.default_rng(0).uniform(-1, 1, (3, 3, 120, 120)).astype(np.float32)
    reference, _ = _open(stack.root, "onnxruntime", precision="fp16")
    np.testing.assert_allclose(backend.embed(batch), reference.embed(batch), atol=1e-4)
    backend.close()


def test_auto_prefers_the_fastest_engine_and_skips_failed_parity(stack: Any) -> None:
    for precision in ("fp32", "fp16", "int8"):
        trt_build.build_engine(stack.root, options(precision=precision, max_batch=8))
    backend, line = _open(stack.root, max_batch=8)
    assert backend.precision == "int8" and "skipped" not in line
    backend.close()
    _fail_parity(stack.root, "int8")  # e.g. exported with --no-gate
    assert trusted_precisions(Bundle(stack.root)) == ["fp16", "fp32"] and engine_precision(Bundle(stack.root)) == "fp16"
    backend, _ = _open(stack.root, max_batch=8)
    assert backend.precision == "fp16"
    backend.close()


def test_auto_on_a_gpu_box_says_why_it_falls_back(stack: Any) -> None:
    trt_build.build_engine(stack.root, options(precision="fp16"))
    stack.cuda.capability, stack.cuda.name = (8, 9), b"NVIDIA L4"  # the bundle travelled to another GPU
    backend, line = _open(stack.root)
    assert backend.name == "onnxruntime" and backend.precision == "fp32"
    assert line.startswith("backend: onnxruntime (fp32, CPUExecutionProvider")
    assert "tensorrt int8: " in line and "tensorrt fp16: " in line and "built on sm_87 (Orin (fake))" in line
    assert "torch (cuda): " in line  # a GPU box tries PyTorch on the GPU before ONNX Runtime on the CPU


def test_auto_without_tensorrt(stack: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "tensorrt")
    monkeypatch.setattr("facemoe.runtime.device.import_tensorrt", lambda: None)
    _, line = _open(stack.root)
    assert "tensorrt: TensorRT is not installed" in line  # a GPU box: say it
    stack.cuda.driver_ok = False  # no GPU: TensorRT is not worth a word
    backend, line = _open(stack.root)
    assert line == f"backend: {backend.describe()}" and backend.precision == "fp32"


def test_explicit_tensorrt_reports_every_precision(stack: Any) -> None:
    with pytest.raises(EngineMismatchError) as info:
        open_backend(stack.root, "tensorrt")
    message = str(info.value)
    assert all(f"{p}: " in message for p in ("int8", "fp16", "fp32")) and "facemoe build-engine" in message


def test_explicit_torch_runs_on_the_cpu(stack: Any) -> None:
    pytest.importorskip("torch")
    if select._torch_cuda():
        pytest.skip("this machine has a CUDA GPU for torch")
    backend, line = _open(stack.root, "torch", max_batch=2)
    assert (backend.device, backend.precision) == ("cpu", "fp32") and line.startswith(
        "backend: torch (fp32, static routing, cpu"
    )
    reference, _ = _open(stack.root, "onnxruntime")
    batch = np.random.default_rng(1).uniform(-1, 1, (2, 3, 120, 120)).astype(np.float32)
    np.testing.assert_allclose(backend.embed(batch), reference.embed(batch), atol=1e-3)


def test_auto_skips_a_modified_engine(stack: Any) -> None:
    fp16 = trt_build.build_engine(stack.root, options("fp16"))
    trt_build.build_engine(stack.root, options("fp32"))
    fp16.path.write_bytes(fp16.path.read_bytes() + b" ")
    backend, line = _open(stack.root, max_batch=8)
    assert backend.precision == "fp32" and "tensorrt fp16: " in line and "does not match its sidecar" in line
    backend.close()
