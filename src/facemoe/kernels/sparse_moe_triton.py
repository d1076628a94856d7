"""Former home of the sparse-MoE Triton kernels, kept as an import path (the TensorRT plugin uses it).

The kernels live in :mod:`facemoe.gating.triton` (docs/GATING_OP.md); a model runs its MoE blocks through
them with ``FaceMoE(..., kernel="triton")`` or ``with model.using_kernel("triton"):``.
"""

from facemoe.gating.triton import (
    MAX_EXPERTS,
    SUPPORTED_K,
    FusedConfig,
    KernelConfig,
    _fused_token_tile_kernel,
    fused_constexprs,
    fused_sparse_moe,
    group_by_expert,
    pick_config,
    pick_fused_config,
    router_topk,
    sparse_moe,
)

__all__ = [
    "MAX_EXPERTS",
    "SUPPORTED_K",
    "FusedConfig",
    "KernelConfig",
    "_fused_token_tile_kernel",
    "fused_constexprs",
    "fused_sparse_moe",
    "group_by_expert",
    "pick_config",
    "pick_fused_config",
    "router_topk",
    "sparse_moe",
]
