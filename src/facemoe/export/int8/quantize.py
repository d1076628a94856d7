"""``quantize_int8``: plan, calibrate (or reuse cached ranges), rewrite, check and save the INT8 graph."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from facemoe.calibration.cache import CalibrationCache
from facemoe.calibration.cache import model_hash as onnx_file_hash
from facemoe.errors import ExportError, InputError
from facemoe.export.int8.calibrate import CALIBRATION_ALGORITHM_VERSION, array_hash, collect_activation_ranges
from facemoe.export.int8.inspection import cosine, describe_qdq, run_quantized
from facemoe.export.int8.options import Int8Options
from facemoe.export.int8.plan import QuantizationPlan, plan_quantization
from facemoe.export.int8.rewrite import insert_qdq
from facemoe.export.onnx_graph import EXTERNAL_DATA_THRESHOLD, save_onnx
from facemoe.fileio import atomic_path, sha256_file
from facemoe.runtime.ort_session import uses_custom_ops


def _checked_calibration(fp32_path: Path, calibration: np.ndarray) -> np.ndarray:
    if not fp32_path.is_file():
        raise InputError(f"{fp32_path}: no such ONNX file")
    calibration = np.asarray(calibration)
    if calibration.ndim != 4 or len(calibration) == 0:
        raise InputError(f"calibration data must be a non-empty (N, C, H, W) batch, got shape {calibration.shape}")
    if not np.all(np.isfinite(calibration)):
        raise InputError("calibration data contains inf or NaN")
    return np.ascontiguousarray(calibration, dtype=np.float32)


def _save(model: onnx.ModelProto, out_path: Path) -> None:
    """Check (when the graph fits one protobuf, as the checker needs) and save the quantized graph."""
    if model.ByteSize() < EXTERNAL_DATA_THRESHOLD:
        try:
            onnx.checker.check_model(model)
        except onnx.checker.ValidationError as exc:
            raise ExportError(f"{out_path}: the quantized graph is invalid: {exc}") from exc
        with atomic_path(out_path) as tmp:
            save_onnx(model, tmp)
    else:
        save_onnx(model, out_path)


def _smoke_check(fp32_path: Path, out_path: Path, sample: np.ndarray, custom_ops: bool) -> dict[str, Any]:
    """Calibration faces through both graphs: finite, well-shaped output and its cosine to fp32."""
    if len(sample) == 0:
        return {}
    reference = run_quantized(fp32_path, sample, custom_ops)
    # Batch 1 and the rest as a second batch: both the single-face and the batched path must work.
    parts = [sample[:1], sample[1:]] if len(sample) > 1 else [sample]
    got = np.concatenate([run_quantized(out_path, part, custom_ops) for part in parts])
    if got.shape != reference.shape or not np.all(np.isfinite(got)):
        raise ExportError(f"{out_path}: the INT8 graph gives non-finite or mis-shaped output {got.shape}")
    similarity = cosine(reference, got)
    return {"samples": len(sample), "cosine_min": float(similarity.min()), "cosine_mean": float(similarity.mean())}


def quantize_int8(
    fp32_path: str | Path,
    out_path: str | Path,
    calibration: np.ndarray,
    options: Int8Options | None = None,
    *,
    cache: CalibrationCache | None = None,
    model_hash: str | None = None,
    data_hash: str | None = None,
    calibration_summary: dict[str, Any] | None = None,
    work_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Write the INT8 Q/DQ graph of ``fp32_path`` to ``out_path``; return a report for the manifest.

    ``calibration`` is an (N, 3, H, W) float32 batch of pre-processed faces (see
    ``facemoe.calibration.build_calibration_set``). With ``cache``, activation ranges are looked up by
    (model hash, data hash, method, parameters) and calibration runs only on a miss; ``model_hash`` defaults
    to a hash of the ONNX file(s) and ``data_hash`` to a hash of the ``calibration`` array (pass the
    calibration summary's ``data_hash`` or a weights fingerprint to skip hashing large inputs). The
    calibration probe graph goes into ``work_dir`` (default: the folder of ``out_path``). Parity on
    held-out faces is the parity module's job.
    """
    started = time.perf_counter()
    options = options or Int8Options()
    options.validate()
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    calibration = _checked_calibration(fp32_path, calibration)

    model = onnx.load(str(fp32_path))
    if any(node.op_type in ("QuantizeLinear", "DequantizeLinear") for node in model.graph.node):
        raise ExportError(f"{fp32_path}: already contains QuantizeLinear/DequantizeLinear nodes")
    custom_ops = uses_custom_ops(model)
    plan = plan_quantization(model, options)
    if not plan.nodes:
        raise ExportError(f"{fp32_path}: nothing to quantize (no MatMul/Gemm/Conv with an fp32 weight selected)")

    params = options.calibration_params(CALIBRATION_ALGORITHM_VERSION)
    calib_started = time.perf_counter()
    cache_state, cache_key, amax = "off", None, None
    data_hash = data_hash or array_hash(calibration)
    if cache is not None:
        cache_key = cache.key(model_hash or onnx_file_hash(fp32_path), data_hash, options.method, params)
        amax = cache.load(cache_key, plan.activations)
        cache_state = "hit" if amax is not None else "miss"
    batches_run = 0
    if amax is None:
        amax = collect_activation_ranges(
            model,
            plan.activations,
            calibration,
            options.method,
            options.percentile,
            options.num_bins,
            options.batch_size,
            work_dir=Path(work_dir) if work_dir is not None else out_path.parent,
        )
        batches_run = math.ceil(len(calibration) / options.batch_size)
        if cache is not None and cache_key is not None:
            cache.save(cache_key, amax, {"data_hash": data_hash, "method": options.method, "params": params})
    calibration_s = time.perf_counter() - calib_started

    insert_qdq(model, plan, amax, options.split_gemm_bias)
    qdq = describe_qdq(model)
    _save(model, out_path)
    del model
    check = _smoke_check(fp32_path, out_path, calibration[: max(options.check_samples, 0)], custom_ops)
    calibration_report = {
        "method": options.method,
        "params": params,
        "samples": len(calibration),
        "data_hash": data_hash,
        "cache": cache_state,
        "cache_key": cache_key,
        "batches_run": batches_run,
        "amax": _amax_summary(plan, amax),
        "summary": calibration_summary,
    }
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
        "quantized_roles": plan.roles,
        "quantized_activations": len(plan.activations),
        "excluded_nodes": dict(plan.excluded),
        "options": options.placement_json(),
        "qdq": qdq,
        "calibration": calibration_report,
        "check_on_calibration_faces": check,
        "time_s": {"calibration": round(calibration_s, 3), "total": round(time.perf_counter() - started, 3)},
    }


def _amax_summary(plan: QuantizationPlan, amax: dict[str, float]) -> dict[str, float]:
    values = np.array([amax[t] for t in plan.activations], dtype=np.float64)
    return {"min": float(values.min()), "median": float(np.median(values)), "max": float(values.max())}
