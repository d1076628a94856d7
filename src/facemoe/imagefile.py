"""Image files to HxWx3 uint8 BGR: the one decoder of enrolment photos, image inputs and calibration faces.

Decoded from bytes (``cv2.imread`` cannot open non-ASCII paths on Windows and fails silently) with flags
that make OpenCV apply the EXIF orientation: a phone photo stored sideways with a "rotate 90" tag comes out
upright, as every viewer shows it (``IMREAD_UNCHANGED`` would skip that). ``ANYDEPTH`` keeps 16-bit images,
which :func:`to_bgr8` rounds to the nearest 8-bit value (``v / 257``), so 16-bit and 8-bit copies of the
same picture give the same pixels. Torch-free.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from facemoe.errors import InputError

EXIF_UPRIGHT = cv2.IMREAD_ANYCOLOR | cv2.IMREAD_ANYDEPTH


def to_bgr8(image: np.ndarray, source: str | os.PathLike[str] = "image") -> np.ndarray:
    """Any decoded image (grey, BGR, BGRA; 8 or 16 bit; float in [0, 1]) -> HxWx3 uint8 BGR."""
    if not isinstance(image, np.ndarray) or image.size == 0:
        raise InputError(f"{source}: empty image")
    if image.dtype == np.uint16:
        image = np.rint(image.astype(np.float32) / 257.0).astype(np.uint8)
    elif image.dtype in (np.float32, np.float64):
        image = np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise InputError(f"{source}: unsupported pixel type {image.dtype}")
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1):
        return cv2.cvtColor(image.reshape(image.shape[:2]), cv2.COLOR_GRAY2BGR)
    if image.ndim == 3 and image.shape[2] == 3:
        return image
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    raise InputError(f"{source}: unsupported image shape {image.shape}")


def decode_image(data: bytes | np.ndarray, source: str | os.PathLike[str] = "image") -> np.ndarray:
    """Encoded image bytes -> HxWx3 uint8 BGR, upright; ``InputError`` naming ``source`` when it does not decode."""
    buffer = np.frombuffer(data, dtype=np.uint8) if isinstance(data, bytes) else data
    image = None
    if buffer.size:
        try:
            image = cv2.imdecode(buffer, EXIF_UPRIGHT)
        except cv2.error:
            image = None
    if image is None or image.size == 0:
        raise InputError(f"{source}: not a readable image (empty, truncated or unsupported format)")
    return to_bgr8(image, source)


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read and decode an image file; ``InputError`` naming the file when it cannot be read or decoded."""
    try:
        data = np.fromfile(Path(path), dtype=np.uint8)
    except OSError as exc:
        raise InputError(f"{path}: cannot read file ({exc.strerror or exc})") from None
    return decode_image(data, path)


__all__ = ["EXIF_UPRIGHT", "decode_image", "read_image", "to_bgr8"]
