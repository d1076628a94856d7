"""Mixture-of-experts feed-forward block with FaceMoE's top-k router.

Router semantics (docs/ARCHITECTURE.md): top-k over the *raw* gate logits, and each selected expert's output
is weighted by its raw logit (no softmax, no renormalisation; weights can be negative).

Two routing modes compute the same function:

* ``sparse`` runs each expert only on the tokens routed to it (data-dependent shapes; the reference).
* ``static`` runs every expert on every token and combines them through a dense (tokens, N) gate
  matrix that holds the raw logit for selected experts and 0 elsewhere. It has no data-dependent
  shapes and no Python control flow on tensor values, so it traces to a fixed ONNX graph.

Both accumulate expert terms in ascending expert index starting from zero, as the official code does;
an unselected expert adds an exact 0, so the two modes agree bit for bit in fp32.

Behaviour is chosen at construction (``routing``, ``kernel``) or changed by the block's own methods and
context managers (:meth:`MoE.set_routing`, :meth:`MoE.pack_experts`, :meth:`MoE.recording_routing`,
:meth:`MoE.tracking_aux_loss`, :meth:`MoE.tracing`, :meth:`MoE.using_kernel`); nothing outside sets its
mode attributes. ``FaceMoE`` offers the same context managers for all its blocks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import nn

from facemoe.gating.spec import DOMAIN, OP_TYPE, plugin_support_problems, support_summary
from facemoe.gating.torch_op import sparse_moe_op

RoutingMode = Literal["sparse", "static"]
ROUTING_MODES: tuple[str, ...] = ("sparse", "static")
# How the block is expressed in an exported graph: standard ONNX ops, or one facemoe::SparseMoE node.
GatingMode = Literal["onnx", "plugin"]
GATING_MODES: tuple[str, ...] = ("onnx", "plugin")
# What computes the block in PyTorch (inference only but "torch"): the module's own ops, the sparse Triton
# kernels, or PyTorch's grouped GEMM over the routed tokens in the input's dtype or in bf16 (the dtype torch
# 2.11's CUDA grouped GEMM takes); the grouped paths route with the module's own router (docs/GATING_OP.md).
MoEKernel = Literal["torch", "triton", "grouped", "grouped_bf16"]
MOE_KERNELS: tuple[str, ...] = ("torch", "triton", "grouped", "grouped_bf16")
# Measured on an H200 (fp16, compiled, docs/BENCHMARKS.md): the packed path is faster at batch 1-8
# (1.79 vs 2.35 ms; 2.97 vs 3.21 ms) and slower at batch 256 (55.5 vs 52.6 ms), where the per-expert GEMMs
# win; batch 8 of the first stage is 3,200 tokens.
PACKED_MAX_TOKENS = 4096
# Mode attributes of earlier versions, now owned by the block: assigning one fails loudly with the new way.
_RETIRED = {
    "record_routing": "use `with moe.recording_routing() as calls:` (or the model's)",
    "last_routing": "use `with moe.recording_routing() as calls:` (or the model's)",
    "track_aux_loss": "use `with moe.tracking_aux_loss() as losses:` (or the model's)",
    "aux_loss": "use `with moe.tracking_aux_loss() as losses:` (or the model's)",
    "fuse_fc1": "use `with moe.tracing():` (or the model's)",
    "gating": "use `with moe.tracing(gating=...):` (or the model's)",
    "routing": "use moe.set_routing(...) or the constructor's routing=",
    "packed_max_tokens": "use moe.pack_experts(max_tokens=...)",
}


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


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, not {value!r}")


class MoE(nn.Module):
    """FaceMoE FFN: ``num_experts`` experts and a top-``k`` router (state-dict keys as official)."""

    def __init__(
        self,
        dim: int,
        hidden: int,
        num_experts: int,
        k: int,
        routing: RoutingMode = "static",
        *,
        kernel: MoEKernel = "torch",
    ) -> None:
        super().__init__()
        _check_choice("routing", routing, ROUTING_MODES)
        _check_choice("kernel", kernel, MOE_KERNELS)
        self.num_experts = num_experts
        self.k = k
        self.experts = nn.ModuleList(Expert(dim, hidden) for _ in range(num_experts))
        self.router = TopKRouter(dim, num_experts)
        self._routing: RoutingMode = routing
        self._kernel: MoEKernel = "torch"
        # Set only inside tracing(): the experts' first layers run as one wide matmul (what the ONNX export
        # emits: one GEMM of N*hidden columns feeds TensorRT better than N narrow ones), and "plugin" makes
        # the block one facemoe::SparseMoE node (docs/GATING_OP.md).
        self._fuse_fc1 = False
        self._gating: GatingMode = "onnx"
        # Open while recording_routing() / tracking_aux_loss() are: every forward appends to them.
        self._routing_log: list[torch.Tensor] | None = None
        self._aux_log: list[torch.Tensor] | None = None
        # (fc1 weight (N*H, C), fc1 bias (N*H), fc2 weight (N, C, H), fc2 bias (N, C)); see pack_experts.
        self._packed: tuple[torch.Tensor, ...] | None = None
        self._packed_max_tokens = PACKED_MAX_TOKENS
        # The kernel's stacked weights, built at its first call per dtype and device.
        self._kernel_weights: tuple[torch.Tensor, ...] | None = None
        if kernel != "torch":
            self._set_kernel(kernel)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _RETIRED:
            raise AttributeError(f"MoE.{name} is not set from outside any more: {_RETIRED[name]}")
        super().__setattr__(name, value)

    # --- Read-only views of the mode ------------------------------------------------------------------
    @property
    def routing(self) -> RoutingMode:
        return self._routing

    @property
    def kernel(self) -> MoEKernel:
        return self._kernel

    @property
    def gating(self) -> GatingMode:
        return self._gating

    @property
    def block_shape(self) -> tuple[int, int]:
        """(channels, expert hidden size)."""
        fc1 = self._expert_list()[0].fc1
        return fc1.in_features, fc1.out_features

    def support_problems(self) -> list[str]:
        """Why this block cannot run as ``facemoe::SparseMoE`` (GPU kernels, plugin export); empty when it can."""
        dim, hidden = self.block_shape
        return plugin_support_problems(dim, hidden, self.num_experts, self.k)

    def stacked_weights(self) -> tuple[torch.Tensor, ...]:
        """(router (N, C), fc1 (N, H, C), fc1 bias (N, H), fc2 (N, C, H), fc2 bias (N, C)): the op's layout."""
        experts = self._expert_list()
        return (
            self.router.gate.weight,
            torch.stack([e.fc1.weight for e in experts]),
            torch.stack([e.fc1.bias for e in experts]),
            torch.stack([e.fc2.weight for e in experts]),
            torch.stack([e.fc2.bias for e in experts]),
        )

    def _expert_list(self) -> list[Expert]:
        return [cast(Expert, e) for e in self.experts]

    # --- Mode changes owned by the block ---------------------------------------------------------------
    def set_routing(self, routing: RoutingMode) -> MoE:
        _check_choice("routing", routing, ROUTING_MODES)
        self._routing = routing
        return self

    def _set_kernel(self, kernel: MoEKernel) -> None:
        _check_choice("kernel", kernel, MOE_KERNELS)
        if kernel != "torch":
            problems = self.support_problems()
            if problems:
                raise ValueError(f"cannot use the sparse MoE kernel: {'; '.join(problems)}")
        self._kernel = kernel
        self._kernel_weights = None

    def pack_experts(self, max_tokens: int = PACKED_MAX_TOKENS) -> MoE:
        """Inference speed-up for static routing: the experts' weights move into stacked tensors, each
        expert's parameters become views of them, and the forward runs fc1 as one GEMM and fc2 as one
        batched GEMM (3 GEMM launches instead of 6, no per-call weight concatenation) for calls of up to
        ``max_tokens`` tokens; larger calls keep the per-expert GEMMs, which share the same storage.

        Call it after the final ``.to()``/``.half()``: any later conversion drops the packing (``_apply``)
        and the module falls back to the per-expert path, so it can never run stale weights.
        """
        with torch.no_grad():
            _, w1, b1, w2, b2 = self.stacked_weights()  # (N, H, C), (N, H), (N, C, H), (N, C): fresh storage
            for i, expert in enumerate(self._expert_list()):
                expert.fc1.weight.data, expert.fc1.bias.data = w1[i], b1[i]
                expert.fc2.weight.data, expert.fc2.bias.data = w2[i], b2[i]
        self._packed = (w1.flatten(0, 1), b1.flatten(), w2, b2)
        self._packed_max_tokens = max_tokens
        return self

    @property
    def packed(self) -> bool:
        return self._packed is not None

    @contextlib.contextmanager
    def recording_routing(self) -> Iterator[list[torch.Tensor]]:
        """Collect the (tokens, k) top-k expert indices of every forward inside the block (not the Triton kernel's)."""
        if self._kernel == "triton":
            raise RuntimeError(
                "routing is recorded by the torch kernel only (and the grouped ones), not the Triton one"
            )
        saved, self._routing_log = self._routing_log, []
        try:
            yield self._routing_log
        finally:
            self._routing_log = saved

    @contextlib.contextmanager
    def tracking_aux_loss(self, losses: list[torch.Tensor] | None = None) -> Iterator[list[torch.Tensor]]:
        """Collect the official auxiliary loss of every forward inside the block (into ``losses`` if given)."""
        saved, self._aux_log = self._aux_log, [] if losses is None else losses
        try:
            yield self._aux_log
        finally:
            self._aux_log = saved

    @contextlib.contextmanager
    def tracing(self, gating: GatingMode = "onnx") -> Iterator[MoE]:
        """The traced configuration: static routing, fused fc1, torch ops, no records; ``gating="plugin"``
        makes the block one ``facemoe::SparseMoE`` node (docs/GATING_OP.md)."""
        _check_choice("gating", gating, GATING_MODES)
        saved = (self._routing, self._fuse_fc1, self._gating, self._kernel, self._routing_log, self._aux_log)
        self._routing, self._fuse_fc1, self._gating, self._kernel = "static", True, gating, "torch"
        self._routing_log = self._aux_log = None
        try:
            yield self
        finally:
            self._routing, self._fuse_fc1, self._gating, self._kernel, self._routing_log, self._aux_log = saved

    @contextlib.contextmanager
    def using_kernel(self, kernel: MoEKernel) -> Iterator[MoE]:
        """Compute the block with ``kernel`` inside the block; the stacked-weight cache goes at the exit."""
        saved = self._kernel
        self._set_kernel(kernel)
        try:
            yield self
        finally:
            self._kernel = saved
            self._kernel_weights = None

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # A dtype/device change re-creates the parameters: the packed views and kernel copies are stale.
        self._packed = None
        self._kernel_weights = None
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._kernel_weights = None  # new values in the same parameters
        super()._load_from_state_dict(*args, **kwargs)

    # --- Forward ---------------------------------------------------------------------------------------
    def gate_matrix(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense (T, N) gate holding the raw logit of each token's top-k experts, 0 elsewhere."""
        top_val, top_idx = torch.topk(logits, self.k, dim=-1)
        gates = torch.zeros_like(logits).scatter(-1, top_idx, top_val)
        return gates, top_idx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        if self._gating == "plugin":
            # The whole block becomes one node on (T, C) tokens; the reshapes around it are the same as in
            # the standard path, so the rest of the graph is unchanged.
            return sparse_moe_op(flat, *self.stacked_weights(), k=self.k, num_experts=self.num_experts).reshape(shape)
        if self._kernel == "triton":
            return self._forward_kernel(flat).reshape(shape)
        logits = self.router(flat)
        if self._kernel != "torch":
            out, top_idx = self._forward_grouped(flat, logits)
        elif self._routing == "sparse":
            out, top_idx = self._forward_sparse(flat, logits)
        else:
            out, top_idx = self._forward_static(flat, logits)
        if self._routing_log is not None:
            self._routing_log.append(top_idx.detach())
        if self._aux_log is not None:
            self._aux_log.append(router_aux_loss(logits, top_idx, self.num_experts))
        return out.reshape(shape)

    def _forward_kernel(self, flat: torch.Tensor) -> torch.Tensor:
        from facemoe.gating.triton import sparse_moe

        weights = self._kernel_weights
        if weights is None or weights[1].dtype != flat.dtype or weights[1].device != flat.device:
            with torch.no_grad():
                stacked = self.stacked_weights()
                weights = (stacked[0].float(), *(t.to(flat.dtype).contiguous() for t in stacked[1:]))
            self._kernel_weights = weights
        return sparse_moe(flat, *weights, k=self.k)

    def _forward_grouped(self, flat: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from facemoe.gating.grouped_mm import expert_weights, grouped_experts

        dtype = torch.bfloat16 if self._kernel == "grouped_bf16" else flat.dtype
        weights = self._kernel_weights
        if weights is None or weights[0].dtype != dtype or weights[0].device != flat.device:
            with torch.no_grad():
                weights = expert_weights(*self.stacked_weights()[1:], dtype)
            self._kernel_weights = weights
        top_val, top_idx = torch.topk(logits, self.k, dim=-1)  # the reference's routing, bit for bit
        return grouped_experts(flat, top_val, top_idx, *weights), top_idx

    def _forward_static(self, flat: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gates, top_idx = self.gate_matrix(logits)
        if self._packed is not None and flat.shape[0] <= self._packed_max_tokens:
            w1, b1, w2, b2 = self._packed
            tokens = flat.shape[0]
            hidden = F.gelu(F.linear(flat, w1, b1)).view(tokens, self.num_experts, -1).transpose(0, 1)
            y = torch.baddbmm(b2.unsqueeze(1), hidden, w2.transpose(1, 2))  # (N, T, C)
            return (gates.t().unsqueeze(-1).to(y.dtype) * y).sum(dim=0), top_idx
        if self._fuse_fc1:
            experts = self._expert_list()
            weight = torch.cat([e.fc1.weight for e in experts], dim=0)
            bias = torch.cat([e.fc1.bias for e in experts], dim=0)
            chunks = F.gelu(F.linear(flat, weight, bias)).chunk(self.num_experts, dim=-1)
            outputs = [e.fc2(h) for e, h in zip(experts, chunks, strict=True)]
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


def check_plugin_export(model: nn.Module) -> None:
    """Raise ``ExportError`` naming every reason the model's MoE blocks cannot be exported as the custom op."""
    from facemoe.errors import ExportError

    problems: list[str] = []
    for module in model.modules():
        if isinstance(module, MoE):
            problems += [p for p in module.support_problems() if p not in problems]
    if problems:
        raise ExportError(
            f"--gating plugin: the {DOMAIN}::{OP_TYPE} kernels do not support this model: {'; '.join(problems)}. "
            f"They need {support_summary()}. Export with --gating onnx (standard ops) instead."
        )
