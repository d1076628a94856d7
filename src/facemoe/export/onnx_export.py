"""FP32 ONNX export with static top-k routing.

The model is traced in ``static`` routing mode (dense experts + a (tokens, N) gate matrix built with
TopK -> ScatterElements), with the experts' first layers fused into one wide MatMul. The TorchScript
exporter is used on purpose: the graph is a pure function of tensor shapes fixed by the config, and this
exporter emits compact LayerNormalization / Erf-GELU nodes at opset 17 on every torch release we support.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import torch

from facemoe.errors import ExportError
from facemoe.export.gating_ort import custom_ops_available, name_op_weights
from facemoe.export.graph_check import TRACE_BATCH, assert_graph_ok
from facemoe.export.onnx_graph import save_onnx
from facemoe.model.moe import GATING_MODES
from facemoe.model.moe_plugin import DOMAIN as GATING_DOMAIN
from facemoe.model.moe_plugin import OP_VERSION as GATING_OP_VERSION
from facemoe.model.moe_plugin import check_plugin_export
from facemoe.model.swin import FaceMoE
from facemoe.runtime.ort_session import create_session

INPUT_NAME = "input"
OUTPUT_NAME = "embedding"


@contextlib.contextmanager
def export_mode(model: FaceMoE, gating: str = "onnx") -> Iterator[FaceMoE]:
    """Temporarily put the model in the traced configuration (static routing, fused fc1, eval).

    ``gating="plugin"`` makes every MoE block trace to one ``facemoe::SparseMoE`` node (docs/GATING_OP.md).
    """
    with model.tracing(gating=gating):  # type: ignore[arg-type]
        yield model


def release_memory() -> None:
    """Hand freed heap back to the OS between export stages.

    The stages allocate and free model-sized buffers (protobufs, ONNX Runtime sessions); glibc keeps
    freed arenas mapped, so without a trim the process's resident size only grows.
    """
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def trace_to_onnx(
    model: FaceMoE, path: str | Path, opset: int = 17, trace_batch: int = TRACE_BATCH, gating: str = "onnx"
) -> None:
    """Trace ``model`` to ``path`` (raw, unsimplified; external data beside it when large)."""
    if opset < 17:
        raise ExportError(f"opset {opset} is too old: opset >= 17 keeps LayerNormalization as one node")
    cfg = model.config
    dummy = torch.randn(trace_batch, cfg.in_chans, cfg.img_size, cfg.img_size)
    path = Path(path)
    custom_opsets = {GATING_DOMAIN: GATING_OP_VERSION} if gating == "plugin" else None
    with export_mode(model, gating), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (dummy,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=opset,
            do_constant_folding=True,
            custom_opsets=custom_opsets,
            dynamo=False,
        )


# Weights of these ops (input 1) are what onnxslim never needs to read; see simplify().
_WEIGHT_CONSUMERS = frozenset({"MatMul", "Gemm", "Conv"})
_OFFLOAD_MIN_BYTES = 64 * 1024


def offload_weights(model: onnx.ModelProto, data_path: Path) -> int:
    """Move the large GEMM/Conv weight initializers' bytes into ``data_path``; the proto keeps references.

    Only tensors whose every use is the weight input of a MatMul/Gemm/Conv move: shape constants, biases,
    attention-bias tables and everything a simplifier may fold stay inline. Returns the bytes moved.
    """
    from onnx.external_data_helper import set_external_data

    uses: dict[str, set[tuple[str, int]]] = {}
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            uses.setdefault(name, set()).add((node.op_type, index))
    moved = 0
    with open(data_path, "wb") as data:
        for tensor in model.graph.initializer:
            consumers = uses.get(tensor.name)
            if (
                not consumers
                or len(tensor.raw_data) < _OFFLOAD_MIN_BYTES
                or any(op not in _WEIGHT_CONSUMERS or index != 1 for op, index in consumers)
            ):
                continue
            set_external_data(tensor, data_path.name, offset=data.tell(), length=len(tensor.raw_data))
            data.write(tensor.raw_data)
            moved += len(tensor.raw_data)
            tensor.ClearField("raw_data")
            tensor.data_location = onnx.TensorProto.EXTERNAL
    return moved


def simplify(path: str | Path, out_path: str | Path) -> onnx.ModelProto:
    """Fold constants and shape arithmetic with onnxslim; falls back to the raw graph if unavailable.

    onnxslim copies a graph several times over (measured: 17.8 GiB peak on the 1.86 GB full model), so it
    runs on the graph with its GEMM/Conv weights parked in a file beside ``out_path``; they are read back
    into the simplified graph afterwards (then 1.9 GiB of simplification overhead instead of ~14 GiB).
    """
    model = onnx.load(str(path))
    try:
        import onnxslim
    except ImportError:  # pragma: no cover - onnxslim is in the [export] extra
        return model
    folder = Path(out_path).parent
    data_path = folder / f".{Path(out_path).name}.slim-weights"
    try:
        offload_weights(model, data_path)
        release_memory()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            slim = onnxslim.slim(model)
        result = slim if isinstance(slim, onnx.ModelProto) else model
        del slim, model
        onnx.load_external_data_for_model(result, str(folder))
    finally:
        data_path.unlink(missing_ok=True)
    return result


def onnx_session(path: str | Path, providers: list[str] | None = None, custom_ops: bool = False):  # type: ignore[no-untyped-def]
    return create_session(path, providers=providers or ["CPUExecutionProvider"], custom_ops=custom_ops).session


def run_onnx(
    path: str | Path, batch: np.ndarray, providers: list[str] | None = None, custom_ops: bool = False
) -> np.ndarray:
    session = onnx_session(path, providers, custom_ops)
    return session.run(None, {session.get_inputs()[0].name: batch.astype(np.float32)})[0]


def export_fp32(
    model: FaceMoE,
    out_path: str | Path,
    opset: int = 17,
    verify_batches: tuple[int, ...] = (1, 3, 8),
    tolerance: float = 1e-4,
    seed: int = 1234,
    gating: str = "onnx",
) -> dict[str, object]:
    """Export, simplify, check and verify the fp32 graph; returns a small report for the manifest.

    Verification runs ONNX Runtime at each batch size in ``verify_batches`` on fresh inputs (never the
    trace input) against the PyTorch model in ``sparse`` routing (the reference semantics).
    ``gating="plugin"`` exports each MoE block as one ``facemoe::SparseMoE`` node (docs/GATING_OP.md).
    """
    if gating not in GATING_MODES:
        raise ExportError(f"gating must be one of {', '.join(GATING_MODES)}, not {gating!r}")
    if gating == "plugin":
        check_plugin_export(model)
        if not custom_ops_available():
            raise ExportError(
                "--gating plugin: verifying the graph needs onnxruntime-extensions (it runs the facemoe::SparseMoE "
                "op on ONNX Runtime): pip install onnxruntime-extensions"
            )
    out_path = Path(out_path)
    model.eval()  # the reference below must use BatchNorm running statistics, as the graph does
    raw_path = out_path.with_name(out_path.stem + ".raw.onnx")
    trace_to_onnx(model, raw_path, opset, gating=gating)
    slim = simplify(raw_path, out_path)
    if gating == "plugin":
        name_op_weights(slim)
    for leftover in out_path.parent.glob(raw_path.name + "*"):
        leftover.unlink()
    if raw_path.exists():
        raw_path.unlink()
    graph = assert_graph_ok(slim, str(out_path), input_name=INPUT_NAME)
    external = save_onnx(slim, out_path)
    del slim
    cfg = model.config
    generator = np.random.default_rng(seed)
    errors: dict[str, float] = {}
    saved_routing = model.routing
    model.set_routing("sparse")
    # One session for every batch size: a session of the full model holds several GB (prepacked weights).
    session = onnx_session(out_path, custom_ops=gating == "plugin")
    try:
        for batch_size in verify_batches:
            batch = generator.standard_normal((batch_size, cfg.in_chans, cfg.img_size, cfg.img_size)).astype(np.float32)
            with torch.no_grad():
                reference = model(torch.from_numpy(batch)).numpy()
            got = session.run(None, {session.get_inputs()[0].name: batch})[0]
            errors[str(batch_size)] = float(np.abs(got - reference).max())
    finally:
        model.set_routing(saved_routing)  # type: ignore[arg-type]
        del session
        release_memory()
    worst = max(errors.values())
    if not worst <= tolerance:
        raise ExportError(
            f"{out_path}: ONNX Runtime output differs from PyTorch by {worst:.3g} (> {tolerance}) "
            f"at batch sizes {errors}"
        )
    return {
        "ops": graph.ops,
        "max_abs_by_batch": errors,
        "external_data": external,
        "opset": opset,
        "gating": gating,
    }


__all__ = ["INPUT_NAME", "OUTPUT_NAME", "export_fp32", "run_onnx", "save_onnx", "simplify", "trace_to_onnx"]
