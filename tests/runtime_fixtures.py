"""Helpers and fixtures shared by the runtime tests (detection, tracking, gallery, pipeline, CLI).

The tiny-preset bundle comes from conftest's session fixture ``tiny_bundle``; the fixtures here build
material on top of it once per session (module-level caches, since a fixture imported into several test
modules would otherwise run once per module).
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]
SAMPLE_VIDEO = REPO / "src" / "facemoe" / "data" / "carphone_pristine.mp4"
TOM_HANKS = Path(__file__).parent / "data" / "Tom_Hanks_54745.png"
_SCRATCH = Path(tempfile.mkdtemp(prefix="facemoe-runtime-tests-"))
atexit.register(shutil.rmtree, _SCRATCH, ignore_errors=True)


@functools.lru_cache(maxsize=1)
def sample_frames() -> tuple[np.ndarray, ...]:
    cap = cv2.VideoCapture(str(SAMPLE_VIDEO))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    assert len(frames) == 120, f"sample video decoded to {len(frames)} frames"
    return tuple(frames)


def tom_hanks() -> np.ndarray:
    image = cv2.imread(str(TOM_HANKS))
    assert image is not None and image.shape == (112, 112, 3)
    return image


def padded_tom(pad: int = 40, scale: float = 1.0, value: int = 127) -> np.ndarray:
    """The aligned reference crop on a flat border, optionally rescaled (the face then fills less of it)."""
    big = cv2.copyMakeBorder(tom_hanks(), pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=(value,) * 3)
    if scale != 1.0:
        big = cv2.resize(big, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
    return big


def write_video(path: Path, frames: Sequence[np.ndarray], fps: float = 30.0, fourcc: str = "mp4v") -> Path:
    height, width = frames[0].shape[:2]
    is_colour = frames[0].ndim == 3
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*fourcc), fps, (width, height), is_colour)
    assert writer.isOpened(), f"cannot write {path}"
    for frame in frames:
        writer.write(frame)
    writer.release()
    return path


def read_video(path: Path) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    return frames


def read_events(path: Path) -> list[dict[str, Any]]:
    """Parse a JSON Lines file strictly: every line one JSON object with an ``event`` field."""
    text = Path(path).read_text(encoding="utf-8")
    assert text.endswith("\n"), "events file does not end with a newline (unflushed or cut line)"
    events = []
    for number, line in enumerate(text.splitlines(), start=1):
        record = json.loads(line)
        assert isinstance(record, dict) and "event" in record, f"line {number} is not an event: {line[:80]}"
        events.append(record)
    return events


def face_patch(image: np.ndarray, box: Sequence[float], margin: float = 0.6) -> np.ndarray:
    """A square patch around ``box`` (with margin), for pasting a face into synthetic scenes."""
    x1, y1, x2, y2 = box
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    half = max(x2 - x1, y2 - y1) * (1 + margin) / 2
    h, w = image.shape[:2]
    a, b = int(max(0, cx - half)), int(max(0, cy - half))
    c, d = int(min(w, cx + half)), int(min(h, cy + half))
    return image[b:d, a:c].copy()


def crossing_scene(size: tuple[int, int] = (320, 200), frames: int = 60) -> tuple[list[np.ndarray], int]:
    """Two faces moving in opposite directions, passing each other with partial overlap.

    Face A (from the sample video) moves left to right on the upper half, face B (Tom Hanks) right to left
    a little lower; their boxes overlap around the middle frames. Returns the frames and the patch size.
    """
    width, height = size
    face_a = cv2.resize(face_patch(sample_frames()[0], (66, 35, 113, 97), margin=0.3), (80, 80))
    face_b = cv2.resize(tom_hanks(), (80, 80), interpolation=cv2.INTER_AREA)
    background = np.full((height, width, 3), 90, dtype=np.uint8)
    cv2.rectangle(background, (0, height - 30), (width, height), (60, 80, 60), -1)
    out = []
    for i in range(frames):
        t = i / (frames - 1)
        frame = background.copy()
        ax, bx = int(10 + t * (width - 100)), int(width - 90 - t * (width - 100))
        ay, by = 30, 75
        frame[by : by + 80, bx : bx + 80] = face_b
        frame[ay : ay + 80, ax : ax + 80] = face_a  # A passes in front of B
        out.append(frame)
    return out, 80


def invoke(app: Any, args: Sequence[object]) -> Any:
    """Run a typer app in-process; the result has ``exit_code``, ``stdout`` and ``stderr``."""
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


@functools.lru_cache(maxsize=4)
def _people_dir(bundle_key: str) -> Path:
    """DIR/<name>/ images: 'carphone' from frames 0-39 of the sample video, 'tom' from the reference crop."""
    root = _SCRATCH / f"people-{abs(hash(bundle_key))}"
    if root.exists():
        shutil.rmtree(root)
    (root / "carphone").mkdir(parents=True)
    (root / "tom").mkdir(parents=True)
    frames = sample_frames()
    for i in range(0, 40, 8):
        cv2.imwrite(str(root / "carphone" / f"frame{i:03d}.png"), frames[i])
    cv2.imwrite(str(root / "tom" / "padded.png"), padded_tom(40))
    cv2.imwrite(str(root / "tom" / "scaled.jpg"), padded_tom(60, 1.5))
    return root


@pytest.fixture
def people_dir() -> Path:
    return _people_dir("people")


@functools.lru_cache(maxsize=4)
def _gallery(bundle: str) -> Path:
    from facemoe.cli.enroll_cmd import app

    out = _SCRATCH / f"gallery-{abs(hash(bundle))}.npz"
    result = invoke(app, ["--images", _people_dir("people"), "--bundle", bundle, "--out", out])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def gallery_file(tiny_bundle: Path) -> Path:
    """Gallery with 'carphone' (frames 0-39 of the sample) and 'tom', enrolled with the tiny bundle."""
    return _gallery(str(tiny_bundle))


@functools.lru_cache(maxsize=1)
def second_half_video() -> Path:
    """Frames 60-119 of the sample: the person of the gallery's 'carphone' entry, in other frames."""
    return write_video(_SCRATCH / "second_half.mp4", sample_frames()[60:], fps=29.97)


__all__ = [
    "SAMPLE_VIDEO",
    "TOM_HANKS",
    "crossing_scene",
    "error_lines",
    "face_patch",
    "gallery_file",
    "invoke",
    "padded_tom",
    "people_dir",
    "read_events",
    "read_video",
    "sample_frames",
    "second_half_video",
    "tom_hanks",
    "write_video",
]
