"""Former home of the ``facemoe::SparseMoE`` op's PyTorch side, kept as an import path.

The op lives in :mod:`facemoe.gating` (docs/GATING_OP.md): its contract in :mod:`facemoe.gating.spec`, the
reference and the traced op in :mod:`facemoe.gating.torch_op`. What depends on the MoE module (its stacked
weights, its shape, the export check) is defined in :mod:`facemoe.model.moe`; this module only imports.
"""

from __future__ import annotations

import torch

from facemoe.gating.spec import DIM_MULTIPLE, DOMAIN, MAX_EXPERTS, OP_TYPE, OP_VERSION, SUPPORTED_K
from facemoe.gating.spec import plugin_support_problems as plugin_support_problems
from facemoe.gating.torch_op import SparseMoEFunction, reference_sparse_moe
from facemoe.gating.torch_op import sparse_moe_op as _sparse_moe_op
from facemoe.model.moe import MoE, check_plugin_export


def block_shape(moe: MoE) -> tuple[int, int]:
    """(channels, expert hidden size) of a MoE block."""
    return moe.block_shape


def stacked_weights(moe: MoE) -> tuple[torch.Tensor, ...]:
    """(router (N, C), fc1 (N, H, C), fc1 bias (N, H), fc2 (N, C, H), fc2 bias (N, C)) in the op's layout."""
    return moe.stacked_weights()


def sparse_moe_op(flat: torch.Tensor, moe: MoE) -> torch.Tensor:
    """(T, C) -> (T, C) through the custom op (traceable to a single ONNX node)."""
    return _sparse_moe_op(flat, *moe.stacked_weights(), k=moe.k, num_experts=moe.num_experts)


__all__ = [
    "DIM_MULTIPLE",
    "DOMAIN",
    "MAX_EXPERTS",
    "OP_TYPE",
    "OP_VERSION",
    "SUPPORTED_K",
    "SparseMoEFunction",
    "block_shape",
    "check_plugin_export",
    "plugin_support_problems",
    "reference_sparse_moe",
    "sparse_moe_op",
    "stacked_weights",
]
