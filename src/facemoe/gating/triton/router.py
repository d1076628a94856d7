"""Router + top-k on the GPU: fp32 raw logits and the k best experts per token (docs/GATING_OP.md).

The router runs in fp32 whatever the input dtype (the routers stay in higher precision, docs/ARCHITECTURE.md):
every rounding of a logit can flip a near-tied token. Ties go to the lower expert index (ONNX TopK).
"""

# Triton convention: compile-time (constexpr) kernel arguments are UPPER_CASE, and a branch on one is
# resolved at compile time by an if-statement (kept as statements, not ternaries).
# ruff: noqa: N803
from __future__ import annotations

import torch
import triton
import triton.language as tl


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


__all__ = ["router_topk"]
