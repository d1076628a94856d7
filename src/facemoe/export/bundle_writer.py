"""Writing a deployment bundle: fp32 / fp16 / int8 ONNX, parity report, manifest, atomically.

The bundle is built in a hidden staging directory beside the target and renamed into place only after
every artifact exists and every parity gate passed, so an interrupted or failed export never leaves a
directory that looks like a valid bundle. Every temporary file of the export (calibration and routing
probes, parked weights) lives in that staging directory too.

``export_bundle`` runs stages (fp32, fp16, int8, parity, manifest), each a function with a typed result,
timed and announced the same way by ``StageClock``; progress and warnings go to an ``ExportReporter``
(the terminal one is ``facemoe.cli.export_progress``; this module never imports rich).
"""

from __future__ import annotations

import datetime as dt
import logging
import platform
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import onnx
import torch

import facemoe
from facemoe.bundle import (
    Calibration,
    ExportInfo,
    Manifest,
    ModelSection,
    ModelSource,
    Preprocessing,
    Routing,
    write_manifest,
)
from facemoe.errors import ExportError
from facemoe.export.bundle_stages import (
    ArtifactStage,
    CalibrationSpec,
    ParityStage,
    fp16_stage,
    fp32_stage,
    int8_stage,
    parity_stage,
    write_parity_plot,
)
from facemoe.export.onnx_export import INPUT_NAME, OUTPUT_NAME, release_memory
from facemoe.export.parity import DEFAULT_GATES, ParityResult
from facemoe.fileio import atomic_directory, write_json_atomic
from facemoe.model.fingerprint import model_fingerprint
from facemoe.model.swin import FaceMoE, count_parameters


@dataclass
class ExportResult:
    path: Path
    manifest: Manifest
    parity: dict[str, ParityResult] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def tool_versions() -> dict[str, str]:
    import onnxruntime

    versions = {
        "facemoe": facemoe.__version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
    }
    try:
        import onnxslim

        versions["onnxslim"] = getattr(onnxslim, "__version__", "unknown")
    except ImportError:
        pass
    return versions


class ExportReporter(Protocol):
    """Where an export reports its progress (``facemoe.cli.export_progress.RichExportReporter`` for a terminal)."""

    def plan(self, stages: list[str]) -> None: ...

    def stage_started(self, name: str, description: str) -> None: ...

    def stage_finished(self, name: str, seconds: float) -> None: ...

    def warn(self, message: str) -> None: ...

    def parity(self, results: dict[str, ParityResult], noise: ParityResult) -> None: ...


class LogReporter:
    """The default reporter: warnings go to the ``facemoe.export`` logger, nothing else is shown."""

    def plan(self, stages: list[str]) -> None:
        pass

    def stage_started(self, name: str, description: str) -> None:
        pass

    def stage_finished(self, name: str, seconds: float) -> None:
        pass

    def warn(self, message: str) -> None:
        logging.getLogger("facemoe.export").warning(message)

    def parity(self, results: dict[str, ParityResult], noise: ParityResult) -> None:
        pass


@dataclass
class StageClock:
    """Times and announces every stage the same way; ``timings`` holds seconds per finished stage."""

    reporter: ExportReporter
    timings: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str, description: str) -> Iterator[None]:
        release_memory()  # the previous stage's graphs are garbage by now; give their memory back first
        self.reporter.stage_started(name, description)
        start = time.perf_counter()
        yield
        self.timings[name] = time.perf_counter() - start
        self.reporter.stage_finished(name, self.timings[name])


def manifest_stage(
    model: FaceMoE,
    stages: dict[str, ArtifactStage],
    parity: ParityStage,
    *,
    weights_sha256: str,
    random_weights: bool,
    source: dict[str, Any] | None,
    gating: str,
    max_batch: int,
    timings: dict[str, float],
) -> Manifest:
    """The manifest of the bundle (written last by ``export_bundle``)."""
    artifacts = {precision: stage.artifact for precision, stage in stages.items()}
    for precision, artifact in artifacts.items():
        artifact.parity = parity.results[precision].to_json()
    int8 = stages.get("int8")
    cfg = model.config
    manifest = Manifest(
        model=ModelSection(
            architecture="facemoe-swin",
            config=cfg.to_dict(),
            num_experts=cfg.num_experts,
            k=cfg.k,
            parameters=count_parameters(model),
            weights_sha256=weights_sha256,
            random_weights=random_weights,
            source=ModelSource.from_json(source),
            export=ExportInfo(
                max_batch=max_batch,
                fp32=stages["fp32"].report,
                parity_inputs=parity.inputs_summary,
                parity_noise_floor=parity.noise.to_json(),
                timings_s={name: round(seconds, 1) for name, seconds in timings.items()},
            ),
        ),
        preprocessing=Preprocessing(input_size=cfg.img_size),
        routing=Routing(mode="static", k=cfg.k, num_experts=cfg.num_experts, gating=gating),
        embedding_size=cfg.embedding_size,
        input_name=INPUT_NAME,
        output_name=OUTPUT_NAME,
        artifacts=artifacts,
        calibration=Calibration.from_json(int8.report) if int8 is not None else None,
        tools=tool_versions(),
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    )
    return manifest


