"""Where calibration faces come from: files and folders of images, videos and .npy stacks of crops.

An aligned crop is what the runtime feeds the model after detection and alignment: 112 x 112 BGR on the
ArcFace template. Folders are searched at any depth; grey, 16-bit and 4-channel files are converted to 8-bit
BGR; 96 x 112 crops (the older SphereFace template, which is the ArcFace one without its 8-pixel side
margins) are padded; other sizes are centre-cropped to a square and resized. Whether an image *is* an
aligned crop or a scene that needs the detector is decided in ``facemoe.calibration.pool``.

A ``.npy`` file is a stack of aligned crops: uint8 or uint16, shape (N, H, W) grey or (N, H, W, C) with C
= 1, 3 (BGR, OpenCV's order like every image in facemoe) or 4; it is memory-mapped, never loaded whole.

Every problem a user can cause (missing path, empty folder, unreadable file) is an ``InputError`` whose
one-line message starts with the path.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from facemoe.errors import InputError
from facemoe.imagefile import decode_image, read_image, to_bgr8

ALIGNED_SIZE = 112
IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp")
VIDEO_SUFFIXES: tuple[str, ...] = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
STACK_SUFFIXES: tuple[str, ...] = (".npy",)


@dataclass(frozen=True)
class SourceFile:
    """One file found under a user-given path; ``label`` is its name relative to that path (for hashing)."""

    path: Path
    label: str
    kind: str  # "image", "video" or "stack"


def _kind(path: Path) -> str | None:
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix in VIDEO_SUFFIXES:
        return "video"
    if suffix in STACK_SUFFIXES:
        return "stack"
    return None


_WHAT = f"images ({', '.join(IMAGE_SUFFIXES)}), videos ({', '.join(VIDEO_SUFFIXES)}) or .npy stacks of crops"


def find_files(root: str | os.PathLike[str]) -> list[SourceFile]:
    """Image, video and .npy files under ``root`` (a folder, any depth, or a single file), sorted by label."""
    root = Path(root)
    if not root.exists():
        raise InputError(f"{root}: no such file or folder")
    if root.is_file():
        kind = _kind(root)
        if kind is None:
            raise InputError(f"{root}: not one of the calibration inputs: {_WHAT}")
        return [SourceFile(root, root.name, kind)]
    found: list[SourceFile] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            label = f"{root.name}/{path.relative_to(root).as_posix()}"
            kind = _kind(path)
            if kind is not None:
                found.append(SourceFile(path, label, kind))
    if not found:
        raise InputError(f"{root}: no {_WHAT} found in this folder or below it")
    return sorted(found, key=lambda f: f.label)


def read_bytes(path: str | os.PathLike[str]) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read file ({exc.strerror or exc})") from exc


def to_aligned(image: np.ndarray, size: int = ALIGNED_SIZE) -> np.ndarray:
    """Bring a crop to ``size`` x ``size`` (see the module docstring for non-square crops)."""
    height, width = image.shape[:2]
    if (height, width) == (size, size):
        return np.ascontiguousarray(image)
    if height * 96 == width * 112:  # SphereFace 96x112 layout: same face, no side margins
        margin = round(width * 8 / 96)
        image = cv2.copyMakeBorder(image, 0, 0, margin, margin, cv2.BORDER_CONSTANT, value=(0, 0, 0))
    elif height != width:
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        image = image[top : top + side, left : left + side]
    interpolation = cv2.INTER_AREA if image.shape[0] > size else cv2.INTER_CUBIC
    return np.ascontiguousarray(cv2.resize(image, (size, size), interpolation=interpolation))


def load_aligned_face(path: str | os.PathLike[str], size: int = ALIGNED_SIZE) -> np.ndarray:
    return to_aligned(read_image(path), size)


def iter_video_frames(path: str | os.PathLike[str], frame_step: int = 5) -> Iterator[tuple[int, np.ndarray]]:
    """(index, BGR frame) for every ``frame_step``-th frame of a video file."""
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise InputError(f"{path}: cannot open video (unsupported codec or not a video)")
    try:
        index = 0
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            if index % frame_step == 0:
                yield index, frame
            index += 1
        if index == 0:
            raise InputError(f"{path}: video has no readable frames")
    finally:
        capture.release()


def open_stack(path: str | os.PathLike[str]) -> np.ndarray:
    """Memory-map a .npy stack of crops and check its layout (see the module docstring)."""
    try:
        stack = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable .npy array ({exc})") from exc
    if stack.dtype not in (np.uint8, np.uint16):
        raise InputError(f"{path}: a stack of crops must be uint8 or uint16, not {stack.dtype}")
    if not (stack.ndim == 3 or (stack.ndim == 4 and stack.shape[3] in (1, 3, 4))) or 0 in stack.shape:
        raise InputError(f"{path}: expected a stack of crops (N, H, W) or (N, H, W, 1|3|4), got {stack.shape}")
    return stack


def stack_face(stack: np.ndarray, index: int, source: str | os.PathLike[str], size: int = ALIGNED_SIZE) -> np.ndarray:
    return to_aligned(to_bgr8(np.array(stack[index]), source), size)


__all__ = [
    "ALIGNED_SIZE",
    "IMAGE_SUFFIXES",
    "STACK_SUFFIXES",
    "VIDEO_SUFFIXES",
    "SourceFile",
    "decode_image",
    "find_files",
    "iter_video_frames",
    "load_aligned_face",
    "open_stack",
    "read_bytes",
    "read_image",
    "stack_face",
    "to_aligned",
    "to_bgr8",
]
