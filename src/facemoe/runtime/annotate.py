"""Annotated video output: boxes, landmarks, track ids, names and similarities drawn on each frame.

The video is written under a temporary name and renamed when closed, so an interrupted run never leaves a
file that looks complete but has no index (an MP4 without its ``moov`` atom does not play).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from facemoe.errors import InputError, OutputError
from facemoe.runtime.gallery import UNKNOWN
from facemoe.runtime.tracking import Track
from facemoe.runtime.video_output import partial_name, video_problem

_FOURCC_BY_SUFFIX = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".avi": "MJPG", ".mkv": "MJPG"}


def _colour(track_id: int) -> tuple[int, int, int]:
    # Golden-ratio hue steps keep neighbouring ids visually distinct.
    hue = int((track_id * 0.618033988749895 % 1.0) * 180)
    bgr = cv2.cvtColor(np.array([[[hue, 200, 255]]], dtype=np.uint8), cv2.COLOR_HSV2BGR)[0, 0]
    return int(bgr[0]), int(bgr[1]), int(bgr[2])


@dataclass
class FaceMark:
    """One face to draw: where it was in its frame, its colour key and tag, and its label once known."""

    box: np.ndarray
    landmarks: np.ndarray
    key: int  # colour: the track id, or the face number in a still image
    tag: str  # "#3" for track 3
    identity: str | None = None  # None: not decided (nothing after the tag)
    similarity: float | None = None
    track: Track | None = None  # when set, the label is looked up in the track's decisions at draw time


def track_marks(tracks: list[Track], frame_index: int) -> list[FaceMark]:
    """Marks for the confirmed tracks seen in this frame, their boxes copied as they are now."""
    return [
        FaceMark(t.box.copy(), np.array(t.landmarks, copy=True), t.track_id, f"#{t.track_id}", track=t)
        for t in tracks
        if t.last_frame == frame_index and t.track_id is not None
    ]


def label_text(mark: FaceMark) -> str:
    if mark.identity is None:
        return mark.tag
    if mark.identity == UNKNOWN or mark.similarity is None:
        return f"{mark.tag} {mark.identity}"
    return f"{mark.tag} {mark.identity} {mark.similarity:.2f}"


def draw_marks(frame: np.ndarray, marks: list[FaceMark]) -> np.ndarray:
    """Draw ``marks`` onto a copy of ``frame``: box, landmarks, and a filled label above the box."""
    out = frame.copy()
    height = out.shape[0]
    scale = max(0.3, min(1.2, height / 720))
    thickness = max(1, round(height / 360))
    for mark in marks:
        colour = _colour(mark.key)
        x1, y1, x2, y2 = (round(float(v)) for v in mark.box)
        cv2.rectangle(out, (x1, y1), (x2, y2), colour, thickness)
        for x, y in np.asarray(mark.landmarks).reshape(5, 2):
            cv2.circle(out, (round(float(x)), round(float(y))), thickness, (0, 255, 0), -1)
        label = label_text(mark)
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        top = max(0, y1 - th - base - 2)
        cv2.rectangle(out, (x1, top), (x1 + tw + 2, top + th + base + 2), colour, -1)
        cv2.putText(out, label, (x1 + 1, top + th + 1), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return out


def draw_tracks(frame: np.ndarray, tracks: list[Track], frame_index: int) -> np.ndarray:
    """Draw the tracks seen in this frame, labelled with their current identity, onto a copy of ``frame``."""
    marks = track_marks(tracks, frame_index)
    for mark in marks:
        assert mark.track is not None
        mark.identity, mark.similarity, mark.track = mark.track.identity, mark.track.similarity, None
    return draw_marks(frame, marks)


def _letterbox(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    width, height = size
    ratio = min(width / frame.shape[1], height / frame.shape[0])
    fitted = (max(1, round(frame.shape[1] * ratio)), max(1, round(frame.shape[0] * ratio)))
    resized = cv2.resize(frame, fitted, interpolation=cv2.INTER_AREA if ratio < 1 else cv2.INTER_LINEAR)
    out = np.zeros((height, width, 3), dtype=np.uint8)
    x, y = (width - fitted[0]) // 2, (height - fitted[1]) // 2
    out[y : y + fitted[1], x : x + fitted[0]] = resized
    return out


class VideoAnnotator:
    """Writes annotated frames to ``path`` (.mp4 / .avi / .mkv)."""

    def __init__(self, path: str | Path, fps: float, size: tuple[int, int]) -> None:
        self.path = Path(path)
        suffix = self.path.suffix.lower()
        if suffix not in _FOURCC_BY_SUFFIX:
            raise InputError(f"{self.path}: unsupported video extension; use one of {', '.join(_FOURCC_BY_SUFFIX)}")
        if self.path.is_dir():
            raise InputError(f"{self.path}: is a directory, expected a video file path")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # The temporary name keeps the extension: OpenCV picks the container from it.
        self.tmp = partial_name(self.path)
        self.size = size
        self.fps = fps if fps and fps > 0 else 25.0
        fourcc = cv2.VideoWriter.fourcc(*_FOURCC_BY_SUFFIX[suffix])
        self.writer = cv2.VideoWriter(str(self.tmp), fourcc, self.fps, size)
        if not self.writer.isOpened():
            self.tmp.unlink(missing_ok=True)
            raise InputError(f"{self.path}: cannot create the video (OpenCV has no {suffix} writer here)")
        self.frames = 0

    def write(self, frame: np.ndarray) -> None:
        if (frame.shape[1], frame.shape[0]) != self.size:
            # A stream that changed resolution (reconnect), or photos of several sizes: the container needs
            # one size, so the frame is fitted into it with its aspect ratio kept (black borders).
            frame = _letterbox(frame, self.size)
        self.writer.write(frame)
        self.frames += 1

    def close(self, keep: bool = True) -> Path | None:
        if self.writer is None:
            return None
        self.writer.release()
        self.writer = None  # type: ignore[assignment]
        if keep and self.frames:
            # The writer reports no errors (a full disk): publish the file only if it plays to the end.
            problem = video_problem(self.tmp, self.frames)
            if problem is not None:
                self.tmp.unlink(missing_ok=True)
                raise OutputError(f"{self.path}: not written, {problem} (disk full?)")
            os.replace(self.tmp, self.path)
            return self.path
        self.tmp.unlink(missing_ok=True)
        return None


__all__ = ["FaceMark", "VideoAnnotator", "draw_marks", "draw_tracks", "label_text", "track_marks"]
