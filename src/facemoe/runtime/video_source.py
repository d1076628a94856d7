"""Frame sources: video files, network streams (RTSP / HTTP), webcams and still images, through OpenCV.

Files are read synchronously, every frame. Live sources (streams, webcams, and files with ``realtime``)
are read by a background thread that keeps only the newest frame: when processing is slower than the
source, frames are dropped and counted instead of queueing up latency. Streams that fail after they have
started are reopened with exponential back-off. An image file or a folder of images is read by
``runtime.image_source`` and yields frames marked ``still`` (one result per face, no tracking).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np

from facemoe.errors import InputError
from facemoe.runtime.image_source import ImageFiles, is_still_source

STREAM_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "tcp://", "srt://")
# Consecutive failed reads tolerated inside a file before it is treated as ended (corrupt stretch).
MAX_CORRUPT_RUN = 25


class Capture(Protocol):
    def isOpened(self) -> bool: ...  # noqa: N802 - OpenCV's name
    def read(self) -> tuple[bool, np.ndarray | None]: ...
    def get(self, prop: int) -> float: ...
    def release(self) -> None: ...


@dataclass
class Frame:
    index: int  # position in the source; frames dropped on live sources leave gaps
    timestamp: float  # seconds: media time for files, time since start for live sources
    image: np.ndarray  # as decoded; the pipeline normalises channels and depth
    path: str | None = None  # the file this frame came from (image, or video file)
    still: bool = False  # a photo: its faces are reported one by one instead of tracked


@dataclass
class SourceStats:
    decoded: int = 0
    dropped: int = 0
    corrupt: int = 0
    reconnects: int = 0
    decode_seconds: float = 0.0
    ended_early: bool = False


def parse_source(spec: str) -> tuple[str, str | int]:
    """``("webcam", 0)``, ``("stream", url)`` or ``("file", path)``."""
    text = spec.strip()
    if text.isdigit():
        return "webcam", int(text)
    if text.lower().startswith(STREAM_SCHEMES):
        return "stream", text
    return "file", text


def check_video_file(path: Path) -> None:
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected a video file")
    if not os.access(path, os.R_OK):
        raise InputError(f"{path}: permission denied")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: file is empty")


def _default_opener(kind: str, target: str | int, timeout_ms: int) -> Callable[[], Capture]:
    def open_capture() -> Capture:
        if kind == "webcam":
            return cv2.VideoCapture(int(target))
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, timeout_ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, timeout_ms]
        return cv2.VideoCapture(str(target), cv2.CAP_FFMPEG, params)

    return open_capture


class VideoSource:
    """Iterate ``Frame``s from ``spec`` (video path, URL, webcam index, image file or folder of images)."""

    def __init__(
        self,
        spec: str,
        *,
        realtime: bool = False,
        reconnect_attempts: int = 10,
        backoff_initial: float = 0.5,
        backoff_max: float = 10.0,
        timeout_s: float = 10.0,
        opener: Callable[[], Capture] | None = None,
        on_status: Callable[[str], None] | None = None,
    ) -> None:
        self.spec = spec
        self.kind, self.target = parse_source(spec)
        self.live = self.kind != "file" or realtime
        self.realtime = realtime
        self.reconnect_attempts = reconnect_attempts
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.stats = SourceStats()
        self.on_status = on_status or (lambda _msg: None)
        self._images: ImageFiles | None = None
        if self.kind == "file" and opener is None:
            path = Path(str(self.target))
            if is_still_source(path):
                self._images = ImageFiles(path, self.on_status)
                self.kind = "images" if path.is_dir() else "image"
                self.live = False
            else:
                check_video_file(path)
        self._opener = opener or _default_opener(self.kind, self.target, int(timeout_s * 1000))
        self._cap: Capture | None = None
        self._first: np.ndarray | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._cond = threading.Condition()
        self._latest: Frame | None = None
        self._finished = False
        self._error: str | None = None
        self.fps = 0.0
        self.width = 0
        self.height = 0
        self.frame_count = 0

    # -- opening -------------------------------------------------------------------------------------
    def open(self) -> VideoSource:
        """Open and decode the first frame, so a bad source fails here with a clear message."""
        if self._images is not None:
            _, image, seconds = self._images.open()
            self.stats.decode_seconds += seconds
            self.height, self.width = image.shape[:2]
            self.frame_count = len(self._images.images)
            return self
        cap = self._opener()
        if not cap.isOpened():
            cap.release()
            raise InputError(self._open_failure())
        t0 = time.perf_counter()
        ok, image = cap.read()
        self.stats.decode_seconds += time.perf_counter() - t0
        if not ok or image is None:
            cap.release()
            raise InputError(
                f"{self.spec}: opened but no frame could be decoded (unsupported codec, or corrupt / truncated file)"
                if self.kind == "file"
                else f"{self.spec}: opened but no frame arrived"
            )
        self._cap = cap
        self._first = image
        fps = cap.get(cv2.CAP_PROP_FPS)
        self.fps = float(fps) if np.isfinite(fps) and 0 < fps < 1000 else 0.0
        self.height, self.width = image.shape[:2]
        count = cap.get(cv2.CAP_PROP_FRAME_COUNT)
        self.frame_count = int(count) if np.isfinite(count) and count > 0 else 0
        return self

    def _open_failure(self) -> str:
        if self.kind == "webcam":
            return f"webcam {self.target}: cannot open the camera (no such device, or in use)"
        if self.kind == "stream":
            return f"{self.spec}: cannot open the stream (unreachable, refused, or not a video stream)"
        return (
            f"{self.spec}: cannot open as a video (not a video, an unsupported container or codec, or a truncated file)"
        )

    def describe(self) -> str:
        size = f"{self.width}x{self.height}"
        fps = f"{self.fps:.2f} fps" if self.fps else "unknown fps"
        count = f", {self.frame_count} frames" if self.frame_count and self.kind == "file" else ""
        live = ", live" if self.live else ""
        if self._images is not None:
            if not self._images.folder:
                return f"image {self.spec} ({size})"
            return f"images {self.spec} ({self.frame_count} images, the first {size})"
        return f"{self.kind} {self.spec} ({size}, {fps}{count}{live})"

    # -- iteration -----------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Frame]:
        if self._images is not None:
            return self._iter_images(self._images)
        if self._cap is None and self._first is None:
            self.open()
        if self.live:
            return self._iter_live()
        return self._iter_file()

    def _timestamp(self, index: int) -> float:
        return index / self.fps if self.fps else 0.0

    def _iter_file(self) -> Iterator[Frame]:
        assert self._cap is not None
        index = 0
        first, self._first = self._first, None
        if first is not None:
            self.stats.decoded += 1
            yield Frame(0, 0.0, first, path=self.spec)
        corrupt_run = 0
        while not self._stop.is_set():
            index += 1
            t0 = time.perf_counter()
            ok, image = self._cap.read()
            self.stats.decode_seconds += time.perf_counter() - t0
            if ok and image is not None:
                # Failed reads followed by a good one were damaged frames, not the end of the file.
                self.stats.corrupt += corrupt_run
                corrupt_run = 0
                self.stats.decoded += 1
                yield Frame(index, self._timestamp(index), image, path=self.spec)
                continue
            if self.frame_count and index < self.frame_count - 1 and corrupt_run < MAX_CORRUPT_RUN:
                corrupt_run += 1
                continue
            if self.frame_count and self.stats.decoded + self.stats.corrupt < self.frame_count - 1:
                self.stats.ended_early = True
            return

    def _iter_images(self, images: ImageFiles) -> Iterator[Frame]:
        for position, path, image, seconds in images:
            self.stats.decode_seconds += seconds
            self.stats.decoded += 1
            self.stats.corrupt = len(images.unreadable)
            yield Frame(position, 0.0, image, path=str(path), still=True)
            if self._stop.is_set():
                return
        self.stats.corrupt = len(images.unreadable)

    def _iter_live(self) -> Iterator[Frame]:
        self._thread = threading.Thread(target=self._reader, name="facemoe-video-reader", daemon=True)
        self._thread.start()
        while True:
            with self._cond:
                while self._latest is None and not self._finished:
                    self._cond.wait(timeout=0.5)
                frame, self._latest = self._latest, None
                finished, error = self._finished, self._error
            if frame is not None:
                yield frame
            elif finished:
                if error:
                    raise InputError(error)
                return

    def _publish(self, frame: Frame) -> None:
        with self._cond:
            if self._latest is not None:
                self.stats.dropped += 1
            self._latest = frame
            self._cond.notify()

    def _finish(self, error: str | None = None) -> None:
        with self._cond:
            self._finished = True
            self._error = error
            self._cond.notify()

    def _reader(self) -> None:
        cap = self._cap
        index = 0
        start = time.monotonic()
        first, self._first = self._first, None
        if first is not None:
            self.stats.decoded += 1
            self._publish(Frame(0, 0.0, first))
        try:
            while not self._stop.is_set():
                if cap is None:
                    cap = self._reconnect()
                    if cap is None:
                        return
                t0 = time.perf_counter()
                ok, image = cap.read()
                self.stats.decode_seconds += time.perf_counter() - t0
                if ok and image is not None:
                    index += 1
                    self.stats.decoded += 1
                    if self.realtime and self.kind == "file" and self.fps:
                        # Pace a file like a camera: a frame is available only once its time has come.
                        delay = start + index / self.fps - time.monotonic()
                        if delay > 0 and self._stop.wait(delay):
                            return
                    timestamp = index / self.fps if self.kind == "file" and self.fps else time.monotonic() - start
                    self._publish(Frame(index, timestamp, image))
                    continue
                if self.kind == "file" or (self.frame_count and index >= self.frame_count - 1):
                    return  # the end of a finite file, not a broken stream
                cap.release()
                cap = None
                self._cap = None
        except Exception as exc:  # the consumer must hear of it, a dying thread would hang the run
            self._error = f"{self.spec}: reading failed: {exc}"
        finally:
            if cap is not None:
                cap.release()
            self._cap = None
            self._finish(self._error)

    def _reconnect(self) -> Capture | None:
        attempt = 0
        while not self._stop.is_set():
            attempt += 1
            if self.reconnect_attempts >= 0 and attempt > self.reconnect_attempts:
                self._error = f"{self.spec}: source lost, gave up after {self.reconnect_attempts} reconnect attempts"
                return None
            delay = min(self.backoff_max, self.backoff_initial * (2 ** (attempt - 1)))
            limit = "unlimited" if self.reconnect_attempts < 0 else str(self.reconnect_attempts)
            self.on_status(f"source lost; reconnecting in {delay:.1f} s (attempt {attempt}/{limit})")
            if self._stop.wait(delay):
                return None
            cap = self._opener()
            if cap.isOpened():
                self.stats.reconnects += 1
                self.on_status("source reconnected")
                return cap
            cap.release()
        return None

    def stop(self) -> None:
        """Ask the iteration (and a live source's reader) to end soon; ``close`` releases the capture."""
        self._stop.set()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)
        if self._cap is not None and (self._thread is None or not self._thread.is_alive()):
            self._cap.release()
            self._cap = None

    def __enter__(self) -> VideoSource:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


__all__ = ["Frame", "SourceStats", "VideoSource", "check_video_file", "parse_source"]
