"""``facemoe-run``'s process environment: the packaged sample video, quiet OpenCV, SIGTERM as Ctrl-C."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

from facemoe.errors import FaceMoEError

SAMPLE_VIDEO = "carphone_pristine.mp4"
DEMO_WARNING = (
    "[bold yellow]DEMO:[/] this bundle has RANDOM weights, so identities and similarities are meaningless "
    "(tracking and throughput are real). For real recognition get the official weights and export them:\n"
    "  facemoe download --dest weights\n"
    "  facemoe-export --checkpoint weights/model.pt --fp16 --out bundle\n"
    "  facemoe enroll --images people/ --bundle bundle --out gallery.npz\n"
    "  facemoe-run --video VIDEO --bundle bundle --gallery gallery.npz"
)


@contextlib.contextmanager
def sample_video() -> Iterator[Path]:
    ref = resources.files("facemoe") / "data" / SAMPLE_VIDEO
    if not ref.is_file():
        raise FaceMoEError(f"the packaged sample video {SAMPLE_VIDEO} is missing from this installation")
    with resources.as_file(ref) as path:
        yield path


def quiet_opencv() -> None:
    # FFmpeg and OpenCV print a line per damaged packet or failed probe; the run reports those as counts.
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    try:
        import cv2

        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    except (ImportError, AttributeError):
        pass


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (systemd stop, docker stop) and SIGHUP (closed terminal) end the run as cleanly as Ctrl-C."""

    def handler(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    except ValueError:  # not the main thread (e.g. under a test runner thread)
        yield
        return
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


__all__ = ["DEMO_WARNING", "SAMPLE_VIDEO", "quiet_opencv", "sample_video", "sigterm_as_interrupt"]
