"""From a detected face to its embedding: align to the template, pre-process, embed, fuse the flip test.

One place for the bundle's pre-processing, shared by the video pipeline, enrolment and still images
(docs/BUNDLE.md#preprocessing).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from facemoe.bundle import ARCFACE_TEMPLATE_112, FLIP_FUSIONS
from facemoe.preprocess import flip_batch, l2_normalize, preprocess_face
from facemoe.runtime.alignment import align_face
from facemoe.runtime.backends.base import Backend


class FaceEncoder:
    """Landmarks -> aligned crop -> model input -> raw embedding, with the bundle's pre-processing."""

    def __init__(self, backend: Backend, preprocessing: Mapping[str, Any] | None = None, flip: bool = False) -> None:
        pre = preprocessing or {}
        self.backend = backend
        self.flip = flip
        self.aligned_size = int(pre.get("aligned_size", 112))
        self.input_size = int(pre.get("input_size", backend.input_size))
        self.interpolation = str(pre.get("interpolation", "pil-bicubic"))
        mean, std = pre.get("mean", 0.5), pre.get("std", 0.5)
        self.mean = float(mean[0] if isinstance(mean, (list, tuple)) else mean)
        self.std = float(std[0] if isinstance(std, (list, tuple)) else std)
        template = pre.get("alignment_template") or ARCFACE_TEMPLATE_112
        self.template = [tuple(float(v) for v in point) for point in template]
        # The manifest says how the flip test fuses f(x) and f(flip x) (docs/BUNDLE.md#preprocessing).
        self.flip_fusion = str(pre.get("flip_fusion", "pre_norm_vector_add"))
        if self.flip_fusion not in FLIP_FUSIONS:
            raise ValueError(f"unknown flip fusion {self.flip_fusion!r}; choose {' or '.join(FLIP_FUSIONS)}")

    def align(self, frame_bgr: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        return align_face(frame_bgr, landmarks, self.aligned_size, self.template)

    def prepare(self, aligned_bgr: np.ndarray) -> np.ndarray:
        return preprocess_face(aligned_bgr, self.input_size, self.interpolation, self.mean, self.std)

    def embed(self, tensors: list[np.ndarray] | np.ndarray) -> np.ndarray:
        """Raw embeddings; with flip f(x) + f(flip x) fused as the manifest's ``flip_fusion`` says."""
        batch = np.ascontiguousarray(np.stack(tensors) if isinstance(tensors, list) else tensors, dtype=np.float32)
        if batch.shape[0] == 0:
            return np.zeros((0, self.backend.embedding_size), dtype=np.float32)
        if not self.flip:
            return self.backend.embed(batch)
        both = self.backend.embed(np.concatenate([batch, flip_batch(batch)]))
        plain, flipped = both[: len(batch)], both[len(batch) :]
        if self.flip_fusion == "norm_add":  # sum of unit vectors; callers L2-normalise the result
            return l2_normalize(plain) + l2_normalize(flipped)
        return plain + flipped


__all__ = ["FaceEncoder"]
