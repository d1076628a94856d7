"""Which plugins a TensorRT build needs, and where the code that provides them lives.

A ``--gating plugin`` graph holds custom ``facemoe::SparseMoE`` nodes that only a plugin implements: either
compiled libraries (``--plugin lib.so``, or ``plugins/*.so`` shipped in the bundle), loaded by
:mod:`facemoe.runtime.backends.plugin_libraries` and recorded by hash in the engine identity, or, without
any, the Python plugin of :mod:`facemoe.gating.trt_plugin` in its AOT or JIT form (docs/TENSORRT.md,
"Python plugin"). Those names are re-exported here for callers that import them from this module.
"""

from __future__ import annotations

from facemoe.bundle import Bundle
from facemoe.gating.spec import DOMAIN as CUSTOM_OP_DOMAIN
from facemoe.gating.trt_plugin import python_plugin_mode
from facemoe.runtime.backends.plugin_libraries import bundle_plugin_libraries, load_plugin_libraries


def needs_plugins(bundle: Bundle, precision: str) -> bool:
    """Whether the artifact holds custom gating nodes (domain ``facemoe``) that only a plugin implements."""
    art = bundle.manifest.artifacts.get(precision)
    gating = (art.gating if art else "onnx") or "onnx"
    return gating != "onnx" or bundle.manifest.routing.get("gating", "onnx") not in ("onnx", None)


__all__ = [
    "CUSTOM_OP_DOMAIN",
    "bundle_plugin_libraries",
    "load_plugin_libraries",
    "needs_plugins",
    "python_plugin_mode",
]
