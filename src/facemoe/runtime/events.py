"""JSON Lines event output (schema in docs/EVENTS.md), one object per line, flushed as written.

Flushing each line lets ``tail -f`` and log shippers follow a live run, and leaves a valid file up to the
last complete line if the process is killed.
"""

from __future__ import annotations

import json
import math
import sys
from collections import Counter
from pathlib import Path
from typing import IO, Any

import numpy as np

from facemoe.errors import InputError

SCHEMA_VERSION = 1


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, (np.floating, float)):
        number = float(value)
        return round(number, 4) if math.isfinite(number) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def face_fields(frame: int, timestamp: float, box: np.ndarray, landmarks: np.ndarray, score: float) -> dict[str, Any]:
    """Where a face was: frame index, media time (s), box x1 y1 x2 y2, 5 landmarks, detection score (px)."""
    return {
        "frame": int(frame),
        "time": round(float(timestamp), 4),
        "box": [round(float(v), 2) for v in np.asarray(box).reshape(4)],
        "landmarks": [[round(float(x), 2), round(float(y), 2)] for x, y in np.asarray(landmarks).reshape(5, 2)],
        "score": round(float(score), 4),
    }


class EventWriter:
    """Writes events to a file, to stdout (``-``), or nowhere (``None``, still counted)."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = None if path is None else str(path)
        self.counts: Counter[str] = Counter()
        self._handle: IO[str] | None = None
        self._owns = False
        if self.path == "-":
            self._handle = sys.stdout
        elif self.path is not None:
            target = Path(self.path)
            if target.is_dir():
                raise InputError(f"{target}: is a directory, expected an events file path")
            target.parent.mkdir(parents=True, exist_ok=True)
            self._handle = open(target, "w", encoding="utf-8")  # noqa: SIM115 - lives as long as the run
            self._owns = True

    def emit(self, event: str, **fields: Any) -> dict[str, Any]:
        record = {"event": event, **_plain(fields)}
        self.counts[event] += 1
        if self._handle is not None:
            self._handle.write(json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n")
            self._handle.flush()
        return record

    def close(self) -> None:
        if self._handle is not None and self._owns:
            self._handle.close()
        self._handle = None

    def __enter__(self) -> EventWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


__all__ = ["SCHEMA_VERSION", "EventWriter", "face_fields"]
