"""ONNX graph helpers for ``facemoe::SparseMoE`` nodes (onnx imported inside the functions)."""

from __future__ import annotations

from typing import Any

from facemoe.gating.spec import DOMAIN, WEIGHT_NAMES, is_sparse_moe


def name_op_weights(model: Any) -> int:
    """Give the stacked weights of each ``SparseMoE`` node readable names; returns how many were renamed.

    The exporter names them after the op (``facemoe::SparseMoE_1477``); precision tools and TensorRT
    refit address weights by name, so they get ``<block>.mlp.experts.fc1_weight`` and the like.
    """
    initializers = {init.name: init for init in model.graph.initializer}
    renamed = 0
    for node in model.graph.node:
        if not is_sparse_moe(node.domain, node.op_type):
            continue
        block = node.name.strip("/").rsplit("/", 1)[0].replace("/", ".") or node.output[0]
        for slot in range(2, 6):
            old = node.input[slot]
            init = initializers.get(old)
            if init is None or not old.startswith(f"{DOMAIN}::"):
                continue
            new = f"{block}.experts.{WEIGHT_NAMES[slot - 1]}"
            if new in initializers:
                continue
            init.name = new
            initializers[new] = initializers.pop(old)
            for other in model.graph.node:
                other.input[:] = [new if name == old else name for name in other.input]
            renamed += 1
    return renamed


def uses_custom_op(model_path: str) -> bool:
    """Whether an ONNX file contains ``facemoe::SparseMoE`` nodes (reads the graph, not the weights)."""
    import onnx

    model = onnx.load(model_path, load_external_data=False)
    return any(is_sparse_moe(n.domain, n.op_type) for n in model.graph.node)


__all__ = ["name_op_weights", "uses_custom_op"]
