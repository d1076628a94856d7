"""INT8 on x86 CPUs: which weight encoding ONNX Runtime's integer kernels compute exactly on this processor.

The bundle's ``model.int8.onnx`` is the graph TensorRT consumes: symmetric int8, zero point 0, per-channel
weights using the full range [-127, 127] (docs/PRECISION.md#int8-qdq). ONNX Runtime's CPU optimizer fuses its
Q/DQ pairs into integer GEMMs (MatMulIntegerToFloat, QGemm, QLinearConv) that run on MLAS kernels chosen
by the processor's instruction set:

* with VNNI (AVX-VNNI, AVX512-VNNI, AMX-INT8) the u8 x s8 products are summed straight into int32
  (``vpdpbusd``): the fused kernel computes the graph exactly;
* without VNNI (plain AVX2, and AVX-512 without VNNI) MLAS uses ``vpmaddubsw``, which adds two adjacent
  u8 x s8 products into a *saturating int16*. Signed activations are shifted to u8 (0..255), so one pair
  reaches 2 x 255 x 127 = 64,770 and saturates at 32,767. Measured on the small preset with random
  weights: mean embedding cosine 0.99 (optimisations off) fell to 0.95 (``ORT_ENABLE_ALL``) on such a CPU.

Two encodings compute without saturation there; both are rewrites of the loaded graph made when the
session is created (``facemoe.runtime.ort_session``), so the artifact on disk stays the TensorRT graph:

* ``u8``: activations and weights shifted to uint8 with zero point 128. The real values are the same, so
  the arithmetic is the graph's, exactly; MLAS then runs its u8 x u8 kernels, which widen to int16
  (``vpmaddwd``) and cannot saturate, but are slower than u8 x s8 (on the order of fp32 on AVX2).
* ``w7``: weights limited to [-64, 64] (``q7 = round(q8 / 2)``, scale doubled; ONNX Runtime's
  ``reduce_range`` idea). Every pair stays within 2 x 255 x 64 = 32,640, so the fast u8 x s8 kernels are
  exact again, at the cost of one bit of weight resolution (measured on the small preset with random
  weights: mean cosine 0.9875 -> 0.980).

``s8`` is the graph as stored (TensorRT, and x86 CPUs with VNNI, and Arm). On a CPU that saturates,
:func:`choose_encoding` takes ``w7`` when the export's parity report says that encoding passed its gates
and ``u8`` otherwise (docs/EXPORT.md#int8-on-cpus-without-vnni).

Nothing here imports torch.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

# Largest |weight| that cannot saturate vpmaddubsw's int16 pair sums with u8 activations: 2*255*64 <= 32767.
SAFE_WEIGHT_MAX = 64
_VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
# The int8 encodings a CPU session can run (module docstring).
INT8_ENCODINGS: tuple[str, ...] = ("s8", "w7", "u8")
# FACEMOE_INT8_CPU_ENCODING=s8|w7|u8 overrides the choice (to compare encodings on one machine).
ENCODING_ENV = "FACEMOE_INT8_CPU_ENCODING"


@dataclass(frozen=True)
class CpuIsa:
    """What matters about this processor for ONNX Runtime's int8 kernels."""

    arch: str  # "x86_64", "aarch64", ...
    vnni: bool | None  # from the CPU flags; None: not x86, or the flags could not be read
    saturates_int8: bool  # measured: ONNX Runtime's fused int8 kernels saturate on full-range weights

    @property
    def label(self) -> str:
        flags = "" if self.vnni is None else (" with VNNI" if self.vnni else " without VNNI")
        kernels = "saturating" if self.saturates_int8 else "exact"
        return f"{self.arch}{flags}, {kernels} int8 kernels"


def _flags_vnni(cpuinfo: str | os.PathLike[str]) -> bool | None:
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return bool(set(line.partition(":")[2].split()) & _VNNI_FLAGS)
    return None


