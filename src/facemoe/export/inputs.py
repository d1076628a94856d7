"""Held-out inputs for export verification and parity (never the trace input, never calibration faces)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np

from facemoe.errors import InputError
from facemoe.fileio import sha256_file
from facemoe.preprocess import flip_batch

SYNTHETIC_SEED = 4321


def synthetic_faces(count: int, size: int = 120, seed: int = SYNTHETIC_SEED) -> np.ndarray:
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
# Synthetic faces are not stored: their recipe (count, size, seed) and the sha256 of the exact array are
# recorded instead, and `facemoe parity` regenerates them and checks the hash.
PARITY_INPUTS_NAME = "parity_inputs.npz"
PAIR_SEED = 99


def array_sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()


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


def recorded_parity_inputs(bundle_dir: Path, recorded: dict, fallback_count: int) -> tuple[np.ndarray, str]:
    """The inputs an export judged parity on, from what its manifest recorded, and a line saying so.

    Stored faces are checked against their sha256; synthetic ones are regenerated from their recipe and
    checked against the array's sha256 (other numpy/OpenCV builds may round differently: then it says so).
    """
    if recorded.get("file"):
        path = bundle_dir / recorded["file"]
        if not path.is_file():
            raise InputError(f"{path}: the parity inputs the manifest records are missing")
        if recorded.get("sha256") and sha256_file(path) != recorded["sha256"]:
            raise InputError(f"{path}: sha256 differs from the manifest's; the bundle was modified")
        inputs, source = load_parity_inputs(path)
        return inputs, f"the {len(inputs) // 2} {source} the export was judged on ({path.name})"
    if recorded.get("array_sha256"):
        faces = synthetic_faces(int(recorded["count"]), size=int(recorded["size"]), seed=int(recorded["seed"]))
        inputs = paired_views(faces, seed=int(recorded.get("pair_seed", PAIR_SEED)))
        if array_sha256(faces) == recorded["array_sha256"]:
            return inputs, f"the {len(faces)} synthetic faces the export was judged on (regenerated, sha256 match)"
        return inputs, (
            f"{len(faces)} synthetic faces regenerated from the export's recipe, but their sha256 differs "
            "(another numpy/OpenCV build): near-tied routes may flip differently"
        )
    faces = synthetic_faces(fallback_count)
    return paired_views(faces), f"{fallback_count} synthetic faces (the bundle records no parity inputs)"
