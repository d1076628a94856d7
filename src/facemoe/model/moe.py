"""Mixture-of-experts feed-forward block with FaceMoE's top-k router.

Router semantics (spec §4): top-k over the *raw* gate logits, and each selected expert's output is
weighted by its raw logit (no softmax, no renormalisation; weights can be negative).

Two routing modes compute the same function:

* ``sparse`` runs each expert only on the tokens routed to it (data-dependent shapes; the reference).
* ``static`` runs every expert on every token and combines them through a dense (tokens, N) gate
  matrix that holds the raw logit for selected experts and 0 elsewhere. It has no data-dependent
  shapes and no Python control flow on tensor values, so it traces to a fixed ONNX graph.

Both accumulate expert terms in ascending expert index starting from zero, as the official code does;
an unselected expert adds an exact 0, so the two modes agree bit for bit in fp32.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

RoutingMode = Literal["sparse", "static"]
ROUTING_MODES: tuple[str, ...] = ("sparse", "static")
# How the block is expressed in an exported graph: standard ONNX ops, or one facemoe::SparseMoE node.
GatingMode = Literal["onnx", "plugin"]
GATING_MODES: tuple[str, ...] = ("onnx", "plugin")


class Expert(nn.Module):
    """Linear -> exact GELU -> Linear (the official expert MLP)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class TopKRouter(nn.Module):
    def __init__(self, dim: int, num_experts: int) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, num_experts, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(x)


