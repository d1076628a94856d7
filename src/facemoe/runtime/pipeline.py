"""The video recognition pipeline: detect -> track -> align -> batch -> embed -> aggregate -> match -> events.

Faces are embedded in batches that span faces and frames: a face waits in the queue until the batch is full
(``max_batch``) or its wait reaches ``max_latency_s``, whichever comes first, so a GPU sees large batches
on busy scenes while a live view never lags by more than the latency bound. Each stage's wall time is
accumulated so the summary shows where a frame's time goes (CPU pre-processing is a common bottleneck).
Frames for the annotated video wait in a bounded ``FrameBuffer`` until their faces' results are back, so the
video shows a name from the frame the events give it. Still images (and a one-frame video) are not tracked:
each face gets one result (runtime.stills).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from facemoe.errors import InputError, OutputError
from facemoe.runtime.aggregation import RecognitionBudget
from facemoe.runtime.annotate import VideoAnnotator, track_marks
from facemoe.runtime.audit import Auditor, AuditStop
from facemoe.runtime.detection import Detection, RetinaFaceDetector, to_bgr
from facemoe.runtime.events import SCHEMA_VERSION, EventWriter, face_fields
from facemoe.runtime.face_encoder import FaceEncoder
from facemoe.runtime.frame_buffer import FrameBuffer
from facemoe.runtime.gallery import UNKNOWN, Gallery
from facemoe.runtime.stills import emit_still, recognise_still
from facemoe.runtime.tracking import Track, Tracker
from facemoe.runtime.video_source import Frame, SourceStats

STAGES = ("decode", "detect", "align", "embed", "track", "write")
MIN_FRAME_SIDE = 16


class StageTimer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = dict.fromkeys(STAGES, 0.0)
        self.observer: Callable[[str, float], None] | None = None  # each step's time (runtime.metrics)

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.seconds[stage] += elapsed
            if self.observer is not None:
                self.observer(stage, elapsed)


@dataclass
class PipelineConfig:
    detect_threshold: float = 0.5
    match_threshold: float = 0.4
    # Leaving a recognised identity needs the similarity to fall this far below the threshold.
    hysteresis: float = 0.05
    min_eye_distance: float = 8.0
    max_batch: int = 32
    max_latency_s: float = 0.1
    budget: RecognitionBudget = field(default_factory=RecognitionBudget)
    include_embeddings: bool = False
    # Frames held for the annotated video while their faces wait for embeddings (runtime.frame_buffer).
    annotate_buffer_bytes: int = 256 * 2**20


@dataclass
class RunStats:
    frames: int = 0
    skipped_frames: Counter[str] = field(default_factory=Counter)
    faces: int = 0
    faces_too_small: int = 0
    faces_embedded: int = 0
    batches: int = 0
    tracks: int = 0
    wall_seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    source: SourceStats = field(default_factory=SourceStats)
    interrupted: bool = False

    @property
    def fps(self) -> float:
        return self.frames / self.wall_seconds if self.wall_seconds > 0 else 0.0

    @property
    def faces_per_second(self) -> float:
        return self.faces / self.wall_seconds if self.wall_seconds > 0 else 0.0


@dataclass
class _Pending:
    track: Track
    tensor: np.ndarray
    where: dict[str, Any]
    queued_at: float
    aligned: np.ndarray | None = None  # kept for the accuracy audit's saved crops


class Pipeline:
    def __init__(
        self,
        detector: RetinaFaceDetector,
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
        self.tracker = tracker or Tracker(detect_threshold=self.config.detect_threshold)
        self.timer = StageTimer()
        self.stats = RunStats(stage_seconds=self.timer.seconds)
        self._pending: list[_Pending] = []
        self._frames = FrameBuffer(annotator, self.config.annotate_buffer_bytes) if annotator is not None else None
        # The first tracked frame and its detections, kept until a second frame comes: a one-frame video
        # is reported like a photo.
        self._first: tuple[np.ndarray, Frame, list[Detection]] | None = None
        self.video_path: Path | None = None  # the annotated video, once run() has finalised it
        self.audit: Auditor | None = None  # re-checks a sample of embedded faces (runtime.audit)
        self.on_batch: Callable[[int], None] | None = None  # each batch's size (runtime.metrics)

    @property
    def queued(self) -> int:
        """Faces waiting for their embedding batch."""
        return len(self._pending)

    # -- per frame -----------------------------------------------------------------------------------
    def process(self, frame: Frame) -> None:
        with self.timer("decode"):
            try:
                image = to_bgr(frame.image)
            except InputError:
                self.stats.skipped_frames["unreadable"] += 1
                return
            if min(image.shape[:2]) < MIN_FRAME_SIDE:
                self.stats.skipped_frames["too_small"] += 1
                return
        self.stats.frames += 1
        with self.timer("detect"):
            detections = self.detector.detect(image)
        self.stats.faces += sum(d.score >= self.config.detect_threshold for d in detections)
        if frame.still:
            self._still(image, frame, detections)
            return
        self._first = (image, frame, detections) if self.stats.frames == 1 else None
        with self.timer("track"):
            update = self.tracker.update(detections, frame.index, frame.timestamp)
        if update.ended:
            self.flush()
            for track in update.ended:
                self._end_track(track, "lost")
        for track in update.started:
            self.stats.tracks += 1
            with self.timer("write"):
                self.events.emit(
                    "track_started",
                    track_id=track.track_id,
                    first_frame=track.first_frame,
                    **face_fields(frame.index, frame.timestamp, track.box, track.landmarks, track.score),
                )
        for track, det in update.matched:
            self._maybe_queue(image, frame, track, det)
        if self._pending and (
            len(self._pending) >= self.config.max_batch
            or time.perf_counter() - self._pending[0].queued_at >= self.config.max_latency_s
        ):
            self.flush()
        if self._frames is not None:
            with self.timer("write"):
                self._frames.hold(frame.index, image, track_marks(self.tracker.active, frame.index))
            if self._frames.full:
                self.flush()  # embed now rather than hold more frames: memory stays bounded
            if self._first is None:  # the first frame waits: it may turn out to be the only one
                self._release()

    def _release(self) -> None:
        """Write the held frames that no queued face can relabel any more."""
        if self._frames is not None:
            with self.timer("write"):
                self._frames.release(self._pending[0].where["frame"] if self._pending else None)

    def _still(self, image: np.ndarray, frame: Frame, detections: list[Detection]) -> None:
        cfg = self.config
        faces = recognise_still(
            image,
            detections,
            self.encoder,
            self.gallery,
            detect_threshold=cfg.detect_threshold,
            min_eye_distance=cfg.min_eye_distance,
            match_threshold=cfg.match_threshold,
            timer=self.timer,
        )
        embedded = sum(f.embedded for f in faces)
        self.stats.faces_too_small += len(faces) - embedded
        self.stats.faces_embedded += embedded
        self.stats.batches += embedded > 0
        with self.timer("write"):
            size = (image.shape[1], image.shape[0])
            emit_still(self.events, faces, image=frame.path, frame=frame.index, timestamp=frame.timestamp, size=size)
            if self._frames is not None:
                marks = [face.mark(number) for number, face in enumerate(faces)]
                if frame.still:
                    self._frames.hold(frame.index, image, marks)
                else:
                    self._frames.replace_marks(frame.index, marks)
        self._release()

    def _maybe_queue(self, image: np.ndarray, frame: Frame, track: Track, det: Detection) -> None:
        if det.score < self.config.detect_threshold:
            return
        if det.eye_distance < self.config.min_eye_distance:
            self.stats.faces_too_small += 1
            return
        budget = self.config.budget
        if not budget.is_due(frame.index, track.last_embedded, track.aggregate.count + track.pending, track.streak):
            return
        with self.timer("align"):
            aligned = self.encoder.align(image, det.landmarks)
            tensor = self.encoder.prepare(aligned)
        track.pending += 1
        track.last_embedded = frame.index
        where = face_fields(frame.index, frame.timestamp, det.box, det.landmarks, det.score)
        self._pending.append(_Pending(track, tensor, where, time.perf_counter(), aligned))

    # -- batches -------------------------------------------------------------------------------------
    def flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        with self.timer("embed"):
            raw = self.encoder.embed([p.tensor for p in pending])
        self.stats.batches += 1
        self.stats.faces_embedded += len(pending)
        if self.on_batch is not None:
            self.on_batch(len(pending))
        for item, embedding in zip(pending, raw, strict=True):
            track = item.track
            track.pending -= 1
            with self.timer("track"):
                track.aggregate.add(embedding)
                decision = self._decide(track)
            if decision is not None:
                with self.timer("write"):
                    self.events.emit(decision.pop("event"), track_id=track.track_id, **decision, **item.where)
            if self._frames is not None and track.identity is not None:
                track.labels.append((item.where["frame"], track.identity, track.similarity))
        if self.audit is not None:  # samples, enqueues and returns: the check runs in the background
            self.audit.offer([(p.where["frame"], p.track.track_id, p.tensor, p.aligned) for p in pending], raw)

    def _decide(self, track: Track) -> dict[str, Any] | None:
        """Match the track's aggregate against the gallery; the event to emit if its identity is new."""
        if self.gallery is None:
            return None
        vector = track.aggregate.vector
        if vector is None:
            return None
        cfg = self.config
        match = self.gallery.match(vector, cfg.match_threshold)
        identity, similarity = match.identity, match.similarity
        previous = track.identity
        if previous not in (None, UNKNOWN) and identity != previous:
            # Hysteresis: stay with the recognised person while the similarity to them is barely lower.
            held = float(self.gallery.embeddings[self.gallery.names.index(previous)] @ vector)
            if held >= cfg.match_threshold - cfg.hysteresis and (identity == UNKNOWN or held >= similarity - 1e-6):
                identity, similarity = previous, held
        track.streak = track.streak + 1 if identity == previous and identity != UNKNOWN else int(identity != UNKNOWN)
        track.similarity = similarity
        fields: dict[str, Any] = {
            "identity": identity,
            "similarity": similarity,
            "best": match.best,
            "second": match.second,
            "second_similarity": match.second_similarity,
            "embeddings": track.aggregate.count,
        }
        if previous is None:
            track.identity = identity
            return {"event": "identity_assigned", **fields}
        if identity != previous:
            track.identity = identity
            return {"event": "identity_changed", "previous": previous, **fields}
        return None

    def _end_track(self, track: Track, reason: str) -> None:
        extra: dict[str, Any] = {}
        if self.config.include_embeddings and track.aggregate.vector is not None:
            extra["embedding"] = [round(float(v), 6) for v in track.aggregate.vector]
        with self.timer("write"):
            self.events.emit(
                "track_ended",
                track_id=track.track_id,
                reason=reason,
                first_frame=track.first_frame,
                last_frame=track.last_frame,
                duration=track.last_time - track.first_time,
                detections=track.hits,
                identity=track.identity or UNKNOWN,
                similarity=track.similarity if track.identity is not None else None,
                embeddings=track.aggregate.count,
                mean_norm=track.aggregate.mean_norm,
                **face_fields(track.last_frame, track.last_time, track.box, track.landmarks, track.score),
                **extra,
            )

    def finish(self, reason: str = "end_of_stream") -> None:
        """Embed what is queued, report a one-frame video like a photo, write held frames, end every track."""
        self.flush()
        if self._first is not None and self.stats.frames == 1 and self.stats.tracks == 0:
            self._still(*self._first)
        self._first = None
        if self.audit is not None:  # its final accuracy_check comes before run_ended
            self.audit.finish()
        self._release()
        for track in self.tracker.finish():
            self._end_track(track, reason)

    # -- a whole stream ------------------------------------------------------------------------------
    def run(
        self,
        frames: Iterable[Frame],
        *,
        source_stats: SourceStats | None = None,
        header: dict[str, Any] | None = None,
        on_frame: Callable[[RunStats], None] | None = None,
        max_frames: int | None = None,
    ) -> RunStats:
        """Process ``frames`` to the end (or ``max_frames``); Ctrl-C stops cleanly with every track ended."""
        self.events.emit("run_started", schema=SCHEMA_VERSION, **(header or {}))
        start = time.perf_counter()
        reason = "end_of_stream"
        error: str | None = None
        failure: Exception | None = None  # re-raised once the events are ended
        try:
            for count, frame in enumerate(frames, start=1):
                self.process(frame)
                self.stats.wall_seconds = time.perf_counter() - start
                if on_frame is not None:
                    on_frame(self.stats)
                if max_frames is not None and count >= max_frames:
                    break
        except KeyboardInterrupt:
            reason = "interrupted"
            self.stats.interrupted = True
        except InputError as exc:  # a live source that could not be reconnected
            reason, error = "source_error", str(exc)
        except AuditStop as exc:  # --audit-strict: an accuracy alarm ends the run
            reason, error, failure = exc.reason, str(exc), exc
        except OutputError as exc:  # events or video could not be written (a full disk)
            reason, error, failure = "output_error", str(exc), exc
        except Exception as exc:  # whatever else stops the run, the events still end with run_ended
            reason, error, failure = "error", f"{type(exc).__name__}: {exc}", exc
        finally:
            try:
                self.finish(reason)
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
            if source_stats is not None:
                self.stats.source = source_stats
                self.timer.seconds["decode"] += source_stats.decode_seconds
            self.stats.wall_seconds = time.perf_counter() - start
            self.events.emit(
                "run_ended",
                reason=reason,
                error=error,
                frames=self.stats.frames,
                skipped_frames=dict(self.stats.skipped_frames),
                dropped_frames=self.stats.source.dropped,
                corrupt_frames=self.stats.source.corrupt,
                reconnects=self.stats.source.reconnects,
                faces=self.stats.faces,
                faces_too_small=self.stats.faces_too_small,
                faces_embedded=self.stats.faces_embedded,
                tracks=self.stats.tracks,
                seconds=self.stats.wall_seconds,
                stage_seconds=dict(self.timer.seconds),
            )
        if isinstance(failure, OutputError):
            raise OutputError(error) from failure  # with the video's fate when both failed
        if failure is not None:
            raise failure
        if error is not None:
            raise InputError(error)
        return self.stats


__all__ = ["STAGES", "FaceEncoder", "Pipeline", "PipelineConfig", "RunStats", "StageTimer"]
