"""The artifact and parity stages of an export, each a function with a typed result.

``facemoe.export.bundle_writer.export_bundle`` runs them in order inside the staging directory and
writes the manifest from their results.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from facemoe.bundle import Artifact
from facemoe.export import fp16 as fp16_pass
from facemoe.export.inputs import (
    PAIR_SEED,
    PARITY_INPUTS_NAME,
    SYNTHETIC_SEED,
    array_sha256,
    paired_views,
    save_parity_inputs,
    synthetic_faces,
)
from facemoe.export.onnx_export import export_fp32
from facemoe.export.onnx_graph import save_onnx
from facemoe.export.parity import ParityResult, check_artifacts, noise_floor, run_reference
from facemoe.fileio import sha256_file
from facemoe.model.swin import FaceMoE


@dataclass
class CalibrationSpec:
    """Where INT8 calibration faces come from and how ranges are computed."""

    paths: list[Path]
    count: int = 256
    method: str = "percentile"
    seed: int = 0
    degrade: bool = True
    cache_dir: Path | None = None
    # INT8 placement: transformer blocks kept float from the input side, and whether the attention
    # activation-activation matmuls get Q/DQ too (measured on the full preset, 2-core CPU: both on gives
    # 2.16-2.26x over fp32 at batch 1 instead of 1.92-2.24x; docs/BENCHMARKS.md).
    float_blocks: int = 1
    quantize_attention_matmuls: bool = False


@dataclass
class ArtifactStage:
    """One ONNX artifact written into the staging directory and the report of the pass that made it."""

    artifact: Artifact
    path: Path
    report: dict[str, Any]


@dataclass
class ParityStage:
    results: dict[str, ParityResult]
    noise: ParityResult
    inputs_summary: dict[str, Any]
    reference_embeddings: np.ndarray
    embeddings: dict[str, np.ndarray]


def fp32_stage(model: FaceMoE, staging: Path, opset: int, gating: str) -> ArtifactStage:
    """Trace, simplify, check and verify the fp32 graph."""
    path = staging / "model.fp32.onnx"
    report = export_fp32(model, path, opset=opset, gating=gating)
    external = list(report["external_data"])  # type: ignore[call-overload]
    return ArtifactStage(Artifact("fp32", path.name, sha256_file(path), opset, external, gating=gating), path, report)


def fp16_stage(fp32: ArtifactStage, staging: Path, opset: int, gating: str) -> ArtifactStage:
    """The mixed-precision graph; the report is the fp16 pass's (which nodes stayed fp32)."""
    half, conversion = fp16_pass.convert_to_fp16(onnx.load(str(fp32.path)), in_place=True)
    path = staging / "model.fp16.onnx"
    external = save_onnx(half, path)
    del half
    artifact = Artifact("fp16", path.name, sha256_file(path), opset, external, gating=gating)
    return ArtifactStage(artifact, path, conversion.to_json())


def int8_stage(
    fp32: ArtifactStage,
    staging: Path,
    calib: CalibrationSpec,
    face_pool: Any,
    *,
    weights_sha256: str,
    opset: int,
    gating: str,
    warn: Callable[[str], None],
) -> ArtifactStage:
    """Calibrate on low-resolution faces and insert Q/DQ; the report is the manifest's calibration section."""
    from facemoe.calibration.dataset import build_calibration_set
    from facemoe.export.int8 import Int8Options, quantize_int8

    faces, data_summary = build_calibration_set(
        face_pool, count=calib.count, seed=calib.seed, degrade=calib.degrade, warn=warn
    )
    cache = None
    if calib.cache_dir is not None:
        from facemoe.calibration.cache import CalibrationCache

        cache = CalibrationCache(calib.cache_dir)
    options = Int8Options(
        method=calib.method,
        float_blocks=calib.float_blocks,
        quantize_attention_matmuls=calib.quantize_attention_matmuls,
    )
    path = staging / "model.int8.onnx"
    report = quantize_int8(
        fp32.path,
        path,
        faces,
        options,
        cache=cache,
        model_hash=weights_sha256,
        data_hash=data_summary.get("data_hash"),
        work_dir=staging,
    )
    artifact = Artifact("int8", path.name, sha256_file(path), opset, [], gating=gating)
    return ArtifactStage(artifact, path, {**data_summary, "method": calib.method, "quantization": report})


