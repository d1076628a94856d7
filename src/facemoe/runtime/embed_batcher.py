"""The embedding queue shared by every source of a run: cross-stream batches with fairness.

Faces from all sources wait in one queue; a batch is due when the queue holds ``max_batch`` faces or its
oldest face has waited ``max_latency_s``. When more faces wait than one batch takes, the batch takes the
overdue faces first, then the others, each group shared round-robin across sources (oldest first within a
source), so a busy camera cannot keep a quiet camera's face out of a batch beyond the latency bound
(docs/EVENTS.md#several-sources). Pure bookkeeping: the model call is the caller's.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class PendingFace:
    source: str
    track: Any  # runtime.tracking.Track
    tensor: np.ndarray
    where: dict[str, Any]  # face_fields of the face: its frame, time, box ...
    queued_at: float
    aligned: np.ndarray | None = None  # kept for the accuracy audit's saved crops
    seq: int = field(default=0, compare=False)  # arrival order, ties broken by it


class EmbedBatcher:
    def __init__(self, max_batch: int, max_latency_s: float) -> None:
        self.max_batch = max(1, max_batch)
        self.max_latency_s = max_latency_s
        self._pending: list[PendingFace] = []
        self._seq = itertools.count()
        self.batches = 0
        self.faces = 0

    def __len__(self) -> int:
        return len(self._pending)

    def __iter__(self) -> Iterator[PendingFace]:
        return iter(self._pending)

    def add(self, face: PendingFace) -> None:
        face.seq = next(self._seq)
        self._pending.append(face)

    def oldest_frame(self, source: str) -> int | None:
        """The earliest frame of ``source`` that still waits for an embedding (frames before it are final)."""
        frames = [p.where["frame"] for p in self._pending if p.source == source]
        return min(frames) if frames else None

    def due(self, now: float) -> bool:
        if not self._pending:
            return False
        return len(self._pending) >= self.max_batch or now - self._pending[0].queued_at >= self.max_latency_s

    def take(self, now: float) -> list[PendingFace]:
        """The next batch (at most ``max_batch`` faces), removed from the queue; fair across sources."""
        if len(self._pending) <= self.max_batch:
            batch, self._pending = self._pending, []
            self._count(batch)
            return batch
        # Overdue faces first, then the rest; within each group, round-robin across sources so that a busy
        # camera's backlog cannot push a quiet camera's face into a later batch, overloaded or not.
        overdue = [p for p in self._pending if now - p.queued_at >= self.max_latency_s]
        fresh = [p for p in self._pending if now - p.queued_at < self.max_latency_s]
        chosen = self._round_robin(overdue, self.max_batch)
        chosen += self._round_robin(fresh, self.max_batch - len(chosen))
        taken = {p.seq for p in chosen}
        self._pending = [p for p in self._pending if p.seq not in taken]
        chosen.sort(key=lambda p: p.seq)
        self._count(chosen)
        return chosen

    @staticmethod
    def _round_robin(faces: list[PendingFace], limit: int) -> list[PendingFace]:
        """Up to ``limit`` of ``faces`` (in arrival order), one per source in turn, oldest first in each."""
        by_source: dict[str, list[PendingFace]] = {}
        for p in faces:
            by_source.setdefault(p.source, []).append(p)
        queues = sorted(by_source.values(), key=lambda q: q[0].seq)  # the longest-waiting source first
        chosen: list[PendingFace] = []
        while len(chosen) < limit and queues:
            for queue in list(queues):
                if len(chosen) >= limit:
                    break
                chosen.append(queue.pop(0))
                if not queue:
                    queues.remove(queue)
        return chosen

    def _count(self, batch: list[PendingFace]) -> None:
        if batch:
            self.batches += 1
            self.faces += len(batch)

    @property
    def mean_batch(self) -> float:
        return self.faces / self.batches if self.batches else 0.0


__all__ = ["EmbedBatcher", "PendingFace"]
