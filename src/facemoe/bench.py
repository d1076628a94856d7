"""Throughput and latency of every backend x precision x batch size, with the same inputs and timer.

One row per (backend, precision, CUDA graphs, batch): warm-up calls, then timed ``Backend.embed`` calls
(host array in, host array out, so copies and synchronisation are inside the timing, as an application
sees them); latency p50/p95/p99, throughput in images/s, and peak memory of the kind the backend can
report: ``torch.cuda.max_memory_allocated`` for PyTorch on CUDA, the device memory an engine + context +
IO buffers took for TensorRT, and the process's peak RSS on the CPU (monotonic over the whole run).

Backends: ``torch`` (static routing; fp16 with fp32 islands or fp32), ``sparse`` (PyTorch fp32 with the
official code's sparse routing: the baseline every speed-up is quoted against), ``onnxruntime`` and
``tensorrt`` (the bundle's artifacts / engines). A backend that cannot run here gives a ``skipped`` row
with the reason instead of failing the sweep.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import importlib.util
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import facemoe
from facemoe.bundle import Bundle
from facemoe.errors import FaceMoEError
from facemoe.fileio import write_json_atomic
from facemoe.runtime.backends.base import Backend, BackendUnavailable

BACKENDS = ("torch", "sparse", "onnxruntime", "tensorrt")
BENCH_FORMAT = "facemoe-bench"
BENCH_SCHEMA_VERSION = 1


@dataclass
class BenchConfig:
    backends: Sequence[str] = ("torch", "sparse", "onnxruntime")
    precisions: Sequence[str] = ("fp16", "fp32")
    batch_sizes: Sequence[int] = (1, 8, 32)
    # The sparse baseline is slow at large batches; None: same as batch_sizes.
    sparse_batch_sizes: Sequence[int] | None = None
    cuda_graphs: Sequence[bool] = (True,)
    # torch rows: TorchInductor per block, and fp16 as GEMMs only ("gemm") or the whole network ("all").
    torch_compile: bool = False
    torch_half: str = "gemm"
    warmup: int = 3
    iterations: int = 20
    device: str = "auto"
    threads: int | None = None
    seed: int = 0

    def validate(self) -> None:
        unknown = set(self.backends) - set(BACKENDS)
        if unknown:
            raise FaceMoEError(f"unknown backend(s) {', '.join(sorted(unknown))}; choose from {', '.join(BACKENDS)}")
        bad = set(self.precisions) - {"fp32", "fp16", "int8"}
        if bad:
            raise FaceMoEError(f"unknown precision(s) {', '.join(sorted(bad))}; choose from fp32, fp16, int8")
        sizes = [*self.batch_sizes, *(self.sparse_batch_sizes or ())]
        if not self.batch_sizes or any(b < 1 for b in sizes):
            raise FaceMoEError(f"batch sizes must be positive, got {list(sizes)}")
        if self.torch_half not in ("gemm", "all"):
            raise FaceMoEError(f"torch fp16 mode {self.torch_half!r}: choose gemm or all")
        if self.iterations < 1 or self.warmup < 0:
            raise FaceMoEError("need at least 1 timed iteration and a non-negative warm-up")


@dataclass
class BenchRow:
    backend: str
    precision: str
    routing: str
    batch: int
    cuda_graphs: bool = False
    device: str = ""
    status: str = "ok"
    note: str = ""
    iterations: int = 0
    latency_ms: dict[str, float] = field(default_factory=dict)
    throughput_img_s: float | None = None
    peak_memory_bytes: int | None = None
    memory_kind: str = ""
    describe: str = ""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class BenchReport:
    rows: list[BenchRow]
    config: dict[str, Any]
    source: dict[str, Any]
    environment: dict[str, Any]
    created: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "format": BENCH_FORMAT,
            "schema_version": BENCH_SCHEMA_VERSION,
            "created": self.created,
            "source": self.source,
            "config": self.config,
            "environment": self.environment,
            "rows": [r.to_json() for r in self.rows],
        }

    def write_json(self, path: str | Path) -> None:
        write_json_atomic(path, self.to_json())

    def display_rows(self) -> list[BenchRow]:
        """Rows for tables: a configuration skipped at every batch size shows once, batches joined."""
        shown: list[BenchRow] = []
        for row in self.rows:
            last = shown[-1] if shown else None
            if (
                last is not None
                and row.status == last.status == "skipped"
                and (row.backend, row.precision, row.cuda_graphs, row.note)
                == (last.backend, last.precision, last.cuda_graphs, last.note)
            ):
                last.describe = f"{last.describe},{row.batch}"
                continue
            shown.append(dataclasses.replace(row, describe=str(row.batch)))
        return shown

    def markdown(self) -> str:
        env = self.environment
        lines = [
            f"FaceMoE bench, {self.created}: {self.source.get('description', '')}",
            "",
            f"Device: {env.get('gpu') or 'no GPU'}; CPU: {env.get('cpu_count')} cores; "
            f"torch {env.get('torch', '-')}, onnxruntime {env.get('onnxruntime', '-')}, "
            f"TensorRT {env.get('tensorrt') or '-'}; {self.config.get('iterations')} timed calls per row after "
            f"{self.config.get('warmup')} warm-up",
            "",
            "| backend | precision | routing | CUDA graphs | batch | p50 ms | p95 ms | p99 ms | img/s | peak memory "
            "| note |",
            "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in self.display_rows():
            lat = r.latency_ms
            note = r.note if r.status == "ok" else f"{r.status}: {r.note}"
            lines.append(
                f"| {r.backend} | {r.precision} | {r.routing} | {'on' if r.cuda_graphs else 'off'} | {r.describe} | "
                f"{_fmt(lat.get('p50'))} | {_fmt(lat.get('p95'))} | {_fmt(lat.get('p99'))} | "
                f"{_fmt(r.throughput_img_s, 1)} | {_bytes(r.peak_memory_bytes)} | {note} |"
            )
        return "\n".join(lines) + "\n"

    def print_table(self, console: Any = None) -> None:
        """A rich table (plain markdown when rich is not installed), on ``console`` or stdout."""
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            print(self.markdown())
            return
        table = Table(title=f"FaceMoE bench: {self.source.get('description', '')}")
        for column in ("backend", "precision", "routing", "graphs"):
            table.add_column(column)
        for column in ("batch", "p50 ms", "p95 ms", "p99 ms", "img/s", "peak mem"):
            table.add_column(column, justify="right")
        table.add_column("note")
        for r in self.display_rows():
            lat = r.latency_ms
            table.add_row(
                r.backend,
                r.precision,
                r.routing,
                "on" if r.cuda_graphs else "off",
                r.describe,
                _fmt(lat.get("p50")),
                _fmt(lat.get("p95")),
                _fmt(lat.get("p99")),
                _fmt(r.throughput_img_s, 1),
                _bytes(r.peak_memory_bytes),
                r.note if r.status == "ok" else f"[yellow]{r.status}[/]: {r.note}",
            )
        (console or Console()).print(table)


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _bytes(value: int | None) -> str:
    if value is None:
        return "-"
    return f"{value / 2**30:.2f} GiB" if value >= 2**30 else f"{value / 2**20:.0f} MiB"


def peak_rss_bytes() -> int | None:
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) * (1 if sys.platform == "darwin" else 1024)


def environment() -> dict[str, Any]:
    """Versions and devices, without importing torch unless it is installed."""
    from facemoe.runtime.engine_identity import detect_device

    device = detect_device()
    env: dict[str, Any] = {
        "facemoe": facemoe.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "numpy": np.__version__,
        "gpu": f"{device.gpu_name} ({device.compute_capability})" if device.has_gpu else None,
        "gpu_memory_bytes": device.total_memory_bytes,
        "tensorrt": device.tensorrt_version,
        "jetson": device.is_jetson,
    }
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime

        env["onnxruntime"] = onnxruntime.__version__
        env["onnxruntime_providers"] = onnxruntime.get_available_providers()
    if importlib.util.find_spec("torch") is not None:
        import torch

        env["torch"] = torch.__version__
        env["torch_cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            env["torch_gpu"] = torch.cuda.get_device_name()
    return env


def time_backend(backend: Backend, batch: np.ndarray, warmup: int, iterations: int) -> list[float]:
    """Seconds per ``embed`` call after ``warmup`` untimed calls."""
    for _ in range(warmup):
        backend.embed(batch)
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        backend.embed(batch)
        times.append(time.perf_counter() - start)
    return times


def _torch_device(requested: str) -> str:
    if requested != "auto":
        return requested
    if importlib.util.find_spec("torch") is None:
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class BenchSource:
    """What is benchmarked: an in-memory model (torch rows) and/or a bundle (ORT / TensorRT rows)."""

    description: str
    model: Any = None
    bundle: Bundle | None = None
    checkpoint: Path | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "description": self.description,
            "bundle": str(self.bundle.root) if self.bundle else None,
            "checkpoint": str(self.checkpoint) if self.checkpoint else None,
        }


@contextmanager
def prepare_source(
    *,
    bundle: str | Path | None = None,
    preset: str = "tiny",
    random_weights: bool = False,
    checkpoint: str | Path | None = None,
    need_bundle: bool = False,
    bundle_precisions: Sequence[str] = ("fp32",),
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> Iterator[BenchSource]:
    """Open ``bundle``, or build the model (``preset`` + random weights or ``checkpoint``) and, when the
    backends need one, export a temporary bundle from it (deleted afterwards)."""
    if bundle is not None:
        opened = Bundle(bundle)
        yield BenchSource(f"bundle {opened.root}", bundle=opened)
        return
    if not random_weights and checkpoint is None:
        raise FaceMoEError("give a bundle (--bundle), a checkpoint (--checkpoint) or --random-weights")
    from facemoe.model import build_model, load_checkpoint
    from facemoe.model.random_weights import randomize

    if checkpoint is not None:
        model = load_checkpoint(checkpoint, config="infer" if preset == "infer" else preset)
        description = f"{preset} preset, checkpoint {checkpoint}"
    else:
        log(f"building the {preset} model with random weights (seed {seed})")
        model = randomize(build_model(preset), seed=seed)
        description = f"{preset} preset, random weights (seed {seed})"
    if not need_bundle:
        yield BenchSource(description, model=model, checkpoint=Path(checkpoint) if checkpoint else None)
        return
    from facemoe.export.bundle_writer import export_bundle

    with tempfile.TemporaryDirectory(prefix="facemoe-bench-") as tmp:
        precisions = tuple(p for p in bundle_precisions if p in ("fp32", "fp16")) or ("fp32",)
        log(f"exporting a temporary bundle ({', '.join(precisions)}) for the ONNX Runtime / TensorRT rows")
        source_info: dict[str, Any] = (
            {"path": str(Path(checkpoint).resolve())}
            if checkpoint
            else {"random_weights": True, "preset": preset, "seed": seed}
        )
        result = export_bundle(
            model,
            Path(tmp) / "bundle",
            precisions=precisions,
            random_weights=checkpoint is None,
            source=source_info,
        )
        yield BenchSource(
            description,
            model=model,
            bundle=Bundle(result.path),
            checkpoint=Path(checkpoint) if checkpoint else None,
        )


def _open(name: str, precision: str, graphs: bool, max_batch: int, source: BenchSource, config: BenchConfig) -> Backend:
    """Open one backend configuration; BackendUnavailable / FaceMoEError when it cannot run here."""
    if name in ("torch", "sparse"):
        from facemoe.runtime.backends.torch_backend import TorchBackend, load_model_from_bundle

        device = _torch_device(config.device)
        routing = "sparse" if name == "sparse" else "static"
        if source.model is None:
            assert source.bundle is not None
            # Loaded once for every torch row; TorchBackend converts a copy.
            source.model = load_model_from_bundle(source.bundle, source.checkpoint)
        static = routing == "static"
        return TorchBackend(
            source.model,
            precision=precision,
            device=device,
            max_batch=max_batch,
            cuda_graphs=graphs,
            routing=routing,
            compile=config.torch_compile and static,
            half=config.torch_half,
        )
    if source.bundle is None:
        raise BackendUnavailable(f"{name} runs a bundle and none was given")
    if name == "onnxruntime":
        from facemoe.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend.from_bundle(source.bundle, precision, max_batch=max_batch, threads=config.threads)
    from facemoe.runtime.backends.tensorrt_backend import TensorRTBackend

    return TensorRTBackend.from_bundle(source.bundle, precision, max_batch, cuda_graphs=graphs)


def _plan(config: BenchConfig, source: BenchSource) -> list[tuple[str, str, bool, tuple[int, ...]]]:
    """(backend, precision, cuda graphs, batch sizes) to open, in order."""
    plan = []
    for name in config.backends:
        if name == "sparse":
            sizes = tuple(config.sparse_batch_sizes or config.batch_sizes)
            plan.append((name, "fp32", False, sizes))
            continue
        for precision in config.precisions:
            if name == "torch" and precision == "int8":
                continue
            if name == "onnxruntime" and source.bundle is not None and precision not in source.bundle.precisions:
                continue
            graph_modes = config.cuda_graphs if name in ("torch", "tensorrt") else (False,)
            for graphs in dict.fromkeys(graph_modes):
                plan.append((name, precision, graphs, tuple(config.batch_sizes)))
    return plan


def run_bench(config: BenchConfig, source: BenchSource, log: Callable[[str], None] = print) -> BenchReport:
    config.validate()
    rows: list[BenchRow] = []
    rng = np.random.default_rng(config.seed)
    size = int(source.model.config.img_size) if source.model is not None else 120
    if source.bundle is not None:
        size = int(source.bundle.manifest.preprocessing.get("input_size", size))
    for name, precision, graphs, sizes in _plan(config, source):
        routing = "sparse" if name == "sparse" else "static"
        try:
            backend = _open(name, precision, graphs, max(sizes), source, config)
        except FaceMoEError as exc:  # BackendUnavailable, EngineMismatchError, BundleError ...
            log(f"{name} {precision}: skipped ({exc})")
            rows.extend(BenchRow(name, precision, routing, b, graphs, status="skipped", note=str(exc)) for b in sizes)
            continue
        try:
            for batch_size in sizes:
                rows.append(_measure(backend, name, precision, routing, batch_size, config, rng, size, log))
        finally:
            backend.close()
            del backend
            _release_cuda_cache()
    return BenchReport(
        rows=rows,
        config={k: list(v) if isinstance(v, tuple | list) else v for k, v in dataclasses.asdict(config).items()},
        source=source.to_json(),
        environment=environment(),
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    )


def _release_cuda_cache() -> None:
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _measure(
    backend: Backend,
    name: str,
    precision: str,
    routing: str,
    batch_size: int,
    config: BenchConfig,
    rng: np.random.Generator,
    size: int,
    log: Callable[[str], None],
) -> BenchRow:
    graphs = bool(getattr(backend, "cuda_graphs", False))
    row = BenchRow(name, precision, routing, batch_size, graphs, device=backend.device, describe=backend.describe())
    batch = rng.uniform(-1.0, 1.0, (batch_size, 3, size, size)).astype(np.float32)
    reset = getattr(backend, "reset_peak_memory", None)
    if callable(reset):
        reset()
    try:
        times = time_backend(backend, batch, config.warmup, config.iterations)
    except (FaceMoEError, RuntimeError, MemoryError) as exc:  # e.g. CUDA out of memory at a large batch
        row.status, row.note = "error", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        log(f"{name} {precision} batch {batch_size}: {row.note}")
        return row
    ms = np.asarray(times) * 1000.0
    row.iterations = len(times)
    row.latency_ms = {
        "p50": float(np.percentile(ms, 50)),
        "p95": float(np.percentile(ms, 95)),
        "p99": float(np.percentile(ms, 99)),
        "mean": float(ms.mean()),
        "min": float(ms.min()),
    }
    row.throughput_img_s = batch_size / (row.latency_ms["p50"] / 1000.0)
    stats_fn = getattr(backend, "memory_stats", None)
    stats = stats_fn() if callable(stats_fn) else {}
    if stats.get("peak_device_memory_bytes") is not None:
        row.peak_memory_bytes, row.memory_kind = int(stats["peak_device_memory_bytes"]), str(stats.get("kind", ""))
    else:
        row.peak_memory_bytes, row.memory_kind = peak_rss_bytes(), "process peak RSS (whole process, monotonic)"
    options = ["compiled"] if getattr(backend, "compiled", False) else []
    if getattr(backend, "half", "") == "all":
        options.append("whole network fp16")
    note = getattr(backend, "cuda_graph_error", None)
    row.note = "; ".join([*options, *([str(note)] if note else [])])
    log(
        f"{name:<11} {precision} {'graphs' if graphs else 'eager '} batch {batch_size:>4}: "
        f"p50 {row.latency_ms['p50']:.2f} ms, {row.throughput_img_s:.1f} img/s"
    )
    return row


__all__ = [
    "BACKENDS",
    "BenchConfig",
    "BenchReport",
    "BenchRow",
    "BenchSource",
    "environment",
    "peak_rss_bytes",
    "prepare_source",
    "run_bench",
    "time_backend",
]
