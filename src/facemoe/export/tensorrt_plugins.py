"""Which plugins a TensorRT build needs, and how they are provided: compiled libraries or the Python plugin.

A ``--gating plugin`` graph holds custom ``facemoe::SparseMoE`` nodes that only a plugin implements: either
compiled libraries (``--plugin lib.so``, or ``plugins/*.so`` shipped in the bundle), loaded into TensorRT's
registry and recorded by hash in the engine identity, or, without any, the Python plugin of
:mod:`facemoe.export.trt_plugin` in its AOT or JIT form (docs/TENSORRT.md, "Python plugin").
"""

from __future__ import annotations

import ctypes
import importlib.util
from collections.abc import Sequence
from pathlib import Path

from facemoe.bundle import Bundle
from facemoe.errors import FaceMoEError
from facemoe.runtime.engine_identity import plugin_hashes

CUSTOM_OP_DOMAIN = "facemoe"
# Plugin libraries already registered in this process (registering one twice duplicates its creators).
_LOADED_PLUGINS: dict[str, str] = {}


def load_plugin_libraries(paths: Sequence[str | Path]) -> dict[str, str]:
    """Register plugin libraries with TensorRT's global registry; returns name -> sha256 of each."""
    if not paths:
        return {}
    from facemoe.export.tensorrt import require_tensorrt

    trt = require_tensorrt()

    hashes = plugin_hashes([Path(p) for p in paths])
    registry = trt.get_plugin_registry()
    for path in paths:
        resolved = str(Path(path).resolve())
        if resolved in _LOADED_PLUGINS:
            continue
        try:
            if hasattr(registry, "load_library"):
                handle = registry.load_library(resolved)
                if handle is None:
                    raise OSError("TensorRT's plugin registry refused it (see the TensorRT log above)")
            else:  # TensorRT before 10 registers creators from the library's static initialisers
                ctypes.CDLL(resolved, mode=ctypes.RTLD_GLOBAL)
        except OSError as exc:
            raise FaceMoEError(f"{path}: cannot load TensorRT plugin library: {exc}") from exc
        _LOADED_PLUGINS[resolved] = hashes[Path(path).name]
    return hashes


def bundle_plugin_libraries(bundle: Bundle) -> list[Path]:
    """Plugin libraries shipped inside the bundle (``plugins/*.so``), used when none are given."""
    folder = bundle.root / "plugins"
    return sorted(folder.glob("*.so")) if folder.is_dir() else []


def needs_plugins(bundle: Bundle, precision: str) -> bool:
    """Whether the artifact holds custom gating nodes (domain ``facemoe``) that only a plugin implements."""
    art = bundle.manifest.artifacts.get(precision)
    gating = (art.gating if art else "onnx") or "onnx"
    return gating != "onnx" or bundle.manifest.routing.get("gating", "onnx") not in ("onnx", None)


def python_plugin_mode(onnx_path: Path, requested: str, tensorrt_version: str) -> str:
    """Register facemoe::SparseMoE through TensorRT's Python plugin API; returns "aot" or "jit".

    Used for graphs with custom gating nodes when no compiled plugin library is given. The engine built
    with the AOT implementation embeds its kernel and runs without Python; the JIT one calls back into
    torch and triton at run time (docs/TENSORRT.md, "Python plugin").
    """
    from facemoe.export import trt_plugin

    mode = trt_plugin.default_mode() if requested == "auto" else requested
    if mode is None or not trt_plugin.available(aot=mode == "aot"):
        need = "10.9 for the AOT implementation" if mode == "aot" else "10.6"
        raise FaceMoEError(
            f"{onnx_path}: the graph has custom gating nodes (domain {CUSTOM_OP_DOMAIN!r}); TensorRT "
            f"{tensorrt_version} cannot host their Python plugin (it needs TensorRT {need}). Pass --plugin "
            "path/to/library.so, or re-export with --gating onnx"
        )
    missing = [name for name in ("torch", "triton") if importlib.util.find_spec(name) is None]
    if missing:
        raise FaceMoEError(
            f"{onnx_path}: building the {mode.upper()} facemoe::SparseMoE plugin needs {' and '.join(missing)} "
            "(pip install 'facemoe-edge[export]'), or re-export with --gating onnx"
        )
    registered = trt_plugin.register(aot=mode == "aot")
    if mode not in registered:
        raise FaceMoEError(f"the {mode.upper()} implementation of {trt_plugin.PLUGIN_ID} could not be registered")
    return mode


__all__ = [
    "CUSTOM_OP_DOMAIN",
    "bundle_plugin_libraries",
    "load_plugin_libraries",
    "needs_plugins",
    "python_plugin_mode",
]
