"""Static checks of an exported graph: no data-dependent shapes, no baked-in trace batch.

The checks work on the ONNX protobuf alone (no torch), so they also run in CI on artifacts produced
elsewhere. They complement, not replace, the numerical check at several batch sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from facemoe.errors import ExportError

# Ops whose output shape depends on tensor values, or that carry control flow: either makes the graph
# unbuildable as a static TensorRT engine and signals routing frozen or computed in Python.
FORBIDDEN_OPS = frozenset({"NonZero", "Unique", "Loop", "If", "Scan", "Compress"})
# Ops whose "shape" input is a tensor of dimensions.
_SHAPE_INPUT = {"Reshape": 1, "Expand": 1, "ConstantOfShape": 0, "Tile": 1}

# The export traces with a batch size that is a prime no model dimension is a multiple of, so a
# constant that holds it (or a multiple of it) in a leading dimension betrays a baked-in batch.
TRACE_BATCH = 7


@dataclass
class GraphReport:
    ops: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _constant_values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    values = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer if init.data_type == 7}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type == onnx.TensorProto.INT64:
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def check_graph(model: onnx.ModelProto, trace_batch: int = TRACE_BATCH, input_name: str = "input") -> GraphReport:
    report = GraphReport()
    for node in model.graph.node:
        report.ops[node.op_type] = report.ops.get(node.op_type, 0) + 1
        if node.op_type in FORBIDDEN_OPS:
            report.problems.append(f"node {node.name or node.output[0]!r} is a {node.op_type} (data-dependent shape)")
    constants = _constant_values(model)
    for node in model.graph.node:
        index = _SHAPE_INPUT.get(node.op_type)
        if index is None or len(node.input) <= index:
            continue
        shape = constants.get(node.input[index])
        if shape is None or shape.ndim != 1 or shape.size == 0:
            continue
        lead = int(shape[0])
        if lead >= trace_batch and lead % trace_batch == 0:
            report.problems.append(
                f"{node.op_type} {node.name or node.output[0]!r} has constant shape {shape.tolist()} whose leading "
                f"dimension is a multiple of the trace batch {trace_batch}: the batch size is baked in"
            )
    for value in model.graph.input:
        if value.name != input_name:
            continue
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value"):
            report.problems.append(f"input {value.name!r} has a fixed batch dimension {dims[0].dim_value}")
    return report


def assert_graph_ok(model: onnx.ModelProto, source: str, **kwargs: object) -> GraphReport:
    report = check_graph(model, **kwargs)  # type: ignore[arg-type]
    if not report.ok:
        raise ExportError(f"{source}: graph check failed: " + "; ".join(report.problems[:3]))
    return report
