"""Former home of the TensorRT Python plugin of ``facemoe::SparseMoE``: it lives with the op's other
implementations in :mod:`facemoe.gating.trt_plugin` (docs/GATING_OP.md). Re-exported so older imports work;
patch names on :mod:`facemoe.gating.trt_plugin`, which is where they are looked up.
"""

from __future__ import annotations

from facemoe.gating.trt_plugin import (
    MIN_TRT_AOT,
    MIN_TRT_JIT,
    MODES,
    PLUGIN_ID,
    AotKernel,
    IntAttr,
    available,
    compile_fused_kernel,
    default_mode,
    plugin_module,
    python_plugin_mode,
    register,
    trt_version,
)

__all__ = [
    "MIN_TRT_AOT",
    "MIN_TRT_JIT",
    "MODES",
    "PLUGIN_ID",
    "AotKernel",
    "IntAttr",
    "available",
    "compile_fused_kernel",
    "default_mode",
    "plugin_module",
    "python_plugin_mode",
    "register",
    "trt_version",
]
