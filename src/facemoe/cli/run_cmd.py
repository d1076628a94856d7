"""``facemoe-run``: face recognition on a video file, stream or webcam, with JSON Lines events.

Torch is never imported here unless ``--demo`` has to build its demo bundle or ``--backend torch`` is
chosen: the edge box this runs on carries ONNX Runtime or TensorRT, numpy and OpenCV only.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from facemoe.cli.common import EXIT_INTERRUPTED, EXIT_USER_ERROR, console, user_errors
from facemoe.errors import FaceMoEError

app = typer.Typer(add_completion=False, help=__doc__)

SAMPLE_VIDEO = "carphone_pristine.mp4"
DEMO_WARNING = (
    "[bold yellow]DEMO:[/] this bundle has RANDOM weights, so identities and similarities are meaningless "
    "(tracking and throughput are real). For real recognition get the official weights and export them:\n"
    "  facemoe download --dest weights\n"
    "  facemoe-export --checkpoint weights/model.pt --fp16 --out bundle\n"
    "  facemoe enroll --images people/ --bundle bundle --out gallery.npz\n"
    "  facemoe-run --video VIDEO --bundle bundle --gallery gallery.npz"
)


def cache_dir() -> Path:
    """User cache directory for FaceMoE (``$FACEMOE_CACHE``, else the XDG cache, else ~/.cache)."""
    if os.environ.get("FACEMOE_CACHE"):
        return Path(os.environ["FACEMOE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "facemoe"


def ensure_demo_bundle(root: Path | None = None) -> Path:
    """The cached demo bundle (tiny preset, random weights), exported on first use; needs PyTorch once."""
    from facemoe.bundle import Bundle

    target = (root or cache_dir()) / "demo-bundle"
    try:
        Bundle(target).artifact_path("fp32")
        return target
    except FaceMoEError:
        pass
    try:
        import torch  # noqa: F401

        from facemoe.export.bundle_writer import export_bundle
        from facemoe.model import build_model
        from facemoe.model.random_weights import randomize
    except ImportError as exc:
        raise FaceMoEError(
            f"--demo builds its bundle with PyTorch, which is not available here ({exc}); install the export "
            "extra (pip install 'facemoe-edge[export]') or pass --bundle DIR"
        ) from None
    console.print(f"building the demo bundle (tiny preset, random weights) in {escape(str(target))} ...")
    seed = 0
    export_bundle(
        randomize(build_model("tiny"), seed=seed),
        target,
        precisions=("fp32",),
        overwrite=True,
        random_weights=True,
        source={"random_weights": True, "preset": "tiny", "seed": seed},
        progress=console.is_terminal,
        console=console,
    )
    return target


@contextlib.contextmanager
def sample_video() -> Iterator[Path]:
    ref = resources.files("facemoe") / "data" / SAMPLE_VIDEO
    if not ref.is_file():
        raise FaceMoEError(f"the packaged sample video {SAMPLE_VIDEO} is missing from this installation")
    with resources.as_file(ref) as path:
        yield path


def _quiet_opencv() -> None:
    # FFmpeg and OpenCV print a line per damaged packet or failed probe; the run reports those as counts.
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    try:
        import cv2

        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    except (ImportError, AttributeError):
        pass


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (systemd stop, docker stop) ends the run as cleanly as Ctrl-C."""

    def handler(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. under a test runner thread)
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _live_table(stats: Any, backend: str, tracks: list[Any]) -> Table:
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    dropped = stats.source.dropped
    table.add_row("frames", f"{stats.frames}" + (f"  (dropped {dropped})" if dropped else ""))
    table.add_row("fps", f"{stats.fps:.1f}")
    table.add_row("faces/s", f"{stats.faces_per_second:.1f}  (embedded {stats.faces_embedded})")
    names = escape(", ".join(f"#{t.track_id} {t.identity or '…'}" for t in tracks[:8]))
    table.add_row("tracks", f"{len(tracks)} active, {stats.tracks} total" + (f"  [{names}]" if names else ""))
    table.add_row("backend", escape(backend))
    return table


