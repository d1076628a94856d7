"""Five-point face alignment to the ArcFace 112x112 template (similarity transform, least squares)."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from facemoe.bundle import ARCFACE_TEMPLATE_112

ALIGNED_SIZE = 112


def template_array(template: Sequence[Sequence[float]] = ARCFACE_TEMPLATE_112, size: int = ALIGNED_SIZE) -> np.ndarray:
    """The template as a (5, 2) float array, scaled when the aligned crop is not 112 px."""
    points = np.asarray(template, dtype=np.float64).reshape(5, 2)
    return points * (size / ALIGNED_SIZE)


def estimate_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation; no reflection) mapping src to dst.

    Umeyama's closed form. Returns the (2, 3) matrix for ``cv2.warpAffine``.
    """
    src = np.asarray(src, dtype=np.float64).reshape(-1, 2)
    dst = np.asarray(dst, dtype=np.float64).reshape(-1, 2)
    if src.shape != dst.shape or src.shape[0] < 2:
        raise ValueError(f"need two matching sets of >= 2 points, got {src.shape} and {dst.shape}")
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    src_var = (src_c**2).sum() / len(src)
    if src_var <= 1e-12:
        raise ValueError("degenerate landmarks (all points coincide)")
    cov = dst_c.T @ src_c / len(src)
    u, singular, vt = np.linalg.svd(cov)
    sign = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[-1] = -1.0  # forbid a reflection: a mirrored face is a different face
    rotation = u @ np.diag(sign) @ vt
    scale = float((singular * sign).sum() / src_var)
    translation = dst_mean - scale * rotation @ src_mean
    return np.hstack([scale * rotation, translation[:, None]]).astype(np.float64)


def transform_points(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return points @ matrix[:, :2].T + matrix[:, 2]


def eye_distance(landmarks: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(landmarks[1]) - np.asarray(landmarks[0])))


def align_face(
    frame_bgr: np.ndarray,
    landmarks: np.ndarray,
    size: int = ALIGNED_SIZE,
    template: Sequence[Sequence[float]] = ARCFACE_TEMPLATE_112,
) -> np.ndarray:
    """Warp the face with these five landmarks onto the template; returns a (size, size, 3) uint8 BGR crop.

    Outside the frame is filled with black, as insightface's ``norm_crop`` does, so crops of faces at the
    image border match what the model saw in evaluation.
    """
    matrix = estimate_similarity(landmarks, template_array(template, size))
    return cv2.warpAffine(frame_bgr, matrix, (size, size), flags=cv2.INTER_LINEAR, borderValue=(0, 0, 0))


__all__ = ["ALIGNED_SIZE", "align_face", "estimate_similarity", "eye_distance", "template_array", "transform_points"]
