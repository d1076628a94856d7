"""Backend selection: ``auto`` picks TensorRT, then ONNX Runtime, then PyTorch, whichever can run."""

from __future__ import annotations

import importlib.util

from facemoe.bundle import Bundle
from facemoe.errors import FaceMoEError
from facemoe.runtime.backends.base import Backend, BackendUnavailable

BACKEND_NAMES = ("auto", "tensorrt", "onnxruntime", "torch")


def available_backends() -> list[str]:
    """Backends whose libraries are importable here (a GPU is checked when a backend is opened)."""
    names = []
    # find_spec alone is fooled by the tensorrt-stubs package (an importable, empty "tensorrt").
    from facemoe.runtime.engine_identity import import_tensorrt

    if import_tensorrt() is not None:
        names.append("tensorrt")
    if importlib.util.find_spec("onnxruntime") is not None:
        names.append("onnxruntime")
    if importlib.util.find_spec("torch") is not None:
        names.append("torch")
    return names


def _default_precision(bundle: Bundle, backend: str) -> str:
    # On a GPU the fastest artifact that passed parity; on the CPU fp32 (ORT's CPU fp16 kernels are slow).
    if backend == "tensorrt":
        for precision in ("int8", "fp16", "fp32"):
            if precision in bundle.precisions:
                return precision
    return "fp32"


def _open_one(name: str, bundle: Bundle, precision: str | None, max_batch: int, threads: int | None) -> Backend:
    if name == "tensorrt":
        try:
            from facemoe.runtime.backends.tensorrt_backend import TensorRTBackend
        except ImportError as exc:
            raise BackendUnavailable(f"TensorRT backend unavailable: {exc}") from exc
        return TensorRTBackend.from_bundle(bundle, precision or _default_precision(bundle, name), max_batch)
    if name == "onnxruntime":
        from facemoe.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend.from_bundle(
            bundle, precision or _default_precision(bundle, name), max_batch=max_batch, threads=threads
        )
    if name == "torch":
        try:
            from facemoe.runtime.backends.torch_backend import TorchBackend
        except ImportError as exc:
            raise BackendUnavailable(f"PyTorch backend unavailable: {exc}") from exc
        return TorchBackend.from_bundle(bundle, precision or "fp16", max_batch)
    raise FaceMoEError(f"unknown backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")


def open_backend(
    bundle: Bundle | str,
    backend: str = "auto",
    precision: str | None = None,
    max_batch: int = 32,
    threads: int | None = None,
) -> Backend:
    """Open ``backend`` for ``bundle``; with ``auto`` the first that works, in TensorRT > ORT > torch order."""
    if not isinstance(bundle, Bundle):
        bundle = Bundle(bundle)
    if backend != "auto":
        return _open_one(backend, bundle, precision, max_batch, threads)
    reasons = []
    for name in ("tensorrt", "onnxruntime", "torch"):
        if name not in available_backends():
            continue
        try:
            return _open_one(name, bundle, precision, max_batch, threads)
        except BackendUnavailable as exc:
            reasons.append(f"{name}: {exc}")
    raise BackendUnavailable("no backend can run this bundle here (" + "; ".join(reasons) + ")")
