"""The ``facemoe::SparseMoE`` custom op: one ONNX node for a whole MoE block (docs/GATING_OP.md).

``MoE`` routes through :func:`sparse_moe_op` when its ``gating`` is ``"plugin"`` (set by the export's
``export_mode(model, gating="plugin")``). Eagerly the op computes the reference function; under
``torch.onnx.export(dynamo=False)`` the ``symbolic`` below replaces the router, TopK, ScatterElements and
the dense experts by a single node whose weights are stacked per expert, so runtimes (ONNX Runtime
custom op, TensorRT plugin) can run only the selected experts.

The limits in :func:`plugin_support_problems` are those of the GPU kernels (Triton, TensorRT AOT); the
numpy ONNX Runtime kernel is general, but a graph that only runs on the CPU would defeat the purpose,
so export refuses what the GPU kernels cannot run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from facemoe.model.moe import Expert, MoE

DOMAIN = "facemoe"
OP_TYPE = "SparseMoE"
OP_VERSION = 1
# What the GPU kernels implement: k experts kept in registers per token, N logits compared in one pass,
# and 16-wide MMA tiles along the channel and hidden dimensions.
MAX_EXPERTS = 8
SUPPORTED_K = (1, 2)
DIM_MULTIPLE = 16


def plugin_support_problems(dim: int, hidden: int, num_experts: int, k: int) -> list[str]:
    """Why a block of this shape cannot use the custom op (empty when it can)."""
    problems = []
    if k not in SUPPORTED_K:
        problems.append(f"k={k} (supported: {', '.join(map(str, SUPPORTED_K))})")
    if not 2 <= num_experts <= MAX_EXPERTS:
        problems.append(f"num_experts={num_experts} (supported: 2..{MAX_EXPERTS})")
    if k > num_experts:
        problems.append(f"k={k} > num_experts={num_experts}")
    if dim % DIM_MULTIPLE:
        problems.append(f"channels {dim} not a multiple of {DIM_MULTIPLE}")
    if hidden % DIM_MULTIPLE:
        problems.append(f"expert hidden size {hidden} not a multiple of {DIM_MULTIPLE}")
    return problems


def block_shape(moe: MoE) -> tuple[int, int]:
    """(channels, expert hidden size) of a MoE block."""
    fc1 = cast("Expert", moe.experts[0]).fc1
    return fc1.in_features, fc1.out_features


def check_plugin_export(model: torch.nn.Module) -> None:
    """Raise ``ExportError`` naming every reason the model's MoE blocks cannot be exported as the custom op."""
    from facemoe.errors import ExportError
    from facemoe.model.moe import MoE

    problems: list[str] = []
    for module in model.modules():
        if isinstance(module, MoE):
            dim, hidden = block_shape(module)
            for problem in plugin_support_problems(dim, hidden, module.num_experts, module.k):
                if problem not in problems:
                    problems.append(problem)
    if problems:
        raise ExportError(
            f"--gating plugin: the {DOMAIN}::{OP_TYPE} kernels do not support this model: {'; '.join(problems)}. "
            f"They need k in {{{', '.join(map(str, SUPPORTED_K))}}}, 2..{MAX_EXPERTS} experts and channel and hidden "
            f"sizes that are multiples of {DIM_MULTIPLE}. Export with --gating onnx (standard ops) instead."
        )


def stacked_weights(moe: MoE) -> tuple[torch.Tensor, ...]:
    """(router (N, C), fc1 (N, H, C), fc1 bias (N, H), fc2 (N, C, H), fc2 bias (N, C)) in the op's layout."""
    experts = [cast("Expert", e) for e in moe.experts]
    return (
        moe.router.gate.weight,
        torch.stack([e.fc1.weight for e in experts]),
        torch.stack([e.fc1.bias for e in experts]),
        torch.stack([e.fc2.weight for e in experts]),
        torch.stack([e.fc2.bias for e in experts]),
    )


def reference_sparse_moe(
    x: torch.Tensor,
    router: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    *,
    k: int,
) -> torch.Tensor:
    """The op's semantics on (T, C) tokens: raw-logit top-k, raw logits as weights, ascending expert order."""
    logits = F.linear(x, router)
    top_val, top_idx = torch.topk(logits, k, dim=-1)
    gates = torch.zeros_like(logits).scatter(-1, top_idx, top_val)
    out = torch.zeros_like(x)
    for e in range(router.shape[0]):
        hidden = F.gelu(F.linear(x, w1[e], b1[e]))
        out = out + gates[:, e : e + 1] * F.linear(hidden, w2[e], b2[e])
    return out


class SparseMoEFunction(torch.autograd.Function):
    """Eager: the reference computation. Traced to ONNX: one ``facemoe::SparseMoE`` node."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        router: torch.Tensor,
        w1: torch.Tensor,
        b1: torch.Tensor,
        w2: torch.Tensor,
        b2: torch.Tensor,
        k: int,
        num_experts: int,
    ) -> torch.Tensor:
        return reference_sparse_moe(x, router, w1, b1, w2, b2, k=k)

    @staticmethod
    def symbolic(  # type: ignore[no-untyped-def]
        g, x, router, w1, b1, w2, b2, k: int, num_experts: int
    ):
        node = g.op(
            f"{DOMAIN}::{OP_TYPE}",
            x,
            router,
            w1,
            b1,
            w2,
            b2,
            k_i=k,
            num_experts_i=num_experts,
            # The TensorRT ONNX parser maps a node to the plugin registered as
            # "<plugin_namespace>::<op_type>", with the namespace taken from this attribute.
            plugin_namespace_s=DOMAIN,
        )
        node.setType(x.type())
        return node


def sparse_moe_op(flat: torch.Tensor, moe: MoE) -> torch.Tensor:
    """(T, C) -> (T, C) through the custom op (traceable to a single ONNX node)."""
    return SparseMoEFunction.apply(flat, *stacked_weights(moe), moe.k, moe.num_experts)  # type: ignore[no-any-return]


__all__ = [
    "DOMAIN",
    "OP_TYPE",
    "OP_VERSION",
    "SparseMoEFunction",
    "block_shape",
    "check_plugin_export",
    "plugin_support_problems",
    "reference_sparse_moe",
    "sparse_moe_op",
    "stacked_weights",
]
