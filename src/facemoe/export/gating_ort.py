"""Former home of the ONNX Runtime ``facemoe::SparseMoE`` kernel, kept as an import path.

The op lives in :mod:`facemoe.gating` (docs/GATING_OP.md): the kernel and its registration in
:mod:`facemoe.gating.ort`, the graph helpers in :mod:`facemoe.gating.onnx_graph`.
"""

from facemoe.gating.onnx_graph import name_op_weights, uses_custom_op
from facemoe.gating.ort import (
    DOMAIN,
    OP_TYPE,
    custom_ops_available,
    erf,
    gelu,
    register_custom_ops,
    sparse_moe,
    top_k,
)

__all__ = [
    "DOMAIN",
    "OP_TYPE",
    "custom_ops_available",
    "erf",
    "gelu",
    "name_op_weights",
    "register_custom_ops",
    "sparse_moe",
    "top_k",
    "uses_custom_op",
]
