"""Optional dependencies: which extra provides a module, and one clear line when it is missing.

A plain ``pip install facemoe-edge`` is the runtime (ONNX Runtime, OpenCV, numpy). Commands that need more
(exporting and parity need PyTorch) say which extra to install instead of showing an import traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from facemoe.errors import FaceMoEError

DIST = "facemoe-edge"

# Top-level module -> (what to call it, the extra of pyproject.toml that installs it).
EXTRAS: dict[str, tuple[str, str]] = {
    "torch": ("PyTorch", "export"),
    "onnxslim": ("onnxslim", "export"),
    "matplotlib": ("matplotlib", "export"),
    "huggingface_hub": ("huggingface_hub", "export"),
    "onnxruntime_extensions": ("onnxruntime-extensions", "plugin"),
    "cuda": ("cuda-python", "trt"),
    "triton": ("Triton", "dev"),
}


class MissingExtra(FaceMoEError):
    """A command needs an optional dependency that is not installed."""


def install_hint(module: str) -> str | None:
    """``needs PyTorch: pip install 'facemoe-edge[export]'`` for a module an extra provides, else None."""
    known = EXTRAS.get(module.split(".")[0])
    if known is None:
        return None
    what, extra = known
    return f"needs {what}: pip install '{DIST}[{extra}]'"


def require(module: str, command: str) -> ModuleType:
    """Import ``module`` for ``command`` or raise :class:`MissingExtra` naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        hint = install_hint(module)
        if hint is None:
            raise
        # A torch that is installed but broken (missing CUDA libraries, ...) says why in the same line.
        missing = isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] == module.split(".")[0]
        detail = "" if missing else f" ({module} failed to import: {exc})"
        raise MissingExtra(f"{command} {hint}{detail}") from None


def require_torch(command: str) -> ModuleType:
    """PyTorch, or one line saying that ``command`` needs the export extra."""
    return require("torch", command)


def missing_extra_message(exc: ImportError, command: str = "this command") -> str | None:
    """The one-line message for an ImportError of an optional dependency, None for anything else."""
    name = getattr(exc, "name", None)
    if not isinstance(exc, ModuleNotFoundError) or not name:
        return None
    hint = install_hint(name)
    return f"{command} {hint}" if hint is not None else None


def import_tensorrt() -> ModuleType | None:
    """The real ``tensorrt`` module, or None: the one answer to "is TensorRT installed here".

    ``tensorrt-stubs`` installs a bare ``tensorrt/`` folder of .pyi files, which Python imports as an empty
    namespace package: a module without ``Builder`` is not TensorRT.
    """
    try:
        module = importlib.import_module("tensorrt")
    except Exception:  # not installed, or a broken install (missing libnvinfer: OSError from the bindings)
        return None
    return module if hasattr(module, "Builder") and hasattr(module, "Runtime") else None
