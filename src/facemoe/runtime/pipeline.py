"""The video recognition pipeline: detect -> track -> align -> batch -> embed -> aggregate -> match -> events.

A run has one or more sources (``Stream``s, runtime.stream). The pipeline takes *rounds* of frames, at most
one per source (runtime.source_mux), runs the detector over the round (one batched call per detector input
size where the detector offers ``detect_batch``), lets each stream track and align its faces, and embeds the
faces of all sources together: a face waits in the shared queue (runtime.embed_batcher) until the batch is
full (``max_batch``) or its wait reaches ``max_latency_s``, so a GPU sees large batches on busy scenes while a
live view never lags by more than the latency bound. Each stage's wall time is accumulated so the summary
shows where a frame's time goes. Frames for the annotated video wait in a bounded ``FrameBuffer`` until their
faces' results are back, so the video shows a name from the frame the events give it.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from facemoe.errors import InputError, OutputError
from facemoe.runtime.annotate import VideoAnnotator
from facemoe.runtime.audit import Auditor, AuditStop
from facemoe.runtime.embed_batcher import EmbedBatcher, PendingFace
from facemoe.runtime.events import SCHEMA_VERSION, EventWriter
from facemoe.runtime.face_encoder import FaceEncoder
from facemoe.runtime.frame_buffer import FrameBuffer
from facemoe.runtime.gallery import Gallery
from facemoe.runtime.source_mux import End
from facemoe.runtime.stream import STAGES, PipelineConfig, RunStats, Stream
from facemoe.runtime.tracking import Tracker
from facemoe.runtime.video_source import Frame, SourceStats

Round = list[tuple[str, Frame | End]]


class StageTimer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = dict.fromkeys(STAGES, 0.0)
        # Each step's time and its source (None: shared by all sources), for runtime.metrics.
        self.observer: Callable[[str, float, str | None], None] | None = None

    @contextmanager
    def __call__(self, stage: str, source: str | None = None) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.record(stage, time.perf_counter() - start, source)

    def record(self, stage: str, seconds: float, source: str | None = None) -> None:
        self.seconds[stage] += seconds
        if self.observer is not None:
            self.observer(stage, seconds, source)


class Pipeline:
    def __init__(
        self,
        detector: Any,
        encoder: FaceEncoder,
        events: EventWriter,
        *,
        gallery: Gallery | None = None,
        annotator: VideoAnnotator | None = None,
        tracker: Tracker | None = None,
        config: PipelineConfig | None = None,
    ) -> None:
        self.detector = detector
        self.encoder = encoder
        self.events = events
        self.gallery = gallery
        self.annotator = annotator
        self.config = config or PipelineConfig()
        self.timer = StageTimer()
        self.batcher = EmbedBatcher(self.config.max_batch, self.config.max_latency_s)
        self.streams: list[Stream] = []
        self._tracker = tracker  # the first stream's, when given
        self.video_path = None  # the annotated video, once run() has finalised it
        self.audit: Auditor | None = None  # re-checks a sample of embedded faces (runtime.audit)
        self.on_batch: Callable[[int], None] | None = None  # each batch's size (runtime.metrics)
        self.wall_seconds = 0.0
        self.interrupted = False

    def add_stream(
        self,
        source_id: str,
        *,
        detector: Any = None,
        roi: tuple[int, int, int, int] | None = None,
        source_stats: SourceStats | None = None,
        header: dict[str, Any] | None = None,
    ) -> Stream:
        cfg = self.config
        tracker = self._tracker if not self.streams and self._tracker is not None else None
        frames = None
        if self.annotator is not None and not self.streams:  # an annotated video shows one source
            frames = FrameBuffer(self.annotator, cfg.annotate_buffer_bytes)
        stream = Stream(
            source_id,
            self,
            detector=detector or self.detector,
            tracker=tracker or Tracker(detect_threshold=cfg.detect_threshold, max_age=cfg.max_age),
            roi=roi,
            source_stats=source_stats,
            header=header,
            frames=frames,
        )
        self.streams.append(stream)
        return stream

    # -- totals --------------------------------------------------------------------------------------
    @property
    def queued(self) -> int:
        """Faces waiting for their embedding batch."""
        return len(self.batcher)

    @property
    def tracker(self) -> Tracker:
        return self.streams[0].tracker if self.streams else (self._tracker or Tracker())

    @property
    def stats(self) -> RunStats:
        """The run's totals over every source."""
        total = RunStats(stage_seconds=self.timer.seconds, wall_seconds=self.wall_seconds)
        total.interrupted = self.interrupted
        total.skipped_frames = Counter()
        for stream in self.streams:
            s = stream.stats
            total.frames += s.frames
            total.skipped_frames.update(s.skipped_frames)
            total.faces += s.faces
            total.faces_too_small += s.faces_too_small
            total.faces_embedded += s.faces_embedded
            total.batches += s.batches  # still images' batches
            total.tracks += s.tracks
            for name in ("decoded", "dropped", "corrupt", "reconnects", "decode_seconds"):
                setattr(total.source, name, getattr(total.source, name) + getattr(s.source, name))
            total.source.ended_early |= s.source.ended_early
        total.batches += self.batcher.batches
        total.mean_batch = total.faces_embedded / total.batches if total.batches else 0.0
        return total

    # -- batches -------------------------------------------------------------------------------------
    def flush_all(self) -> None:
        """Embed every queued face now (in batches of at most ``max_batch``)."""
        while len(self.batcher):
            self._embed(self.batcher.take(float("inf")))

    def _flush_due(self) -> None:
        now = time.perf_counter()
        while self.batcher.due(now):
            self._embed(self.batcher.take(now))

    def _embed(self, batch: list[PendingFace]) -> None:
        if not batch:
            return
        with self.timer("embed"):
            raw = self.encoder.embed([p.tensor for p in batch])
        if self.on_batch is not None:
            self.on_batch(len(batch))
        by_id = {stream.id: stream for stream in self.streams}
        for item, embedding in zip(batch, raw, strict=True):
            by_id[item.source].on_embedded(item, embedding)
        if self.audit is not None:  # samples, enqueues and returns: the check runs in the background
            self.audit.offer([(p.where["frame"], p.track.track_id, p.tensor, p.aligned) for p in batch], raw)

    # -- a round of frames ---------------------------------------------------------------------------
    def process_round(self, items: list[tuple[Stream, Frame]]) -> None:
        """At most one frame per source: detection over the round, then each stream's tracking."""
        ready = [(s, f, image) for s, f in items if (image := s.prepare(f)) is not None]
        detect = [(s, f, image) for s, f, image in ready if s.wants_detection(f)]
        by_detector: dict[int, list[tuple[Stream, Frame, np.ndarray]]] = {}
        for entry in detect:
            by_detector.setdefault(id(entry[0].detector), []).append(entry)
        found: dict[int, list[Any]] = {}
        for group in by_detector.values():
            detector = group[0][0].detector
            inputs = [s.detect_input(image) for s, _, image in group]
            start = time.perf_counter()
            if len(inputs) > 1 and hasattr(detector, "detect_batch"):
                results = detector.detect_batch(inputs)
            else:
                results = [detector.detect(image) for image in inputs]
            share = (time.perf_counter() - start) / len(inputs)  # a batched call's time split over its frames
            for (stream, _, _), dets in zip(group, results, strict=True):
                self.timer.record("detect", share, stream.id)
                found[id(stream)] = dets
        for stream, frame, image in ready:
            if id(stream) in found:
                stream.on_detections(image, frame, found[id(stream)])
            else:
                stream.on_coast(image, frame)
        self._flush_due()
        for stream in {id(s): s for s, _, _ in ready}.values():
            if stream.frames is not None and stream.frames.full:
                self.flush_all()  # embed now rather than hold more frames: memory stays bounded
            stream.release()

    def process(self, frame: Frame) -> None:
        """One frame of the first source (a single-source run)."""
        if not self.streams:
            self.add_stream("source")
        self.streams[0].seen += 1
        self.process_round([(self.streams[0], frame)])

    # -- a whole run ---------------------------------------------------------------------------------
    def run(
        self,
        frames: Iterable[Frame],
        *,
        source_stats: SourceStats | None = None,
        header: dict[str, Any] | None = None,
        on_frame: Callable[[RunStats], None] | None = None,
        max_frames: int | None = None,
        source_id: str = "source",
    ) -> RunStats:
        """Process one source's ``frames`` to the end (or ``max_frames``); see ``run_rounds``."""
        stream = self.streams[0] if self.streams else self.add_stream(source_id, source_stats=source_stats)
        if source_stats is not None:
            stream.stats.source = source_stats

        def rounds() -> Iterator[Round]:
            for frame in frames:
                yield [(stream.id, frame)]
            yield [(stream.id, End("end_of_stream"))]

        return self.run_rounds(rounds(), header=header, on_frame=on_frame, max_frames=max_frames)

    def run_rounds(
        self,
        rounds: Iterable[Round],
        *,
        header: dict[str, Any] | None = None,
        on_frame: Callable[[RunStats], None] | None = None,
        max_frames: int | None = None,
        stop: Callable[[str], None] | None = None,
        failed: list[dict[str, Any]] | None = None,
    ) -> RunStats:
        """Process every source to its end (or ``max_frames`` each); Ctrl-C stops cleanly with every track
        ended. ``failed``: sources that could not be opened (id, video, error), reported as ``open_failed``.
        ``stop(id)`` is called when a source reaches ``max_frames``."""
        by_id = {stream.id: stream for stream in self.streams}
        self.events.emit("run_started", source=None, schema=SCHEMA_VERSION, **(header or {}))
        for stream in self.streams:
            stream.emit("source_started", **stream.header)
        for entry in failed or []:
            self.events.emit("source_ended", source=entry["id"], reason="open_failed", error=entry["error"])
        start = time.perf_counter()
        reason = "end_of_stream"
        error: str | None = None
        failure: Exception | None = None  # re-raised once the events are ended
        try:
            for batch in rounds:
                items: list[tuple[Stream, Frame]] = []
                for sid, item in batch:
                    stream = by_id[sid]
                    if isinstance(item, End):
                        stream.finish(item.reason, item.error)
                        continue
                    stream.seen += 1
                    items.append((stream, item))
                if items:
                    self.process_round(items)
                else:
                    self._flush_due()  # nothing new: the latency bound still holds
                self.wall_seconds = time.perf_counter() - start
                for stream, _ in items:
                    if max_frames is not None and stream.seen >= max_frames and stream.ended is None:
                        if stop is not None:
                            stop(stream.id)
                        stream.finish("max_frames")
                if on_frame is not None:
                    on_frame(self.stats)
                if all(stream.ended is not None for stream in self.streams):
                    break
        except KeyboardInterrupt:
            reason = "interrupted"
            self.interrupted = True
        except InputError as exc:  # a live source (of a single-source run) that could not be reconnected
            reason, error = "source_error", str(exc)
        except AuditStop as exc:  # --audit-strict: an accuracy alarm ends the run
            reason, error, failure = exc.reason, str(exc), exc
        except OutputError as exc:  # events or video could not be written (a full disk)
            reason, error, failure = "output_error", str(exc), exc
        except Exception as exc:  # whatever else stops the run, the events still end with run_ended
            reason, error, failure = "error", f"{type(exc).__name__}: {exc}", exc
        finally:
            reason, error, failure = self._finish(reason, error, failure)
            self.wall_seconds = time.perf_counter() - start
            self._run_ended(reason, error)
        if isinstance(failure, OutputError):
            raise OutputError(error) from failure  # with the video's fate when both failed
        if failure is not None:
            raise failure
        if error is not None:
            raise InputError(error)
        return self.stats

    def _finish(self, reason: str, error: str | None, failure: Exception | None) -> tuple[str, Any, Any]:
        steps: list[Callable[[], Any]] = [
            (lambda s=stream: s.finish(reason, error if reason == "source_error" else None)) for stream in self.streams
        ]
        if self.audit is not None:  # its final accuracy_check comes before run_ended
            steps.append(self.audit.finish)
        for step in steps:  # every source is ended even when one of them fails to
            try:
                step()
            except Exception as exc:
                if failure is None:
                    reason, failure = ("output_error" if isinstance(exc, OutputError) else "error"), exc
                    error = str(exc) if isinstance(exc, OutputError) else f"{type(exc).__name__}: {exc}"
        # The video is finalised (and checked) before run_ended, so that line says whether it was written.
        try:
            self.video_path = self.annotator.close() if self.annotator is not None else None
        except OutputError as exc:
            error = f"{error}; {exc}" if error else str(exc)
            if failure is None:
                reason, failure = "output_error", exc
        lost = [s.error for s in self.streams if s.ended == "source_error" and s.error]
        if reason == "end_of_stream" and lost:  # a source lost for good; the others ran to their end
            reason, error = "source_error", "; ".join(lost)
        for stream in self.streams:
            self.timer.seconds["decode"] += stream.stats.source.decode_seconds
        return reason, error, failure

    def _run_ended(self, reason: str, error: str | None) -> None:
        stats = self.stats
        self.events.emit(
            "run_ended",
            source=None,
            reason=reason,
            error=error,
            frames=stats.frames,
            skipped_frames=dict(stats.skipped_frames),
            dropped_frames=stats.source.dropped,
            corrupt_frames=stats.source.corrupt,
            reconnects=stats.source.reconnects,
            faces=stats.faces,
            faces_too_small=stats.faces_too_small,
            faces_embedded=stats.faces_embedded,
            tracks=stats.tracks,
            batches=stats.batches,
            mean_batch=stats.mean_batch,
            seconds=stats.wall_seconds,
            stage_seconds=dict(self.timer.seconds),
            sources=[{"id": s.id, "reason": s.ended, "error": s.error, **s.totals()} for s in self.streams],
        )


__all__ = ["STAGES", "FaceEncoder", "Pipeline", "PipelineConfig", "RunStats", "StageTimer"]
