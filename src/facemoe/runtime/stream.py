"""One source's state inside a run: its tracker, counts, region of interest and per-frame recognition steps.

The pipeline (runtime.pipeline) owns what the sources share (the face encoder, the embedding queue, the events
writer and the gallery) and hands each stream its frames. A stream's tracks are numbered from 1 within the
stream, and every event it writes carries its ``source`` id (docs/EVENTS.md#several-sources). Still images (and
a one-frame video) are not tracked: each face gets one result (runtime.stills).
"""

from __future__ import annotations

import time
from collections import Counter
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from facemoe.errors import InputError
from facemoe.runtime.aggregation import RecognitionBudget
from facemoe.runtime.annotate import track_marks
from facemoe.runtime.detection import Detection, to_bgr
from facemoe.runtime.embed_batcher import EmbedBatcher, PendingFace
from facemoe.runtime.events import EventWriter, face_fields
from facemoe.runtime.face_encoder import FaceEncoder
from facemoe.runtime.frame_buffer import FrameBuffer
from facemoe.runtime.gallery import UNKNOWN, Gallery
from facemoe.runtime.stills import emit_still, recognise_still
from facemoe.runtime.tracking import Track, Tracker, TrackUpdate
from facemoe.runtime.video_source import Frame, SourceStats

STAGES = ("decode", "detect", "align", "embed", "track", "write")
MIN_FRAME_SIDE = 16


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
    max_age: int = 30  # frames a track survives without a detection
    # The detector runs on every N-th frame of a source; the tracker coasts in between. Faces are embedded
    # only on detected frames: alignment needs the landmarks of that frame (docs/EVENTS.md#several-sources).
    detect_every: int = 1


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
    mean_batch: float = 0.0

    @property
    def fps(self) -> float:
        return self.frames / self.wall_seconds if self.wall_seconds > 0 else 0.0

    @property
    def faces_per_second(self) -> float:
        return self.faces / self.wall_seconds if self.wall_seconds > 0 else 0.0


class Shared(Protocol):
    """What a stream uses of its pipeline."""

    encoder: FaceEncoder
    events: EventWriter
    gallery: Gallery | None
    config: PipelineConfig
    batcher: EmbedBatcher

    def timer(self, stage: str, source: str | None = None) -> AbstractContextManager[None]: ...
    def flush_all(self) -> None: ...


def decide(track: Track, gallery: Gallery | None, cfg: PipelineConfig) -> dict[str, Any] | None:
    """Match the track's aggregate against the gallery; the event to emit if its identity is new."""
    if gallery is None:
        return None
    vector = track.aggregate.vector
    if vector is None:
        return None
    match = gallery.match(vector, cfg.match_threshold)
    identity, similarity = match.identity, match.similarity
    previous = track.identity
    if previous not in (None, UNKNOWN) and identity != previous:
        # Hysteresis: stay with the recognised person while the similarity to them is barely lower.
        held = float(gallery.embeddings[gallery.names.index(previous)] @ vector)
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


