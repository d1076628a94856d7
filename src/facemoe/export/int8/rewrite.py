"""Q/DQ rewrite: int8 weights with per-channel DequantizeLinear, per-tensor Q/DQ pairs on activations."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from facemoe.errors import ExportError
from facemoe.export.int8.calibrate import MIN_AMAX
from facemoe.export.int8.plan import QuantizationPlan, node_key

_INT8_MAX = 127


def _quantize_weight(weight: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    reduce_axes = tuple(a for a in range(weight.ndim) if a != axis)
    amax = np.abs(weight).max(axis=reduce_axes).astype(np.float32)
    # An all-zero channel quantizes to 0 with any scale; 1 keeps the scale valid (positive, finite).
    scale = np.where(amax > 0, amax / np.float32(_INT8_MAX), np.float32(1.0)).astype(np.float32)
    shape = [1] * weight.ndim
    shape[axis] = -1
    quantized = np.clip(np.rint(weight / scale.reshape(shape)), -_INT8_MAX, _INT8_MAX).astype(np.int8)
    return quantized, scale


def insert_qdq(
    model: onnx.ModelProto, plan: QuantizationPlan, amax: dict[str, float], split_gemm_bias: bool = True
) -> onnx.ModelProto:
    """Rewrite ``model`` (in place) with Q/DQ on the planned inputs; returns it.

    ``split_gemm_bias`` turns a quantized ``Gemm(x, W, b)`` into ``Gemm(x, W) + b``: ONNX Runtime's CPU
    optimizer fuses ``DQ, DQ -> Gemm`` without a bias into its integer QGemm kernel but runs a Gemm with an
    fp32 bias as dequantize + float Gemm (slower than plain fp32); a 2-D ``MatMul + Add`` is no better, ORT
    folds it back into a float Gemm. TensorRT fuses the separate bias add into the INT8 GEMM either way.
    """
    graph = model.graph
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < 13:
        raise ExportError(f"opset {opset} is too old for per-channel DequantizeLinear (needs >= 13)")
    initializers = {init.name: init for init in graph.initializer}
    nodes_by_key = {node_key(node, i): node for i, node in enumerate(graph.node)}
    weight_nodes: list[onnx.NodeProto] = []
    activation_qdq: dict[str, list[onnx.NodeProto]] = {}
    dequantized_weight: dict[tuple[str, int], str] = {}
    new_initializers: list[TensorProto] = []

    def activation_output(tensor: str) -> str:
        if tensor not in activation_qdq:
            scale_name, zp_name = f"{tensor}_int8_scale", f"{tensor}_int8_zero_point"
            scale = np.float32(max(amax[tensor], MIN_AMAX) / _INT8_MAX)
            new_initializers.append(numpy_helper.from_array(np.array(scale, dtype=np.float32), scale_name))
            new_initializers.append(numpy_helper.from_array(np.array(0, dtype=np.int8), zp_name))
            quantized, dequantized = f"{tensor}_int8_q", f"{tensor}_int8_dq"
            activation_qdq[tensor] = [
                helper.make_node(
                    "QuantizeLinear", [tensor, scale_name, zp_name], [quantized], name=f"{tensor}_QuantizeLinear"
                ),
                helper.make_node(
                    "DequantizeLinear",
                    [quantized, scale_name, zp_name],
                    [dequantized],
                    name=f"{tensor}_DequantizeLinear",
                ),
            ]
        return activation_qdq[tensor][1].output[0]

    def weight_output(name: str, axis: int) -> str:
        key = (name, axis)
        if key not in dequantized_weight:
            weight = numpy_helper.to_array(initializers[name])
            quantized, scale = _quantize_weight(weight, axis)
            q_name, scale_name, zp_name = f"{name}_int8", f"{name}_int8_scale", f"{name}_int8_zero_point"
            if any(k[0] == name for k in dequantized_weight):  # same weight used with another axis
                q_name, scale_name, zp_name = (f"{n}_axis{axis}" for n in (q_name, scale_name, zp_name))
            new_initializers.append(numpy_helper.from_array(quantized, q_name))
            new_initializers.append(numpy_helper.from_array(scale, scale_name))
            new_initializers.append(numpy_helper.from_array(np.zeros(scale.shape, dtype=np.int8), zp_name))
            out = f"{q_name}_dq"
            weight_nodes.append(
                helper.make_node(
                    "DequantizeLinear",
                    [q_name, scale_name, zp_name],
                    [out],
                    name=f"{q_name}_DequantizeLinear",
                    axis=axis,
                )
            )
            dequantized_weight[key] = out
        return dequantized_weight[key]

    bias_adds: dict[str, onnx.NodeProto] = {}  # new Gemm output -> the Add that restores the old output
    for spec in plan.nodes:
        node = nodes_by_key[spec.name]
        for idx in spec.activation_inputs:
            node.input[idx] = activation_output(node.input[idx])
        if spec.weight_input is not None and spec.weight_axis is not None:
            node.input[spec.weight_input] = weight_output(node.input[spec.weight_input], spec.weight_axis)
        has_bias = node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] != ""
        beta = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "beta"), 1.0)
        if split_gemm_bias and has_bias and beta == 1.0:
            bias, output = node.input[2], node.output[0]
            del node.input[2]
            node.output[0] = f"{output}_before_bias"
            bias_adds[node.output[0]] = helper.make_node(
                "Add", [node.output[0], bias], [output], name=f"{node.name}_bias"
            )

    # Order: weight DQs first (they read initializers only), each activation Q/DQ right after its producer.
    graph_inputs = {i.name for i in graph.input}
    ordered: list[onnx.NodeProto] = list(weight_nodes)
    for tensor, pair in activation_qdq.items():
        if tensor in graph_inputs or tensor in initializers:
            ordered.extend(pair)
    for node in graph.node:
        produced = [node]
        if node.output[0] in bias_adds:
            produced.append(bias_adds[node.output[0]])
        for item in produced:
            ordered.append(item)
            ordered.extend(pair for out in item.output if out in activation_qdq for pair in activation_qdq[out])
    del graph.node[:]
    graph.node.extend(ordered)

    still_used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    kept = [init for init in graph.initializer if init.name in still_used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    graph.initializer.extend(new_initializers)
    return model
