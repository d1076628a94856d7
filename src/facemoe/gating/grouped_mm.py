"""Top-k expert compute through PyTorch's own grouped GEMM (``torch.nn.functional.grouped_mm``).

The (token, expert) assignments are sorted by expert (stable), so each expert's rows form one contiguous
group; fc1 and fc2 then run as one grouped GEMM each over the ``T * k`` gathered rows (CUTLASS on sm_90), and
each row's ``raw logit x (fc2 + bias)`` is scatter-added straight into the (T, C) output: no (T, k, C) buffer
and no separate sum. For k <= 2 the scatter order does not matter (``0 + a + b`` equals ``0 + b + a`` exactly),
so the result is deterministic and follows the op's semantics
(docs/GATING_OP.md#operator-specification-domain-facemoe-version-1).

Everything stays on the device (no host synchronisation: counts by ``scatter_add``, not ``bincount``), so
a CUDA graph can capture it. The GEMMs run in ``expert_dtype``: on torch 2.11's CUDA build the grouped GEMM
takes bf16 only; torch 2.14 also runs fp16 and fp32, and on the CPU every one of them (a per-group loop). The
routing is the caller's (the MoE module's own router and ``torch.topk``), so it is the reference routing bit
for bit. Import lazily: this module imports torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

GroupedMM = Callable[..., torch.Tensor]


def grouped_mm_function() -> GroupedMM | None:
    """The public ``F.grouped_mm`` (torch >= 2.9), else the private ``torch._grouped_mm``, else None."""
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


class Groups(NamedTuple):
    """The T*k assignments sorted by expert: row r of the grouped GEMMs is assignment ``order[r]``."""

    order: torch.Tensor  # (T*k,) int64: flat assignment index (token * k + slot)
    token: torch.Tensor  # (T*k,) int64: the token of each row
    expert: torch.Tensor  # (T*k,) int64: the expert of each row (ascending)
    offsets: torch.Tensor  # (N,) int32: end row of each expert's group (cumulative counts)


def group_assignments(top_idx: torch.Tensor, num_experts: int) -> Groups:
    """Group a (T, k) top-k index matrix by expert; stable, so tokens keep ascending order in each group."""
    flat = top_idx.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    return Groups(order, order // top_idx.shape[1], flat[order], counts.cumsum(0).to(torch.int32))


def expert_weights(
    w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, ...]:
    """The op's (N, H, C), (N, H), (N, C, H), (N, C) expert weights as the grouped GEMM takes them.

    ``mat_b`` is (N, K, N_out): the nn.Linear layout transposed (a view: column-major per expert, the layout
    the sm_90 kernels read without a copy).
    """
    with torch.no_grad():
        w1, b1, w2, b2 = (t.detach().to(dtype).contiguous() for t in (w1, b1, w2, b2))
    return w1.transpose(1, 2), b1, w2.transpose(1, 2), b2


def per_group_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Same math as the grouped GEMM, one matmul per group (a host sync: for tests and as the CPU check)."""
    out = a.new_zeros(a.shape[0], b.shape[-1])
    start = 0
    for group, end in enumerate(offs.tolist()):
        if end > start:
            out[start:end] = a[start:end] @ b[group]
        start = end
    return out


def grouped_experts(
    x: torch.Tensor,
    top_val: torch.Tensor,
    top_idx: torch.Tensor,
    w1t: torch.Tensor,
    b1: torch.Tensor,
    w2t: torch.Tensor,
    b2: torch.Tensor,
    *,
    mm: GroupedMM | None = None,
) -> torch.Tensor:
    """(T, C) tokens, their (T, k) top-k logits and experts, weights from :func:`expert_weights` -> (T, C).

    The GEMMs run in the weights' dtype; the weighted rows are added into an output of ``x``'s dtype.
    """
    if top_idx.shape[1] > 2:
        raise ValueError(
            f"the grouped expert path adds at most 2 terms per token (order-free), not k={top_idx.shape[1]}"
        )
    mm = mm or grouped_mm_function()
    if mm is None:
        raise RuntimeError(f"torch {torch.__version__} has no grouped GEMM (torch.nn.functional.grouped_mm)")
    groups = group_assignments(top_idx, w1t.shape[0])
    rows = x[groups.token].to(w1t.dtype)
    hidden = F.gelu(mm(rows, w1t, offs=groups.offsets) + b1[groups.expert])
    y = mm(hidden, w2t, offs=groups.offsets) + b2[groups.expert]
    weight = top_val.reshape(-1)[groups.order].unsqueeze(-1)
    out = torch.zeros_like(x)
    # y in x's dtype times the logit in x's dtype: with same-dtype experts, the reference's `weight * y`.
    return out.index_add_(0, groups.token, y.to(x.dtype) * weight.to(x.dtype))


def grouped_sparse_moe(
    x: torch.Tensor,
    router: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    *,
    k: int,
    expert_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``facemoe::SparseMoE`` on (T, C) tokens with the op's weights (router in ``x``'s dtype, as the reference)."""
    top_val, top_idx = torch.topk(F.linear(x, router.to(x.dtype)), k, dim=-1)
    weights = expert_weights(w1, b1, w2, b2, expert_dtype or x.dtype)
    return grouped_experts(x, top_val, top_idx, *weights)


__all__ = [
    "Groups",
    "expert_weights",
    "group_assignments",
    "grouped_experts",
    "grouped_mm_function",
    "grouped_sparse_moe",
    "per_group_mm",
]
