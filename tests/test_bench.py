"""``facemoe bench`` on the tiny preset: the sweep runs, skips what cannot run here, writes valid JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from facemoe.bench import BACKENDS, BenchConfig, BenchReport, BenchRow, time_backend
from facemoe.bench.sweep import _measure
from facemoe.cli.bench_cmd import BENCH_BACKENDS, app
from facemoe.errors import FaceMoEError
from facemoe.runtime.backends.base import Backend
from facemoe.runtime.engine_identity import import_tensorrt

runner = CliRunner()


def invoke(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


def ok_rows(data: dict) -> list[dict]:
    return [r for r in data["rows"] if r["status"] == "ok"]


def check_row(row: dict) -> None:
    lat = row["latency_ms"]
    assert 0 < lat["min"] <= lat["p50"] <= lat["p95"] <= lat["p99"]
    assert row["throughput_img_s"] == pytest.approx(row["batch"] / lat["p50"] * 1000)
    assert row["iterations"] == 2
    assert row["peak_memory_bytes"] and row["memory_kind"]


def test_bench_tiny_random_weights_torch_rows(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    out_json, out_md = tmp_path / "bench.json", tmp_path / "bench.md"
    code, output = invoke(
        "--random-weights",
        "--preset",
        "tiny",
        "--backend",
        "torch,sparse",
        "--precision",
        "fp16,fp32",
        "--batch",
        "1,2",
        "--sparse-batch",
        "2",
        "--device",
        "cpu",
        "--warmup",
        "1",
        "--iterations",
        "2",
        "--json",
        str(out_json),
        "--markdown",
        str(out_md),
    )
    assert code == 0, output
    data = json.loads(out_json.read_text())
    assert data["format"] == "facemoe-bench" and data["schema_version"] == 1
    assert data["config"]["batch_sizes"] == [1, 2] and data["config"]["iterations"] == 2
    assert "tiny preset, random weights" in data["source"]["description"]
    assert {"python", "numpy", "cpu_count"} <= set(data["environment"])
    rows = {(r["backend"], r["precision"], r["batch"]): r for r in data["rows"]}
    assert set(rows) == {
        ("torch", "fp16", 1),
        ("torch", "fp16", 2),
        ("torch", "fp32", 1),
        ("torch", "fp32", 2),
        ("sparse", "fp32", 2),
    }
    assert rows[("torch", "fp16", 1)]["status"] == "skipped"
    assert "fp16 needs a CUDA GPU" in rows[("torch", "fp16", 1)]["note"]
    assert rows[("sparse", "fp32", 2)]["routing"] == "sparse"
    for row in ok_rows(data):
        check_row(row)
    assert len(ok_rows(data)) == 3
    markdown = out_md.read_text()
    assert "| torch | fp16 | static | on | 1,2 |" in markdown  # the skipped configuration shows once
    assert "| sparse | fp32 | sparse | off | 2 |" in markdown


def test_bench_bundle_onnxruntime_and_unavailable_tensorrt(tiny_bundle: Path, tmp_path: Path) -> None:
    out_json = tmp_path / "bench.json"
    code, output = invoke(
        "--bundle",
        str(tiny_bundle),
        "--backend",
        "onnxruntime,tensorrt",
        "--precision",
        "fp32,fp16",
        "--batch",
        "1,3",
        "--warmup",
        "1",
        "--iterations",
        "2",
        "--threads",
        "1",
        "--json",
        str(out_json),
    )
    assert code == 0, output
    data = json.loads(out_json.read_text())
    ort = [r for r in data["rows"] if r["backend"] == "onnxruntime"]
    assert {(r["precision"], r["batch"]) for r in ort} == {("fp32", 1), ("fp32", 3), ("fp16", 1), ("fp16", 3)}
    for row in ort:
        assert row["status"] == "ok"
        check_row(row)
        assert row["memory_kind"].startswith("process peak RSS")
    trt = [r for r in data["rows"] if r["backend"] == "tensorrt"]
    assert len(trt) == 4
    # The tiny bundle has no engine, so TensorRT cannot run it anywhere: skipped, with the reason.
    assert all(r["status"] == "skipped" and r["note"] for r in trt)
    if import_tensorrt() is None:
        assert all("TensorRT is not installed" in r["note"] for r in trt)


def test_bench_cli_errors(tmp_path: Path) -> None:
    code, output = invoke("--backend", "torch", "--batch", "1,x")
    assert code == 2 and "expected comma-separated integers" in output
    code, output = invoke("--backend", "torch")
    assert code == 2 and "--random-weights" in output
    code, output = invoke("--backend", "cuda-magic", "--random-weights")
    assert code == 2 and "unknown backend" in output
    code, output = invoke("--random-weights", "--cuda-graphs", "maybe")
    assert code == 2 and "'maybe' is not one of 'on', 'off', 'both'" in output


def test_cli_backend_names_match_the_sweep() -> None:
    # The command checks names before importing the sweep; both lists must agree.
    assert BENCH_BACKENDS == BACKENDS


def test_config_validation() -> None:
    with pytest.raises(FaceMoEError, match="positive"):
        BenchConfig(batch_sizes=(0,)).validate()
    with pytest.raises(FaceMoEError, match="precision"):
        BenchConfig(precisions=("fp8",)).validate()
    with pytest.raises(FaceMoEError, match="iteration"):
        BenchConfig(iterations=0).validate()


class CountingBackend(Backend):
    name = "counting"

    @classmethod
    def from_bundle(cls, bundle, precision="fp32", max_batch=32, *, device=None, threads=None):  # type: ignore[no-untyped-def]
        return cls()

    def __init__(self) -> None:
        self.calls = 0

    def _embed_batch(self, batch: np.ndarray) -> np.ndarray:
        self.calls += 1
        return np.zeros((len(batch), 4), np.float32)

    @property
    def embedding_size(self) -> int:
        return 4


def test_time_backend_warms_up_then_times() -> None:
    backend = CountingBackend()
    times = time_backend(backend, np.zeros((2, 3, 8, 8), np.float32), warmup=3, iterations=5)
    assert backend.calls == 8 and len(times) == 5 and all(t >= 0 for t in times)


class DeviceBackend(CountingBackend):
    """Reports device memory and a run-time note, as the GPU backends do."""

    device = "cuda:0"

    def __init__(self) -> None:
        super().__init__()
        self.resets = 0

    def reset_peak_memory(self) -> None:
        self.resets += 1

    def memory_stats(self) -> dict:
        return {**super().memory_stats(), "peak_device_memory_bytes": 12345, "kind": "device peak"}

    def notes(self) -> list[str]:
        return ["compiled", *super().notes()]


def test_rows_take_memory_and_notes_from_the_backend_interface() -> None:
    config = BenchConfig(warmup=1, iterations=2)
    rng = np.random.default_rng(0)
    device = DeviceBackend()
    assert device.use_cuda_graphs(True) and device.cuda_graphs
    device.cuda_graph_error = "capture failed, running without CUDA graphs: x"
    row = _measure(device, "tensorrt", "fp16", "static", 2, config, rng, 8, log=lambda _: None)
    assert (row.peak_memory_bytes, row.memory_kind, row.cuda_graphs) == (12345, "device peak", True)
    assert row.note == "compiled; capture failed, running without CUDA graphs: x" and device.resets == 1
    with CountingBackend() as host:
        assert not host.use_cuda_graphs(True)  # a CPU backend has no CUDA graphs
        row = _measure(host, "onnxruntime", "fp32", "static", 2, config, rng, 8, log=lambda _: None)
    assert row.memory_kind.startswith("process peak RSS") and row.peak_memory_bytes and row.note == ""
    with pytest.raises(FaceMoEError, match="counting backend was closed"):
        host.embed(np.zeros((1, 3, 8, 8), np.float32))


def test_report_collapses_only_identical_skips() -> None:
    rows = [
        BenchRow("tensorrt", "fp16", "static", 1, True, status="skipped", note="no TensorRT"),
        BenchRow("tensorrt", "fp16", "static", 8, True, status="skipped", note="no TensorRT"),
        BenchRow("tensorrt", "fp32", "static", 1, True, status="skipped", note="no TensorRT"),
        BenchRow("torch", "fp32", "static", 1, status="error", note="OOM"),
        BenchRow("torch", "fp32", "static", 8, status="error", note="OOM"),
    ]
    report = BenchReport(rows, {}, {"description": "x"}, {})
    assert [r.describe for r in report.display_rows()] == ["1,8", "1", "1", "8"]
    assert report.rows[0].describe == ""  # display rows are copies
