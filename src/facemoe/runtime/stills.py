"""Recognition of the faces in one still image: every face embedded and matched on its own, no tracking.

A track needs ``min_hits`` frames before it is reported, so a photo (or a one-frame video) would report
nothing through tracking. Here each detected face at or above the detection threshold gives one result:
faces with enough eye distance are embedded together in one batch and matched against the gallery; smaller
ones are reported as not embedded. Faces are numbered left to right (then top to bottom), as a caption
would name the people in a group photo. Events: ``image`` and ``face`` in docs/EVENTS.md.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from facemoe.runtime.annotate import FaceMark
from facemoe.runtime.detection import Detection
from facemoe.runtime.events import EventWriter, face_fields
from facemoe.runtime.gallery import UNKNOWN, Gallery


class Encoder(Protocol):
    def align(self, frame_bgr: np.ndarray, landmarks: np.ndarray) -> np.ndarray: ...
    def prepare(self, aligned_bgr: np.ndarray) -> np.ndarray: ...
    def embed(self, tensors: list[np.ndarray] | np.ndarray) -> np.ndarray: ...


@dataclass
class StillFace:
    detection: Detection
    embedded: bool = False
    identity: str = UNKNOWN
    similarity: float | None = None
    match: dict[str, Any] | None = None  # best / second / second_similarity with a gallery

    def mark(self, number: int) -> FaceMark:
        det = self.detection
        identity = self.identity if self.embedded and self.similarity is not None else None
        return FaceMark(det.box, det.landmarks, number + 1, str(number), identity, self.similarity)


def recognise_still(
    image: np.ndarray,
    detections: list[Detection],
    encoder: Encoder,
    gallery: Gallery | None,
    *,
    detect_threshold: float,
    min_eye_distance: float,
    match_threshold: float,
    timer: Callable[[str], AbstractContextManager[None]],
) -> list[StillFace]:
    """One result per face at or above ``detect_threshold``, in reading order (left to right)."""
    faces = [StillFace(d) for d in detections if d.score >= detect_threshold]
    faces.sort(key=lambda f: (float(f.detection.box[0]), float(f.detection.box[1])))
    usable = [f for f in faces if f.detection.eye_distance >= min_eye_distance]
    if not usable:
        return faces
    with timer("align"):
        tensors = [encoder.prepare(encoder.align(image, f.detection.landmarks)) for f in usable]
    with timer("embed"):
        raw = encoder.embed(tensors)
    with timer("track"):
        for face, embedding in zip(usable, raw, strict=True):
            face.embedded = True
            norm = float(np.linalg.norm(embedding))
            if gallery is None or not np.isfinite(norm) or norm <= 1e-12:
                continue
            match = gallery.match((embedding / norm).astype(np.float32), match_threshold)
            face.identity, face.similarity = match.identity, match.similarity
            face.match = {"best": match.best, "second": match.second, "second_similarity": match.second_similarity}
    return faces


def emit_still(
    events: EventWriter,
    faces: list[StillFace],
    *,
    image: str | None,
    frame: int,
    timestamp: float,
    size: tuple[int, int],
    source: str | None = None,
) -> None:
    """An ``image`` event, then a ``face`` event per face (of the source ``source``)."""
    width, height = size
    embedded = sum(f.embedded for f in faces)
    events.emit(
        "image",
        source=source,
        image=image,
        frame=frame,
        width=width,
        height=height,
        faces=len(faces),
        embedded=embedded,
    )
    for number, face in enumerate(faces):
        det = face.detection
        events.emit(
            "face",
            source=source,
            image=image,
            face=number,
            identity=face.identity,
            similarity=face.similarity,
            embedded=face.embedded,
            **(face.match or {}),
            **face_fields(frame, timestamp, det.box, det.landmarks, det.score),
        )


__all__ = ["StillFace", "emit_still", "recognise_still"]