def _probe_model() -> onnx.ModelProto:
    """x (1, 4, 64) -> Q/DQ -> MatMul with int8 weights 127: every u8 x s8 pair sum overflows int16 if summed so."""
    from onnx import TensorProto, helper

    k, n = 64, 8
    initializers = [
        numpy_helper.from_array(np.full((k, n), 127, dtype=np.int8), "w"),
        numpy_helper.from_array(np.full(n, 1.0 / 127, dtype=np.float32), "w_scale"),
        numpy_helper.from_array(np.zeros(n, dtype=np.int8), "w_zero"),
        numpy_helper.from_array(np.array(1.0 / 127, dtype=np.float32), "x_scale"),
        numpy_helper.from_array(np.array(0, dtype=np.int8), "x_zero"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zero"], ["wd"], axis=1),
        helper.make_node("MatMul", ["xd", "wd"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "int8_saturation_probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, n])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@functools.lru_cache(maxsize=1)
def int8_kernels_saturate() -> bool:
    """Ask ONNX Runtime: does its CPU provider's fused int8 GEMM saturate on this processor?

    Measured rather than inferred from CPU flags, because what counts is the kernel MLAS picks from CPUID
    at run time (flags can disagree: emulators, hypervisors that hide VNNI, other operating systems).
    x = 1.0 (int8 127) against weights 1.0 (int8 127) gives exactly 64.0 per output; a saturating kernel
    returns far less. Costs one small session (~20 ms), once per process.
    """
    import onnxruntime as ort

    # Its own session on purpose: ``ort_session.create_session`` asks this probe which encoding to apply.
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(_probe_model().SerializeToString(), options, providers=["CPUExecutionProvider"])
    y = session.run(None, {"x": np.ones((1, 4, 64), dtype=np.float32)})[0]
    return not bool(np.allclose(y, 64.0, rtol=1e-4))


def detect_cpu(cpuinfo: str | os.PathLike[str] = "/proc/cpuinfo") -> CpuIsa:
    """This processor's architecture, VNNI flag, and whether ONNX Runtime's int8 kernels saturate on it."""
    return CpuIsa(platform.machine().lower(), _flags_vnni(cpuinfo), int8_kernels_saturate())


def choose_encoding(isa: CpuIsa | None = None, fast_encoding_passed: bool | None = None) -> str:
    """The int8 encoding a CPU session uses on this processor.

    ``fast_encoding_passed``: whether the export's parity report passed the ``w7`` encoding (None: not
    known, e.g. a graph opened outside a bundle), in which case the exact ``u8`` encoding is used.
    """
    forced = os.environ.get(ENCODING_ENV, "").strip()
    if forced:
        if forced not in INT8_ENCODINGS:
            raise ValueError(f"{ENCODING_ENV}={forced!r}: expected one of {', '.join(INT8_ENCODINGS)}")
        return forced
    if not (isa or detect_cpu()).saturates_int8:
        return "s8"
    return "w7" if fast_encoding_passed else "u8"


def apply_encoding(model: onnx.ModelProto, encoding: str) -> int:
    """Rewrite ``model``'s int8 tensors in place into ``encoding``; returns how many tensors changed."""
    if encoding == "s8":
        return 0
    if encoding == "w7":
        return limit_weight_range(model)
    if encoding == "u8":
        return shift_to_uint8(model)
    raise ValueError(f"int8 encoding {encoding!r}: expected one of {', '.join(INT8_ENCODINGS)}")


def _int8_weight_dequantizers(model: onnx.ModelProto) -> list[tuple[onnx.TensorProto, onnx.TensorProto]]:
    """(int8 weight, scale) initialiser pairs of every DequantizeLinear that reads an int8 constant."""
    initializers = {init.name: init for init in model.graph.initializer}
    pairs = []
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in initializers:
            continue
        weight = initializers[node.input[0]]
        if weight.data_type != onnx.TensorProto.INT8 or node.input[1] not in initializers:
            continue
        if len(node.input) > 2 and node.input[2] in initializers:
            zero = numpy_helper.to_array(initializers[node.input[2]])
            if np.any(zero != 0):
                continue  # only the symmetric encoding is rewritten; nothing else is exported
        pairs.append((weight, initializers[node.input[1]]))
    return pairs


def limit_weight_range(model: onnx.ModelProto) -> int:
    """Rewrite int8 weights in place to |q| <= 64 with doubled scales; returns how many tensors changed.

    Weights already within the range are left alone (a second call changes nothing). A scale shared by
    several weights is refused before anything changes (doubling it would rescale the others too); the
    exporter gives every weight its own scale.
    """
    pairs = _int8_weight_dequantizers(model)
    users: dict[str, set[str]] = {}
    for weight, scale in pairs:
        users.setdefault(scale.name, set()).add(weight.name)
    shared = sorted(name for name, weights in users.items() if len(weights) > 1)
    if shared:
        raise ValueError(f"int8 weight scale {shared[0]} is shared by several weights; cannot limit their range")
    changed = 0
    done: set[str] = set()
    for weight, scale in pairs:
        if weight.name in done:
            continue
        q = numpy_helper.to_array(weight).astype(np.int16)
        if int(np.abs(q).max(initial=0)) <= SAFE_WEIGHT_MAX:
            continue
        # Round half to even keeps the rewrite unbiased; |round(127 / 2)| = 64 is within the safe range.
        q7 = np.clip(np.rint(q / 2.0), -SAFE_WEIGHT_MAX, SAFE_WEIGHT_MAX).astype(np.int8)
        s = numpy_helper.to_array(scale)
        weight.CopyFrom(numpy_helper.from_array(q7, weight.name))
        scale.CopyFrom(numpy_helper.from_array((s * 2.0).astype(s.dtype), scale.name))
        done.add(weight.name)
        changed += 1
    return changed


def shift_to_uint8(model: onnx.ModelProto) -> int:
    """Rewrite the graph's int8 Q/DQ tensors in place to uint8 + 128 (the same real values).

    Shifted: every int8 zero-point initializer of a QuantizeLinear/DequantizeLinear and every int8 weight a
    DequantizeLinear reads. A DequantizeLinear without a zero point that reads a shifted tensor (a weight, or
    the output of a shifted QuantizeLinear) gets an explicit 128, since its implicit zero point would become
    uint8 0. Returns how many initializers changed.
    """
    initializers = {init.name: init for init in model.graph.initializer}
    shifted: set[str] = set()  # initializers rewritten
    shifted_tensors: set[str] = set()  # tensors that now carry uint8 values (weights, shifted Q outputs)

    def shift(name: str) -> bool:
        tensor = initializers.get(name)
        if tensor is None or tensor.data_type != onnx.TensorProto.INT8:
            return name in shifted
        values = numpy_helper.to_array(tensor).astype(np.int16) + 128
        tensor.CopyFrom(numpy_helper.from_array(values.astype(np.uint8), name))
        shifted.add(name)
        return True

    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and len(node.input) > 2 and node.input[2] and shift(node.input[2]):
            shifted_tensors.add(node.output[0])
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        if shift(node.input[0]):
            shifted_tensors.add(node.input[0])
        if len(node.input) > 2 and node.input[2]:
            shift(node.input[2])
        elif node.input[0] in shifted_tensors:
            scale = numpy_helper.to_array(initializers[node.input[1]])
            name = _unique_name(initializers, f"{node.output[0]}_zero_point_u8")
            zero = numpy_helper.from_array(np.full(scale.shape, 128, dtype=np.uint8), name)
            model.graph.initializer.append(zero)
            initializers[name] = model.graph.initializer[-1]
            del node.input[2:]
            node.input.append(name)
    return len(shifted)


def _unique_name(taken: dict[str, onnx.TensorProto], base: str) -> str:
    name, n = base, 1
    while name in taken:
        name, n = f"{base}_{n}", n + 1
    return name


def has_int8_weights(model: onnx.ModelProto) -> bool:
    return bool(_int8_weight_dequantizers(model))
