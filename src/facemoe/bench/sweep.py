"""The sweep: every backend x precision x batch size, with the same inputs and timer.

One row per (backend, precision, CUDA graphs, batch): warm-up calls, then timed ``Backend.embed`` calls
(host array in, host array out, so copies and synchronisation are inside the timing, as an application
sees them); latency p50/p95/p99, throughput in images/s, and the peak memory the backend reports
(``Backend.memory_stats``): device memory where it can tell, else the process's peak RSS.

Bundle rows (``onnxruntime``, ``tensorrt``) are opened by ``open_backend``, as ``facemoe-run`` opens them.
Torch rows (``torch``: static routing, fp16 with fp32 islands or fp32; ``sparse``: PyTorch fp32 with the
official code's sparse routing, the baseline every speed-up is quoted against) run the source's model,
loaded once. A backend that cannot run here gives a ``skipped`` row with the reason.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import importlib.util
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

import facemoe
from facemoe.bench.report import BenchReport, BenchRow
from facemoe.bench.source import BenchSource
from facemoe.errors import FaceMoEError
from facemoe.runtime.backends.base import HOST_PEAK_KIND, Backend, BackendUnavailable

BACKENDS = ("torch", "sparse", "onnxruntime", "tensorrt")


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


def _open(name: str, precision: str, graphs: bool, max_batch: int, source: BenchSource, config: BenchConfig) -> Backend:
    """Open one backend configuration; BackendUnavailable / FaceMoEError when it cannot run here."""
    if name in ("torch", "sparse"):
        from facemoe.runtime.backends.torch_backend import TorchBackend

        if source.model is None:
            from facemoe.model.inference import load_reference_model

            assert source.bundle is not None
            # Loaded once for every torch row; TorchBackend converts a copy.
            source.model = load_reference_model(source.bundle, source.checkpoint)
        static = name == "torch"
        note = ""
        if static and source.bundle is not None:
            # A stored compiled package of the bundle runs as facemoe-run would run it (docs/COMPILED.md).
            from facemoe.runtime.torch_package import KIND, PackageUnavailable, probe, select_package

            device = _torch_device(config.device)
            try:
                here = probe(device, source.bundle, precision, config.torch_half, max_batch)
                path, identity = select_package(source.bundle, here)
                return TorchBackend._from_package(source.bundle, path, identity, device, max_batch, graphs)
            except PackageUnavailable as exc:
                if any(e.get("kind") == KIND for e in source.bundle.manifest.engines):
                    note = f"stored package not used ({exc})"
        backend = TorchBackend(
            source.model,
            precision=precision,
            device=_torch_device(config.device),
            max_batch=max_batch,
            cuda_graphs=graphs,
            routing="static" if static else "sparse",
            compile=config.torch_compile and static,
            half=config.torch_half,
        )
        backend.package_note = note
        return backend
    if source.bundle is None:
        raise BackendUnavailable(f"{name} runs a bundle and none was given")
    from facemoe.runtime.backends.select import open_backend

    backend = open_backend(source.bundle, name, precision, max_batch, config.threads)
    backend.use_cuda_graphs(graphs)
    return backend


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
        with backend:  # closing releases its sessions, graphs and device memory before the next row
            for batch_size in sizes:
                rows.append(_measure(backend, name, precision, routing, batch_size, config, rng, size, log))
        del backend
    return BenchReport(
        rows=rows,
        config={k: list(v) if isinstance(v, tuple | list) else v for k, v in dataclasses.asdict(config).items()},
        source=source.to_json(),
        environment=environment(),
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    )


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
    graphs = backend.cuda_graphs
    row = BenchRow(name, precision, routing, batch_size, graphs, device=backend.device, describe=backend.describe())
    batch = rng.uniform(-1.0, 1.0, (batch_size, 3, size, size)).astype(np.float32)
    backend.reset_peak_memory()
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
    stats = backend.memory_stats()
    if stats.get("peak_device_memory_bytes") is not None:
        row.peak_memory_bytes, row.memory_kind = int(stats["peak_device_memory_bytes"]), str(stats.get("kind", ""))
    else:
        row.peak_memory_bytes, row.memory_kind = stats.get("peak_host_rss_bytes"), HOST_PEAK_KIND
    row.note = "; ".join(backend.notes())
    log(
        f"{name:<11} {precision} {'graphs' if graphs else 'eager '} batch {batch_size:>4}: "
        f"p50 {row.latency_ms['p50']:.2f} ms, {row.throughput_img_s:.1f} img/s"
    )
    return row


__all__ = ["BACKENDS", "BenchConfig", "environment", "run_bench", "time_backend"]
