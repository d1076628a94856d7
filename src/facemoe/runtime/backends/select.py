"""Back-end and precision policy, in one place (docs/TENSORRT.md, "Which back end runs").

Precisions are tried fastest first (int8, fp16, fp32), and only those whose ONNX artifact passed its parity
gate at export. ``auto``:

1. TensorRT, at the first such precision that has an engine usable on this GPU with this TensorRT;
2. on a GPU box without a usable engine: ONNX Runtime when it has a CUDA provider, else PyTorch on the GPU;
3. else ONNX Runtime (fp32: its CPU fp16 kernels are slow), then PyTorch on the CPU.

Whatever it picks, it says so on one line (``Backend.selection``, which ``facemoe-run`` prints, or the
``report`` callback), with the reason each better option was skipped (engine missing, built elsewhere,
TensorRT absent, ...): a GPU box never falls to ONNX Runtime fp32 without a word. An
explicit ``--backend`` runs that back end or fails with its reason; ``torch`` runs on the CPU when there
is no CUDA GPU (fp32).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

from facemoe.bundle import Bundle
from facemoe.errors import FaceMoEError
from facemoe.runtime.backends.base import Backend, BackendUnavailable

# "triton" (a remote Triton Inference Server, runtime/backends/triton_backend.py) only when asked for: auto
# never sends faces off the box.
BACKEND_NAMES = ("auto", "tensorrt", "onnxruntime", "torch", "triton")
PRECISION_ORDER = ("int8", "fp16", "fp32")  # fastest first

Report = Callable[[str], None]


def available_backends() -> list[str]:
    """Backends whose libraries are importable here (a GPU is checked when a backend is opened)."""
    names = []
    # find_spec alone is fooled by the tensorrt-stubs package (an importable, empty "tensorrt").
    from facemoe.runtime import device as probe

    if probe.import_tensorrt() is not None:
        names.append("tensorrt")
    if importlib.util.find_spec("onnxruntime") is not None:
        names.append("onnxruntime")
    if importlib.util.find_spec("torch") is not None:
        names.append("torch")
    return names


def passed_parity(bundle: Bundle, precision: str) -> bool:
    """The bundle has this ONNX and it did not fail its parity gate (bundles exported with --no-gate may)."""
    artifact = bundle.manifest.artifacts.get(precision)
    return artifact is not None and artifact.parity.get("passed", True) is not False


def trusted_precisions(bundle: Bundle) -> list[str]:
    """The bundle's precisions that passed parity, fastest first."""
    return [p for p in PRECISION_ORDER if passed_parity(bundle, p)]


def engine_precision(bundle: Bundle) -> str:
    """The precision to build a TensorRT engine for by default: the fastest that passed parity."""
    trusted = trusted_precisions(bundle)
    if not trusted:
        raise FaceMoEError(f"{bundle.root}: no ONNX artifact passed its parity gate; re-export the bundle")
    return trusted[0]


def _has_gpu() -> bool:
    from facemoe.runtime.device import detect_device

    return detect_device().has_gpu


def _ort_has_cuda() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


def _torch_cuda() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def _open_tensorrt(
    bundle: Bundle, precision: str | None, max_batch: int, skipped: list[str], options: dict[str, Any]
) -> Backend:
    """TensorRT at ``precision``, or at the fastest trusted precision with a usable engine.

    Engine problems (missing, built elsewhere, stale, modified) move on to the next precision and end in one
    ``EngineUnavailable`` listing them all; a missing library or GPU ends the attempt at once.
    """
    try:
        from facemoe.runtime.backends.tensorrt_backend import TensorRTBackend
    except ImportError as exc:
        raise BackendUnavailable(f"TensorRT backend unavailable: {exc}") from exc
    from facemoe.errors import EngineMismatchError
    from facemoe.runtime.engine_identity import EngineUnavailable

    candidates = [precision] if precision else trusted_precisions(bundle)
    reasons: list[str] = []
    for candidate in candidates:
        try:
            backend = TensorRTBackend.from_bundle(bundle, candidate, max_batch, **options)
        except EngineMismatchError as exc:  # also a modified engine file, or one TensorRT would not load
            reasons.append(f"tensorrt {candidate}: {exc}")
            continue
        skipped.extend(reasons)
        if backend.note:
            skipped.append(backend.note)
        return backend
    if not reasons:
        raise EngineUnavailable(f"{bundle.root}: no ONNX artifact passed its parity gate")
    raise EngineUnavailable(" | ".join(reasons))


