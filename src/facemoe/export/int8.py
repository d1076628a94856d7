"""INT8 explicit quantization: insert QuantizeLinear/DequantizeLinear (Q/DQ) into the fp32 ONNX graph.

TensorRT 10/11 builds INT8 only from explicit Q/DQ graphs, and ONNX Runtime runs the same graph on the CPU,
so the INT8 artifact is an ONNX file that every precision test can check without a GPU.

Why our own insertion instead of ``onnxruntime.quantization.quantize_static``:

* Placement. TensorRT fuses ``DQ(x) , DQ(W) -> MatMul/Gemm/Conv`` into an INT8 GEMM/conv and keeps the
  bias and the output in higher precision (the layout of NVIDIA ModelOpt's ONNX PTQ). ORT's QDQ quantizer
  also quantizes Gemm biases to int32 and, depending on version and op, adds Q/DQ on outputs; undoing that
  afterwards is more fragile than writing the few dozen lines that place Q/DQ exactly where we want them.
* MoE. The router gate MatMul (N=num_experts columns, feeding TopK) must stay fp32 while it shares its
  input tensor with the fused expert fc1 GEMM; here the Q/DQ pair goes on the fc1 *edge* only, so the router
  still reads the fp32 tensor.
* Calibration. ORT's histogram calibrators keep every intermediate output of every batch in memory before
  building histograms, and have no cache. Here ranges are accumulated batch by batch (running abs-max and
  a fixed-size histogram that grows by merging bins) and cached by ``CalibrationCache``.

Quantization scheme (what TensorRT accepts for INT8):

* symmetric int8, zero point 0 (an explicit int8 zero-point initializer, so Q's output type is int8);
* activations per tensor, ``scale = amax / 127`` with ``amax`` from calibration (max, percentile or
  TensorRT-style entropy);
* weights per output channel, ``scale[c] = max|W[c]| / 127``; axis 0 for Conv and ``Gemm(transB=1)``,
  the last axis for MatMul ``(K, N)`` weights.

Weights are stored as int8 initializers followed by a per-channel DequantizeLinear (no weight Q node).
TensorRT accepts both this and ``fp32 W -> Q -> DQ``; it folds the weight Q at build time, so the engine is
the same either way. The int8 form is what makes the artifact small: the full model's 1.86 GB of fp32
weights become ~0.47 GB, which keeps the file under the 2 GB protobuf limit (no external data) and lowers
the peak memory of parsing and building on a Jetson.

ONNX Runtime's CPU optimizer fuses this pattern into integer kernels (MatMulIntegerToFloat for the 3-D
MatMuls, QGemm for the 2-D Gemms) once the Gemm biases are split off (see ``insert_qdq``); ``ort_cpu_fusion``
reports what it did. On the shared 2-core dev machine (2 threads) the full model ran 1.7-2.6x faster than
fp32 at batch 1 and 8; the tiny preset does not speed up (its matrices are too small to pay for quantizing
activations).

Left in floating point by default: LayerNorm, Softmax, GELU, the residual adds, graph outputs, the router
gate MatMul and TopK/ScatterElements (routing must not flip), and the attention ``q @ k^T`` / ``attn @ v``
matmuls (activation-activation; opt in with ``quantize_attention_matmuls``), and the patch-embedding Conv
that reads the image (opt in with ``quantize_first_layer``): the input is an 8-bit image mapped to [-1, 1],
a grid that a zero-point-0 int8 scale cannot represent, so Q/DQ there adds about half a grey level of noise
to every pixel; on the tiny preset with random weights that alone cost 0.6 points of mean cosine, for a
layer that is ~0.1% of the FLOPs. The first transformer block also stays float (``float_blocks=1``):
quantization error made there is amplified by every later block, and it was the most sensitive block in
a per-node sweep. Keeping it float raised mean cosine on the tiny preset's parity inputs from 0.980 to
0.988 and the worst layer's routing agreement from 0.934 to 0.959, for ~1/22 of the full model's FLOPs
(every Swin block has about the same FLOPs). The head Linear (BN1d -> Linear -> BN1d) is quantized
unless ``quantize_head=False``.

MoE caveat: the graph computes every expert on every token, so the fc2 input ranges are calibrated over all
tokens, including those whose gate weight is 0 for that expert.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import re
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from facemoe.calibration.cache import CalibrationCache
from facemoe.calibration.cache import model_hash as onnx_file_hash
from facemoe.errors import ExportError, InputError
from facemoe.fileio import atomic_path, sha256_file
from facemoe.runtime.ort_session import create_session, uses_custom_ops

CalibrationMethod = Literal["max", "percentile", "entropy"]
CALIBRATION_METHODS: tuple[str, ...] = ("max", "percentile", "entropy")
QUANTIZABLE_OPS: tuple[str, ...] = ("MatMul", "Gemm", "Conv")
# Bumped when the way ranges are computed changes, so old cache entries stop matching.
CALIBRATION_ALGORITHM_VERSION = 1

_INT8_MAX = 127
# An activation that was exactly 0 on every calibration sample still needs a positive scale.
_MIN_AMAX = 1e-6
# Ops a router's logits may pass through between the gate MatMul and TopK.
_ROUTER_PASS_THROUGH = frozenset({"Reshape", "Cast", "Identity", "Transpose", "Squeeze", "Unsqueeze", "Flatten"})
# Ops that may sit between the head Linear and the graph output (the BN1d after the Linear).
_HEAD_PASS_THROUGH = frozenset(
    {"BatchNormalization", "Add", "Mul", "Div", "Sub", "Identity", "Reshape", "Flatten", "Cast", "Squeeze"}
)
_PROTOBUF_LIMIT = 1_900 * 1024 * 1024
# How the exporter names the nodes of one Swin block (torch module path).
_BLOCK_NAME = re.compile(r"^/layers\.\d+/blocks\.\d+/")
# Domain of the optional MoE gating op (export/gating_ort.py); its fused experts stay in float.
_CUSTOM_DOMAIN = "facemoe"


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


# --------------------------------------------------------------------------------------------- planning


def _node_key(node: onnx.NodeProto, index: int) -> str:
    return node.name or f"{node.op_type}_{index}:{node.output[0]}"


def _attribute(node: onnx.NodeProto, name: str, default: int) -> int:
    for attr in node.attribute:
        if attr.name == name:
            return int(helper.get_attribute_value(attr))
    return default


def router_gate_nodes(model: onnx.ModelProto) -> set[str]:
    """Names of the MatMul/Gemm nodes whose output reaches a TopK through reshapes/casts only."""
    producers = {out: node for node in model.graph.node for out in node.output}
    found: set[str] = set()
    for node in model.graph.node:
        if node.op_type != "TopK":
            continue
        tensor = node.input[0]
        for _ in range(16):  # a short chain; a loop guard rather than a real limit
            producer = producers.get(tensor)
            if producer is None:
                break
            if producer.op_type in ("MatMul", "Gemm"):
                found.add(producer.name)
                break
            if producer.op_type not in _ROUTER_PASS_THROUGH:
                break
            tensor = producer.input[0]
    return found


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
        return 0 if _attribute(node, "transB", 0) else 1
    return len(weight.dims) - 1  # MatMul: (..., K, N)


def plan_quantization(
    model: onnx.ModelProto,
    exclude_router: bool = True,
    quantize_attention_matmuls: bool = False,
    quantize_head: bool = True,
    nodes_to_exclude: Sequence[str] = (),
    op_types: Sequence[str] = QUANTIZABLE_OPS,
    quantize_first_layer: bool = False,
    float_blocks: int = 1,
) -> QuantizationPlan:
    """Decide which nodes get Q/DQ and why the others do not (no graph change)."""
    unknown = set(op_types) - set(QUANTIZABLE_OPS)
    if unknown:
        raise ValueError(f"cannot quantize op types {sorted(unknown)}; supported: {', '.join(QUANTIZABLE_OPS)}")
    initializers = {init.name: init for init in model.graph.initializer}
    routers = router_gate_nodes(model)
    heads = head_nodes(model)
    graph_inputs = {i.name for i in model.graph.input}
    float_prefixes = transformer_blocks(model)[: max(float_blocks, 0)]
    plan = QuantizationPlan()
    seen_activations: set[str] = set()
    for index, node in enumerate(model.graph.node):
        if node.op_type not in QUANTIZABLE_OPS:
            continue
        key = _node_key(node, index)
        weight = initializers.get(node.input[1]) if len(node.input) > 1 else None
        if node.op_type not in op_types:
            plan.excluded[key] = f"op type {node.op_type} not selected"
            continue
        if any(fnmatch.fnmatchcase(key, pattern) for pattern in nodes_to_exclude):
            plan.excluded[key] = "nodes_to_exclude"
            continue
        if node.name in routers and exclude_router:
            plan.excluded[key] = "router gate (feeds TopK): kept fp32 so routing does not flip"
            continue
        if node.name in heads and not quantize_head:
            plan.excluded[key] = "head Linear (quantize_head=False)"
            continue
        if node.input[0] in graph_inputs and not quantize_first_layer:
            plan.excluded[key] = "first layer reads the image (quantize_first_layer=False)"
            continue
        if node.input[0] in initializers:
            plan.excluded[key] = "constant first input"
            continue
        if weight is not None:
            if weight.data_type != TensorProto.FLOAT:
                plan.excluded[key] = f"weight is not fp32 (type {weight.data_type})"
                continue
            role = "conv" if node.op_type == "Conv" else "weight-gemm"
            spec = QuantizedNode(key, node.op_type, role, [0], 1, _weight_axis(node, weight))
        elif node.op_type == "MatMul":
            if not quantize_attention_matmuls:
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


# ------------------------------------------------------------------------------------------ calibration


class _TensorRange:
    """Running abs-max and a histogram of |x| over [0, edge] that doubles its range by merging bins.

    Growing by powers of two keeps the bin count fixed (memory bounded) and never re-reads old batches; the
    price is at most a factor-2 coarser resolution than a two-pass histogram would have.
    """

    def __init__(self, num_bins: int, with_histogram: bool) -> None:
        self.num_bins = num_bins
        self.absmax = 0.0
        self.count = 0
        self.hist: np.ndarray | None = np.zeros(num_bins, dtype=np.int64) if with_histogram else None
        self.edge = 0.0

    def update(self, values: np.ndarray) -> None:
        magnitude = np.abs(values.astype(np.float32, copy=False)).ravel()
        if magnitude.size == 0:
            return
        if not np.all(np.isfinite(magnitude)):
            raise ExportError("calibration produced non-finite activations (inf/NaN): check the fp32 model")
        peak = float(magnitude.max())
        self.absmax = max(self.absmax, peak)
        self.count += magnitude.size
        if self.hist is None:
            return
        if self.edge == 0.0:
            self.edge = peak if peak > 0.0 else _MIN_AMAX
        elif peak > self.edge:
            factor = 2 ** math.ceil(math.log2(peak / self.edge))
            if factor >= self.num_bins:
                merged = np.zeros(self.num_bins, dtype=np.int64)
                merged[0] = self.hist.sum()
            else:
                merged = np.zeros(self.num_bins, dtype=np.int64)
                merged[: self.num_bins // factor] = self.hist.reshape(-1, factor).sum(axis=1)
            self.hist = merged
            self.edge *= factor
        counts, _ = np.histogram(magnitude, bins=self.num_bins, range=(0.0, self.edge))
        self.hist += counts

    def amax(self, method: str, percentile: float) -> float:
        if method == "max" or self.hist is None:
            value = self.absmax
        elif method == "percentile":
            value = _percentile_amax(self.hist, self.edge, percentile)
        else:
            value = _entropy_amax(self.hist, self.edge)
        return float(max(min(value, self.absmax), _MIN_AMAX))


def _percentile_amax(hist: np.ndarray, edge: float, percentile: float) -> float:
    total = int(hist.sum())
    if total == 0:
        return 0.0
    cumulative = np.cumsum(hist)
    index = int(np.searchsorted(cumulative, total * percentile / 100.0, side="left"))
    return (min(index, len(hist) - 1) + 1) * edge / len(hist)


def _entropy_amax(hist: np.ndarray, edge: float, levels: int = 128) -> float:
    """TensorRT's legacy entropy calibration: the clip threshold minimising KL(P || Q).

    For each candidate threshold of ``i`` bins, P is the histogram clipped to ``i`` bins (outliers added to
    the last bin) and Q is the first ``i`` bins merged into 128 levels and spread back uniformly over the
    bins that were non-zero. Thresholds run from 128 bins to the last occupied bin. All candidates are
    evaluated at once from cumulative sums (KL splits into per-bin and per-group terms), which is ~100x
    faster than building P and Q for each candidate.
    """
    counts = hist.astype(np.float64)
    occupied = np.flatnonzero(counts)
    if occupied.size == 0:
        return 0.0
    last = int(occupied[-1]) + 1
    if last <= levels:
        return last * edge / len(hist)
    h = counts[:last]
    total = h.sum()
    mass = np.concatenate([[0.0], np.cumsum(h)])
    nonzero = np.concatenate([[0], np.cumsum(h > 0)])
    h_log_h = np.concatenate([[0.0], np.cumsum(h * np.log(np.where(h > 0, h, 1.0)))])

    bins = np.arange(levels, last + 1)  # candidate thresholds, in bins
    width = bins // levels
    group = np.arange(levels)
    starts = group[None, :] * width[:, None]
    ends = np.where(group[None, :] == levels - 1, bins[:, None], starts + width[:, None])
    group_mass = mass[ends] - mass[starts]
    group_nonzero = nonzero[ends] - nonzero[starts]
    q_total = mass[bins]
    density = np.divide(group_mass, group_nonzero, out=np.zeros_like(group_mass), where=group_nonzero > 0)
    safe_total = np.where(q_total > 0, q_total, 1.0)[:, None]
    log_q = np.log(np.where(group_nonzero > 0, density, 1.0) / safe_total)
    # sum over bins b < i-1 of h_b * log(q_b / Q_total): whole groups, minus bin i-1 (always in the last group)
    cross = np.sum(np.where(group_nonzero > 0, group_mass * log_q, 0.0), axis=1)
    h_last = h[bins - 1]
    cross -= np.where(h_last > 0, h_last * log_q[:, -1], 0.0)
    body = (h_log_h[bins - 1] - np.log(total) * mass[bins - 1] - cross) / total
    p_last = (h_last + (total - mass[bins])) / total
    q_last = np.maximum(np.where(h_last > 0, density[:, -1] / safe_total[:, 0], 0.0), 1e-12)
    tail = np.where(p_last > 0, p_last * np.log(np.where(p_last > 0, p_last, 1.0) / q_last), 0.0)
    divergence = np.where(q_total > 0, body + tail, np.inf)
    best = int(bins[int(np.argmin(divergence))])
    return (best + 0.5) * edge / len(hist)


def _uses_custom_ops(model: onnx.ModelProto) -> bool:
    return uses_custom_ops(model)


def _session(path: str | Path, custom_ops: bool | None = None, int8_encoding: str = "auto") -> Any:
    """CPU session (``facemoe.runtime.ort_session``): the int8 encoding this processor computes exactly."""
    return create_session(
        path, providers=["CPUExecutionProvider"], custom_ops=custom_ops, int8_encoding=int8_encoding
    ).session


def _save_model(model: onnx.ModelProto, path: Path) -> None:
    if model.ByteSize() < _PROTOBUF_LIMIT:
        onnx.save_model(model, str(path))
    else:
        onnx.save_model(model, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=1024)


def with_extra_outputs(model: onnx.ModelProto, tensors: Iterable[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also returns ``tensors`` (intermediate values) as graph outputs."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output} | {i.name for i in probe.graph.input}
    for name in tensors:
        if name not in existing:
            probe.graph.output.append(helper.make_empty_tensor_value_info(name))
            existing.add(name)
    return probe


def collect_activation_ranges(
    model: onnx.ModelProto,
    tensors: Sequence[str],
    calibration: np.ndarray,
    method: str = "percentile",
    percentile: float = 99.99,
    num_bins: int = 2048,
    batch_size: int = 16,
) -> dict[str, float]:
    """Run ``calibration`` through ONNX Runtime and return ``{tensor: amax}`` for ``tensors``.

    Only one batch of intermediate values is alive at a time; per tensor, a running max and a fixed-size
    histogram are kept.
    """
    input_name = model.graph.input[0].name
    custom_ops = _uses_custom_ops(model)
    ranges = {name: _TensorRange(num_bins, with_histogram=method != "max") for name in tensors}
    probe = with_extra_outputs(model, [t for t in tensors if t != input_name])
    with tempfile.TemporaryDirectory(prefix="facemoe-calib-") as tmp:
        probe_path = Path(tmp) / "probe.onnx"
        _save_model(probe, probe_path)
        del probe
        session = _session(probe_path, custom_ops)
        wanted = [t for t in tensors if t != input_name]
        for start in range(0, len(calibration), batch_size):
            batch = np.ascontiguousarray(calibration[start : start + batch_size], dtype=np.float32)
            values = session.run(wanted, {input_name: batch}) if wanted else []
            for name, value in zip(wanted, values, strict=True):
                ranges[name].update(value)
            if input_name in ranges:
                ranges[input_name].update(batch)
        del session
    return {name: r.amax(method, percentile) for name, r in ranges.items()}


def array_hash(batch: np.ndarray) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps({"shape": list(batch.shape), "dtype": "float32"}).encode())
    digest.update(np.ascontiguousarray(batch, dtype=np.float32).tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- rewrite


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
    nodes_by_key = {_node_key(node, i): node for i, node in enumerate(graph.node)}
    weight_nodes: list[onnx.NodeProto] = []
    activation_qdq: dict[str, list[onnx.NodeProto]] = {}
    dequantized_weight: dict[tuple[str, int], str] = {}
    new_initializers: list[TensorProto] = []

    def activation_output(tensor: str) -> str:
        if tensor not in activation_qdq:
            scale_name, zp_name = f"{tensor}_int8_scale", f"{tensor}_int8_zero_point"
            scale = np.float32(max(amax[tensor], _MIN_AMAX) / _INT8_MAX)
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


# ----------------------------------------------------------------------------------------- verification


def describe_qdq(model: onnx.ModelProto) -> dict[str, Any]:
    """Facts about the Q/DQ nodes of ``model`` (types, zero points, axes), read from the graph itself."""
    initializers = {init.name: init for init in model.graph.initializer}
    report: dict[str, Any] = {
        "quantize_linear": 0,
        "dequantize_linear": 0,
        "int8_zero_points": True,
        "zero_points_all_zero": True,
        "per_channel_weights": 0,
        "per_tensor_activations": 0,
        "weight_axes": {},
    }
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        report["quantize_linear" if node.op_type == "QuantizeLinear" else "dequantize_linear"] += 1
        zp = initializers.get(node.input[2]) if len(node.input) > 2 else None
        if zp is None or zp.data_type != TensorProto.INT8:
            report["int8_zero_points"] = False
        elif np.any(numpy_helper.to_array(zp) != 0):
            report["zero_points_all_zero"] = False
        scale = initializers.get(node.input[1])
        if node.op_type == "DequantizeLinear" and node.input[0] in initializers:
            report["per_channel_weights"] += int(scale is not None and len(scale.dims) == 1)
            report["weight_axes"][node.input[0]] = _attribute(node, "axis", 1)
        elif node.op_type == "QuantizeLinear" and scale is not None and len(scale.dims) == 0:
            report["per_tensor_activations"] += 1
    return report


def run_quantized(
    path: str | Path, batch: np.ndarray, custom_ops: bool | None = None, int8_encoding: str = "auto"
) -> np.ndarray:
    """Run a (quantized) graph on the CPU; ``int8_encoding`` as in ``facemoe.runtime.ort_session``."""
    session = _session(path, custom_ops, int8_encoding)
    return session.run(None, {session.get_inputs()[0].name: np.ascontiguousarray(batch, dtype=np.float32)})[0]


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return np.sum(a * b, axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


def topk_indices(model_path: str | Path, batch: np.ndarray) -> dict[str, np.ndarray]:
    """Expert indices chosen by every TopK node (``{node name: (tokens, k) sorted}``) for ``batch``."""
    model = onnx.load(str(model_path))
    topk = [(node.name, node.output[1]) for node in model.graph.node if node.op_type == "TopK"]
    probe = with_extra_outputs(model, [out for _, out in topk])
    with tempfile.TemporaryDirectory(prefix="facemoe-topk-") as tmp:
        probe_path = Path(tmp) / "probe.onnx"
        _save_model(probe, probe_path)
        session = _session(probe_path, _uses_custom_ops(model))
        values = session.run(
            [out for _, out in topk], {session.get_inputs()[0].name: np.ascontiguousarray(batch, dtype=np.float32)}
        )
    return {name: np.sort(v.reshape(-1, v.shape[-1]), axis=-1) for (name, _), v in zip(topk, values, strict=True)}


def routing_agreement(reference_path: str | Path, test_path: str | Path, batch: np.ndarray) -> dict[str, float]:
    """Per MoE layer (TopK node), the share of tokens whose top-k expert set is the same in both graphs."""
    reference = topk_indices(reference_path, batch)
    test = topk_indices(test_path, batch)
    return {name: float(np.mean(np.all(reference[name] == test[name], axis=-1))) for name in reference if name in test}


def ort_cpu_fusion(path: str | Path) -> dict[str, Any]:
    """What ONNX Runtime's CPU graph optimizer turns the Q/DQ graph into (op counts of the optimized graph).

    ``fused_int8_ops`` counts integer kernels (QLinear*, MatMulInteger*, QGemm, ...). A fused integer MatMul
    still needs its activation QuantizeLinear; a DequantizeLinear left over marks an op that runs in float
    on dequantized values.
    """
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="facemoe-ortopt-") as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(optimized)
        if _uses_custom_ops(onnx.load(str(path), load_external_data=False)):
            from facemoe.export.gating_ort import register_custom_ops

            register_custom_ops(options, required=True)
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        graph = onnx.load(str(optimized)).graph
    ops: dict[str, int] = {}
    for node in graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    fused = {op: n for op, n in ops.items() if op.startswith(("QLinear", "MatMulInteger", "QGemm", "DynamicQuantize"))}
    return {
        "ops": dict(sorted(ops.items())),
        "fused_int8_ops": fused,
        "quantize_linear_left": ops.get("QuantizeLinear", 0),
        "dequantize_linear_left": ops.get("DequantizeLinear", 0),
    }


# ------------------------------------------------------------------------------------------------- main


def quantize_int8(
    fp32_path: str | Path,
    out_path: str | Path,
    calibration: np.ndarray,
    method: CalibrationMethod | str = "percentile",
    percentile: float = 99.99,
    exclude_router: bool = True,
    cache: CalibrationCache | None = None,
    *,
    quantize_attention_matmuls: bool = False,
    quantize_head: bool = True,
    nodes_to_exclude: Sequence[str] = (),
    op_types: Sequence[str] = QUANTIZABLE_OPS,
    num_bins: int = 2048,
    batch_size: int = 16,
    split_gemm_bias: bool = True,
    quantize_first_layer: bool = False,
    float_blocks: int = 1,
    model_hash: str | None = None,
    data_hash: str | None = None,
    calibration_summary: dict[str, Any] | None = None,
    check_samples: int = 4,
) -> dict[str, Any]:
    """Write the INT8 Q/DQ graph of ``fp32_path`` to ``out_path``; return a report for the manifest.

    ``calibration`` is an (N, 3, H, W) float32 batch of pre-processed faces (see
    ``facemoe.calibration.build_calibration_set``). With ``cache``, activation ranges are looked up by
    (model hash, data hash, method, parameters) and calibration runs only on a miss; ``model_hash`` defaults
    to a hash of the ONNX file(s) and ``data_hash`` to a hash of the ``calibration`` array (pass the
    calibration summary's ``data_hash`` or a weights fingerprint to skip hashing large inputs). ``check_samples``
    calibration faces are run through both graphs as a smoke test (finite output, cosine reported);
    parity on held-out faces is the parity module's job. ``split_gemm_bias``: see ``insert_qdq``.
    """
    started = time.perf_counter()
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"unknown calibration method {method!r}; choose one of {', '.join(CALIBRATION_METHODS)}")
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (0, 100], not {percentile}")
    if num_bins < 256 or num_bins & (num_bins - 1):
        raise ValueError(f"num_bins must be a power of two >= 256, not {num_bins}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, not {batch_size}")
    if not fp32_path.is_file():
        raise InputError(f"{fp32_path}: no such ONNX file")
    calibration = np.asarray(calibration)
    if calibration.ndim != 4 or len(calibration) == 0:
        raise InputError(f"calibration data must be a non-empty (N, C, H, W) batch, got shape {calibration.shape}")
    if not np.all(np.isfinite(calibration)):
        raise InputError("calibration data contains inf or NaN")
    calibration = np.ascontiguousarray(calibration, dtype=np.float32)

    model = onnx.load(str(fp32_path))
    if any(node.op_type in ("QuantizeLinear", "DequantizeLinear") for node in model.graph.node):
        raise ExportError(f"{fp32_path}: already contains QuantizeLinear/DequantizeLinear nodes")
    custom_ops = _uses_custom_ops(model)
    plan = plan_quantization(
        model,
        exclude_router,
        quantize_attention_matmuls,
        quantize_head,
        nodes_to_exclude,
        op_types,
        quantize_first_layer,
        float_blocks,
    )
    if not plan.nodes:
        raise ExportError(f"{fp32_path}: nothing to quantize (no MatMul/Gemm/Conv with an fp32 weight selected)")

    params: dict[str, Any] = {"algorithm": CALIBRATION_ALGORITHM_VERSION}
    if method == "percentile":
        params["percentile"] = percentile
    if method != "max":
        params.update(num_bins=num_bins, batch_size=batch_size)
    calib_started = time.perf_counter()
    cache_state, cache_key, amax = "off", None, None
    data_hash = data_hash or array_hash(calibration)
    if cache is not None:
        cache_key = cache.key(model_hash or onnx_file_hash(fp32_path), data_hash, method, params)
        amax = cache.load(cache_key, plan.activations)
        cache_state = "hit" if amax is not None else "miss"
    batches_run = 0
    if amax is None:
        amax = collect_activation_ranges(model, plan.activations, calibration, method, percentile, num_bins, batch_size)
        batches_run = math.ceil(len(calibration) / batch_size)
        if cache is not None and cache_key is not None:
            cache.save(cache_key, amax, {"data_hash": data_hash, "method": method, "params": params})
    calibration_s = time.perf_counter() - calib_started

    insert_qdq(model, plan, amax, split_gemm_bias)
    if model.ByteSize() < _PROTOBUF_LIMIT:  # the checker needs the whole model in one protobuf
        try:
            onnx.checker.check_model(model)
        except onnx.checker.ValidationError as exc:
            raise ExportError(f"{out_path}: the quantized graph is invalid: {exc}") from exc
    qdq = describe_qdq(model)
    if model.ByteSize() < _PROTOBUF_LIMIT:
        with atomic_path(out_path) as tmp:
            onnx.save_model(model, str(tmp))
    else:
        _save_model(model, out_path)
    del model

    check: dict[str, Any] = {}
    if check_samples > 0:
        sample = calibration[:check_samples]
        reference = run_quantized(fp32_path, sample, custom_ops)
        # Batch 1 and the rest as a second batch: both the single-face and the batched path must work.
        parts = [sample[:1], sample[1:]] if len(sample) > 1 else [sample]
        got = np.concatenate([run_quantized(out_path, part, custom_ops) for part in parts])
        if got.shape != reference.shape or not np.all(np.isfinite(got)):
            raise ExportError(f"{out_path}: the INT8 graph gives non-finite or mis-shaped output {got.shape}")
        cosine = _cosine(reference, got)
        check = {"samples": len(sample), "cosine_min": float(cosine.min()), "cosine_mean": float(cosine.mean())}

    values = np.array(list(amax[t] for t in plan.activations), dtype=np.float64)
    return {
        "path": str(out_path),
        "sha256": sha256_file(out_path),
        "size_bytes": out_path.stat().st_size,
        "format": "QDQ",
        "scheme": {
            "activations": "int8 symmetric per-tensor, zero point 0",
            "weights": "int8 symmetric per-output-channel, stored int8 + DequantizeLinear",
        },
        "quantized_nodes": len(plan.nodes),
        "quantized_ops": plan.ops,
        "quantized_roles": {
            role: sum(1 for n in plan.nodes if n.role == role) for role in sorted({n.role for n in plan.nodes})
        },
        "quantized_activations": len(plan.activations),
        "excluded_nodes": dict(plan.excluded),
        "options": {
            "exclude_router": exclude_router,
            "quantize_attention_matmuls": quantize_attention_matmuls,
            "quantize_head": quantize_head,
            "nodes_to_exclude": list(nodes_to_exclude),
            "op_types": list(op_types),
            "split_gemm_bias": split_gemm_bias,
            "quantize_first_layer": quantize_first_layer,
            "float_blocks": float_blocks,
        },
        "qdq": qdq,
        "calibration": {
            "method": method,
            "params": params,
            "samples": len(calibration),
            "data_hash": data_hash,
            "cache": cache_state,
            "cache_key": cache_key,
            "batches_run": batches_run,
            "amax": {
                "min": float(values.min()),
                "median": float(np.median(values)),
                "max": float(values.max()),
            },
            "summary": calibration_summary,
        },
        "check_on_calibration_faces": check,
        "time_s": {"calibration": round(calibration_s, 3), "total": round(time.perf_counter() - started, 3)},
    }


__all__ = [
    "CALIBRATION_METHODS",
    "QUANTIZABLE_OPS",
    "QuantizationPlan",
    "QuantizedNode",
    "collect_activation_ranges",
    "describe_qdq",
    "head_nodes",
    "insert_qdq",
    "ort_cpu_fusion",
    "plan_quantization",
    "quantize_int8",
    "router_gate_nodes",
    "routing_agreement",
    "run_quantized",
    "topk_indices",
    "transformer_blocks",
]
