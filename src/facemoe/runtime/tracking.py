"""Multi-face tracking: IoU association with constant-velocity prediction, ByteTrack-style two stages.

Confident detections are matched first to every live track; weaker ones (between the tracking and the
detection threshold) only extend existing tracks, which carries a track through motion blur or partial
occlusion without ever starting a track on a doubtful detection. A track gets its public id only when
confirmed (``min_hits`` detections), so ids stay dense and false positives never appear in the events.

On frames where the detector does not run (a detection interval), :meth:`Tracker.coast` moves every box
by its constant-velocity prediction; velocities are per frame index, so they stay right however many
frames pass between two detections. Faces are embedded only on detected frames: alignment needs the
landmarks the detector just found, not ones carried along with a predicted box.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from facemoe.runtime.aggregation import EmbeddingAggregate
from facemoe.runtime.detection import Detection, box_iou


@dataclass
class Track:
    # Where the face is at ``box_frame``: detected there, or predicted on a coasted frame (landmarks moved
    # with the box). Once the track ends, both are its last detection again.
    box: np.ndarray
    landmarks: np.ndarray
    score: float
    first_frame: int
    last_frame: int  # the last frame with a detection
    first_time: float = 0.0
    last_time: float = 0.0
    velocity: np.ndarray = field(default_factory=lambda: np.zeros(4, dtype=np.float64))  # per frame
    hits: int = 1
    box_frame: int = -1  # -1: ``last_frame``
    detected_box: np.ndarray = field(default_factory=lambda: np.zeros(0))  # at last_frame; empty: ``box``
    detected_landmarks: np.ndarray = field(default_factory=lambda: np.zeros(0))
    track_id: int | None = None  # assigned on confirmation
    # Recognition state, filled by the pipeline.
    aggregate: EmbeddingAggregate = field(default_factory=EmbeddingAggregate)
    last_embedded: int | None = None
    pending: int = 0
    identity: str | None = None
    similarity: float = 0.0
    streak: int = 0
    # (frame, identity, similarity) of each decision, kept only while an annotated video needs them: a frame
    # is drawn with the decision made from the latest face at or before it (see runtime.frame_buffer).
    labels: list[tuple[int, str, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.box_frame < 0:
            self.box_frame = self.last_frame
        if self.detected_box.size == 0:
            self.detected_box = np.asarray(self.box, dtype=np.float64).copy()
        if self.detected_landmarks.size == 0:
            self.detected_landmarks = np.asarray(self.landmarks).copy()

    @property
    def confirmed(self) -> bool:
        return self.track_id is not None

    @property
    def coasting(self) -> bool:
        """True while ``box`` is a prediction (the detector has not seen the face on ``box_frame``)."""
        return self.box_frame != self.last_frame

    def label_at(self, frame_index: int) -> tuple[str, float] | None:
        """The identity and similarity decided from this track's faces up to ``frame_index``."""
        found = None
        for decided_at, identity, similarity in self.labels:
            if decided_at > frame_index:
                break
            found = (identity, similarity)
        return found

    def forget_labels_before(self, frame_index: int) -> None:
        """Drop decisions superseded by one at or before ``frame_index`` (frames before it are drawn)."""
        keep = 0
        for i, (decided_at, _, _) in enumerate(self.labels):
            if decided_at <= frame_index:
                keep = i
        del self.labels[:keep]

    def predict(self, frame_index: int) -> np.ndarray:
        """The box at ``frame_index`` extrapolated from the last detection at constant velocity."""
        return self.detected_box + self.velocity * (frame_index - self.last_frame)

    def move_to(self, frame_index: int) -> None:
        """Put ``box`` (and the landmarks, mapped box to box) at its prediction for ``frame_index``."""
        box = self.predict(frame_index)
        old = self.detected_box
        scale = (box[2:] - box[:2]) / np.maximum(old[2:] - old[:2], 1e-6)
        centre_old, centre_new = (old[:2] + old[2:]) / 2, (box[:2] + box[2:]) / 2
        points = np.asarray(self.detected_landmarks, dtype=np.float64)
        self.landmarks = (centre_new + (points - centre_old) * scale).astype(np.float32)
        self.box = box
        self.box_frame = frame_index

    def settle(self) -> None:
        """Back to the last detection (an ending track reports where the face was last seen)."""
        self.box = self.detected_box.copy()
        self.landmarks = np.array(self.detected_landmarks, copy=True)
        self.box_frame = self.last_frame


@dataclass
class TrackUpdate:
    started: list[Track]
    ended: list[Track]
    matched: list[tuple[Track, Detection]]


