"""The one place ONNX Runtime sessions for FaceMoE graphs are made (export checks, parity, backends).

It decides, in one spot, what every session of the project shares: execution providers, thread count,
graph optimisation level, the ``facemoe`` custom-op library for ``--gating plugin`` graphs, and the int8
weight encoding the CPU provider computes exactly on this processor (``facemoe.runtime.int8_cpu``).
Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import onnx

from facemoe.gating.spec import DOMAIN
from facemoe.runtime.int8_cpu import (
    INT8_ENCODINGS,
    apply_encoding,
    choose_encoding,
    detect_cpu,
    has_int8_weights,
)

Optimization = Literal["all", "extended", "basic", "disabled"]
# The custom-op domain of the optional MoE gating node (docs/GATING_OP.md); re-exported for callers.
CUSTOM_DOMAIN = DOMAIN
# Preference order; the CPU provider is always last and always present.
PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


@dataclass
class OrtSession:
    """An ONNX Runtime session and what was decided when it was made."""

    session: Any  # onnxruntime.InferenceSession
    provider: str
    optimization: Optimization
    int8_encoding: str | None  # None: the graph has no int8 weights

    def run(self, batch: Any, outputs: list[str] | None = None) -> list[Any]:
        return self.session.run(outputs, {self.session.get_inputs()[0].name: batch})

    def describe(self) -> str:
        encoding = f", int8 weights {self.int8_encoding}" if self.int8_encoding else ""
        return f"{self.provider}, graph optimisation {self.optimization}{encoding}"


def uses_custom_ops(model: onnx.ModelProto) -> bool:
    return any(node.domain == CUSTOM_DOMAIN for node in model.graph.node) or any(
        op.domain == CUSTOM_DOMAIN for op in model.opset_import
    )


def _level(optimization: Optimization) -> Any:
    import onnxruntime as ort

    return {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }[optimization]


def create_session(
    model: str | Path | bytes | onnx.ModelProto,
    *,
    providers: list[str] | None = None,
    threads: int | None = None,
    optimization: Optimization = "all",
    int8_encoding: str = "auto",
    custom_ops: bool | None = None,
    optimized_model_path: str | Path | None = None,
) -> OrtSession:
    """A session for ``model`` (a path, serialised bytes, or a proto; a proto is consumed to bound peak memory).

    ``int8_encoding``: ``"auto"`` lets :func:`facemoe.runtime.int8_cpu.choose_encoding` pick for this
    processor (exact by default); ``"s8"``, ``"w7"`` or ``"u8"`` force one. Only graphs with int8 weights
    run on the CPU provider are rewritten; GPU providers get the graph as stored.
    """
    import onnxruntime as ort

    if int8_encoding not in ("auto", *INT8_ENCODINGS):
        raise ValueError(f"int8 encoding {int8_encoding!r}: expected auto or one of {', '.join(INT8_ENCODINGS)}")
    available = ort.get_available_providers()
    chosen = providers or [p for p in PROVIDER_ORDER if p in available]
    on_cpu = chosen[0] == "CPUExecutionProvider"

    if isinstance(model, bytes):
        model = onnx.load_from_string(model)
    proto: onnx.ModelProto | None = model if isinstance(model, onnx.ModelProto) else None
    path = None if proto is not None else Path(model)
    if proto is None and path is not None:
        # The graph (without external weights) is cheap to read and says whether there is anything to decide.
        header = onnx.load(str(path), load_external_data=False)
        custom_ops = uses_custom_ops(header) if custom_ops is None else custom_ops
        int8 = has_int8_weights(header)
        if on_cpu and int8:
            proto = onnx.load(str(path), load_external_data=True)
        del header
    else:
        assert proto is not None
        custom_ops = uses_custom_ops(proto) if custom_ops is None else custom_ops
        int8 = has_int8_weights(proto)

    encoding: str | None = None
    if on_cpu and proto is not None and int8:
        encoding = choose_encoding(detect_cpu()) if int8_encoding == "auto" else int8_encoding
        apply_encoding(proto, encoding)

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = _level(optimization)
    if threads:
        options.intra_op_num_threads = threads
    if optimized_model_path is not None:
        options.optimized_model_filepath = str(optimized_model_path)
    if custom_ops:
        # Imported here: only plugin graphs load onnxruntime-extensions (torch stays hidden from it).
        from facemoe.gating.ort import register_custom_ops

        register_custom_ops(options, required=True)
    if proto is not None:
        payload: str | bytes = proto.SerializeToString()
        proto.Clear()
    else:
        payload = str(path)
    session = ort.InferenceSession(payload, options, providers=chosen)
    if int8 and encoding is None and session.get_providers()[0] == "CPUExecutionProvider":
        # A GPU provider was asked for but ONNX Runtime fell back to the CPU (e.g. CUDA failed to load): the
        # graph must not run there in the stored encoding, whose fused kernels may saturate on this CPU.
        del session
        fallback = onnx.load_from_string(payload) if isinstance(payload, bytes) else onnx.load(payload)
        return create_session(
            fallback,
            providers=["CPUExecutionProvider"],
            threads=threads,
            optimization=optimization,
            int8_encoding=int8_encoding,
            custom_ops=custom_ops,
            optimized_model_path=optimized_model_path,
        )
    return OrtSession(session, session.get_providers()[0], optimization, encoding)
