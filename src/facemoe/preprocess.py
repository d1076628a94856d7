"""Face pre-processing shared by every backend (numpy + OpenCV, no torch).

The official TinyFace evaluation reads the aligned 112x112 crop with OpenCV (BGR), converts it to RGB,
resizes it to 120x120 with PIL's bicubic filter (torchvision ``Resize`` on a PIL image) and maps
``x / 255`` to [-1, 1]. PIL's bicubic (a = -0.5, 22-bit fixed point, horizontal pass rounded to uint8
before the vertical pass) differs from OpenCV's (a = -0.75), so it is reproduced here exactly instead
of approximated with ``cv2.resize``.
"""

from __future__ import annotations

import functools
from typing import Literal

import cv2
import numpy as np

Interpolation = Literal["pil-bicubic", "cv2-bicubic", "bilinear"]
INTERPOLATIONS: tuple[str, ...] = ("pil-bicubic", "cv2-bicubic", "bilinear")

_PRECISION_BITS = 32 - 8 - 2  # PIL's fixed-point precision for 8-bit images


def _pil_bicubic_kernel(x: float) -> float:
    a = -0.5
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    if x < 2.0:
        return (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return 0.0


@functools.lru_cache(maxsize=16)
def _pil_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """Fixed-point resampling matrix (out_size, in_size) exactly as Pillow computes it."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    matrix = np.zeros((out_size, in_size), dtype=np.int64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        weights = [_pil_bicubic_kernel((x + xmin - center + 0.5) / filterscale) for x in range(xmax)]
        total = sum(weights)
        for x, w in enumerate(weights):
            w = w / total if total != 0.0 else w
            # Pillow rounds half away from zero when converting coefficients to fixed point.
            fixed = int(-0.5 + w * (1 << _PRECISION_BITS)) if w < 0 else int(0.5 + w * (1 << _PRECISION_BITS))
            matrix[xx, xmin + x] = fixed
    return matrix


@functools.lru_cache(maxsize=16)
def _pil_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The resampling matrix as (out, taps) source indices and float64 weights (bicubic has <= ~5 taps)."""
    matrix = _pil_bicubic_matrix(in_size, out_size)
    taps = max(1, int((matrix != 0).sum(axis=1).max()))
    index = np.zeros((out_size, taps), dtype=np.intp)
    weight = np.zeros((out_size, taps), dtype=np.float64)
    for row in range(out_size):
        cols = np.flatnonzero(matrix[row])
        index[row, : len(cols)] = cols
        weight[row, : len(cols)] = matrix[row, cols]
    return index, weight


def _pil_pass(image: np.ndarray, in_size: int, out_size: int, axis: int) -> np.ndarray:
    # float64 holds every partial sum exactly (|terms| < 2^31, a handful per output, far below 2^53), so
    # this equals Pillow's integer arithmetic; gathering only the non-zero taps keeps it at ~1 ms a face.
    index, weight = _pil_taps(in_size, out_size)
    src = np.moveaxis(image, axis, 0).astype(np.float64)
    acc = np.einsum("ot...,ot->o...", src[index], weight)
    acc += float(1 << (_PRECISION_BITS - 1))
    out = np.clip(np.floor(acc / float(1 << _PRECISION_BITS)), 0, 255).astype(np.uint8)
    return np.moveaxis(out, 0, axis)


def resize_pil_bicubic(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an HxWxC uint8 image to ``size`` = (width, height) like PIL's BICUBIC.

    Bit-exact with Pillow for square-to-square resizes (the 112 -> 120 face path). For non-square
    resizes recent Pillow releases may run the vertical pass first, which changes intermediate
    rounding by a few grey levels.
    """
    out_w, out_h = size
    in_h, in_w = image.shape[:2]
    out = image
    if out_w != in_w:
        out = _pil_pass(out, in_w, out_w, axis=1)
    if out_h != in_h:
        out = _pil_pass(out, in_h, out_h, axis=0)
    return out


def resize(image: np.ndarray, size: int, interpolation: str = "pil-bicubic") -> np.ndarray:
    if image.shape[0] == size and image.shape[1] == size:
        return image
    if interpolation == "pil-bicubic":
        return resize_pil_bicubic(image, (size, size))
    if interpolation == "cv2-bicubic":
        return cv2.resize(image, (size, size), interpolation=cv2.INTER_CUBIC)
    if interpolation == "bilinear":
        return cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)
    raise ValueError(f"unknown interpolation {interpolation!r}; choose one of {', '.join(INTERPOLATIONS)}")


def preprocess_face(
    face_bgr: np.ndarray,
    input_size: int = 120,
    interpolation: str = "pil-bicubic",
    mean: float = 0.5,
    std: float = 0.5,
) -> np.ndarray:
    """Aligned face crop (HxWx3 uint8 BGR, as OpenCV reads it) -> (3, S, S) float32 RGB in [-1, 1]."""
    if face_bgr.dtype != np.uint8 or face_bgr.ndim != 3 or face_bgr.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 BGR image, got {face_bgr.dtype} {face_bgr.shape}")
    rgb = np.ascontiguousarray(face_bgr[:, :, ::-1])
    rgb = resize(rgb, input_size, interpolation)
    # Same float32 operation order as torchvision ToTensor + Normalize: (x / 255 - mean) / std.
    scaled = rgb.astype(np.float32) / np.float32(255.0)
    normalized = (scaled - np.float32(mean)) / np.float32(std)
    return np.ascontiguousarray(normalized.transpose(2, 0, 1))


def preprocess_batch(
    faces_bgr: list[np.ndarray], input_size: int = 120, interpolation: str = "pil-bicubic"
) -> np.ndarray:
    """List of aligned BGR crops -> (N, 3, S, S) float32 batch."""
    if not faces_bgr:
        return np.zeros((0, 3, input_size, input_size), dtype=np.float32)
    return np.stack([preprocess_face(f, input_size, interpolation) for f in faces_bgr])


def flip_batch(batch: np.ndarray) -> np.ndarray:
    """Horizontal flip of an NCHW batch (flip along width), as the flip-test uses."""
    return np.ascontiguousarray(batch[..., ::-1])


def l2_normalize(x: np.ndarray, axis: int = -1, eps: float = 1e-12) -> np.ndarray:
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.maximum(norm, eps)


def fuse_flip(emb: np.ndarray, emb_flipped: np.ndarray, mode: str = "pre_norm_vector_add") -> np.ndarray:
    """Flip-test fusion of raw embeddings.

    ``pre_norm_vector_add`` (TinyFace default): L2norm(f(x) + f(flip x)).
    ``norm_add`` (high-quality benchmarks): L2norm(L2norm(f(x)) + L2norm(f(flip x))).
    """
    if mode == "pre_norm_vector_add":
        return l2_normalize(emb + emb_flipped)
    if mode == "norm_add":
        return l2_normalize(l2_normalize(emb) + l2_normalize(emb_flipped))
    raise ValueError(f"unknown flip fusion {mode!r}; choose pre_norm_vector_add or norm_add")


__all__ = [
    "INTERPOLATIONS",
    "flip_batch",
    "fuse_flip",
    "l2_normalize",
    "preprocess_batch",
    "preprocess_face",
    "resize",
    "resize_pil_bicubic",
]
