"""Held-out inputs for export verification and parity (never the trace input, never calibration faces)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from facemoe.errors import InputError
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


# The held-out faces the export judged parity on are stored in the bundle (float32, exactly as used), so
# `facemoe parity` re-runs the check on bit-identical inputs and reaches the same verdict: on a random-weight
# model one rounded pixel can flip a near-tied route (docs/EXPORT.md, "Parity").
PARITY_INPUTS_NAME = "parity_inputs.npz"
PAIR_SEED = 99


def save_parity_inputs(path: Path, faces: np.ndarray, source: str) -> None:
    np.savez_compressed(
        path,
        faces=np.ascontiguousarray(faces, dtype=np.float32),
        pair_seed=np.array(PAIR_SEED),
        source=np.array(source),
    )


def load_parity_inputs(path: Path) -> tuple[np.ndarray, str]:
    """The stored faces as the paired views parity runs on, and where they came from."""
    try:
        with np.load(path, allow_pickle=False) as data:
            faces, seed, source = data["faces"], int(data["pair_seed"]), str(data["source"])
    except (OSError, KeyError, ValueError) as exc:
        raise InputError(f"{path}: not a parity inputs file ({exc})") from None
    if faces.dtype != np.float32 or faces.ndim != 4 or faces.shape[1] != 3:
        raise InputError(f"{path}: expected float32 faces of shape (N, 3, H, W), found {faces.dtype} {faces.shape}")
    return paired_views(faces, seed=seed), source
