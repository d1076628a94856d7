"""What a run reads: one ``SourceSpec`` per source, from ``--video`` and ``--sources FILE`` (YAML or JSON).

A sources file is a list of entries (or a mapping with a ``sources`` list); each entry is a string (the
video) or a mapping ``{id, url | path, realtime, det_size, roi: [x, y, w, h], reconnect_attempts}``
(docs/EVENTS.md#several-sources). Ids default to the file or URL name stem (``webcam<N>`` for a webcam);
a repeated id gets ``-2``, ``-3``...; ids are one MQTT topic level, so ``/ + #`` are refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from facemoe.errors import InputError

ENTRY_KEYS = {"id", "url", "path", "video", "realtime", "det_size", "roi", "reconnect_attempts"}
MIN_DET_SIZE = 32


@dataclass
class SourceSpec:
    video: str
    id: str | None = None
    realtime: bool | None = None  # None: the run's --realtime
    det_size: int | None = None  # None: the run's --det-size
    roi: tuple[int, int, int, int] | None = None  # x, y, width, height in frame pixels
    reconnect_attempts: int | None = None  # None: the run's --reconnect-attempts


RESERVED_IDS = ("_run", "_all")  # the run's own MQTT topic level; the metrics label of what sources share


def default_id(video: str) -> str:
    """A file's or URL's name stem, ``webcam<N>`` for a webcam index."""
    text = video.strip()
    if text.isdigit():
        return f"webcam{int(text)}"
    if "://" in text:
        parts = urlsplit(text)
        return Path(parts.path).stem or parts.hostname or "stream"
    return Path(text.rstrip("/")).stem or "source"


def check_id(source_id: str, where: str) -> str:
    if not source_id or any(c in "/+#" or ord(c) < 32 for c in source_id):
        raise InputError(f"{where}: source id {source_id!r} may not be empty nor contain / + # or control characters")
    if source_id in RESERVED_IDS:
        raise InputError(f"{where}: source id {source_id!r} is reserved (the run's own MQTT topic / metrics label)")
    return source_id


def assign_ids(specs: list[SourceSpec]) -> list[SourceSpec]:
    """Fill missing ids from the video, never taking an id given explicitly (or a reserved one); ids
    derived twice get ``-2``, ``-3``...; the same explicit id on two sources is refused."""
    explicit: set[str] = set()
    for spec in specs:
        if spec.id is not None:
            if spec.id in explicit:
                raise InputError(f"--sources/--video: source id {spec.id!r} is given to two sources (ids are unique)")
            explicit.add(spec.id)
    used = set(explicit) | set(RESERVED_IDS)
    for spec in specs:
        if spec.id is not None:
            continue
        base = "".join("_" if c in "/+#" or ord(c) < 32 else c for c in default_id(spec.video))
        candidate, number = base, 1
        while candidate in used:
            number += 1
            candidate = f"{base}-{number}"
        used.add(candidate)
        spec.id = candidate
    return specs


def _entry(raw: Any, where: str) -> SourceSpec:
    if isinstance(raw, (str, int)) and not isinstance(raw, bool):
        return SourceSpec(str(raw))
    if not isinstance(raw, dict):
        raise InputError(f"{where}: expected a video (string) or a mapping with 'url' or 'path'")
    unknown = sorted(set(map(str, raw)) - ENTRY_KEYS)
    if unknown:
        raise InputError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(ENTRY_KEYS))})")
    videos = [raw[k] for k in ("url", "path", "video") if k in raw]
    if len(videos) != 1 or not isinstance(videos[0], (str, int)) or isinstance(videos[0], bool):
        raise InputError(f"{where}: needs exactly one of 'url' or 'path' (a string)")
    spec = SourceSpec(str(videos[0]).strip())
    if not spec.video:
        raise InputError(f"{where}: 'url' / 'path' is empty")
    if "id" in raw:
        if not isinstance(raw["id"], (str, int)) or isinstance(raw["id"], bool):
            raise InputError(f"{where}: 'id' must be a string")
        spec.id = check_id(str(raw["id"]), where)
    if "realtime" in raw:
        if not isinstance(raw["realtime"], bool):
            raise InputError(f"{where}: 'realtime' must be true or false")
        spec.realtime = raw["realtime"]
    if "det_size" in raw:
        value = raw["det_size"]
        if not isinstance(value, int) or isinstance(value, bool) or value < MIN_DET_SIZE:
            raise InputError(f"{where}: 'det_size' must be an integer >= {MIN_DET_SIZE}")
        spec.det_size = value
    if "reconnect_attempts" in raw:
        value = raw["reconnect_attempts"]
        if not isinstance(value, int) or isinstance(value, bool) or value < -1:
            raise InputError(f"{where}: 'reconnect_attempts' must be an integer >= -1 (-1: forever)")
        spec.reconnect_attempts = value
    if "roi" in raw:
        roi = raw["roi"]
        if (
            not isinstance(roi, list)
            or len(roi) != 4
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in roi)
            or roi[0] < 0
            or roi[1] < 0
            or roi[2] < MIN_DET_SIZE // 2
            or roi[3] < MIN_DET_SIZE // 2
        ):
            raise InputError(f"{where}: 'roi' must be [x, y, width, height] in pixels (x, y >= 0, sides >= 16)")
        spec.roi = (roi[0], roi[1], roi[2], roi[3])
    return spec


def load_sources_file(path: Path) -> list[SourceSpec]:
    """Parse a sources file (``.json``, else YAML); errors name the file and the entry."""
    if not path.is_file():
        raise InputError(f"{path}: no such sources file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the sources file: {exc}") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            problem = getattr(exc, "problem", None) or type(exc).__name__
            raise InputError(f"{path}: not valid YAML: {problem}{at}") from None
    if isinstance(data, dict) and set(data) == {"sources"}:
        data = data["sources"]
    if not isinstance(data, list) or not data:
        raise InputError(f"{path}: expected a non-empty list of sources (or a mapping with a 'sources' list)")
    return [_entry(raw, f"{path}: entry {number}") for number, raw in enumerate(data, start=1)]


__all__ = ["SourceSpec", "assign_ids", "check_id", "default_id", "load_sources_file"]