def parity_stage(
    model: FaceMoE,
    staging: Path,
    artifacts: dict[str, ArtifactStage],
    calib: CalibrationSpec | None,
    face_pool: Any,
    gates: dict[str, dict[str, float]],
    parity_count: int,
) -> ParityStage:
    """The PyTorch fp32 reference against every artifact on held-out inputs, and the noise-floor context."""
    inputs, inputs_summary = _parity_inputs(staging, calib, face_pool, parity_count)
    reference = run_reference(model, inputs)
    layer_names = [name for name, _ in model.moe_layers()]
    paths = {precision: stage.path for precision, stage in artifacts.items()}
    results, embeddings = check_artifacts(reference, paths, inputs, layer_names, gates)
    # Context for the figures: how far the reference moves under imperceptible input noise.
    noise = noise_floor(model, inputs, reference, layer_names)
    return ParityStage(results, noise, inputs_summary, reference[0], embeddings)


def _parity_inputs(
    staging: Path, calib: CalibrationSpec | None, pool: Any, count: int
) -> tuple[np.ndarray, dict[str, Any]]:
    """Held-out inputs and how ``facemoe parity`` gets the same ones again.

    Faces held out from the calibration sources are stored in the bundle (float32, exactly as used);
    synthetic faces are recorded by recipe and sha256 (docs/EXPORT.md, "Parity").
    """
    faces: np.ndarray | None = None
    if calib is not None:
        from facemoe.calibration.dataset import build_holdout_set

        faces, summary = build_holdout_set(
            pool, count=count, seed=calib.seed + 1, calibration_count=calib.count, calibration_seed=calib.seed
        )
    if faces is not None and len(faces):
        path = staging / PARITY_INPUTS_NAME
        save_parity_inputs(path, faces, "held-out faces")
        summary = {"source": "held-out faces", **summary, "file": path.name, "sha256": sha256_file(path)}
    else:
        faces = synthetic_faces(count)
        summary = {
            "source": "synthetic smooth images (no face data given)",
            "count": count,
            "size": int(faces.shape[-1]),
            "seed": SYNTHETIC_SEED,
            "array_sha256": array_sha256(faces),
        }
    return paired_views(faces, seed=PAIR_SEED), {**summary, "faces": len(faces), "pair_seed": PAIR_SEED}


def write_parity_plot(
    path: Path, reference: np.ndarray, embeddings: dict[str, np.ndarray], parity: dict[str, ParityResult]
) -> None:
    """Reference vs artifact embedding values (one panel per artifact) and per-layer routing agreement."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # matplotlib comes with the [export] extra; the plot is optional
        return
    count = len(embeddings)
    fig, axes = plt.subplots(1, count + 1, figsize=(4.2 * (count + 1), 4.2), squeeze=False)
    lim = float(np.abs(reference).max()) * 1.05
    for ax, (name, got) in zip(axes[0], embeddings.items(), strict=False):
        ax.scatter(reference.ravel(), got.ravel(), s=1, alpha=0.3)
        ax.plot([-lim, lim], [-lim, lim], color="red", linewidth=0.8)
        result = parity[name]
        ax.set_title(f"{name}: cos min {result.cosine_min:.5f}, mean {result.cosine_mean:.5f}", fontsize=9)
        ax.set_xlabel("PyTorch fp32 reference")
        ax.set_ylabel(f"ONNX {name}")
    ax = axes[0][count]
    width = 0.8 / max(count, 1)
    for i, (name, result) in enumerate(parity.items()):
        layers = list(result.routing_per_layer)
        ax.bar(np.arange(len(layers)) + i * width, [result.routing_per_layer[k] for k in layers], width, label=name)
    ax.set_ylim(0.9, 1.001)
    ax.set_title("routing agreement per MoE layer", fontsize=9)
    ax.set_xlabel("MoE layer (forward order)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
