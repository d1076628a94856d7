"""Still images as a frame source: one image file, or every image in a folder (sorted, not recursive).

Each image is decoded once, with its EXIF orientation applied (facemoe.imagefile, which rotates JPEGs as a
viewer shows them), and becomes a ``Frame`` marked ``still``: the pipeline then reports one result per face
instead of tracking (a track needs several frames; see docs/EVENTS.md, ``image`` and ``face`` events).
Files in a folder that are not images (by extension) are skipped and counted; an image that does not decode
is skipped, named through ``on_status`` and counted as corrupt.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from facemoe import imagefile
from facemoe.errors import InputError

# The formats OpenCV's image codecs read (builds without one fail to decode and are counted, not fatal).
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".dib", ".webp", ".tif", ".tiff", ".jp2", ".pbm", ".pgm", ".ppm"}
    | {".pnm", ".pxm", ".sr", ".ras", ".hdr", ".pic", ".exr", ".avif"}
)


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def is_still_source(path: Path) -> bool:
    """A folder, or a file whose extension names an image format."""
    return path.is_dir() or (path.is_file() and is_image_file(path))


def _natural_key(name: str) -> list[object]:
    # img2 before img10, as file browsers sort; ties broken by the plain name.
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)] + [name]


def list_images(folder: Path) -> tuple[list[Path], list[Path]]:
    """(images in natural name order, other files); sub-folders and hidden files are ignored."""
    try:
        entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    except PermissionError:
        raise InputError(f"{folder}: permission denied") from None
    files = sorted((p for p in entries if p.is_file()), key=lambda p: _natural_key(p.name))
    return [p for p in files if is_image_file(p)], [p for p in files if not is_image_file(p)]


def read_image(path: Path) -> np.ndarray | None:
    """Decode ``path`` as 8-bit BGR with its EXIF orientation applied; None when it does not decode."""
    try:
        return imagefile.read_image(path)
    except InputError:
        return None


class ImageFiles:
    """The images of ``path`` (a file or a folder); ``open`` decodes the first one, so errors come early."""

    def __init__(self, path: Path, on_status: Callable[[str], None] | None = None) -> None:
        self.path = path
        self.on_status = on_status or (lambda _msg: None)
        if not path.exists():
            raise InputError(f"{path}: no such file")
        if not os.access(path, os.R_OK):
            raise InputError(f"{path}: permission denied")
        if path.is_dir():
            self.images, self.not_images = list_images(path)
            if not self.images:
                extra = f" ({len(self.not_images)} other files)" if self.not_images else ""
                raise InputError(f"{path}: is a directory with no images{extra}; expected a video, image or folder")
        else:
            if path.stat().st_size == 0:
                raise InputError(f"{path}: file is empty")
            self.images, self.not_images = [path], []
        self.unreadable: list[Path] = []
        self._first: tuple[int, np.ndarray] | None = None

    @property
    def folder(self) -> bool:
        return self.path.is_dir()

    def open(self) -> tuple[int, np.ndarray, float]:
        """Decode up to the first readable image: (its position, the image, decode seconds)."""
        if self.not_images:
            count = len(self.not_images)
            self.on_status(
                f"skipping {count} file{'s' if count > 1 else ''} that {'are' if count > 1 else 'is'} "
                f"not an image (by extension) in {self.path}"
            )
        start = time.perf_counter()
        for position, image_path in enumerate(self.images):
            image = read_image(image_path)
            if image is not None:
                self._first = (position, image)
                return position, image, time.perf_counter() - start
            self._skip(image_path)
        what = "the image" if not self.folder else f"none of the {len(self.images)} images"
        raise InputError(f"{self.path}: {what} could not be decoded (corrupt, truncated or unsupported format)")

    def _skip(self, path: Path) -> None:
        self.unreadable.append(path)
        self.on_status(f"skipping {path}: cannot be decoded as an image")

    def __iter__(self) -> Iterator[tuple[int, Path, np.ndarray, float]]:
        """(position in the sorted list, path, image, decode seconds) for each readable image."""
        if self._first is None:
            self.open()
        assert self._first is not None
        start, image = self._first
        self._first = None
        yield start, self.images[start], image, 0.0
        for position in range(start + 1, len(self.images)):
            t0 = time.perf_counter()
            decoded = read_image(self.images[position])
            seconds = time.perf_counter() - t0
            if decoded is None:
                self._skip(self.images[position])
                continue
            yield position, self.images[position], decoded, seconds


__all__ = ["IMAGE_SUFFIXES", "ImageFiles", "is_image_file", "is_still_source", "list_images", "read_image"]
