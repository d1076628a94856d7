"""Triton kernels for ``facemoe::SparseMoE``: compute only the top-k experts of each token on the GPU.

Pipeline for tokens ``x`` (T, C) (:func:`sparse_moe`), all on the device and free of host synchronisation:

1. ``router.py``: router logits in fp32 and the top-k experts per token, ties to the lower index.
2. ``grouped.py``: the T*k (token, expert) assignments sorted by expert (stable) and each expert's run padded
   to a multiple of the row tile, so every row tile of the grouped GEMMs belongs to one expert (at most
   ``T*k/BM + N`` row tiles; tiles past the real ones exit at once); then fc1 + exact GELU over the gathered
   tokens, fc2 + bias times the raw logit stored per assignment (unique: no atomics), and the k terms of
   each token added in fp32.
3. ``fused.py``: the whole op in one launch (:func:`fused_sparse_moe`), what the TensorRT AOT plugin embeds.

Inputs may be fp16, bf16 or fp32 (fp32 uses IEEE matmuls, no TF32). Importing this package imports torch
and triton: import it lazily. Run it on CPU tensors with ``TRITON_INTERPRET=1`` (set before importing
triton) to check it without a GPU. A PyTorch model uses it through ``FaceMoE(..., kernel="triton")`` or
``with model.using_kernel("triton"):``.
"""

from facemoe.gating.spec import MAX_EXPERTS, SUPPORTED_K
from facemoe.gating.triton.fused import (
    FusedConfig,
    _fused_token_tile_kernel,
    fused_constexprs,
    fused_sparse_moe,
    pick_fused_config,
)
from facemoe.gating.triton.grouped import KernelConfig, group_by_expert, pick_config, sparse_moe
from facemoe.gating.triton.router import router_topk

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
