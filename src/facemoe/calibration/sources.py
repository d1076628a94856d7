"""Where calibration faces come from: folders of aligned crops, and scene images or videos via a detector.

An aligned crop is what the runtime feeds the model after detection and alignment: 112 x 112 BGR on the
ArcFace template. Folders are searched at any depth; grey, 16-bit and 4-channel files are converted to 8-bit
BGR; 96 x 112 crops (the older SphereFace template, which is the ArcFace one without its 8-pixel side
margins) are padded; other sizes are centre-cropped to a square and resized.

Scene images and video frames need a detector hook, ``detector(frame_bgr) -> list of aligned crops``; the
runtime's detector (``facemoe.runtime.detection``) will provide one.

Every problem a user can cause (missing path, empty folder, unreadable file) is an ``InputError`` whose
one-line message starts with the path.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from facemoe.errors import InputError

ALIGNED_SIZE = 112
IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp")
VIDEO_SUFFIXES: tuple[str, ...] = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")

Detector = Callable[[np.ndarray], list[np.ndarray]]


@dataclass(frozen=True)
class SourceFile:
    """One file found under a user-given path; ``label`` is its name relative to that path (for hashing)."""

    path: Path
    label: str
    kind: str  # "aligned", "scene" or "video"


def _suffix(path: Path) -> str:
    return path.suffix.lower()


def find_files(root: str | os.PathLike[str], aligned: bool = True) -> list[SourceFile]:
    """Image (and video) files under ``root`` (a folder, any depth, or a single file), sorted by label."""
    root = Path(root)
    if not root.exists():
        raise InputError(f"{root}: no such file or folder")
    image_kind = "aligned" if aligned else "scene"
    if root.is_file():
        suffix = _suffix(root)
        if suffix in IMAGE_SUFFIXES:
            return [SourceFile(root, root.name, image_kind)]
        if suffix in VIDEO_SUFFIXES:
            return [SourceFile(root, root.name, "video")]
        raise InputError(
            f"{root}: not an image ({', '.join(IMAGE_SUFFIXES)}) or video ({', '.join(VIDEO_SUFFIXES)}) file"
        )
    found: list[SourceFile] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            label = f"{root.name}/{path.relative_to(root).as_posix()}"
            if _suffix(path) in IMAGE_SUFFIXES:
                found.append(SourceFile(path, label, image_kind))
            elif _suffix(path) in VIDEO_SUFFIXES:
                found.append(SourceFile(path, label, "video"))
    if not found:
        raise InputError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) or videos found in this folder or below it")
    return sorted(found, key=lambda f: f.label)


def to_bgr8(image: np.ndarray, source: str | os.PathLike[str] = "image") -> np.ndarray:
    """Any decoded image (grey, BGR, BGRA; 8 or 16 bit) -> HxWx3 uint8 BGR."""
    if image.dtype == np.uint16:
        image = np.rint(image.astype(np.float32) / 257.0).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise InputError(f"{source}: unsupported pixel type {image.dtype}")
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.ndim == 3 and image.shape[2] == 1:
        return cv2.cvtColor(image[:, :, 0], cv2.COLOR_GRAY2BGR)
    if image.ndim == 3 and image.shape[2] == 3:
        return image
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    raise InputError(f"{source}: unsupported image shape {image.shape}")


def read_bytes(path: str | os.PathLike[str]) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read file ({exc.strerror or exc})") from exc


def decode_image(data: bytes, source: str | os.PathLike[str]) -> np.ndarray:
    """Encoded image bytes -> HxWx3 uint8 BGR."""
    buffer = np.frombuffer(data, dtype=np.uint8)
    image = None
    if buffer.size:
        try:
            image = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED)
        except cv2.error:
            image = None
    if image is None or image.size == 0:
        raise InputError(f"{source}: not a readable image (empty, truncated or unsupported format)")
    return to_bgr8(image, source)


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an image file as HxWx3 uint8 BGR (``cv2.imread`` fails on non-ASCII paths on Windows)."""
    return decode_image(read_bytes(path), path)


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


def detect_faces(frame: np.ndarray, detector: Detector, source: str, size: int = ALIGNED_SIZE) -> list[np.ndarray]:
    """Run the detector hook and normalise what it returns to aligned uint8 BGR crops."""
    faces = []
    for crop in detector(frame):
        crop = np.asarray(crop)
        if crop.ndim not in (2, 3) or crop.size == 0:
            raise InputError(f"{source}: the detector returned a crop of shape {crop.shape}, not an image")
        faces.append(to_aligned(to_bgr8(crop, source), size))
    return faces


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


def faces_from_source(
    source: SourceFile,
    detector: Detector | None,
    frame_step: int = 5,
    max_faces: int = 64,
    size: int = ALIGNED_SIZE,
) -> list[np.ndarray]:
    """Detected, aligned faces of a scene image or video (at most ``max_faces``, in frame order)."""
    if detector is None:
        raise InputError(f"{source.path}: scene images and videos need a face detector (detector=...)")
    if source.kind == "scene":
        return detect_faces(read_image(source.path), detector, str(source.path), size)[:max_faces]
    faces: list[np.ndarray] = []
    for _, frame in iter_video_frames(source.path, frame_step):
        faces.extend(detect_faces(frame, detector, str(source.path), size))
        if len(faces) >= max_faces:
            break
    return faces[:max_faces]


__all__ = [
    "ALIGNED_SIZE",
    "IMAGE_SUFFIXES",
    "VIDEO_SUFFIXES",
    "Detector",
    "SourceFile",
    "decode_image",
    "detect_faces",
    "faces_from_source",
    "find_files",
    "iter_video_frames",
    "load_aligned_face",
    "read_bytes",
    "read_image",
    "to_aligned",
    "to_bgr8",
]
