"""Faces for calibration: the runtime's detector as a hook, the aligned-or-scene test, near-duplicates.

``FaceDetector`` is the runtime's RetinaFace detector (``facemoe.runtime.detection``) followed by the same
five-point ArcFace alignment the runtime applies, so calibration crops are made exactly like the probes the
model will see. It returns ``DetectedFace`` records (crop and landmarks); a plain callable returning crops
is accepted too, but then landmarks are unknown and no image can be confirmed as already aligned.

Aligned or scene (docs/EXPORT.md#calibration-faces): an image is an aligned crop when the plain resize
``to_aligned`` would apply already puts the detected face on the ArcFace template, i.e. the similarity
transform from the detected landmarks (mapped through that resize) to the template is close to the identity.
Otherwise it is a scene and every detected face is aligned by the detector's landmarks.

Near-duplicates: consecutive video frames of a still subject give the same face again. Two crops are the
same face when their 32 x 32 grey thumbnails, mean-removed and normalised, correlate above
``1 - NEAR_DUPLICATE_DISTANCE``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

ALIGNED_SIZE = 112
# Tolerances of "already on the template" (in the 112 px aligned frame). Measured with the default detector
# on the two ArcFace-aligned test crops resized to 112-400 px: scale 0.93-1.01, rotation < 2.6 degrees,
# centroid offset < 4 px. Fail: the crop padded by 20 px (scale 1.28-1.31), shifted 12 px (offset 11),
# zoomed 1.2x (scale 0.78-0.88), rotated 10 degrees (11-13). Failing costs little: the image is then
# re-aligned from its landmarks like a scene.
TEMPLATE_SCALE_TOLERANCE = 0.12  # |log scale|, about +-13 %
TEMPLATE_ROTATION_DEGREES = 8.0
TEMPLATE_OFFSET_PX = 6.0
# 1 - correlation of normalised 32x32 grey thumbnails. Measured: a JPEG q60 re-encode or a 20 % brightness
# change of one crop 0.0001-0.0008; sampled carphone frames (5 apart) 0.04-0.44; two different LFW people
# at least 0.14.
NEAR_DUPLICATE_DISTANCE = 0.03
_THUMB = 32


@dataclass(frozen=True)
class DetectedFace:
    """One detected face: its aligned crop and, when the detector gives them, its landmarks in the image."""

    crop: np.ndarray  # (112, 112, 3) uint8 BGR, ArcFace-aligned
    landmarks: np.ndarray | None = None  # (5, 2) image pixels
    score: float | None = None


Detector = Callable[[np.ndarray], Sequence[DetectedFace | np.ndarray]]


class FaceDetector:
    """The runtime's RetinaFace detector plus ArcFace alignment, as a calibration detector hook.

    ``min_eye_distance`` drops faces too small to align meaningfully (the runtime's pipeline does the same).
    Build one per export: it holds an ONNX Runtime session.
    """

    def __init__(self, model: str | None = None, score_threshold: float = 0.7, min_eye_distance: float = 8.0) -> None:
        from facemoe.runtime.detection import RetinaFaceDetector

        self._detector = RetinaFaceDetector(model, score_threshold=score_threshold)
        self.min_eye_distance = min_eye_distance
        self.name = f"{self._detector.name}, score >= {score_threshold}, eye distance >= {min_eye_distance} px"

    def __call__(self, frame_bgr: np.ndarray) -> list[DetectedFace]:
        from facemoe.runtime.alignment import align_face

        return [
            DetectedFace(align_face(frame_bgr, d.landmarks), d.landmarks.astype(np.float64), d.score)
            for d in self._detector.detect(frame_bgr)
            if d.eye_distance >= self.min_eye_distance
        ]


def detector_name(detector: Detector | None) -> str | None:
    if detector is None:
        return None
    name = getattr(detector, "name", None)
    if isinstance(name, str):
        return name
    qualname = getattr(detector, "__qualname__", None) or type(detector).__qualname__
    return f"{getattr(detector, '__module__', '?')}.{qualname}"


def _resize_geometry(height: int, width: int, size: int = ALIGNED_SIZE) -> tuple[float, float, float]:
    """(scale, dx, dy) of ``to_aligned``'s pad-or-crop-and-resize: aligned = image * scale + (dx, dy)."""
    if height * 96 == width * 112 and (height, width) != (size, size):  # SphereFace layout: padded sides
        margin = round(width * 8 / 96)
        scale = size / height
        return scale, margin * scale, 0.0
    side = min(height, width)
    scale = size / side
    return scale, -((width - side) // 2) * scale, -((height - side) // 2) * scale


def template_fit(landmarks: np.ndarray, height: int, width: int) -> dict[str, float]:
    """How far a plain resize of this image leaves the face from the ArcFace template.

    Returns the similarity transform (resized landmarks -> template) as scale, rotation (degrees) and the
    landmark centroid offset (px in the 112 frame).
    """
    from facemoe.runtime.alignment import estimate_similarity, template_array

    scale, dx, dy = _resize_geometry(height, width)
    points = np.asarray(landmarks, dtype=np.float64).reshape(5, 2) * scale + (dx, dy)
    template = template_array()
    matrix = estimate_similarity(points, template)
    fit_scale = float(math.hypot(matrix[0, 0], matrix[1, 0]))
    rotation = math.degrees(math.atan2(matrix[1, 0], matrix[0, 0]))
    offset = float(np.linalg.norm(points.mean(axis=0) - template.mean(axis=0)))
    return {"scale": round(fit_scale, 4), "rotation_deg": round(rotation, 2), "offset_px": round(offset, 2)}


def on_template(fit: dict[str, float]) -> bool:
    return (
        abs(math.log(fit["scale"])) <= TEMPLATE_SCALE_TOLERANCE
        and abs(fit["rotation_deg"]) <= TEMPLATE_ROTATION_DEGREES
        and fit["offset_px"] <= TEMPLATE_OFFSET_PX
    )


def thumbnail(crop: np.ndarray) -> np.ndarray:
    """Mean-removed, unit-norm 32x32 grey thumbnail: the near-duplicate signature of a crop."""
    grey = cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY) if crop.ndim == 3 else crop
    small = cv2.resize(grey, (_THUMB, _THUMB), interpolation=cv2.INTER_AREA).astype(np.float64).ravel()
    small -= small.mean()
    norm = float(np.linalg.norm(small))
    return small / norm if norm > 0 else small


class DistinctFaces:
    """Keeps the faces of one source that are not near-duplicates of a face it already kept."""

    def __init__(self, threshold: float = NEAR_DUPLICATE_DISTANCE) -> None:
        self.threshold = threshold
        self._signatures: list[np.ndarray] = []
        self.duplicates = 0

    def add(self, crop: np.ndarray) -> bool:
        """True when ``crop`` is a new face (and remember it), False for a near-duplicate."""
        signature = thumbnail(crop)
        if self._signatures:
            distances = 1.0 - np.stack(self._signatures) @ signature
            if float(distances.min()) < self.threshold:
                self.duplicates += 1
                return False
        self._signatures.append(signature)
        return True


__all__ = [
    "NEAR_DUPLICATE_DISTANCE",
    "DetectedFace",
    "Detector",
    "DistinctFaces",
    "FaceDetector",
    "detector_name",
    "on_template",
    "template_fit",
    "thumbnail",
]
