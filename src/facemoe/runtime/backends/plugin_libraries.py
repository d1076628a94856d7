"""Compiled TensorRT plugin libraries: loading them into TensorRT's registry, and the ones a bundle ships.

A ``--gating plugin`` graph holds custom ``facemoe::SparseMoE`` nodes that only a plugin implements. When
that plugin is a compiled library (``--plugin lib.so``, or ``plugins/*.so`` shipped in the bundle), both the
engine builder and the TensorRT backend register it before TensorRT parses a graph or deserialises an
engine, and the engine identity records it by hash (docs/TENSORRT.md, "Python plugin" for the other way).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from pathlib import Path

from facemoe.bundle import Bundle
from facemoe.errors import FaceMoEError
from facemoe.runtime.device import import_tensorrt
from facemoe.runtime.engine_identity import plugin_hashes

# Plugin libraries already registered in this process (registering one twice duplicates its creators).
_LOADED_PLUGINS: dict[str, str] = {}


def load_plugin_libraries(paths: Sequence[str | Path]) -> dict[str, str]:
    """Register plugin libraries with TensorRT's global registry; returns name -> sha256 of each."""
    if not paths:
        return {}
    trt = import_tensorrt()
    if trt is None:
        raise FaceMoEError(f"{paths[0]}: cannot load a TensorRT plugin library: TensorRT is not installed")

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


__all__ = ["bundle_plugin_libraries", "load_plugin_libraries"]
