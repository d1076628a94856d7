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

Modules: ``options`` (``Int8Options``), ``plan`` (placement), ``calibrate`` (range statistics), ``rewrite``
(Q/DQ insertion), ``inspection`` (``describe_qdq``, ``ort_cpu_fusion``), ``quantize`` (``quantize_int8``).
"""

from __future__ import annotations

from facemoe.export.int8.calibrate import (
    CALIBRATION_ALGORITHM_VERSION,
    array_hash,
    collect_activation_ranges,
)
from facemoe.export.int8.inspection import cosine, describe_qdq, ort_cpu_fusion, run_quantized
from facemoe.export.int8.options import (
    CALIBRATION_METHODS,
    QUANTIZABLE_OPS,
    CalibrationMethod,
    Int8Options,
)
from facemoe.export.int8.plan import (
    QuantizationPlan,
    QuantizedNode,
    head_nodes,
    plan_quantization,
    transformer_blocks,
)
from facemoe.export.int8.quantize import quantize_int8
from facemoe.export.int8.rewrite import insert_qdq
from facemoe.export.onnx_graph import router_gate_nodes

__all__ = [
    "CALIBRATION_ALGORITHM_VERSION",
    "CALIBRATION_METHODS",
    "QUANTIZABLE_OPS",
    "CalibrationMethod",
    "Int8Options",
    "QuantizationPlan",
    "QuantizedNode",
    "array_hash",
    "collect_activation_ranges",
    "cosine",
    "describe_qdq",
    "head_nodes",
    "insert_qdq",
    "ort_cpu_fusion",
    "plan_quantization",
    "quantize_int8",
    "router_gate_nodes",
    "run_quantized",
    "transformer_blocks",
]
