"""Writing a deployment bundle: fp32 / fp16 / int8 ONNX, parity report, manifest, atomically.

The bundle is built in a hidden staging directory beside the target and renamed into place only after
every artifact exists and every parity gate passed, so an interrupted or failed export never leaves a
directory that looks like a valid bundle.
"""

from __future__ import annotations

import datetime as dt
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

import facemoe
from facemoe.bundle import (
    Artifact,
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
from facemoe.export.onnx_export import INPUT_NAME, OUTPUT_NAME, export_fp32, release_memory, save_onnx
from facemoe.export.parity import DEFAULT_GATES, ParityResult, check_artifacts, noise_floor, run_reference
from facemoe.fileio import atomic_directory, sha256_file, write_json_atomic
from facemoe.model.fingerprint import model_fingerprint
from facemoe.model.swin import FaceMoE, count_parameters


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


NOISE_FLOOR_ROW = "reference, inputs ±0.5 grey level"
NOISE_FLOOR_CAPTION = (
    "context row: the fp32 PyTorch reference against itself with every input pixel moved by up to half a grey "
    "level (below 8-bit rounding), i.e. how far the model itself moves under imperceptible noise; no artifact "
    "can be expected to agree with the reference much better. Artifacts pass or fail on their own gates."
)
_GRAPH_LEVEL_LABELS = {"s8": "graph, s8 weights (TensorRT, VNNI CPUs)", "w7": "graph, w7 weights (x86 w/o VNNI)"}


def parity_table(results: dict[str, ParityResult]) -> Table:
    """One row per artifact as this machine serves it, and for int8 one row per graph-level encoding."""
    table = Table(title="Parity against the PyTorch fp32 reference (sparse routing)")
    for column in (
        "artifact",
        "measured with",
        "cos min",
        "cos mean",
        "max abs",
        "routing min",
        "top-1 agr",
        "ΔTAR@1e-3",
        "result",
    ):
        table.add_column(column, justify="right" if column not in ("artifact", "measured with") else "left")

    def row(name: str, r: ParityResult, where: str) -> None:
        if not r.gates:
            verdict = "[dim]context[/]"
        else:
            verdict = "[green]pass[/]" if r.passed else "[red]FAIL: " + "; ".join(r.failures) + "[/]"
        table.add_row(
            name,
            where,
            f"{r.cosine_min:.6f}",
            f"{r.cosine_mean:.6f}",
            f"{r.max_abs:.3g}",
            f"{r.routing_min:.4f}",
            f"{r.top1_agreement:.3f}",
            f"{r.tar_at_far - r.tar_at_far_reference:+.3f}",
            verdict,
        )

    for name, r in results.items():
        m = r.measured_with
        served = f"{m.get('cpu', '')}, ORT opt {m.get('graph_optimization', '')}" if m else "PyTorch"
        if m.get("int8_encoding"):
            served += f", {m['int8_encoding']}"
        row(name, r, served)
        for encoding, graph in r.graph_level.items():
            row(f"  {name} {_GRAPH_LEVEL_LABELS.get(encoding, encoding)}", graph, "ORT opt disabled (any CPU)")
    return table


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
    progress: bool = True,
    console: Console | None = None,
) -> ExportResult:
    """Export ``model`` into a bundle directory; raises ``ExportError`` when a parity gate is missed."""
    console = console or Console(stderr=True)
    wanted = ["fp32", *[p for p in ("fp16", "int8") if p in precisions]]
    unknown = set(precisions) - {"fp32", "fp16", "int8"}
    if unknown:
        raise ExportError(f"unknown precision(s): {', '.join(sorted(unknown))}")
    if "int8" in wanted and calib is None:
        raise ExportError("INT8 needs calibration faces: pass --calib with folders of aligned faces or videos")
    gates = {**DEFAULT_GATES, **(gates or {})}
    model = model.eval()
    out_dir = Path(out_dir)
    timings: dict[str, float] = {}
    artifacts: dict[str, Artifact] = {}
    parity: dict[str, ParityResult] = {}
    calibration_summary: dict[str, Any] | None = None
    face_pool = None
    if calib is not None:  # read and detect the calibration sources once, before the long export steps
        from facemoe.calibration import FaceDetector, gather_faces

        face_pool = gather_faces(calib.paths, detector=FaceDetector())

    steps = ["fp32 ONNX"] + [f"{p} ONNX" for p in wanted[1:]] + ["parity", "manifest"]
    with (
        atomic_directory(out_dir, overwrite=overwrite) as staging,
        Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            TimeElapsedColumn(),
            console=console,
            disable=not progress,
            transient=False,
        ) as bar,
    ):
        task = bar.add_task("export", total=len(steps))

        def step(name: str) -> float:
            release_memory()
            bar.update(task, description=f"[cyan]{name}")
            return time.perf_counter()

        start = step("fp32 ONNX: trace, simplify, check, verify at batch 1/3/8")
        fp32_path = staging / "model.fp32.onnx"
        fp32_report = export_fp32(model, fp32_path, opset=opset, gating=gating)
        artifacts["fp32"] = Artifact(
            "fp32",
            fp32_path.name,
            sha256_file(fp32_path),
            opset,
            list(fp32_report["external_data"]),  # type: ignore[call-overload]
            gating=gating,
        )
        timings["fp32"] = time.perf_counter() - start
        bar.advance(task)

        if "fp16" in wanted:
            start = step("fp16 ONNX: mixed precision (LayerNorm, Softmax, router, residual in fp32)")
            half, report = fp16_pass.convert_to_fp16(onnx.load(str(fp32_path)), in_place=True)
            path = staging / "model.fp16.onnx"
            external = save_onnx(half, path)
            del half
            artifacts["fp16"] = Artifact("fp16", path.name, sha256_file(path), opset, external, gating=gating)
            timings["fp16"] = time.perf_counter() - start
            fp32_report["fp16_conversion"] = report.to_json()
            bar.advance(task)

        if "int8" in wanted:
            assert calib is not None and face_pool is not None
            start = step("int8 ONNX: calibrate on low-resolution faces, insert Q/DQ")
            from facemoe.calibration.dataset import build_calibration_set
            from facemoe.export.int8 import quantize_int8

            faces, data_summary = build_calibration_set(
                face_pool,
                count=calib.count,
                seed=calib.seed,
                degrade=calib.degrade,
                warn=lambda msg: console.print(f"[yellow]warning:[/] {escape(msg)}", highlight=False, soft_wrap=True),
            )
            cache = None
            if calib.cache_dir is not None:
                from facemoe.calibration.cache import CalibrationCache

                cache = CalibrationCache(calib.cache_dir)
            path = staging / "model.int8.onnx"
            int8_report = quantize_int8(
                fp32_path,
                path,
                faces,
                method=calib.method,
                cache=cache,
                model_hash=model_fingerprint(model),
                data_hash=data_summary.get("data_hash"),
                float_blocks=calib.float_blocks,
                quantize_attention_matmuls=calib.quantize_attention_matmuls,
            )
            artifacts["int8"] = Artifact("int8", path.name, sha256_file(path), opset, [], gating=gating)
            calibration_summary = {**data_summary, "method": calib.method, "quantization": int8_report}
            timings["int8"] = time.perf_counter() - start
            bar.advance(task)

        start = step("parity: PyTorch fp32 reference vs every artifact on held-out inputs")
        inputs, inputs_summary = _parity_inputs(staging, calib, face_pool, parity_count)
        reference = run_reference(model, inputs)
        layer_names = [name for name, _ in model.moe_layers()]
        paths = {precision: staging / artifacts[precision].file for precision in wanted}
        parity, embeddings = check_artifacts(reference, paths, inputs, layer_names, gates)
        for precision in wanted:
            artifacts[precision].parity = parity[precision].to_json()
        # Context for the figures: how far the reference moves under imperceptible input noise.
        noise = noise_floor(model, inputs, reference, layer_names)
        timings["parity"] = time.perf_counter() - start
        bar.advance(task)

        step("manifest")
        cfg = model.config
        manifest = Manifest(
            model=ModelSection(
                architecture="facemoe-swin",
                config=cfg.to_dict(),
                num_experts=cfg.num_experts,
                k=cfg.k,
                parameters=count_parameters(model),
                weights_sha256=model_fingerprint(model),
                random_weights=random_weights,
                source=ModelSource.from_json(source),
                export=ExportInfo(
                    max_batch=max_batch,
                    fp32=fp32_report,
                    parity_inputs=inputs_summary,
                    parity_noise_floor=noise.to_json(),
                    timings_s={name: round(seconds, 1) for name, seconds in timings.items()},
                ),
            ),
            preprocessing=Preprocessing(input_size=cfg.img_size),
            routing=Routing(mode="static", k=cfg.k, num_experts=cfg.num_experts, gating=gating),
            embedding_size=cfg.embedding_size,
            input_name=INPUT_NAME,
            output_name=OUTPUT_NAME,
            artifacts=artifacts,
            calibration=Calibration.from_json(calibration_summary) if calibration_summary is not None else None,
            tools=tool_versions(),
            created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        )
        bar.advance(task)

        console.print(parity_table({**parity, NOISE_FLOOR_ROW: noise}))
        console.print(NOISE_FLOOR_CAPTION, style="dim")
        failed = {name: r for name, r in parity.items() if not r.passed}
        if failed and enforce_gates:
            report_path = out_dir.with_name(out_dir.name + ".parity-failed.json")
            write_json_atomic(
                report_path, {**{name: r.to_json() for name, r in parity.items()}, "noise_floor": noise.to_json()}
            )
            raise ExportError(
                "parity gate missed: "
                + "; ".join(f"{name}: {', '.join(r.failures)}" for name, r in failed.items())
                + f" (no bundle written; full report in {report_path})"
            )
        _write_parity_plot(staging / "parity.png", reference[0], embeddings, parity)
        write_json_atomic(staging / "parity.json", {name: r.to_json() for name, r in parity.items()})
        # The manifest is written last: a bundle without it is never taken for a complete one.
        write_manifest(staging, manifest)
    return ExportResult(out_dir, manifest, parity, timings)


def _write_parity_plot(
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
