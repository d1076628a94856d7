"""Frames held for the annotated video until the recognition results for their faces are known.

Faces are embedded in batches that wait up to the latency bound (runtime.pipeline), so when a frame has been
tracked its faces' identities may not be decided yet. Drawing it then would show a name later than the events
report it (on a short file, never). The pipeline therefore holds each frame here, with a snapshot of its
faces (``FaceMark``), and releases it once no face at or before it waits for an embedding: a track's label
in frame *k* is the decision made from its latest embedded face at or before *k*, which is what the
``identity_*`` events say (their ``frame`` field).

Memory is bounded by ``max_bytes`` of held frame pixels (default 256 MiB, ``PipelineConfig``): when the
buffer reaches it, the pipeline embeds the queued faces at once (a smaller batch) and releases every frame,
so at most ``max_bytes`` plus one frame is held (docs/EVENTS.md, "The annotated video").
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from facemoe.runtime.annotate import FaceMark, VideoAnnotator, draw_marks


@dataclass
class _Held:
    index: int
    image: np.ndarray
    marks: list[FaceMark]


class FrameBuffer:
    """Holds frames in order and writes them, annotated, to ``annotator`` when released."""

    def __init__(self, annotator: VideoAnnotator, max_bytes: int) -> None:
        self.annotator = annotator
        self.max_bytes = max_bytes
        self._held: deque[_Held] = deque()
        self.bytes = 0
        self.peak_frames = 0
        self.peak_bytes = 0

    def __len__(self) -> int:
        return len(self._held)

    @property
    def full(self) -> bool:
        return self.bytes >= self.max_bytes

    def hold(self, index: int, image: np.ndarray, marks: list[FaceMark]) -> None:
        self._held.append(_Held(index, image, marks))
        self.bytes += image.nbytes
        self.peak_frames = max(self.peak_frames, len(self._held))
        self.peak_bytes = max(self.peak_bytes, self.bytes)

    def replace_marks(self, index: int, marks: list[FaceMark]) -> None:
        """Set the faces drawn on the held frame ``index`` (results that came from outside tracking)."""
        for held in self._held:
            if held.index == index:
                held.marks = marks

    def release(self, before: int | None = None) -> int:
        """Annotate and write the held frames with an index below ``before`` (all with None); how many."""
        written = 0
        while self._held and (before is None or self._held[0].index < before):
            held = self._held.popleft()
            self.bytes -= held.image.nbytes
            for mark in held.marks:
                if mark.track is not None:
                    label = mark.track.label_at(held.index)
                    if label is not None:
                        mark.identity, mark.similarity = label
                    mark.track.forget_labels_before(held.index)
            self.annotator.write(draw_marks(held.image, held.marks))
            written += 1
        return written


__all__ = ["FrameBuffer"]