class Stream:
    """One source of a run (``source_id``), fed frame by frame by the pipeline."""

    def __init__(
        self,
        source_id: str,
        shared: Shared,
        *,
        detector: Any,
        tracker: Tracker,
        roi: tuple[int, int, int, int] | None = None,
        source_stats: SourceStats | None = None,
        header: dict[str, Any] | None = None,
        frames: FrameBuffer | None = None,
    ) -> None:
        self.id = source_id
        self.shared = shared
        self.detector = detector
        self.tracker = tracker
        self.roi = roi
        self.header = header or {}
        self.stats = RunStats()
        self.stats.source = source_stats if source_stats is not None else SourceStats()
        self.frames = frames  # the annotated video's held frames (one source only)
        self.seen = 0  # items taken from the source, skipped frames included (--max-frames counts these)
        self.ended: str | None = None  # the source_ended reason, once ended
        self.error: str | None = None
        # The first tracked frame and its detections, kept until a second frame comes: a one-frame video
        # is reported like a photo.
        self._first: tuple[np.ndarray, Frame, list[Detection]] | None = None

    def emit(self, event: str, **fields: Any) -> None:
        with self.shared.timer("write", self.id):
            self.shared.events.emit(event, source=self.id, **fields)

    def _time(self, stage: str) -> AbstractContextManager[None]:
        return self.shared.timer(stage, self.id)

    # -- per frame -----------------------------------------------------------------------------------
    def prepare(self, frame: Frame) -> np.ndarray | None:
        """The frame as BGR uint8, or None (counted) when it cannot be processed."""
        with self._time("decode"):
            try:
                image = to_bgr(frame.image)
            except InputError:
                self.stats.skipped_frames["unreadable"] += 1
                return None
            if min(image.shape[:2]) < MIN_FRAME_SIDE:
                self.stats.skipped_frames["too_small"] += 1
                return None
        self.stats.frames += 1
        return image

    def wants_detection(self, frame: Frame) -> bool:
        """Detect on every ``detect_every``-th processed frame (the first one always), stills always."""
        every = self.shared.config.detect_every
        return frame.still or every <= 1 or (self.stats.frames - 1) % every == 0

    def detect_input(self, image: np.ndarray) -> np.ndarray:
        if self.roi is None:
            return image
        x, y, w, h = self.roi  # checked against the frame size when the source opened (cli.run_sources)
        return image[y : y + h, x : x + w]

    def on_detections(self, image: np.ndarray, frame: Frame, detections: list[Detection]) -> None:
        if self.roi is not None and (self.roi[0] or self.roi[1]):
            dx, dy = float(self.roi[0]), float(self.roi[1])
            for det in detections:  # back to full-frame pixels: alignment samples the full frame
                det.box = det.box + np.array([dx, dy, dx, dy], dtype=det.box.dtype)
                det.landmarks = det.landmarks + np.array([dx, dy], dtype=det.landmarks.dtype)
        cfg = self.shared.config
        self.stats.faces += sum(d.score >= cfg.detect_threshold for d in detections)
        if frame.still:
            self._still(image, frame, detections)
            return
        self._first = (image, frame, detections) if self.stats.frames == 1 else None
        with self._time("track"):
            update = self.tracker.update(detections, frame.index, frame.timestamp)
        self._apply(update, image, frame)
        for track, det in update.matched:
            self._maybe_queue(image, frame, track, det)
        self._hold(image, frame)

    def on_coast(self, image: np.ndarray, frame: Frame) -> None:
        """A frame the detector skips: the tracker predicts the boxes; nothing is embedded."""
        self._first = None
        with self._time("track"):
            update = self.tracker.coast(frame.index, frame.timestamp)
        self._apply(update, image, frame)
        self._hold(image, frame)

    def _apply(self, update: TrackUpdate, image: np.ndarray, frame: Frame) -> None:
        if any(track.pending for track in update.ended):
            # A track's identity events come before its track_ended; only then is the shared queue flushed
            # early, so one camera's ended tracks do not shrink every camera's batches.
            self.shared.flush_all()
            for track in update.ended:
                self.end_track(track, "lost")
        for track in update.started:
            self.stats.tracks += 1
            self.emit(
                "track_started",
                track_id=track.track_id,
                first_frame=track.first_frame,
                **face_fields(frame.index, frame.timestamp, track.box, track.landmarks, track.score),
            )

    def _hold(self, image: np.ndarray, frame: Frame) -> None:
        if self.frames is not None:
            with self._time("write"):
                self.frames.hold(frame.index, image, track_marks(self.tracker.active, frame.index))

    def release(self) -> None:
        """Write the held frames that no queued face can relabel any more."""
        if self.frames is not None and self._first is None:  # the first frame may turn out to be the only one
            with self._time("write"):
                self.frames.release(self.shared.batcher.oldest_frame(self.id))

    def _still(self, image: np.ndarray, frame: Frame, detections: list[Detection]) -> None:
        cfg = self.shared.config
        faces = recognise_still(
            image,
            detections,
            self.shared.encoder,
            self.shared.gallery,
            detect_threshold=cfg.detect_threshold,
            min_eye_distance=cfg.min_eye_distance,
            match_threshold=cfg.match_threshold,
            timer=self._time,
        )
        embedded = sum(f.embedded for f in faces)
        self.stats.faces_too_small += len(faces) - embedded
        self.stats.faces_embedded += embedded
        self.stats.batches += embedded > 0
        with self._time("write"):
            size = (image.shape[1], image.shape[0])
            where = {"image": frame.path, "frame": frame.index, "timestamp": frame.timestamp, "size": size}
            emit_still(self.shared.events, faces, source=self.id, **where)
            if self.frames is not None:
                marks = [face.mark(number) for number, face in enumerate(faces)]
                if frame.still:
                    self.frames.hold(frame.index, image, marks)
                else:
                    self.frames.replace_marks(frame.index, marks)
        self.release()

    def _maybe_queue(self, image: np.ndarray, frame: Frame, track: Track, det: Detection) -> None:
        cfg = self.shared.config
        if det.score < cfg.detect_threshold:
            return
        if det.eye_distance < cfg.min_eye_distance:
            self.stats.faces_too_small += 1
            return
        if not cfg.budget.is_due(frame.index, track.last_embedded, track.aggregate.count + track.pending, track.streak):
            return
        encoder = self.shared.encoder
        with self._time("align"):
            aligned = encoder.align(image, det.landmarks)
            tensor = encoder.prepare(aligned)
        track.pending += 1
        track.last_embedded = frame.index
        where = face_fields(frame.index, frame.timestamp, det.box, det.landmarks, det.score)
        self.shared.batcher.add(PendingFace(self.id, track, tensor, where, time.perf_counter(), aligned))

    # -- results -------------------------------------------------------------------------------------
    def on_embedded(self, item: PendingFace, embedding: np.ndarray) -> None:
        track = item.track
        track.pending -= 1
        self.stats.faces_embedded += 1
        with self._time("track"):
            track.aggregate.add(embedding)
            decision = decide(track, self.shared.gallery, self.shared.config)
        if decision is not None:
            self.emit(decision.pop("event"), track_id=track.track_id, **decision, **item.where)
        if self.frames is not None and track.identity is not None:
            track.labels.append((item.where["frame"], track.identity, track.similarity))

    def end_track(self, track: Track, reason: str) -> None:
        extra: dict[str, Any] = {}
        if self.shared.config.include_embeddings and track.aggregate.vector is not None:
            extra["embedding"] = [round(float(v), 6) for v in track.aggregate.vector]
        self.emit(
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

    def finish(self, reason: str, error: str | None = None) -> None:
        """Embed what is queued, report a one-frame video like a photo, write held frames, end every track,
        then ``source_ended``. Tracks of a source stopped by ``--max-frames`` end with ``end_of_stream``."""
        if self.ended is not None:
            return
        self.ended, self.error = reason, error
        self.shared.flush_all()
        if self._first is not None and self.stats.frames == 1 and self.stats.tracks == 0:
            self._still(*self._first)
        self._first = None
        if self.frames is not None:
            with self._time("write"):
                self.frames.release()
        track_reason = "end_of_stream" if reason == "max_frames" else reason
        for track in self.tracker.finish():
            self.end_track(track, track_reason)
        self.emit("source_ended", reason=reason, error=error, **self.totals())

    def totals(self) -> dict[str, Any]:
        stats, source = self.stats, self.stats.source
        return {
            "frames": stats.frames,
            "skipped_frames": dict(stats.skipped_frames),
            "dropped_frames": source.dropped,
            "corrupt_frames": source.corrupt,
            "reconnects": source.reconnects,
            "faces": stats.faces,
            "faces_too_small": stats.faces_too_small,
            "faces_embedded": stats.faces_embedded,
            "tracks": stats.tracks,
        }


__all__ = ["STAGES", "PipelineConfig", "RunStats", "Stream", "decide"]
