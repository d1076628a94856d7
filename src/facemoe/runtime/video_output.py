"""Checks on the annotated video: is the finished file playable, and leftovers of killed runs.

OpenCV's video writer reports no write errors: on a full disk it keeps accepting frames and leaves a file
without its index (MP4 ``moov``) or cut short. The file is therefore opened again after it is closed, and
only published under its final name when it holds every frame (see docs/EVENTS.md, "Outputs").
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import cv2


def video_problem(path: str | Path, frames: int) -> str | None:
    """Why the video at ``path`` is not a complete, playable video of ``frames`` frames; None when it is."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return "the video file is empty"
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            return "the video file is unplayable (its index is missing)"
        count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        # One more frame than counted is whole: Ctrl-C can land between the writer's write and the count.
        if 0 < count < frames:
            return f"the video file holds {count} of {frames} frames"
        # Seeking to the last frame is quick; a file cut short fails it (or OpenCV ignores the seek and the
        # position does not move), and only then are the frames counted one by one.
        cap.set(cv2.CAP_PROP_POS_FRAMES, max(0, frames - 1))
        ok, _ = cap.read()
        if ok and int(cap.get(cv2.CAP_PROP_POS_FRAMES)) == frames:
            return None
    finally:
        cap.release()
    decoded = _count_frames(path, frames)
    if decoded < frames:
        return f"the video file is cut short ({decoded} of {frames} frames decode)"
    return None


def _count_frames(path: Path, limit: int) -> int:
    cap = cv2.VideoCapture(str(path))
    count = 0
    try:
        while count < limit and cap.grab():
            count += 1
    finally:
        cap.release()
    return count


def partial_name(target: str | Path, pid: int | None = None) -> Path:
    """The hidden name a video is written under until it is complete (the extension picks the container)."""
    target = Path(target)
    return target.with_name(f".{target.stem}.partial-{os.getpid() if pid is None else pid}{target.suffix}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_partials(target: str | Path) -> list[Path]:
    """Delete partial videos for ``target`` left by runs that were killed (their process is gone)."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    pattern = re.compile(rf"^\.{re.escape(target.stem)}\.partial-(\d+){re.escape(target.suffix)}$")
    removed = []
    for entry in target.parent.iterdir():
        match = pattern.match(entry.name)
        if match is None or int(match.group(1)) == os.getpid() or _alive(int(match.group(1))):
            continue
        try:
            entry.unlink()
        except OSError:
            continue
        removed.append(entry)
    return removed


__all__ = ["partial_name", "remove_stale_partials", "video_problem"]