def _open_one(
    name: str,
    bundle: Bundle,
    precision: str | None,
    max_batch: int,
    threads: int | None,
    skipped: list[str],
    device: str | None = None,
    options: dict[str, Any] | None = None,
) -> Backend:
    options = options or {}
    if name == "tensorrt":
        return _open_tensorrt(bundle, precision, max_batch, skipped, {"device": device, **options})
    if name == "onnxruntime":
        from facemoe.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend.from_bundle(
            bundle, precision or "fp32", max_batch, device=device, threads=threads, **options
        )
    if name == "torch":
        try:
            from facemoe.runtime.backends.torch_backend import TorchBackend
        except ImportError as exc:
            raise BackendUnavailable(f"PyTorch backend unavailable: {exc}") from exc
        device = device or ("cuda" if _torch_cuda() else "cpu")
        default = "fp16" if device.startswith("cuda") else "fp32"
        return TorchBackend.from_bundle(
            bundle, precision or default, max_batch, device=device, threads=threads, **options
        )
    if name == "triton":
        from facemoe.runtime.backends.triton_backend import TritonBackend

        return TritonBackend.from_bundle(bundle, precision, max_batch, device=device, threads=threads, **options)
    raise FaceMoEError(f"unknown backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")


def _auto_order(gpu: bool) -> list[tuple[str, str | None]]:
    """(backend, torch device) in the order ``auto`` tries them."""
    if not gpu:
        return [("tensorrt", None), ("onnxruntime", None), ("torch", "cpu")]
    if _ort_has_cuda():
        return [("tensorrt", None), ("onnxruntime", None), ("torch", "cuda")]
    return [("tensorrt", None), ("torch", "cuda"), ("onnxruntime", None), ("torch", "cpu")]


def _chosen(backend: Backend, skipped: list[str], report: Report | None) -> Backend:
    """Record (and report) the one-line account of the choice on the backend."""
    text = f"backend: {backend.describe()}"
    engine = getattr(backend, "engine_path", None)
    if engine is not None:
        text += f" engine {engine.name}"
    backend.selection = text + (f"; skipped {' | '.join(skipped)}" if skipped else "")
    if report is not None:
        report(backend.selection)
    return backend


def open_backend(
    bundle: Bundle | str,
    backend: str = "auto",
    precision: str | None = None,
    max_batch: int = 32,
    threads: int | None = None,
    report: Report | None = None,
    *,
    device: str | None = None,
    **options: Any,
) -> Backend:
    """Open ``backend`` for ``bundle`` by the policy above; ``report`` gets the one-line choice and reasons.

    ``device`` (``cpu``, ``cuda``, ``cuda:N``) and ``options`` go to the backend's ``from_bundle``
    (runtime/backends/base.py): e.g. ``cuda_graphs``; torch ``routing``, ``compile``, ``half``; TensorRT
    ``plugin_libraries``. With ``auto`` a ``device`` given applies to every backend tried. Building a missing
    TensorRT engine first is ``facemoe.deploy.prepare_backend``'s job (the runtime never builds one).
    """
    if not isinstance(bundle, Bundle):
        bundle = Bundle(bundle)
    if backend not in BACKEND_NAMES:
        raise FaceMoEError(f"unknown backend {backend!r}; choose one of {', '.join(BACKEND_NAMES)}")
    if precision is not None and precision not in PRECISION_ORDER:
        raise FaceMoEError(f"unknown precision {precision!r}; choose {', '.join(PRECISION_ORDER)}")
    skipped: list[str] = []
    if backend != "auto":
        opened = _open_one(backend, bundle, precision, max_batch, threads, skipped, device, options)
        return _chosen(opened, skipped, report)
    names = available_backends()
    gpu = _has_gpu()
    for name, auto_device in _auto_order(gpu):
        if name not in names:
            if name == "tensorrt" and gpu:
                skipped.append("tensorrt: TensorRT is not installed")
            continue
        try:
            opened = _open_one(name, bundle, precision, max_batch, threads, skipped, device or auto_device, options)
        except BackendUnavailable as exc:
            # _open_tensorrt's message already names each precision it tried
            skipped.append(
                str(exc)
                if str(exc).startswith("tensorrt ")
                else f"{name}{f' ({auto_device})' if auto_device else ''}: {exc}"
            )
            continue
        return _chosen(opened, skipped, report)
    raise BackendUnavailable("no backend can run this bundle here (" + " | ".join(skipped) + ")")


__all__ = [
    "BACKEND_NAMES",
    "PRECISION_ORDER",
    "available_backends",
    "engine_precision",
    "open_backend",
    "passed_parity",
    "trusted_precisions",
]
