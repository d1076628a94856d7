"""The user's own aligned face crops as parity inputs (``facemoe parity BUNDLE --faces DIR``).

The crops ``facemoe-run --audit-save`` writes (112 x 112 BGR on the ArcFace template), or any folder of
aligned crops, become model inputs with the bundle's pre-processing, in the two-view layout the parity
report pairs (docs/EXPORT.md#parity-report): the faces, then flipped and slightly noisy copies of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from facemoe.errors import InputError

MIN_FACES = 2  # the identification and verification figures need at least two faces


def load_face_inputs(folder: Path, preprocessing: dict[str, Any]) -> tuple[np.ndarray, str]:
    """Paired model inputs from the aligned crops under ``folder``, and a line saying what they are."""
    from facemoe.calibration.sources import find_files, load_aligned_face
    from facemoe.export.inputs import paired_views
    from facemoe.preprocess import preprocess_face

    images = [f for f in find_files(folder) if f.kind == "image"]
    if len(images) < MIN_FACES:
        raise InputError(f"{folder}: --faces needs at least {MIN_FACES} aligned face images, found {len(images)}")
    mean, std = preprocessing.get("mean", 0.5), preprocessing.get("std", 0.5)
    faces = np.stack(
        [
            preprocess_face(
                load_aligned_face(f.path, int(preprocessing.get("aligned_size", 112))),
                int(preprocessing.get("input_size", 120)),
                str(preprocessing.get("interpolation", "pil-bicubic")),
                float(mean[0] if isinstance(mean, (list, tuple)) else mean),
                float(std[0] if isinstance(std, (list, tuple)) else std),
            )
            for f in images
        ]
    ).astype(np.float32)
    return paired_views(faces), f"{len(faces)} aligned faces from {folder} (and a flipped view of each)"


__all__ = ["load_face_inputs"]
