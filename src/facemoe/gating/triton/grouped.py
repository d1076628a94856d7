"""The grouped-GEMM pipeline: each expert runs only on the tokens routed to it (docs/GATING_OP.md).

Tokens are grouped by expert with device-side torch ops (no host synchronisation, so the whole pipeline can
be captured in a CUDA graph); fc1 + exact GELU and fc2 x raw logit run as grouped GEMMs over row tiles that
each belong to one expert; the k terms of a token are added in fp32, which for k <= 2 equals the
reference's ascending-expert accumulation (two-term sums commute).
"""

# Triton convention: compile-time (constexpr) kernel arguments are UPPER_CASE, and a branch on one is
# resolved at compile time by an if-statement (kept as statements, not ternaries).
# ruff: noqa: N803, SIM108
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from facemoe.gating.spec import plugin_support_problems
from facemoe.gating.triton.router import router_topk


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes of the grouped GEMMs (rows = routed tokens, cols = output features, k = reduction)."""

    block_m: int = 64
    block_n: int = 128
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3


def pick_config(tokens: int, dim: int, hidden: int, k: int, num_experts: int) -> KernelConfig:
    """Tile sizes from the problem shape: short expert groups (batch 1) waste less padding with small row tiles."""
    per_expert = tokens * k / num_experts
    block_m = 16 if per_expert < 64 else 32 if per_expert < 512 else 64
    block_k = 32 if dim < 64 else 64
    block_n = 64 if min(dim, hidden) < 128 else 128
    num_warps = 8 if block_m * block_n >= 64 * 128 else 4
    return KernelConfig(block_m, block_n, block_k, num_warps, 3)


@triton.jit
def _grouped_fc1_kernel(
    x_ptr,
    w1_ptr,
    b1_ptr,
    h_ptr,
    sorted_ptr,
    block_expert_ptr,
    assignments,
    dim,
    hidden,
    NUM_EXPERTS: tl.constexpr,
    K: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    tile = tl.program_id(0)
    expert = tl.load(block_expert_ptr + tile)
    if expert >= NUM_EXPERTS:  # a padding tile past the last expert's group
        return
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    assignment = tl.load(sorted_ptr + rows)
    valid = assignment < assignments
    token = tl.where(valid, assignment // K, 0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < hidden
    w_base = w1_ptr + expert.to(tl.int64) * hidden * dim
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, dim, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < dim
        a = tl.load(
            x_ptr + token[:, None].to(tl.int64) * dim + ks[None, :], mask=valid[:, None] & k_ok[None, :], other=0.0
        )
        b = tl.load(w_base + cols[None, :] * dim + ks[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    acc += tl.load(b1_ptr + expert * hidden + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
    out = h_ptr + rows[:, None].to(tl.int64) * hidden + cols[None, :]
    tl.store(out, acc.to(h_ptr.dtype.element_ty), mask=valid[:, None] & col_ok[None, :])


@triton.jit
def _grouped_fc2_kernel(
    h_ptr,
    w2_ptr,
    b2_ptr,
    val_ptr,
    y_ptr,
    sorted_ptr,
    block_expert_ptr,
    assignments,
    dim,
    hidden,
    NUM_EXPERTS: tl.constexpr,
    K: tl.constexpr,
    IEEE: tl.constexpr,
    ADD_INTO_OUTPUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    tile = tl.program_id(0)
    expert = tl.load(block_expert_ptr + tile)
    if expert >= NUM_EXPERTS:
        return
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    assignment = tl.load(sorted_ptr + rows)
    valid = assignment < assignments
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < dim
    w_base = w2_ptr + expert.to(tl.int64) * dim * hidden
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < hidden
        a = tl.load(
            h_ptr + rows[:, None].to(tl.int64) * hidden + ks[None, :], mask=valid[:, None] & k_ok[None, :], other=0.0
        )
        b = tl.load(w_base + cols[None, :] * hidden + ks[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    acc += tl.load(b2_ptr + expert * dim + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    gate = tl.load(val_ptr + assignment, mask=valid, other=0.0)
    acc = acc * gate[:, None]
    safe = tl.where(valid, assignment, 0).to(tl.int64)
    if ADD_INTO_OUTPUT:
        # The top-k sum in the epilogue: each term added atomically into the zeroed (T, C) output (in its
        # dtype); with k <= 2 the order of the adds cannot change the result (0 + a + b == 0 + b + a).
        token = safe // K
        out = y_ptr + token[:, None] * dim + cols[None, :]
        tl.atomic_add(out, acc.to(y_ptr.dtype.element_ty), mask=valid[:, None] & col_ok[None, :], sem="relaxed")
    else:
        tl.store(y_ptr + safe[:, None] * dim + cols[None, :], acc, mask=valid[:, None] & col_ok[None, :])


def group_by_expert(idx: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted assignment ids padded per expert to ``block_m`` rows, and the expert of each row tile.

    Padding rows hold ``T*k`` (out of range); tiles past the last group get expert ``num_experts``.
    """
    flat = idx.reshape(-1).long()
    assignments = flat.numel()
    device = flat.device
    counts = torch.zeros(num_experts, dtype=torch.long, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    seg_end = torch.cumsum(padded, 0)
    seg_start = seg_end - padded
    first = torch.cumsum(counts, 0) - counts
    order = torch.argsort(flat, stable=True)
    expert_of = flat[order]
    dest = seg_start[expert_of] + torch.arange(assignments, device=device) - first[expert_of]
    capacity = triton.cdiv(assignments + num_experts * (block_m - 1), block_m) * block_m
    sorted_ids = torch.full((capacity,), assignments, dtype=torch.int32, device=device)
    sorted_ids[dest] = order.to(torch.int32)
    tile_start = torch.arange(0, capacity, block_m, device=device)
    block_expert = torch.bucketize(tile_start, seg_end, right=True).to(torch.int32)
    return sorted_ids, block_expert


def sparse_moe(
    x: torch.Tensor,
    router: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    *,
    k: int,
    config: KernelConfig | None = None,
    add_into_output: bool = False,
) -> torch.Tensor:
    """``facemoe::SparseMoE`` on (T, C) tokens; weights as in docs/GATING_OP.md; output in ``x``'s dtype.

    ``add_into_output``: fc2's epilogue adds each weighted term atomically into the output (no fp32 (T, k, C)
    buffer and no separate sum; each term is rounded to ``x``'s dtype before the add). Off by default until a
    GPU measurement says it wins (benchmarks/gpu_moe.py).
    """
    tokens, dim = x.shape
    num_experts, hidden, _ = w1.shape
    problems = plugin_support_problems(dim, hidden, num_experts, k)
    if problems:
        raise ValueError("sparse_moe kernel: " + "; ".join(problems))
    x = x.contiguous()
    w1, b1, w2, b2 = (t.to(x.dtype).contiguous() for t in (w1, b1, w2, b2))
    router = router.float().contiguous()
    cfg = config or pick_config(tokens, dim, hidden, k, num_experts)
    idx, val = router_topk(x, router, k)
    if tokens == 0:
        return torch.empty_like(x)
    sorted_ids, block_expert = group_by_expert(idx, num_experts, cfg.block_m)
    assignments = tokens * k
    capacity = sorted_ids.numel()
    ieee = x.dtype == torch.float32
    h = torch.empty(capacity, hidden, dtype=x.dtype, device=x.device)
    launch = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    tiles = capacity // cfg.block_m
    _grouped_fc1_kernel[(tiles, triton.cdiv(hidden, cfg.block_n))](
        x,
        w1,
        b1,
        h,
        sorted_ids,
        block_expert,
        assignments,
        dim,
        hidden,
        NUM_EXPERTS=num_experts,
        K=k,
        IEEE=ieee,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        **launch,
    )
    if add_into_output:
        y = torch.zeros(tokens, dim, dtype=x.dtype, device=x.device)
    else:
        y = torch.empty(assignments, dim, dtype=torch.float32, device=x.device)
    _grouped_fc2_kernel[(tiles, triton.cdiv(dim, cfg.block_n))](
        h,
        w2,
        b2,
        val,
        y,
        sorted_ids,
        block_expert,
        assignments,
        dim,
        hidden,
        NUM_EXPERTS=num_experts,
        K=k,
        IEEE=ieee,
        ADD_INTO_OUTPUT=add_into_output,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        **launch,
    )
    if add_into_output:
        return y
    return y.view(tokens, k, dim).sum(dim=1).to(x.dtype)


__all__ = ["KernelConfig", "group_by_expert", "pick_config", "sparse_moe"]
