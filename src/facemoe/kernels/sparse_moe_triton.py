"""Triton kernels for ``facemoe::SparseMoE``: compute only the top-k experts of each token on the GPU.

Pipeline for tokens ``x`` (T, C), all on the device and free of host synchronisation (so it can be
captured in a CUDA graph):

1. ``_router_topk_kernel``: router logits in fp32 (whatever the input dtype, as DESIGN §4 keeps the
   router in higher precision) and the top-k experts per token, ties to the lower index (ONNX TopK).
2. Grouping (a few torch ops on the device): the T*k (token, expert) assignments are sorted by expert
   (stable) and each expert's run is padded to a multiple of the row tile, so every row tile of the
   grouped GEMMs belongs to one expert. The number of row tiles is bounded by ``T*k/BM + N``; tiles past
   the real ones exit at once.
3. ``_grouped_fc1_kernel``: gather the tokens of a tile, ``GELU(x @ W1[e]^T + b1[e])`` (exact erf GELU,
   fp32 accumulation), stored in sorted order.
4. ``_grouped_fc2_kernel``: ``(h @ W2[e]^T + b2[e]) * logit`` (raw router logit as weight, fp32), stored
   per assignment, which is unique: no atomics.
5. The k terms of each token are added in fp32. For k <= 2 the result does not depend on the order of
   the terms (fp addition is commutative), so it equals the reference's ascending-expert accumulation.

Inputs may be fp16, bf16 or fp32 (fp32 uses IEEE matmuls, no TF32). The module imports torch and triton;
import it lazily. Run it on CPU tensors with ``TRITON_INTERPRET=1`` (set before importing triton) to check
it without a GPU.
"""