def _enforce_gates(out_dir: Path, parity: ParityStage) -> None:
    """Raise ``ExportError`` (after writing the full report beside ``out_dir``) when a gate was missed."""
    failed = {name: r for name, r in parity.results.items() if not r.passed}
    if not failed:
        return
    report_path = out_dir.with_name(out_dir.name + ".parity-failed.json")
    write_json_atomic(
        report_path,
        {**{name: r.to_json() for name, r in parity.results.items()}, "noise_floor": parity.noise.to_json()},
    )
    raise ExportError(
        "parity gate missed: "
        + "; ".join(f"{name}: {', '.join(r.failures)}" for name, r in failed.items())
        + f" (no bundle written; full report in {report_path})"
    )


_STAGES = {
    "fp32": "fp32 ONNX: trace, simplify, check, verify at batch 1/3/8",
    "fp16": "fp16 ONNX: mixed precision (LayerNorm, Softmax, router, residual in fp32)",
    "int8": "int8 ONNX: calibrate on low-resolution faces, insert Q/DQ",
    "parity": "parity: PyTorch fp32 reference vs every artifact on held-out inputs",
    "manifest": "manifest",
}


def export_bundle(
    model: FaceMoE,
    out_dir: str | Path,
    *,
    precisions: Sequence[str] = ("fp32",),
    overwrite: bool = False,
    random_weights: bool = False,
    source: dict[str, Any] | None = None,
    calib: CalibrationSpec | None = None,
    opset: int = 17,
    max_batch: int = 32,
    gates: dict[str, dict[str, float]] | None = None,
    parity_count: int = 32,
    gating: str = "onnx",
    enforce_gates: bool = True,
    reporter: ExportReporter | None = None,
) -> ExportResult:
    """Export ``model`` into a bundle directory; raises ``ExportError`` when a parity gate is missed."""
    reporter = reporter or LogReporter()
    wanted = ["fp32", *[p for p in ("fp16", "int8") if p in precisions]]
    unknown = set(precisions) - {"fp32", "fp16", "int8"}
    if unknown:
        raise ExportError(f"unknown precision(s): {', '.join(sorted(unknown))}")
    if "int8" in wanted and calib is None:
        raise ExportError("INT8 needs calibration faces: pass --calib with folders of aligned faces or videos")
    gates = {**DEFAULT_GATES, **(gates or {})}
    model = model.eval()
    out_dir = Path(out_dir)
    face_pool = None
    if calib is not None:  # read and detect the calibration sources once, before the long export steps
        from facemoe.calibration import FaceDetector, gather_faces

        face_pool = gather_faces(calib.paths, detector=FaceDetector())
    weights_sha256 = model_fingerprint(model)

    clock = StageClock(reporter)
    reporter.plan([*wanted, "parity", "manifest"])
    stages: dict[str, ArtifactStage] = {}
    with atomic_directory(out_dir, overwrite=overwrite) as staging:
        with clock.stage("fp32", _STAGES["fp32"]):
            stages["fp32"] = fp32_stage(model, staging, opset, gating)
        if "fp16" in wanted:
            with clock.stage("fp16", _STAGES["fp16"]):
                stages["fp16"] = fp16_stage(stages["fp32"], staging, opset, gating)
                stages["fp32"].report["fp16_conversion"] = stages["fp16"].report
        if "int8" in wanted:
            assert calib is not None
            with clock.stage("int8", _STAGES["int8"]):
                stages["int8"] = int8_stage(
                    stages["fp32"],
                    staging,
                    calib,
                    face_pool,
                    weights_sha256=weights_sha256,
                    opset=opset,
                    gating=gating,
                    warn=reporter.warn,
                )
        with clock.stage("parity", _STAGES["parity"]):
            parity = parity_stage(model, staging, stages, calib, face_pool, gates, parity_count)
        with clock.stage("manifest", _STAGES["manifest"]):
            manifest = manifest_stage(
                model,
                stages,
                parity,
                weights_sha256=weights_sha256,
                random_weights=random_weights,
                source=source,
                gating=gating,
                max_batch=max_batch,
                timings=dict(clock.timings),
            )

        reporter.parity(parity.results, parity.noise)
        if enforce_gates:
            _enforce_gates(out_dir, parity)
        write_parity_plot(staging / "parity.png", parity.reference_embeddings, parity.embeddings, parity.results)
        write_json_atomic(staging / "parity.json", {name: r.to_json() for name, r in parity.results.items()})
        # The manifest is written last: a bundle without it is never taken for a complete one.
        write_manifest(staging, manifest)
    return ExportResult(out_dir, manifest, parity.results, clock.timings)


__all__ = [
    "CalibrationSpec",
    "ExportReporter",
    "ExportResult",
    "LogReporter",
    "StageClock",
    "export_bundle",
    "manifest_stage",
    "model_fingerprint",
    "tool_versions",
]
