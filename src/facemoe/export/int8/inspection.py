"""Inspection of a Q/DQ graph: what its Q/DQ nodes are, how it runs, what ONNX Runtime's CPU optimizer makes of it."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from facemoe.export.int8.plan import int_attribute
from facemoe.runtime.ort_session import create_session


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
            report["weight_axes"][node.input[0]] = int_attribute(node, "axis", 1)
        elif node.op_type == "QuantizeLinear" and scale is not None and len(scale.dims) == 0:
            report["per_tensor_activations"] += 1
    return report


def run_quantized(
    path: str | Path, batch: np.ndarray, custom_ops: bool | None = None, int8_encoding: str = "auto"
) -> np.ndarray:
    """Run a (quantized) graph on the CPU; ``int8_encoding`` as in ``facemoe.runtime.ort_session``."""
    session = create_session(
        path, providers=["CPUExecutionProvider"], custom_ops=custom_ops, int8_encoding=int8_encoding
    ).session
    return session.run(None, {session.get_inputs()[0].name: np.ascontiguousarray(batch, dtype=np.float32)})[0]


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two embedding batches."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return np.sum(a * b, axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


def ort_cpu_fusion(path: str | Path, work_dir: str | Path | None = None) -> dict[str, Any]:
    """What ONNX Runtime's CPU graph optimizer turns the Q/DQ graph into (op counts of the optimized graph).

    ``fused_int8_ops`` counts integer kernels (QLinear*, MatMulInteger*, QGemm, ...). A fused integer MatMul
    still needs its activation QuantizeLinear; a DequantizeLinear left over marks an op that runs in float
    on dequantized values. The optimized graph is written to ``work_dir`` (a temporary folder by default)
    and removed; the graph is optimized as stored (``s8`` weights, no encoding rewrite).
    """
    with tempfile.TemporaryDirectory(prefix="facemoe-ortopt-", dir=work_dir) as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        create_session(
            path,
            providers=["CPUExecutionProvider"],
            optimization="extended",
            int8_encoding="s8",
            optimized_model_path=optimized,
        )
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