# Triton convention: compile-time (constexpr) kernel arguments are UPPER_CASE, and a branch on one is
# resolved at compile time by an if-statement (kept as statements, not ternaries).
# ruff: noqa: N803, SIM108
from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from facemoe.model.moe import MoE
from facemoe.model.moe_plugin import MAX_EXPERTS, SUPPORTED_K, block_shape, plugin_support_problems, stacked_weights


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
def _router_topk_kernel(
    x_ptr,
    router_ptr,
    idx_ptr,
    val_ptr,
    tokens,
    dim,
    NUM_EXPERTS: tl.constexpr,
    K: tl.constexpr,
    E_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    experts = tl.arange(0, E_PAD)
    row_ok = rows < tokens
    exp_ok = experts < NUM_EXPERTS
    logits = tl.zeros((BLOCK_T, E_PAD), dtype=tl.float32)
    for c0 in range(0, dim, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_ok = cols < dim
        xa = tl.load(x_ptr + rows[:, None] * dim + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        wa = tl.load(
            router_ptr + experts[:, None] * dim + cols[None, :], mask=exp_ok[:, None] & col_ok[None, :], other=0.0
        )
        # N is at most 8: a broadcast multiply-add beats padding a 16-wide MMA and stays exact fp32.
        logits += tl.sum(xa.to(tl.float32)[:, None, :] * wa.to(tl.float32)[None, :, :], axis=2)
    logits = tl.where(exp_ok[None, :], logits, float("-inf"))
    # rank[t, e] = how many experts beat e: a larger logit, or an equal one at a lower index (ONNX TopK).
    mine = logits[:, :, None]
    other = logits[:, None, :]
    lower = experts[None, :] < experts[:, None]
    beats = (other > mine) | ((other == mine) & lower[None, :, :])
    rank = tl.sum(beats.to(tl.int32), axis=2)
    for slot in tl.static_range(K):
        hit = rank == slot
        chosen = tl.sum(tl.where(hit, experts[None, :], 0), axis=1)
        value = tl.sum(tl.where(hit, logits, 0.0), axis=1)
        tl.store(idx_ptr + rows * K + slot, chosen.to(tl.int32), mask=row_ok)
        tl.store(val_ptr + rows * K + slot, value, mask=row_ok)


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
    IEEE: tl.constexpr,
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
    tl.store(y_ptr + safe[:, None] * dim + cols[None, :], acc, mask=valid[:, None] & col_ok[None, :])


@triton.jit
def _fused_token_tile_kernel(
    x_ptr,
    router_ptr,
    w1_ptr,
    b1_ptr,
    w2_ptr,
    b2_ptr,
    tokens,
    y_ptr,
    DIM: tl.constexpr,
    HIDDEN: tl.constexpr,
    NUM_EXPERTS: tl.constexpr,
    K: tl.constexpr,
    E_PAD: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The whole op in one launch, for TensorRT's AOT plugins (one kernel, no workspace).

    Arguments are ordered (inputs, scalars, output) as TensorRT passes them. Each program owns BLOCK_T
    tokens and BLOCK_N output channels; it skips an expert only when no token of its tile selected it,
    and recomputes fc1 for each output-channel tile. It trades FLOPs for being self-contained.
    """
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < tokens
    experts = tl.arange(0, E_PAD)
    exp_ok = experts < NUM_EXPERTS
    logits = tl.zeros((BLOCK_T, E_PAD), dtype=tl.float32)
    for c0 in range(0, DIM, BLOCK_K):
        cs = c0 + tl.arange(0, BLOCK_K)
        xa = tl.load(x_ptr + rows[:, None] * DIM + cs[None, :], mask=row_ok[:, None] & (cs[None, :] < DIM), other=0.0)
        wa = tl.load(router_ptr + experts[:, None] * DIM + cs[None, :], mask=exp_ok[:, None] & (cs[None, :] < DIM))
        logits += tl.sum(xa.to(tl.float32)[:, None, :] * wa.to(tl.float32)[None, :, :], axis=2)
    logits = tl.where(exp_ok[None, :], logits, float("-inf"))
    lower = experts[None, :] < experts[:, None]
    beats = (logits[:, None, :] > logits[:, :, None]) | ((logits[:, None, :] == logits[:, :, None]) & lower[None, :, :])
    rank = tl.sum(beats.to(tl.int32), axis=2)
    gates = tl.where((rank < K) & row_ok[:, None], logits, 0.0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < DIM
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for e in range(NUM_EXPERTS):
        gate = tl.sum(tl.where(experts[None, :] == e, gates, 0.0), axis=1)
        if tl.max(tl.abs(gate), axis=0) > 0.0:
            w1_base = w1_ptr + e * HIDDEN * DIM
            w2_base = w2_ptr + e * DIM * HIDDEN
            for h0 in range(0, HIDDEN, BLOCK_H):
                hs = h0 + tl.arange(0, BLOCK_H)
                h_ok = hs < HIDDEN
                hid = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
                for c0 in range(0, DIM, BLOCK_K):
                    cs = c0 + tl.arange(0, BLOCK_K)
                    c_ok = cs < DIM
                    a = tl.load(
                        x_ptr + rows[:, None] * DIM + cs[None, :], mask=row_ok[:, None] & c_ok[None, :], other=0.0
                    )
                    b = tl.load(
                        w1_base + hs[None, :] * DIM + cs[:, None], mask=h_ok[None, :] & c_ok[:, None], other=0.0
                    )
                    if IEEE:
                        hid = tl.dot(a, b, hid, input_precision="ieee")
                    else:
                        hid = tl.dot(a, b, hid)
                hid += tl.load(b1_ptr + e * HIDDEN + hs, mask=h_ok, other=0.0).to(tl.float32)[None, :]
                hid = 0.5 * hid * (1.0 + tl.math.erf(hid * 0.7071067811865476))
                hid = hid * gate[:, None]
                w2 = tl.load(
                    w2_base + cols[None, :] * HIDDEN + hs[:, None], mask=col_ok[None, :] & h_ok[:, None], other=0.0
                )
                if IEEE:
                    acc = tl.dot(hid.to(w2.dtype), w2, acc, input_precision="ieee")
                else:
                    acc = tl.dot(hid.to(w2.dtype), w2, acc)
            bias = tl.load(b2_ptr + e * DIM + cols, mask=col_ok, other=0.0).to(tl.float32)
            acc += gate[:, None] * bias[None, :]
    tl.store(
        y_ptr + rows[:, None] * DIM + cols[None, :],
        acc.to(y_ptr.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )


@dataclass(frozen=True)
class FusedConfig:
    """Tiles of the single-launch kernel (see ``_fused_token_tile_kernel``)."""

    block_t: int = 16
    block_n: int = 128
    block_h: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 2


def pick_fused_config(dim: int, hidden: int) -> FusedConfig:
    return FusedConfig(
        block_t=16,
        block_n=min(256, triton.next_power_of_2(dim)),
        block_h=min(64, triton.next_power_of_2(hidden)),
        block_k=min(64, triton.next_power_of_2(dim)),
        num_warps=8 if dim >= 256 else 4,
    )


def fused_constexprs(dim: int, hidden: int, num_experts: int, k: int, ieee: bool, cfg: FusedConfig) -> dict[str, Any]:
    """Compile-time arguments of ``_fused_token_tile_kernel`` (shared by the launcher and the TensorRT AOT path)."""
    return {
        "DIM": dim,
        "HIDDEN": hidden,
        "NUM_EXPERTS": num_experts,
        "K": k,
        "E_PAD": triton.next_power_of_2(num_experts),
        "IEEE": ieee,
        "BLOCK_T": cfg.block_t,
        "BLOCK_N": cfg.block_n,
        "BLOCK_H": cfg.block_h,
        "BLOCK_K": cfg.block_k,
    }


def fused_sparse_moe(
    x: torch.Tensor,
    router: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    *,
    k: int,
    config: FusedConfig | None = None,
) -> torch.Tensor:
    """The op through the single-launch kernel (what the TensorRT AOT plugin embeds)."""
    tokens, dim = x.shape
    num_experts, hidden, _ = w1.shape
    problems = plugin_support_problems(dim, hidden, num_experts, k)
    if problems:
        raise ValueError("fused sparse_moe kernel: " + "; ".join(problems))
    cfg = config or pick_fused_config(dim, hidden)
    x = x.contiguous()
    weights = [t.to(x.dtype).contiguous() for t in (router, w1, b1, w2, b2)]
    y = torch.empty_like(x)
    if tokens == 0:
        return y
    grid = (triton.cdiv(tokens, cfg.block_t), triton.cdiv(dim, cfg.block_n))
    _fused_token_tile_kernel[grid](
        x,
        *weights,
        tokens,
        y,
        **fused_constexprs(dim, hidden, num_experts, k, x.dtype == torch.float32, cfg),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return y


def router_topk(x: torch.Tensor, router: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, k) int32 expert indices (best first) and their fp32 raw logits."""
    tokens, dim = x.shape
    num_experts = router.shape[0]
    idx = torch.empty(tokens, k, dtype=torch.int32, device=x.device)
    val = torch.empty(tokens, k, dtype=torch.float32, device=x.device)
    if tokens == 0:
        return idx, val
    block_t = 32
    grid = (triton.cdiv(tokens, block_t),)
    _router_topk_kernel[grid](
        x,
        router,
        idx,
        val,
        tokens,
        dim,
        NUM_EXPERTS=num_experts,
        K=k,
        E_PAD=triton.next_power_of_2(num_experts),
        BLOCK_T=block_t,
        BLOCK_C=min(64, triton.next_power_of_2(dim)),
    )
    return idx, val


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
) -> torch.Tensor:
    """``facemoe::SparseMoE`` on (T, C) tokens; weights as in docs/GATING_OP.md; output in ``x``'s dtype."""
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
        IEEE=ieee,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        **launch,
    )
    return y.view(tokens, k, dim).sum(dim=1).to(x.dtype)


# --- Swapping the kernel into a PyTorch model -------------------------------------------------------------


def _kernel_forward(self: MoE, x: torch.Tensor) -> torch.Tensor:
    cache: dict[str, Any] = self._sparse_moe_cache  # type: ignore[assignment]
    weights = cache.get("weights")
    if weights is None or weights[1].dtype != x.dtype or weights[1].device != x.device:
        with torch.no_grad():
            stacked = stacked_weights(self)
            weights = (stacked[0].float(), *(t.to(x.dtype).contiguous() for t in stacked[1:]))
        cache["weights"] = weights
    shape = x.shape
    out = sparse_moe(x.reshape(-1, shape[-1]), *weights, k=self.k)
    return out.reshape(shape)


def enable(model: torch.nn.Module) -> int:
    """Run every MoE block of ``model`` through the Triton kernel; returns the number of blocks swapped.

    Inference only (no autograd, no routing records or aux loss). The stacked weights are cached at the
    first call per dtype and device: call :func:`disable` and ``enable`` again after changing the weights.
    """
    swapped = 0
    for module in model.modules():
        if not isinstance(module, MoE):
            continue
        dim, hidden = block_shape(module)
        problems = plugin_support_problems(dim, hidden, module.num_experts, module.k)
        if problems:
            raise ValueError(f"cannot use the sparse MoE kernel: {'; '.join(problems)}")
        module._sparse_moe_cache = {}  # type: ignore[assignment]
        module.forward = types.MethodType(_kernel_forward, module)  # type: ignore[method-assign]
        swapped += 1
    return swapped


def disable(model: torch.nn.Module) -> int:
    """Undo :func:`enable`; returns the number of blocks restored."""
    restored = 0
    for module in model.modules():
        if isinstance(module, MoE) and "forward" in module.__dict__:
            del module.forward
            module.__dict__.pop("_sparse_moe_cache", None)
            restored += 1
    return restored


__all__ = [
    "MAX_EXPERTS",
    "SUPPORTED_K",
    "FusedConfig",
    "KernelConfig",
    "disable",
    "enable",
    "fused_constexprs",
    "fused_sparse_moe",
    "group_by_expert",
    "pick_config",
    "pick_fused_config",
    "router_topk",
    "sparse_moe",
]
