"""``facemoe-run``: face recognition on a video file, stream or webcam, with JSON Lines events.

Torch is never imported here unless ``--backend torch`` is chosen: the edge box this runs on carries ONNX
Runtime or TensorRT, numpy and OpenCV only (``--demo`` runs the bundle shipped in the package).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.live import Live
from rich.markup import escape

from facemoe.cli import run_integrations as ri
from facemoe.cli import run_sources as rs
from facemoe.cli import run_triton as rt
from facemoe.cli.common import EXIT_INTERRUPTED, EXIT_USER_ERROR, OverwriteOption, console, user_errors
from facemoe.cli.options import OneLineErrors, Precision, RuntimeBackend, VersionOption
from facemoe.cli.run_audit import (
    EXIT_ACCURACY_ALARM,
    AuditMinCosine,
    AuditQueue,
    AuditRate,
    AuditReference,
    AuditReferenceOption,
    AuditSave,
    AuditStrict,
    audit_lines,
    check_audit_options,
    start_audit,
)
from facemoe.cli.run_checks import check_finite, check_parity, plan_outputs
from facemoe.cli.run_display import live_table, report
from facemoe.cli.run_env import DEMO_WARNING, quiet_opencv, sample_video, sigterm_as_interrupt
from facemoe.demo import ensure_demo_bundle
from facemoe.errors import FaceMoEError

app = typer.Typer(add_completion=False, help=__doc__)


@app.command(cls=OneLineErrors)
@user_errors
def run(
    video: rs.VideoOption = None,
    sources: rs.SourcesOption = None,
    bundle: Annotated[Path | None, typer.Option(help="Bundle directory made by facemoe-export.")] = None,
    gallery: Annotated[Path | None, typer.Option(help="Gallery .npz made by 'facemoe enroll'.")] = None,
    out: Annotated[
        str | None,
        typer.Option(
            "--out",
            "-o",
            help="JSON Lines events file ('-' for stdout). Default: a new events-<date>-<time>.jsonl here.",
        ),
    ] = None,
    save_video: Annotated[
        Path | None,
        typer.Option(help="Write an annotated video (.mp4 / .m4v / .mov / .avi / .mkv); needs a single source."),
    ] = None,
    overwrite: bool = OverwriteOption,
    backend: Annotated[RuntimeBackend, typer.Option(help="Inference backend.")] = RuntimeBackend.auto,
    precision: Annotated[
        Precision | None, typer.Option(help="Model precision (default: the fastest the backend runs well).")
    ] = None,
    allow_failed_parity: Annotated[
        bool,
        typer.Option(
            "--allow-failed-parity", help="Run an artifact whose export parity check failed (warned in the events)."
        ),
    ] = False,
    demo: Annotated[
        bool, typer.Option("--demo", help="No bundle/video needed: tiny random-weight model and the sample video.")
    ] = False,
    detector: Annotated[
        Path | None, typer.Option(help="Your own RetinaFace-style detector ONNX (default: MobileNet-0.25).")
    ] = None,
    det_threshold: Annotated[
        float,
        typer.Option(min=0.0, max=1.0, help="Detection score to start tracks and embed faces (0 < x < 1)."),
    ] = 0.5,
    det_size: Annotated[int, typer.Option(min=32, help="Longer side frames are downscaled to for detection.")] = 640,
    threshold: Annotated[
        float, typer.Option(min=-1.0, max=1.0, help="Open-set cosine threshold; below it a face is 'unknown'.")
    ] = 0.4,
    min_eye_distance: Annotated[
        float, typer.Option(min=0.0, help="Skip faces with a smaller eye distance (px).")
    ] = 8.0,
    embed_every: Annotated[int, typer.Option(min=1, help="Embed a track at most every N frames until confident.")] = 5,
    max_embeddings: Annotated[
        int, typer.Option(min=1, help="Embeddings per track before it is only re-checked every 60 frames.")
    ] = 20,
    max_batch: Annotated[
        int, typer.Option(min=1, help="Largest number of faces per model call (batched across frames).")
    ] = 32,
    max_latency_ms: Annotated[
        float | None,
        typer.Option(min=0.0, help="Longest a face waits for its batch (default: 100 live, 1000 files)."),
    ] = None,
    flip: Annotated[bool, typer.Option("--flip", help="Also embed the mirrored face (flip test, 2x cost).")] = False,
    realtime: Annotated[
        bool, typer.Option("--realtime", help="Play a file at its frame rate, dropping frames like a camera.")
    ] = False,
    max_frames: Annotated[int | None, typer.Option(min=1, help="Stop each source after this many frames.")] = None,
    detect_every: rs.DetectEvery = 1,
    max_age: Annotated[int, typer.Option(min=0, help="Frames a track survives without a detection.")] = 30,
    reconnect_attempts: Annotated[int, typer.Option(min=-1, help="Reconnects of a lost stream (-1: forever).")] = 10,
    embeddings: Annotated[
        bool, typer.Option("--embeddings", help="Put each track's identity vector in its track_ended event.")
    ] = False,
    threads: Annotated[
        int | None, typer.Option(min=1, help="CPU threads per ONNX Runtime session (default: all cores).")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No live display.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", help="Keep OpenCV / FFmpeg diagnostics.")] = False,
    audit_rate: AuditRate = 0.02,
    audit_reference: AuditReferenceOption = AuditReference.auto,
    audit_min_cosine: AuditMinCosine = None,
    audit_save: AuditSave = None,
    audit_strict: AuditStrict = False,
    audit_queue: AuditQueue = 64,
    metrics_port: ri.MetricsPort = None,
    metrics_host: ri.MetricsHost = "127.0.0.1",
    mqtt: ri.MqttUrl = None,
    mqtt_user: ri.MqttUser = None,
    mqtt_password: ri.MqttPassword = None,
    mqtt_tls: ri.MqttTls = False,
    mqtt_ca: ri.MqttCa = None,
    triton_url: rt.TritonUrl = None,
    triton_model: rt.TritonModel = rt.DEFAULT_MODEL,
    triton_timeout: rt.TritonTimeout = 10.0,
    version: Annotated[bool, VersionOption] = False,
) -> None:
    """Detect, track and recognise faces in a video; write events (and optionally an annotated video).

    Events go to --out, else to a new events-<date>-<time>.jsonl here; --overwrite replaces existing outputs.
    """
    if not verbose:
        quiet_opencv()
    from facemoe.bundle import Bundle
    from facemoe.runtime.aggregation import RecognitionBudget
    from facemoe.runtime.annotate import VideoAnnotator
    from facemoe.runtime.audit import AuditStop
    from facemoe.runtime.backends import open_backend
    from facemoe.runtime.detection import RetinaFaceDetector
    from facemoe.runtime.events import EventWriter
    from facemoe.runtime.gallery import Gallery, model_fingerprint
    from facemoe.runtime.pipeline import FaceEncoder, Pipeline, PipelineConfig
    from facemoe.runtime.source_mux import SourceMux

    if bundle is None and not demo:
        raise FaceMoEError("pass --bundle DIR (made with facemoe-export), or --demo to try it without one")
    if not video and sources is None and not demo:
        raise FaceMoEError("pass --video FILE|URL|WEBCAM_INDEX, or --demo to use the packaged sample video")
    # Ranges are checked by typer (and shown in --help); infinity passes a range open on one side.
    if det_threshold in (0.0, 1.0):
        raise FaceMoEError(f"--det-threshold must be between 0 and 1 (exclusive), got {det_threshold:g}")
    check_finite(
        det_threshold=det_threshold,
        threshold=threshold,
        min_eye_distance=min_eye_distance,
        max_latency_ms=max_latency_ms,
    )
    with contextlib.ExitStack() as stack:
        demo_video = str(stack.enter_context(sample_video())) if demo and not video and sources is None else None
        specs = rs.collect_specs(video, sources, demo_video)
        if save_video is not None and len(specs) > 1:
            raise FaceMoEError(f"--save-video needs a single source; this run has {len(specs)}")
        check_audit_options(audit_rate, audit_min_cosine, audit_save, audit_reference.value)
        ri.check_mqtt_url(mqtt)
        out = plan_outputs(
            videos=[spec.video for spec in specs if spec.video != demo_video],
            out=out,
            save_video=save_video,
            gallery=gallery,
            detector=detector,
            bundle=bundle,
            overwrite=overwrite,
        )
        if save_video is not None:
            from facemoe.runtime.video_output import remove_stale_partials

            for stale in remove_stale_partials(save_video):
                console.print(f"removed {escape(str(stale))} (left by a run that was killed)", highlight=False)

        opened = rs.open_all(
            specs,
            realtime=realtime,
            reconnect_attempts=reconnect_attempts,
            say=lambda text: console.print(text, highlight=False),
            warn=lambda msg: console.print(f"[yellow]{escape(msg)}[/]", highlight=False),
        )
        stack.callback(opened.close)

        bundle_dir = bundle if bundle is not None else ensure_demo_bundle()
        loaded = Bundle(bundle_dir)
        wanted = precision.value if precision is not None else None
        if wanted is not None:  # refused before the model is loaded
            check_parity(loaded, wanted, allow_failed_parity)
        engine = open_backend(
            loaded,
            backend.value,
            wanted,
            max_batch=max_batch,
            threads=threads,
            **rt.triton_options(backend.value, triton_url, triton_model, triton_timeout),
        )
        stack.callback(engine.close)
        parity_warning = check_parity(loaded, engine.precision, allow_failed_parity)  # also what auto chose
        warnings = [parity_warning] if parity_warning is not None else []
        # The detector reports weaker faces too: they only extend existing tracks (see runtime.tracking).
        # One detector per detection size (a source may set its own): frames of one size are batched.
        detectors: dict[int, RetinaFaceDetector] = {}

        def detector_for(size: int) -> RetinaFaceDetector:
            if size not in detectors:
                detectors[size] = RetinaFaceDetector(
                    detector, score_threshold=min(0.3, det_threshold), max_side=size, threads=threads
                )
            return detectors[size]

        face_detector = detector_for(det_size)
        known = None
        if gallery is not None:
            known = Gallery.load(gallery)
            known.check_compatible(model_fingerprint(loaded), engine.embedding_size, str(gallery))
        # Made before any output file: a reference that cannot be made leaves nothing half-written.
        auditor, audit_header = start_audit(
            loaded,
            engine,
            rate=audit_rate,
            reference=audit_reference.value,
            min_cosine=audit_min_cosine,
            save=audit_save,
            strict=audit_strict,
            queue_size=audit_queue,
            gallery=known,
            match_threshold=threshold,
            flip=flip,
            say=lambda text: console.print(text, highlight=False),
        )

        annotator = None
        if save_video is not None:
            only = next(iter(opened.opened.values()))
            annotator = VideoAnnotator(save_video, only.fps, (only.width, only.height))
            stack.callback(annotator.close)
        attach = stack.enter_context(
            ri.integrations(
                backend=engine.describe(),
                precision=engine.precision,
                metrics_port=metrics_port,
                metrics_host=metrics_host,
                mqtt=mqtt,
                mqtt_user=mqtt_user,
                mqtt_password=mqtt_password,
                mqtt_tls=mqtt_tls,
                mqtt_ca=mqtt_ca,
                say=lambda text: console.print(text, highlight=False),
            )
        )
        events = EventWriter(out, overwrite=overwrite)
        stack.callback(events.close)

        latency = max_latency_ms if max_latency_ms is not None else (100.0 if opened.live else 1000.0)
        config = PipelineConfig(
            detect_threshold=det_threshold,
            match_threshold=threshold,
            min_eye_distance=min_eye_distance,
            # An engine may have been built for a smaller batch than asked for.
            max_batch=min(max_batch, engine.max_batch),
            max_latency_s=latency / 1000.0,
            budget=RecognitionBudget(every=embed_every, max_embeddings=max_embeddings),
            include_embeddings=embeddings,
            max_age=max_age,
            detect_every=detect_every,
        )
        pipeline = Pipeline(
            face_detector,
            FaceEncoder(engine, loaded.manifest.preprocessing, flip=flip),
            events,
            gallery=known,
            annotator=annotator,
            config=config,
        )
        entries: list[dict[str, Any]] = []
        for sid, source in opened.opened.items():
            spec = opened.specs[sid]
            size = spec.det_size or det_size
            header_entry = rs.source_entry(sid, source, spec, size)
            entries.append(header_entry)
            pipeline.add_stream(
                sid,
                detector=detector_for(size),
                roi=spec.roi,
                source_stats=source.stats,
                header={k: v for k, v in header_entry.items() if k != "id"},
            )
        entries += opened.failed
        pipeline.audit = auditor.bind(events) if auditor is not None else None
        attach(pipeline)
        backend_text = engine.describe()
        if loaded.manifest.model.get("random_weights") or demo:
            console.print(DEMO_WARNING, highlight=False)
        for sid, source in opened.opened.items():
            label = f"source {sid}" if len(specs) > 1 else "source"
            console.print(f"{label}: {escape(source.describe())}", highlight=False)
        console.print(escape(engine.selection or f"backend: {backend_text}"), highlight=False)  # choice and why
        console.print(
            escape(f"bundle: {bundle_dir}  detector: {face_detector.name}")
            + (f"  gallery: {len(known)} identities" if known is not None else "  gallery: none"),
            highlight=False,
        )
        header = {
            "sources": entries,
            "bundle": str(bundle_dir),
            "backend": backend_text,
            "precision": engine.precision,
            "detector": face_detector.name,
            "gallery": str(gallery) if gallery is not None else None,
            "gallery_size": len(known) if known is not None else 0,
            "threshold": threshold,
            "detect_every": detect_every,
            "max_batch": config.max_batch,
            "random_weights": bool(loaded.manifest.model.get("random_weights")),
            "warnings": warnings,
            **audit_header,
        }
        for warning in warnings:
            console.print(f"[bold yellow]warning:[/] {escape(warning)}", highlight=False)
        if out != "-":
            console.print(f"events: {escape(out)}", highlight=False)

        show_live = console.is_terminal and not quiet
        live = Live(console=console, refresh_per_second=4, transient=True) if show_live else None
        last_draw = 0.0

        def on_frame(stats: Any) -> None:
            nonlocal last_draw
            now = time.monotonic()
            if live is not None and now - last_draw >= 0.25:
                last_draw = now
                table = live_table(stats, backend_text, pipeline)
                if auditor is not None:
                    table.add_row("audit", auditor.status())
                live.update(table)

        mux = SourceMux(opened.opened)
        source_error: str | None = None
        with sigterm_as_interrupt(), live if live is not None else contextlib.nullcontext():
            try:
                mux.start()
                stats = pipeline.run_rounds(
                    mux.rounds(),
                    header=header,
                    on_frame=on_frame,
                    max_frames=max_frames,
                    stop=mux.stop,
                    failed=opened.failed,
                )
            except FaceMoEError as exc:
                source_error, stats = str(exc), pipeline.stats
            except AuditStop as exc:
                stats = pipeline.stats
                console.print(f"[bold red]stopped:[/] {escape(str(exc))}", highlight=False)
            finally:
                mux.close()
        if pipeline.video_path is not None and annotator is not None:
            console.print(f"annotated video: {escape(str(pipeline.video_path))} ({annotator.frames} frames)")
        report(pipeline, stats, events, backend_text, min_eye_distance)
        for line in audit_lines(auditor.summary() if auditor is not None else None):
            console.print(line, highlight=False)
        if auditor is not None and auditor.saved:
            console.print(f"audit: {len(auditor.saved)} crops saved in {escape(str(audit_save))}", highlight=False)
        if out != "-":
            console.print(f"events: {escape(out)}", highlight=False)
        if auditor is not None and auditor.stopped:
            raise typer.Exit(EXIT_ACCURACY_ALARM)
        errors = [str(f["error"]) for f in opened.failed]
        errors += [s.error for s in pipeline.streams if s.ended == "source_error" and s.error]
        if source_error is not None and source_error not in errors:
            errors.append(source_error)
        if errors:
            for error in errors:
                console.print(f"[bold red]error:[/] {escape(error)}", highlight=False, soft_wrap=True)
            raise typer.Exit(EXIT_USER_ERROR)
        if stats.interrupted:
            console.print("[yellow]interrupted: events and video finalised[/]")
            raise typer.Exit(EXIT_INTERRUPTED)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
