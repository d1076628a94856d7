"""Placement plan: which MatMul/Gemm/Conv nodes get Q/DQ on which inputs, and why the others do not."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

import onnx
from onnx import TensorProto, helper

from facemoe.export.int8.options import QUANTIZABLE_OPS, Int8Options
from facemoe.export.onnx_graph import router_gate_nodes

# Ops that may sit between the head Linear and the graph output (the BN1d after the Linear).
_HEAD_PASS_THROUGH = frozenset(
    {"BatchNormalization", "Add", "Mul", "Div", "Sub", "Identity", "Reshape", "Flatten", "Cast", "Squeeze"}
)
# How the exporter names the nodes of one Swin block (torch module path).
_BLOCK_NAME = re.compile(r"^/layers\.\d+/blocks\.\d+/")


@dataclass
class QuantizedNode:
    """One MatMul/Gemm/Conv that gets Q/DQ on its inputs."""

    name: str
    op_type: str
    role: str  # "weight-gemm", "conv" or "activation-matmul"
    activation_inputs: list[int]
    weight_input: int | None = None
    weight_axis: int | None = None


@dataclass
class QuantizationPlan:
    nodes: list[QuantizedNode] = field(default_factory=list)
    excluded: dict[str, str] = field(default_factory=dict)
    activations: list[str] = field(default_factory=list)

    @property
    def ops(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for node in self.nodes:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
        return counts

    @property
    def roles(self) -> dict[str, int]:
        return {role: sum(1 for n in self.nodes if n.role == role) for role in sorted({n.role for n in self.nodes})}


def node_key(node: onnx.NodeProto, index: int) -> str:
    return node.name or f"{node.op_type}_{index}:{node.output[0]}"


def int_attribute(node: onnx.NodeProto, name: str, default: int) -> int:
    for attr in node.attribute:
        if attr.name == name:
            return int(helper.get_attribute_value(attr))
    return default


def head_nodes(model: onnx.ModelProto) -> set[str]:
    """Names of the weight GEMMs whose output reaches a graph output through elementwise/BN ops only."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in model.graph.output}

    def reaches_output(tensor: str, depth: int = 0) -> bool:
        if tensor in outputs:
            return True
        if depth > 8:
            return False
        return any(
            nxt.op_type in _HEAD_PASS_THROUGH and reaches_output(nxt.output[0], depth + 1)
            for nxt in consumers.get(tensor, [])
        )

    return {
        node.name for node in model.graph.node if node.op_type in ("MatMul", "Gemm") and reaches_output(node.output[0])
    }


def transformer_blocks(model: onnx.ModelProto) -> list[str]:
    """Node-name prefixes of the Swin blocks (``/layers.i/blocks.j/``) in graph order."""
    found: dict[str, None] = {}
    for node in model.graph.node:
        match = _BLOCK_NAME.match(node.name)
        if match:
            found.setdefault(match.group(0))
    return list(found)


def _weight_axis(node: onnx.NodeProto, weight: TensorProto) -> int:
    """Output-channel axis of a weight, the axis TensorRT expects per-channel scales on."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        return 0 if int_attribute(node, "transB", 0) else 1
    return len(weight.dims) - 1  # MatMul: (..., K, N)


def _exclusion(node: onnx.NodeProto, key: str, options: Int8Options, facts: _GraphFacts) -> str | None:
    """Why ``node`` keeps float inputs, or None when its inputs may be quantized."""
    if node.op_type not in options.op_types:
        return f"op type {node.op_type} not selected"
    if any(fnmatch.fnmatchcase(key, pattern) for pattern in options.nodes_to_exclude):
        return "nodes_to_exclude"
    if node.name in facts.routers and options.exclude_router:
        return "router gate (feeds TopK): kept fp32 so routing does not flip"
    if node.name in facts.heads and not options.quantize_head:
        return "head Linear (quantize_head=False)"
    if node.input[0] in facts.graph_inputs and not options.quantize_first_layer:
        return "first layer reads the image (quantize_first_layer=False)"
    if node.input[0] in facts.initializers:
        return "constant first input"
    return None


@dataclass
class _GraphFacts:
    initializers: dict[str, TensorProto]
    routers: set[str]
    heads: set[str]
    graph_inputs: set[str]


def plan_quantization(model: onnx.ModelProto, options: Int8Options | None = None) -> QuantizationPlan:
    """Decide which nodes get Q/DQ and why the others do not (no graph change)."""
    options = options or Int8Options()
    unknown = set(options.op_types) - set(QUANTIZABLE_OPS)
    if unknown:
        raise ValueError(f"cannot quantize op types {sorted(unknown)}; supported: {', '.join(QUANTIZABLE_OPS)}")
    facts = _GraphFacts(
        initializers={init.name: init for init in model.graph.initializer},
        routers=router_gate_nodes(model),
        heads=head_nodes(model),
        graph_inputs={i.name for i in model.graph.input},
    )
    float_blocks = options.float_blocks
    float_prefixes = transformer_blocks(model)[: max(float_blocks, 0)]
    plan = QuantizationPlan()
    seen_activations: set[str] = set()
    for index, node in enumerate(model.graph.node):
        if node.op_type not in QUANTIZABLE_OPS:
            continue
        key = node_key(node, index)
        reason = _exclusion(node, key, options, facts)
        if reason is not None:
            plan.excluded[key] = reason
            continue
        weight = facts.initializers.get(node.input[1]) if len(node.input) > 1 else None
        if weight is not None:
            if weight.data_type != TensorProto.FLOAT:
                plan.excluded[key] = f"weight is not fp32 (type {weight.data_type})"
                continue
            role = "conv" if node.op_type == "Conv" else "weight-gemm"
            spec = QuantizedNode(key, node.op_type, role, [0], 1, _weight_axis(node, weight))
        elif node.op_type == "MatMul":
            if not options.quantize_attention_matmuls:
                plan.excluded[key] = "activation-activation matmul (quantize_attention_matmuls=False)"
                continue
            spec = QuantizedNode(key, node.op_type, "activation-matmul", [0, 1])
        else:
            plan.excluded[key] = "weight is not an initializer"
            continue
        if any(node.name.startswith(prefix) for prefix in float_prefixes):
            plan.excluded[key] = f"in the first {float_blocks} transformer block(s) (float_blocks={float_blocks})"
            continue
        plan.nodes.append(spec)
        for idx in spec.activation_inputs:
            tensor = node.input[idx]
            if tensor not in seen_activations:
                seen_activations.add(tensor)
                plan.activations.append(tensor)
    return plan