def _summary(stats: Any) -> Table:
    table = Table(title="facemoe-run summary", title_justify="left")
    table.add_column("stage")
    table.add_column("total s", justify="right")
    table.add_column("ms / frame", justify="right")
    table.add_column("share", justify="right")
    total = sum(stats.stage_seconds.values()) or 1.0
    frames = max(1, stats.frames)
    for stage, seconds in stats.stage_seconds.items():
        table.add_row(stage, f"{seconds:.3f}", f"{1000 * seconds / frames:.2f}", f"{100 * seconds / total:.0f}%")
    table.add_row("wall", f"{stats.wall_seconds:.3f}", f"{1000 * stats.wall_seconds / frames:.2f}", "")
    return table


def _totals(stats: Any, events: Any, backend: str) -> str:
    mean_batch = stats.faces_embedded / stats.batches if stats.batches else 0.0
    return (
        f"{stats.frames} frames at {stats.fps:.1f} fps; {stats.faces} faces ({stats.faces_per_second:.1f}/s); "
        f"{stats.faces_embedded} embedded in {stats.batches} batches (mean {mean_batch:.1f}); "
        f"{stats.tracks} tracks; {sum(events.counts.values())} events; backend {backend}"
    )


@app.command()
@user_errors
def run(
    video: Annotated[
        str | None,
        typer.Option("--video", "-v", help="Video file, rtsp:// or http(s):// URL, or webcam index (0, 1, ...)."),
    ] = None,
    bundle: Annotated[Path | None, typer.Option(help="Bundle directory made by facemoe-export.")] = None,
    gallery: Annotated[Path | None, typer.Option(help="Gallery .npz made by 'facemoe enroll'.")] = None,
    out: Annotated[str | None, typer.Option("--out", "-o", help="JSON Lines events file ('-' for stdout).")] = None,
    save_video: Annotated[Path | None, typer.Option(help="Write an annotated video (.mp4 / .avi / .mkv).")] = None,
    backend: Annotated[str, typer.Option(help="auto, tensorrt, onnxruntime or torch.")] = "auto",
    precision: Annotated[
        str | None, typer.Option(help="fp32, fp16 or int8 (default: the fastest the backend runs well).")
    ] = None,
    demo: Annotated[
        bool, typer.Option("--demo", help="No bundle/video needed: tiny random-weight model and the sample video.")
    ] = False,
    detector: Annotated[
        Path | None, typer.Option(help="Your own RetinaFace-style detector ONNX (default: MobileNet-0.25).")
    ] = None,
    det_threshold: Annotated[float, typer.Option(help="Detection score to start tracks and embed faces.")] = 0.5,
    det_size: Annotated[int, typer.Option(help="Longer side frames are downscaled to for detection.")] = 640,
    threshold: Annotated[float, typer.Option(help="Open-set cosine threshold; below it a face is 'unknown'.")] = 0.4,
    min_eye_distance: Annotated[float, typer.Option(help="Skip faces with a smaller eye distance (px).")] = 8.0,
    embed_every: Annotated[int, typer.Option(help="Embed a track at most every N frames until confident.")] = 5,
    max_embeddings: Annotated[
        int, typer.Option(help="Embeddings per track before it is only re-checked every 60 frames.")
    ] = 20,
    max_batch: Annotated[int, typer.Option(help="Largest embedding batch (faces across frames).")] = 32,
    max_latency_ms: Annotated[
        float | None, typer.Option(help="Longest a face waits for its batch (default: 100 live, 1000 files).")
    ] = None,
    flip: Annotated[bool, typer.Option("--flip", help="Also embed the mirrored face (flip test, 2x cost).")] = False,
    realtime: Annotated[
        bool, typer.Option("--realtime", help="Play a file at its frame rate, dropping frames like a camera.")
    ] = False,
    max_frames: Annotated[int | None, typer.Option(help="Stop after this many frames.")] = None,
    max_age: Annotated[int, typer.Option(help="Frames a track survives without a detection.")] = 30,
    reconnect_attempts: Annotated[int, typer.Option(help="Reconnects of a lost stream (-1: forever).")] = 10,
    embeddings: Annotated[
        bool, typer.Option("--embeddings", help="Put each track's identity vector in its track_ended event.")
    ] = False,
    threads: Annotated[int | None, typer.Option(help="CPU threads per ONNX Runtime session.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No live display.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", help="Keep OpenCV / FFmpeg diagnostics.")] = False,
) -> None:
    """Detect, track and recognise faces in a video; write events (and optionally an annotated video)."""
    if not verbose:
        _quiet_opencv()
    from facemoe.bundle import Bundle
    from facemoe.runtime.aggregation import RecognitionBudget
    from facemoe.runtime.annotate import VideoAnnotator
    from facemoe.runtime.backends import open_backend
    from facemoe.runtime.detection import RetinaFaceDetector
    from facemoe.runtime.events import EventWriter
    from facemoe.runtime.gallery import Gallery, model_fingerprint
    from facemoe.runtime.pipeline import FaceEncoder, Pipeline, PipelineConfig
    from facemoe.runtime.tracking import Tracker
    from facemoe.runtime.video_source import VideoSource

    if bundle is None and not demo:
        raise FaceMoEError("pass --bundle DIR (made with facemoe-export), or --demo to try it without one")
    if video is None and not demo:
        raise FaceMoEError("pass --video FILE|URL|WEBCAM_INDEX, or --demo to use the packaged sample video")
    for name, value in (("--max-batch", max_batch), ("--embed-every", embed_every), ("--det-size", det_size)):
        if value < 1:
            raise FaceMoEError(f"{name} must be at least 1, got {value}")
    if not 0.0 < det_threshold < 1.0:
        raise FaceMoEError(f"--det-threshold must be between 0 and 1, got {det_threshold}")

    with contextlib.ExitStack() as stack:
        if video is None:
            video = str(stack.enter_context(sample_video()))
        source = VideoSource(
            video,
            realtime=realtime,
            reconnect_attempts=reconnect_attempts,
            on_status=lambda msg: console.print(f"[yellow]{escape(msg)}[/]", highlight=False),
        )
        source.open()
        stack.callback(source.close)

        bundle_dir = bundle if bundle is not None else ensure_demo_bundle()
        loaded = Bundle(bundle_dir)
        engine = open_backend(loaded, backend, precision, max_batch=max_batch, threads=threads)
        stack.callback(engine.close)
        # The detector reports weaker faces too: they only extend existing tracks (see runtime.tracking).
        face_detector = RetinaFaceDetector(
            detector, score_threshold=min(0.3, det_threshold), max_side=det_size, threads=threads
        )
        known = None
        if gallery is not None:
            known = Gallery.load(gallery)
            known.check_compatible(model_fingerprint(loaded), engine.embedding_size, str(gallery))

        annotator = None
        if save_video is not None:
            annotator = VideoAnnotator(save_video, source.fps, (source.width, source.height))
            stack.callback(annotator.close)
        events = EventWriter(out)
        stack.callback(events.close)

        latency = max_latency_ms if max_latency_ms is not None else (100.0 if source.live else 1000.0)
        config = PipelineConfig(
            detect_threshold=det_threshold,
            match_threshold=threshold,
            min_eye_distance=min_eye_distance,
            # An engine may have been built for a smaller batch than asked for.
            max_batch=min(max_batch, engine.max_batch),
            max_latency_s=latency / 1000.0,
            budget=RecognitionBudget(every=embed_every, max_embeddings=max_embeddings),
            include_embeddings=embeddings,
        )
        tracker = Tracker(detect_threshold=det_threshold, max_age=max_age)
        pipeline = Pipeline(
            face_detector,
            FaceEncoder(engine, loaded.manifest.preprocessing, flip=flip),
            events,
            gallery=known,
            annotator=annotator,
            tracker=tracker,
            config=config,
        )
        backend_text = engine.describe()
        if loaded.manifest.model.get("random_weights") or demo:
            console.print(DEMO_WARNING, highlight=False)
        console.print(f"source: {escape(source.describe())}", highlight=False)
        console.print(escape(engine.selection or f"backend: {backend_text}"), highlight=False)  # choice and why
        console.print(
            escape(f"bundle: {bundle_dir}  detector: {face_detector.name}")
            + (f"  gallery: {len(known)} identities" if known is not None else "  gallery: none"),
            highlight=False,
        )
        header = {
            "source": str(video),
            "kind": source.kind,
            "fps": source.fps,
            "width": source.width,
            "height": source.height,
            "frame_count": source.frame_count,
            "bundle": str(bundle_dir),
            "backend": backend_text,
            "precision": engine.precision,
            "detector": face_detector.name,
            "gallery": str(gallery) if gallery is not None else None,
            "gallery_size": len(known) if known is not None else 0,
            "threshold": threshold,
            "random_weights": bool(loaded.manifest.model.get("random_weights")),
        }

        show_live = console.is_terminal and not quiet
        live = Live(console=console, refresh_per_second=4, transient=True) if show_live else None
        last_draw = 0.0

        def on_frame(stats: Any) -> None:
            nonlocal last_draw
            now = time.monotonic()
            if live is not None and now - last_draw >= 0.25:
                last_draw = now
                live.update(_live_table(stats, backend_text, tracker.active))

        source_error: str | None = None
        with _sigterm_as_interrupt(), live if live is not None else contextlib.nullcontext():
            try:
                stats = pipeline.run(
                    source, source_stats=source.stats, header=header, on_frame=on_frame, max_frames=max_frames
                )
            except FaceMoEError as exc:
                source_error, stats = str(exc), pipeline.stats
        if annotator is not None:
            written = annotator.close()
            if written is not None:
                console.print(f"annotated video: {escape(str(written))} ({annotator.frames} frames)")
        console.print(_summary(stats))
        if source.live:
            console.print("(decode runs in a background thread on live sources, beside the other stages)")
        console.print(escape(_totals(stats, events, backend_text)), highlight=False)
        if stats.frames == 0:
            console.print("[yellow]warning:[/] no frame could be processed", highlight=False)
        elif stats.faces == 0:
            console.print(f"[yellow]warning:[/] no faces detected in {stats.frames} frames", highlight=False)
        for reason, count in stats.skipped_frames.items():
            console.print(f"[yellow]skipped {count} frames:[/] {reason.replace('_', ' ')}", highlight=False)
        if stats.faces_too_small:
            console.print(
                f"skipped {stats.faces_too_small} faces below {min_eye_distance:g} px eye distance", highlight=False
            )
        if source.stats.corrupt:
            console.print(f"[yellow]skipped {source.stats.corrupt} undecodable frames[/]", highlight=False)
        if source.stats.ended_early:
            console.print(
                f"[yellow]warning:[/] the file ended after {source.stats.decoded} of {source.frame_count} frames "
                "(truncated or damaged)",
                highlight=False,
            )
        if out is not None and out != "-":
            console.print(f"events: {escape(out)}", highlight=False)
        if source_error is not None:
            console.print(f"[bold red]error:[/] {escape(source_error)}", highlight=False, soft_wrap=True)
            raise typer.Exit(EXIT_USER_ERROR)
        if stats.interrupted:
            console.print("[yellow]interrupted: events and video finalised[/]")
            raise typer.Exit(EXIT_INTERRUPTED)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
