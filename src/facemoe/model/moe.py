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
