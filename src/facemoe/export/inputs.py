"""Held-out inputs for export verification and parity (never the trace input, never calibration faces)."""

from __future__ import annotations

import cv2
import numpy as np

from facemoe.preprocess import flip_batch


def synthetic_faces(count: int, size: int = 120, seed: int = 4321) -> np.ndarray:
    """Smooth random images in [-1, 1] (image statistics, not white noise) when no face data is given."""
    rng = np.random.default_rng(seed)
    out = np.empty((count, 3, size, size), dtype=np.float32)
    for i in range(count):
        low = rng.standard_normal((3, 8, 8)).astype(np.float32)
        image = np.stack([cv2.resize(ch, (size, size), interpolation=cv2.INTER_CUBIC) for ch in low])
        image += 0.15 * rng.standard_normal(image.shape).astype(np.float32)
        out[i] = np.tanh(image)
    return out


def paired_views(faces: np.ndarray, seed: int = 99) -> np.ndarray:
    """Stack view A (the faces) and view B (flipped, slightly noisy copies) for verification pairs."""
    rng = np.random.default_rng(seed)
    second = flip_batch(faces) + 0.05 * rng.standard_normal(faces.shape).astype(np.float32)
    return np.concatenate([faces, np.clip(second, -1.0, 1.0)]).astype(np.float32)