def router_aux_loss(logits: torch.Tensor, top_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Official auxiliary loss: 1e-3 * mean(logits^2) + 1e-2 * E * sum(importance * load) / T^2."""
    logits = logits.float()
    tokens = logits.shape[0]
    z_loss = 1e-3 * logits.pow(2).mean()
    importance = logits.softmax(dim=-1).sum(dim=0)
    load = F.one_hot(top_idx, num_experts).sum(dim=(0, 1)).to(logits.dtype)
    balance = 1e-2 * num_experts * (importance * load).sum() / (tokens * tokens)
    return z_loss + balance


class MoE(nn.Module):
    """FaceMoE FFN: ``num_experts`` experts and a top-``k`` router (state-dict keys as official)."""

    def __init__(self, dim: int, hidden: int, num_experts: int, k: int, routing: RoutingMode = "static") -> None:
        super().__init__()
        self.num_experts = num_experts
        self.k = k
        self.routing: RoutingMode = routing
        self.experts = nn.ModuleList(Expert(dim, hidden) for _ in range(num_experts))
        self.router = TopKRouter(dim, num_experts)
        # When set, the experts' first layers run as one wide matmul (what the ONNX export emits:
        # one GEMM of N*hidden columns feeds TensorRT better than N narrow ones).
        self.fuse_fc1 = False
        self.track_aux_loss = False
        self.aux_loss: torch.Tensor | None = None
        self.last_routing: torch.Tensor | None = None
        self.record_routing = False
        # "plugin" is set only by the export (export_mode); see _forward_plugin_op.
        self.gating: GatingMode = "onnx"
        # (fc1 weight (N*H, C), fc1 bias (N*H), fc2 weight (N, C, H), fc2 bias (N, C)); see pack_experts.
        self._packed: tuple[torch.Tensor, ...] | None = None
        # Measured on an H200 (fp16, compiled, docs/BENCHMARKS.md): the packed path is faster at batch 1-8
        # (1.79 vs 2.35 ms; 2.97 vs 3.21 ms) and slower at batch 256 (55.5 vs 52.6 ms), where the
        # per-expert GEMMs win; batch 8 of the first stage is 3,200 tokens.
        self.packed_max_tokens = 4096

    def pack_experts(self) -> MoE:
        """Inference speed-up for static routing: the experts' weights move into stacked tensors, each
        expert's parameters become views of them, and the forward runs fc1 as one GEMM and fc2 as one
        batched GEMM (3 GEMM launches instead of 6, no per-call weight concatenation) for calls of up to
        ``packed_max_tokens`` tokens; larger calls keep the per-expert GEMMs, which share the same storage.

        Call it after the final ``.to()``/``.half()``: any later conversion drops the packing (``_apply``)
        and the module falls back to the per-expert path, so it can never run stale weights.
        """
        from facemoe.model.moe_plugin import stacked_weights

        with torch.no_grad():
            _, w1, b1, w2, b2 = stacked_weights(self)  # (N, H, C), (N, H), (N, C, H), (N, C): fresh storage
            for i, expert in enumerate(self.experts):
                expert.fc1.weight.data, expert.fc1.bias.data = w1[i], b1[i]
                expert.fc2.weight.data, expert.fc2.bias.data = w2[i], b2[i]
        self._packed = (w1.flatten(0, 1), b1.flatten(), w2, b2)
        return self

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        self._packed = None  # a dtype/device change re-creates the parameters: the views are gone
        return super()._apply(fn, recurse)

    def gate_matrix(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense (T, N) gate holding the raw logit of each token's top-k experts, 0 elsewhere."""
        top_val, top_idx = torch.topk(logits, self.k, dim=-1)
        gates = torch.zeros_like(logits).scatter(-1, top_idx, top_val)
        return gates, top_idx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gating == "plugin":
            return self._forward_plugin_op(x)
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        logits = self.router(flat)
        if self.routing == "sparse":
            out, top_idx = self._forward_sparse(flat, logits)
        else:
            out, top_idx = self._forward_static(flat, logits)
        if self.record_routing:
            self.last_routing = top_idx.detach()
        if self.track_aux_loss:
            self.aux_loss = router_aux_loss(logits, top_idx, self.num_experts)
        return out.reshape(shape)

    def _forward_static(self, flat: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gates, top_idx = self.gate_matrix(logits)
        if self._packed is not None and flat.shape[0] <= self.packed_max_tokens:
            w1, b1, w2, b2 = self._packed
            tokens = flat.shape[0]
            hidden = F.gelu(F.linear(flat, w1, b1)).view(tokens, self.num_experts, -1).transpose(0, 1)
            y = torch.baddbmm(b2.unsqueeze(1), hidden, w2.transpose(1, 2))  # (N, T, C)
            return (gates.t().unsqueeze(-1).to(y.dtype) * y).sum(dim=0), top_idx
        if self.fuse_fc1:
            weight = torch.cat([e.fc1.weight for e in self.experts], dim=0)
            bias = torch.cat([e.fc1.bias for e in self.experts], dim=0)
            hidden = F.gelu(F.linear(flat, weight, bias)).chunk(self.num_experts, dim=-1)
            outputs = [e.fc2(h) for e, h in zip(self.experts, hidden, strict=True)]
        else:
            outputs = [e(flat) for e in self.experts]
        out: torch.Tensor | None = None
        for idx, y in enumerate(outputs):
            term = gates[:, idx : idx + 1].to(y.dtype) * y
            out = term if out is None else out + term
        assert out is not None
        return out, top_idx

    def _forward_sparse(self, flat: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        top_val, top_idx = torch.topk(logits, self.k, dim=-1)
        out: torch.Tensor | None = None
        for idx, expert in enumerate(self.experts):
            hit = top_idx == idx
            rows = hit.any(dim=-1).nonzero(as_tuple=True)[0]
            if rows.numel() == 0:
                continue
            weight = (top_val * hit).sum(dim=-1)[rows].unsqueeze(-1)
            y = expert(flat[rows])
            if out is None:
                out = torch.zeros(flat.shape[0], y.shape[-1], dtype=y.dtype, device=flat.device)
            out = out.index_add(0, rows, weight.to(y.dtype) * y)
        if out is None:  # no tokens at all
            out = torch.zeros_like(flat)
        return out, top_idx

    # --- Custom-op export path (issue 5; docs/GATING_OP.md) -------------------------------------------
    # The whole block becomes one facemoe::SparseMoE node on (T, C) tokens; the reshapes around it are
    # the same as in the standard path, so the rest of the graph is unchanged.
    def _forward_plugin_op(self, x: torch.Tensor) -> torch.Tensor:
        from facemoe.model.moe_plugin import sparse_moe_op

        shape = x.shape
        return sparse_moe_op(x.reshape(-1, shape[-1]), self).reshape(shape)
