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
from facemoe.export.graph_check import TRACE_BATCH, assert_graph_ok
from facemoe.model.swin import FaceMoE

INPUT_NAME = "input"
OUTPUT_NAME = "embedding"
# Protobuf refuses messages over 2 GiB; keep a margin for the graph itself.
EXTERNAL_DATA_THRESHOLD = 1_900 * 1024 * 1024


@contextlib.contextmanager
def export_mode(model: FaceMoE) -> Iterator[FaceMoE]:
    """Temporarily put the model in the traced configuration (static routing, fused fc1, eval)."""
    saved = [(m, m.routing, m.fuse_fc1, m.record_routing, m.track_aux_loss) for _, m in model.moe_layers()]
    was_training = model.training
    model.eval()
    for _, moe in model.moe_layers():
        moe.routing, moe.fuse_fc1, moe.record_routing, moe.track_aux_loss = "static", True, False, False
    try:
        yield model
    finally:
        for moe, routing, fuse, record, aux in saved:
            moe.routing, moe.fuse_fc1, moe.record_routing, moe.track_aux_loss = routing, fuse, record, aux
        model.train(was_training)


def parameter_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def trace_to_onnx(model: FaceMoE, path: str | Path, opset: int = 17, trace_batch: int = TRACE_BATCH) -> None:
    """Trace ``model`` to ``path`` (raw, unsimplified; external data beside it when large)."""
    if opset < 17:
        raise ExportError(f"opset {opset} is too old: opset >= 17 keeps LayerNormalization as one node")
    cfg = model.config
    dummy = torch.randn(trace_batch, cfg.in_chans, cfg.img_size, cfg.img_size)
    path = Path(path)
    with export_mode(model), torch.no_grad(), warnings.catch_warnings():
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
            dynamo=False,
        )


def simplify(path: str | Path, out_path: str | Path) -> onnx.ModelProto:
    """Fold constants and shape arithmetic with onnxslim; falls back to the raw graph if unavailable."""
    model = onnx.load(str(path))
    try:
        import onnxslim
    except ImportError:  # pragma: no cover - onnxslim is in the [export] extra
        return model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        slim = onnxslim.slim(model)
    return slim if isinstance(slim, onnx.ModelProto) else model


def save_onnx(model: onnx.ModelProto, path: str | Path) -> list[str]:
    """Save ``model``; weights go to ``<name>.data`` beside it when the file would pass the 2 GB limit.

    Returns the external data file names (relative to the model's folder), empty when self-contained.
    """
    path = Path(path)
    size = model.ByteSize()
    if size < EXTERNAL_DATA_THRESHOLD:
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


def run_onnx(path: str | Path, batch: np.ndarray, providers: list[str] | None = None) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: batch.astype(np.float32)})[0]


def export_fp32(
    model: FaceMoE,
    out_path: str | Path,
    opset: int = 17,
    verify_batches: tuple[int, ...] = (1, 3, 8),
    tolerance: float = 1e-4,
    seed: int = 1234,
) -> dict[str, object]:
    """Export, simplify, check and verify the fp32 graph; returns a small report for the manifest.

    Verification runs ONNX Runtime at each batch size in ``verify_batches`` on fresh inputs (never the
    trace input) against the PyTorch model in ``sparse`` routing (the reference semantics).
    """
    out_path = Path(out_path)
    raw_path = out_path.with_name(out_path.stem + ".raw.onnx")
    trace_to_onnx(model, raw_path, opset)
    slim = simplify(raw_path, out_path)
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
    try:
        for batch_size in verify_batches:
            batch = generator.standard_normal((batch_size, cfg.in_chans, cfg.img_size, cfg.img_size)).astype(np.float32)
            with torch.no_grad():
                reference = model(torch.from_numpy(batch)).numpy()
            got = run_onnx(out_path, batch)
            errors[str(batch_size)] = float(np.abs(got - reference).max())
    finally:
        model.set_routing(saved_routing)  # type: ignore[arg-type]
    worst = max(errors.values())
    if not worst <= tolerance:
        raise ExportError(
            f"{out_path}: ONNX Runtime output differs from PyTorch by {worst:.3g} (> {tolerance}) "
            f"at batch sizes {errors}"
        )
    return {"ops": graph.ops, "max_abs_by_batch": errors, "external_data": external, "opset": opset}


__all__ = ["INPUT_NAME", "OUTPUT_NAME", "export_fp32", "run_onnx", "save_onnx", "simplify", "trace_to_onnx"]