def _greedy_match(similarity: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    """Pairs (row, col) taken in decreasing similarity, each row and column at most once."""
    pairs: list[tuple[int, int]] = []
    if similarity.size == 0:
        return pairs
    rows, cols = np.nonzero(similarity >= threshold)
    order = np.argsort(-similarity[rows, cols], kind="stable")
    used_r: set[int] = set()
    used_c: set[int] = set()
    for k in order:
        r, c = int(rows[k]), int(cols[k])
        if r in used_r or c in used_c:
            continue
        used_r.add(r)
        used_c.add(c)
        pairs.append((r, c))
    return pairs


class Tracker:
    def __init__(
        self,
        detect_threshold: float = 0.5,
        iou_threshold: float = 0.3,
        low_iou_threshold: float = 0.5,
        min_hits: int = 2,
        max_age: int = 30,
        velocity_smoothing: float = 0.5,
    ) -> None:
        self.detect_threshold = detect_threshold
        self.iou_threshold = iou_threshold
        self.low_iou_threshold = low_iou_threshold
        self.min_hits = min_hits
        self.max_age = max_age
        self.alpha = velocity_smoothing
        self.tracks: list[Track] = []
        self._next_id = 1

    @property
    def active(self) -> list[Track]:
        return [t for t in self.tracks if t.confirmed]

    def _apply(self, track: Track, det: Detection, frame_index: int, timestamp: float) -> None:
        # Motion since the last detection, per frame: coasted frames in between do not shorten the gap.
        gap = max(1, frame_index - track.last_frame)
        box = det.box.astype(np.float64)
        observed = (box - track.detected_box) / gap
        # The first observed motion replaces the zero prior outright; later ones are smoothed.
        track.velocity = observed if track.hits == 1 else self.alpha * observed + (1 - self.alpha) * track.velocity
        track.box = box
        track.detected_box = box.copy()
        track.landmarks = det.landmarks
        track.detected_landmarks = det.landmarks
        track.box_frame = frame_index
        track.score = det.score
        track.last_frame = frame_index
        track.last_time = timestamp
        track.hits += 1

    def update(self, detections: list[Detection], frame_index: int, timestamp: float = 0.0) -> TrackUpdate:
        high = [d for d in detections if d.score >= self.detect_threshold]
        low = [d for d in detections if d.score < self.detect_threshold]
        matched: list[tuple[Track, Detection]] = []
        started: list[Track] = []

        # Confirmed tracks first, so a fresh tentative track cannot steal an established face.
        tracks = sorted(self.tracks, key=lambda t: (not t.confirmed, t.first_frame))
        predicted = np.array([t.predict(frame_index) for t in tracks]).reshape(-1, 4)
        high_boxes = np.array([d.box for d in high]).reshape(-1, 4)
        pairs = _greedy_match(box_iou(predicted, high_boxes), self.iou_threshold)
        used_tracks = {r for r, _ in pairs}
        used_high = {c for _, c in pairs}
        for r, c in pairs:
            matched.append((tracks[r], high[c]))

        remaining = [i for i in range(len(tracks)) if i not in used_tracks and tracks[i].confirmed]
        if remaining and low:
            low_boxes = np.array([d.box for d in low]).reshape(-1, 4)
            low_pairs = _greedy_match(box_iou(predicted[remaining], low_boxes), self.low_iou_threshold)
            for r, c in low_pairs:
                used_tracks.add(remaining[r])
                matched.append((tracks[remaining[r]], low[c]))

        for track, det in matched:
            self._apply(track, det, frame_index, timestamp)
            if not track.confirmed and track.hits >= self.min_hits:
                track.track_id = self._next_id
                self._next_id += 1
                started.append(track)

        ended: list[Track] = []
        survivors: list[Track] = []
        for i, track in enumerate(tracks):
            if i in used_tracks:
                survivors.append(track)
            elif not track.confirmed:
                continue  # a tentative track that missed a frame was most likely a false positive
            elif frame_index - track.last_frame > self.max_age:
                track.settle()
                ended.append(track)
            else:
                survivors.append(track)

        for c, det in enumerate(high):
            if c in used_high:
                continue
            track = Track(
                box=det.box.astype(np.float64),
                landmarks=det.landmarks,
                score=det.score,
                first_frame=frame_index,
                last_frame=frame_index,
                first_time=timestamp,
                last_time=timestamp,
            )
            if self.min_hits <= 1:
                track.track_id = self._next_id
                self._next_id += 1
                started.append(track)
                matched.append((track, det))
            survivors.append(track)
        self.tracks = survivors
        return TrackUpdate(started=started, ended=ended, matched=[(t, d) for t, d in matched if t.confirmed])

    def coast(self, frame_index: int, timestamp: float = 0.0) -> TrackUpdate:
        """A frame the detector did not run on: boxes move by prediction, nothing starts or matches.

        Tracks end after ``max_age`` frames without a detection, counted in frames as in :meth:`update`.
        A tentative track is kept (the detector had no chance to confirm or miss it). ``timestamp`` is the
        frame's time; no track records it, since times mark detections.
        """
        del timestamp  # same signature as update(); a coasted frame changes no track's times
        ended: list[Track] = []
        survivors: list[Track] = []
        for track in self.tracks:
            if frame_index - track.last_frame > self.max_age:
                if track.confirmed:
                    track.settle()
                    ended.append(track)
                continue
            track.move_to(frame_index)
            survivors.append(track)
        self.tracks = survivors
        return TrackUpdate(started=[], ended=ended, matched=[])

    def finish(self) -> list[Track]:
        """End every confirmed track (end of stream); returns them."""
        ended = [t for t in self.tracks if t.confirmed]
        for track in ended:
            track.settle()
        self.tracks = []
        return ended


__all__ = ["Track", "TrackUpdate", "Tracker"]
