"""``facemoe::SparseMoE`` in PyTorch: the reference function and the op that traces to one ONNX node.

Eagerly :class:`SparseMoEFunction` computes :func:`reference_sparse_moe`; under
``torch.onnx.export(dynamo=False)`` its ``symbolic`` replaces the router, TopK, ScatterElements and the
dense experts by a single node whose weights are stacked per expert (layout in :mod:`facemoe.gating.spec`),
so runtimes (ONNX Runtime custom op, TensorRT plugin) can run only the selected experts. The MoE module
routes through :func:`sparse_moe_op` while it is traced with ``gating="plugin"`` (``FaceMoE.tracing``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from facemoe.gating.spec import DOMAIN, OP_TYPE


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


def sparse_moe_op(
    flat: torch.Tensor,
    router: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    *,
    k: int,
    num_experts: int,
) -> torch.Tensor:
    """(T, C) -> (T, C) through the op (traceable to a single ONNX node); weights as in the spec.

    ``num_experts`` is a Python int (a node attribute), not read from ``router.shape``, which is traced.
    """
    return SparseMoEFunction.apply(flat, router, w1, b1, w2, b2, k, num_experts)  # type: ignore[no-any-return]


__all__ = ["SparseMoEFunction", "reference_sparse_moe", "sparse_moe_op"]
