"""The whole op in one kernel launch, for TensorRT's AOT plugins (docs/GATING_OP.md).

TensorRT's AOT plugins launch exactly one kernel and give it no workspace, so this kernel is self-contained:
a portability path, not the fast one (the grouped pipeline in ``grouped.py`` is).
"""

# Triton convention: compile-time (constexpr) kernel arguments are UPPER_CASE, and a branch on one is
# resolved at compile time by an if-statement (kept as statements, not ternaries).
# ruff: noqa: N803, SIM108
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from facemoe.gating.spec import plugin_support_problems


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


__all__ = ["FusedConfig", "fused_constexprs", "fused_sparse_moe", "pick_fused_config"]
