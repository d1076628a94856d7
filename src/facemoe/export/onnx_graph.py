"""ONNX graph helpers shared by the fp16, int8 and parity passes (no torch).

One definition each of: where the routers are (the gate MatMul/Gemm feeding a TopK), a probe copy of a
graph that exposes intermediate tensors, the routing probe and its agreement measure, and the save that
moves weights to an external data file when a graph would pass protobuf's 2 GB limit.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import helper

from facemoe.runtime.onnx_probe import routing_agreement, routing_probe

# A graph this large is saved with external data: protobuf refuses messages over 2 GB.
EXTERNAL_DATA_THRESHOLD = 1_900 * 1024 * 1024
# Ops that only move or reshape data; a router's logits may pass through them on the way to TopK.
PASS_THROUGH_OPS = frozenset(
    {
        "Reshape",
        "Transpose",
        "Slice",
        "Concat",
        "Gather",
        "Split",
        "Flatten",
        "Squeeze",
        "Unsqueeze",
        "Identity",
        "Cast",
    }
)
# A short chain; a loop guard rather than a real limit.
_MAX_ROUTER_CHAIN = 16


@dataclass(frozen=True)
class Router:
    """The gate MatMul/Gemm of one MoE router and the data-movement nodes between it and its TopK."""

    gate: str
    between: tuple[str, ...]
    topk: str


def find_routers(graph: onnx.GraphProto) -> list[Router]:
    """Every TopK whose input comes from a MatMul/Gemm through data-movement ops only, in graph order."""
    producers = {out: node for node in graph.node for out in node.output}
    routers: list[Router] = []
    for node in graph.node:
        if node.op_type != "TopK":
            continue
        between: list[str] = []
        current = producers.get(node.input[0])
        for _ in range(_MAX_ROUTER_CHAIN):
            if current is None or current.op_type not in PASS_THROUGH_OPS:
                break
            between.append(current.name)
            current = producers.get(current.input[0])
        if current is not None and current.op_type in ("MatMul", "Gemm"):
            routers.append(Router(current.name, tuple(between), node.name))
    return routers


def router_gate_nodes(model: onnx.ModelProto) -> set[str]:
    """Names of the router gate MatMul/Gemm nodes (the ones that feed a TopK)."""
    return {router.gate for router in find_routers(model.graph)}


def with_extra_outputs(model: onnx.ModelProto, tensors: Iterable[str], in_place: bool = False) -> onnx.ModelProto:
    """``model`` (a copy unless ``in_place``) that also returns ``tensors`` (intermediate values) as outputs."""
    if in_place:
        probe = model
    else:
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output} | {i.name for i in probe.graph.input}
    for name in tensors:
        if name not in existing:
            probe.graph.output.append(helper.make_empty_tensor_value_info(name))
            existing.add(name)
    return probe


def save_onnx(model: onnx.ModelProto, path: str | Path) -> list[str]:
    """Save ``model``; weights go to ``<name>.data`` beside it when the file would pass the 2 GB limit.

    Returns the external data file names (relative to the model's folder), empty when self-contained.
    """
    path = Path(path)
    if model.ByteSize() < EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(model, str(path))
        return []
    data_name = path.name + ".data"
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data_name,
        size_threshold=1024,
    )
    return [data_name]


def remove_onnx(path: Path) -> None:
    """Delete a graph written by :func:`save_onnx` together with its external data file."""
    path.unlink(missing_ok=True)
    path.with_name(path.name + ".data").unlink(missing_ok=True)


__all__ = [
    "EXTERNAL_DATA_THRESHOLD",
    "PASS_THROUGH_OPS",
    "Router",
    "find_routers",
    "remove_onnx",
    "router_gate_nodes",
    "routing_agreement",
    "routing_probe",
    "save_onnx",
    "with_extra_outputs",
]
