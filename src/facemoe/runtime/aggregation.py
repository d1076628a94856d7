"""Per-track embedding aggregation and the recognition budget.

FaceMoE's evaluation fuses features by adding *raw* embeddings and normalising the sum (the raw norm acts
as a quality weight: blurry, tiny or badly aligned faces produce short vectors). A track's identity vector
is therefore ``L2norm(sum of raw embeddings)``, a norm-weighted running mean over its frames.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class EmbeddingAggregate:
    """Running norm-weighted mean of raw embeddings."""

    def __init__(self) -> None:
        self.total: np.ndarray | None = None
        self.count = 0
        self.norm_sum = 0.0

    def add(self, raw: np.ndarray) -> None:
        raw = np.asarray(raw, dtype=np.float64).reshape(-1)
        if not np.all(np.isfinite(raw)):
            return  # a NaN would poison the whole track's identity
        self.total = raw.copy() if self.total is None else self.total + raw
        self.count += 1
        self.norm_sum += float(np.linalg.norm(raw))

    @property
    def vector(self) -> np.ndarray | None:
        """The identity vector (unit length), or None before the first embedding."""
        if self.total is None:
            return None
        norm = float(np.linalg.norm(self.total))
        if norm <= 1e-12:
            return None
        return (self.total / norm).astype(np.float32)

    @property
    def mean_norm(self) -> float:
        return self.norm_sum / self.count if self.count else 0.0


@dataclass
class RecognitionBudget:
    """When a track should be embedded again.

    Every ``every`` frames until the identity is settled (the same gallery identity above the threshold for
    ``confident_after`` embeddings in a row, or ``max_embeddings`` reached), then only every ``recheck``
    frames, which still catches a track that switched to another person.
    """

    every: int = 5
    confident_after: int = 3
    max_embeddings: int = 20
    recheck: int = 60

    def interval(self, embeddings: int, streak: int) -> int:
        if streak >= self.confident_after or embeddings >= self.max_embeddings:
            return max(self.recheck, self.every)
        return max(1, self.every)

    def is_due(self, frame_index: int, last_embedded: int | None, embeddings: int, streak: int) -> bool:
        if last_embedded is None:
            return True
        return frame_index - last_embedded >= self.interval(embeddings, streak)


__all__ = ["EmbeddingAggregate", "RecognitionBudget"]
