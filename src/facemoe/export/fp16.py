"""FP16 mixed-precision ONNX: the precision is carried in the graph, as strongly typed TensorRT needs.

TensorRT 11 has no FP16 builder flag; a strongly typed network runs each layer in the type the ONNX
gives it. So this pass rewrites the fp32 graph: compute-heavy nodes (matmuls, convolution, GELU, the
data movement around them) run in float16, and the numerically sensitive ones stay in float32:

* LayerNormalization (mean/variance of up to 3072 channels overflow fp16 sums),
* Softmax (exponentials of attention logits),
* the router: the gate MatMul feeding TopK, TopK, ScatterElements -- flipping a near-tie in the
  2nd/3rd logit swaps an expert, which no later layer can undo,
* the residual stream (the Adds whose result feeds a LayerNormalization), so rounding does not pile
  up over 22 blocks,
* the head's BatchNormalization layers and the graph input/output.

A Cast is inserted wherever a tensor crosses between the two domains; TensorRT fuses these casts into
neighbouring kernels. Inputs and outputs stay float32.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from facemoe.export.onnx_graph import PASS_THROUGH_OPS, find_routers

# SparseMoE (the --gating plugin node) holds the router: its inputs and weights stay fp32 like TopK's.
FP32_OPS = frozenset({"LayerNormalization", "Softmax", "TopK", "ScatterElements", "BatchNormalization", "SparseMoE"})
_NON_FLOAT_OUTPUT_OPS = frozenset({"Shape", "Size", "NonZero", "ArgMax", "ArgMin"})


@dataclass
class Fp16Report:
    fp16_nodes: int = 0
    fp32_nodes: dict[str, int] = field(default_factory=dict)
    casts_inserted: int = 0
    fp16_params: int = 0
    fp32_params: int = 0

    def to_json(self) -> dict[str, object]:
        return {
            "fp16_nodes": self.fp16_nodes,
            "fp32_nodes": self.fp32_nodes,
            "casts_inserted": self.casts_inserted,
            "fp16_parameters": self.fp16_params,
            "fp32_parameters": self.fp32_params,
        }


def _float_tensors(model: onnx.ModelProto) -> set[str]:
    """Names of float32 tensors (graph inputs, initializers, and inferred intermediates)."""
    # Shape inference copies the whole model (twice, through C++); on the 1.86 GB full model that is
    # several GB for nothing, since it only needs each initializer's type and shape. Infer on a skeleton
    # whose initializers are graph inputs instead.
    skeleton = onnx.ModelProto()
    skeleton.ir_version = model.ir_version
    skeleton.opset_import.extend(model.opset_import)
    skeleton.graph.node.extend(model.graph.node)
    skeleton.graph.input.extend(model.graph.input)
    skeleton.graph.output.extend(model.graph.output)
    for init in model.graph.initializer:
        skeleton.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    inferred = onnx.shape_inference.infer_shapes(skeleton, strict_mode=False, data_prop=False)
    floats = set()
    for value in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            floats.add(value.name)
    floats.update(init.name for init in model.graph.initializer if init.data_type == TensorProto.FLOAT)
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type == TensorProto.FLOAT:
                    floats.add(node.output[0])
    return floats


def _residual_adds(graph: onnx.GraphProto, consumers: dict[str, list[onnx.NodeProto]]) -> set[str]:
    """Adds whose result reaches a LayerNormalization through data movement only (the residual stream)."""

    def feeds_layernorm(tensor: str, depth: int = 0) -> bool:
        for consumer in consumers.get(tensor, []):
            if consumer.op_type == "LayerNormalization":
                return True
            if (
                consumer.op_type in PASS_THROUGH_OPS
                and depth < 6
                and any(feeds_layernorm(o, depth + 1) for o in consumer.output)
            ):
                return True
        return False

    residual = {node.name for node in graph.node if node.op_type == "Add" and feeds_layernorm(node.output[0])}
    # The second residual Add of a block reads the first one; both belong to the stream.
    changed = True
    while changed:
        changed = False
        for node in graph.node:
            if node.op_type != "Add" or node.name in residual:
                continue
            if any(c.name in residual and c.op_type == "Add" for c in consumers.get(node.output[0], [])):
                residual.add(node.name)
                changed = True
    return residual


def convert_to_fp16(
    model: onnx.ModelProto, keep_residual_fp32: bool = True, in_place: bool = False
) -> tuple[onnx.ModelProto, Fp16Report]:
    """Return a mixed-precision version of ``model`` (fp32 graph in, fp32 I/O out).

    ``in_place`` rewrites ``model`` itself instead of a copy (saves a model's worth of memory).
    """
    if not in_place:
        model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    for i, node in enumerate(graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
    floats = _float_tensors(model)
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)

    routers = {name for router in find_routers(graph) for name in (router.gate, *router.between)}
    fp32_names = {n.name for n in graph.node if n.op_type in FP32_OPS} | routers
    if keep_residual_fp32:
        fp32_names |= _residual_adds(graph, consumers)

    report = Fp16Report()
    for node in graph.node:
        if node.name in fp32_names:
            report.fp32_nodes[node.op_type] = report.fp32_nodes.get(node.op_type, 0) + 1

    def wants_fp16(node: onnx.NodeProto) -> bool:
        if node.name in fp32_names or node.op_type in _NON_FLOAT_OUTPUT_OPS or node.op_type == "Cast":
            return False
        return any(name in floats for name in [*node.input, *node.output])

    fp16_nodes = {n.name for n in graph.node if wants_fp16(n)}
    report.fp16_nodes = len(fp16_nodes)

    # Initializers read only by fp16 nodes become fp16; shared ones are duplicated as needed.
    initializers = {init.name: init for init in graph.initializer}
    fp16_copies: dict[str, str] = {}
    for name, init in list(initializers.items()):
        if init.data_type != TensorProto.FLOAT:
            continue
        users = consumers.get(name, [])
        fp16_users = [u for u in users if u.name in fp16_nodes]
        if not fp16_users:
            report.fp32_params += int(np.prod(init.dims))
            continue
        half = numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), name)
        if len(fp16_users) == len(users):
            init.CopyFrom(half)
        else:
            half.name = f"{name}__fp16"
            graph.initializer.append(half)
            fp16_copies[name] = half.name
            report.fp32_params += int(np.prod(init.dims))
        report.fp16_params += int(np.prod(init.dims))

    # Float Constant nodes whose readers are all fp16 are stored as fp16 directly.
    dtype_of: dict[str, int] = {}
    for node in graph.node:
        if node.op_type == "Constant":
            users = consumers.get(node.output[0], [])
            attr = next((a for a in node.attribute if a.name == "value"), None)
            if (
                attr is not None
                and attr.t.data_type == TensorProto.FLOAT
                and users
                and all(u.name in fp16_nodes for u in users)
            ):
                attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float16), attr.t.name))
    for init in graph.initializer:
        dtype_of[init.name] = init.data_type
    for value in graph.input:
        dtype_of[value.name] = value.type.tensor_type.elem_type

    new_nodes: list[onnx.NodeProto] = []
    cast_cache: dict[tuple[str, int], str] = {}

    def cast(name: str, to: int) -> str:
        key = (name, to)
        if key not in cast_cache:
            suffix = "fp16" if to == TensorProto.FLOAT16 else "fp32"
            out = f"{name}__to_{suffix}"
            new_nodes.append(helper.make_node("Cast", [name], [out], name=f"Cast_{out}", to=to))
            cast_cache[key] = out
            report.casts_inserted += 1
        return cast_cache[key]

    for node in graph.node:
        target = TensorProto.FLOAT16 if node.name in fp16_nodes else TensorProto.FLOAT
        for i, name in enumerate(node.input):
            if not name:
                continue
            if target == TensorProto.FLOAT and name in fp16_copies and node.name not in fp16_nodes:
                continue  # the fp32 original is still there for fp32 readers
            if target == TensorProto.FLOAT16 and name in fp16_copies:
                node.input[i] = fp16_copies[name]
                continue
            have = dtype_of.get(name)
            if have in (TensorProto.FLOAT, TensorProto.FLOAT16) and have != target:
                node.input[i] = cast(name, target)
        if node.op_type == "Constant":
            attr = next((a for a in node.attribute if a.name == "value"), None)
            if attr is not None:
                dtype_of[node.output[0]] = attr.t.data_type
        elif node.op_type == "Cast":
            to = next(a.i for a in node.attribute if a.name == "to")
            dtype_of[node.output[0]] = to
        elif node.op_type == "ConstantOfShape":
            attr = next((a for a in node.attribute if a.name == "value"), None)
            dtype_of[node.output[0]] = attr.t.data_type if attr is not None else TensorProto.FLOAT
        else:
            for out in node.output:
                if out in floats:
                    dtype_of[out] = target
        new_nodes.append(node)

    for value in graph.output:
        if dtype_of.get(value.name) == TensorProto.FLOAT16:
            # Rename the producer's output so the graph output keeps its name and fp32 type.
            inner = f"{value.name}__fp16"
            for node in new_nodes:
                for i, out in enumerate(node.output):
                    if out == value.name:
                        node.output[i] = inner
                for i, inp in enumerate(node.input):
                    if inp == value.name:
                        node.input[i] = inner
            new_nodes.append(
                helper.make_node("Cast", [inner], [value.name], name=f"Cast_{value.name}_out", to=TensorProto.FLOAT)
            )
            report.casts_inserted += 1

    del graph.node[:]
    graph.node.extend(new_nodes)
    del graph.value_info[:]
    # check_model on a proto over 2 GB would fail to serialise; large models are checked from disk later.
    if model.ByteSize() < 2**31 - 2**26:
        onnx.checker.check_model(model)
    return model, report
