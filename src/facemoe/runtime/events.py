"""JSON Lines event output (schema in docs/EVENTS.md), one object per line, written as it happens.

Each line goes to the file in one unbuffered write, so ``tail -f`` and log shippers follow a live run and a
killed process leaves a valid file up to its last line. A write that fails part-way (a full disk) is cut
back to the previous line: every line of an events file is a complete JSON object, or absent.
"""

from __future__ import annotations

import errno
import json
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from facemoe.errors import InputError, OutputError

SCHEMA_VERSION = 2
# The file layer every events line goes through (tests put a full disk here).
_os_write = os.write


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


def default_events_path(directory: str | Path = ".", now: float | None = None) -> Path:
    """``events-YYYYmmdd-HHMMSS.jsonl`` in ``directory`` (``-2``, ``-3``... when taken): never an existing file."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    base = Path(directory) / f"events-{stamp}"
    path, n = base.with_suffix(".jsonl"), 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}.jsonl")
    return path


class EventWriter:
    """Writes events to a file, to stdout (``-``), or nowhere (``None``, still counted).

    The first failed write raises ``OutputError`` so the run stops; afterwards events are only counted
    (``lost``), except ``run_ended``, which is still tried so the file says how the run ended when space
    allows. ``overwrite=False`` refuses an existing file at open time (exclusive create).
    """

    def __init__(self, path: str | Path | None, *, overwrite: bool = True) -> None:
        self.path = None if path is None else str(path)
        self.counts: Counter[str] = Counter()
        # Called with each record as it is emitted, written or not (runtime.metrics, runtime.mqtt_sink);
        # each must return at once and never raise.
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        # Called before run_ended is written; the fields they return are added to it (runtime.mqtt_sink).
        self.closing: list[Callable[[], dict[str, Any]]] = []
        self.lost = 0
        self.error: str | None = None
        self._fd: int | None = None
        self._offset = 0
        self._stdout = self.path == "-"
        if self.path is not None and not self._stdout:
            target = Path(self.path)
            if target.is_dir():
                raise InputError(f"{target}: is a directory, expected an events file path")
            target.parent.mkdir(parents=True, exist_ok=True)
            flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
            if target.exists() and not target.is_file():
                flags = os.O_WRONLY  # a FIFO or device (a log shipper's pipe) is written to, not replaced
            try:
                self._fd = os.open(target, flags, 0o666)
            except FileExistsError:
                raise OutputError(f"{target}: already exists (pass --overwrite to replace it)") from None
            except OSError as exc:
                raise OutputError(f"{target}: cannot create the events file: {exc.strerror}") from None

    def emit(self, event: str, **fields: Any) -> dict[str, Any]:
        if event == "run_ended":
            for hook in self.closing:
                fields.update(hook())
        # Every event names its source (docs/EVENTS.md#several-sources); run-level events carry null.
        source = fields.pop("source", None)
        record = {"event": event, "source": source, **_plain(fields)}
        self.counts[event] += 1
        for listener in self.listeners:
            listener(record)
        if self.error is not None and event != "run_ended":
            self.lost += 1
            return record
        line = json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n"
        try:
            self._write(line)
        except OSError as exc:
            self.lost += 1
            first = self.error is None
            self.error = f"{self.path if not self._stdout else 'stdout'}: cannot write events: {exc.strerror or exc}"
            if first:
                raise OutputError(self.error + "; every line written before is complete") from None
        return record

    def _write(self, line: str) -> None:
        if self._stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            return
        if self._fd is None:
            return
        data = memoryview(line.encode("utf-8"))
        done = 0
        try:
            while done < len(data):
                written = _os_write(self._fd, data[done:])
                if written == 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                done += written
        except OSError:
            # Cut a partly written line back off: the file keeps only complete lines.
            try:
                os.ftruncate(self._fd, self._offset)
                os.lseek(self._fd, self._offset, os.SEEK_SET)
            except OSError:
                pass
            raise
        self._offset += done

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd = None

    def __enter__(self) -> EventWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


__all__ = ["SCHEMA_VERSION", "EventWriter", "default_events_path", "face_fields"]
