"""``facemoe-run``'s sources: ``--video`` (repeatable) and ``--sources FILE``, checked, then opened in parallel.

A source that cannot be opened is reported and the others run; when none opens the run is refused before
any output is made (docs/EVENTS.md#several-sources).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from facemoe.errors import FaceMoEError, InputError
from facemoe.runtime.source_spec import SourceSpec, assign_ids, load_sources_file

VideoOption = Annotated[
    list[str] | None,
    typer.Option(
        "--video",
        "-v",
        metavar="VIDEO",
        help="Video file, rtsp:// or http(s):// URL, or webcam index (0, 1, ...); repeat for several sources.",
    ),
]
SourcesOption = Annotated[
    Path | None,
    typer.Option(
        "--sources",
        metavar="FILE",
        help="YAML or JSON (.json) list of sources: {id, url | path, realtime, det_size, roi, reconnect_attempts}.",
    ),
]
DetectEvery = Annotated[
    int,
    typer.Option(
        min=1,
        help="Run the detector on every N-th frame of a source; the tracker predicts the boxes in between "
        "(faces are embedded only on detected frames, whose landmarks align them).",
    ),
]


@dataclass
class Sources:
    """The opened sources (id -> VideoSource), their specs, and the ones that failed to open."""

    specs: dict[str, SourceSpec] = field(default_factory=dict)
    opened: dict[str, Any] = field(default_factory=dict)
    failed: list[dict[str, Any]] = field(default_factory=list)

    @property
    def live(self) -> bool:
        return any(source.live for source in self.opened.values())

    def close(self) -> None:
        for source in self.opened.values():
            source.close()


def collect_specs(videos: list[str] | None, sources_file: Path | None, demo_video: str | None) -> list[SourceSpec]:
    """Every source asked for, with unique ids; the packaged sample for ``--demo`` without sources."""
    from facemoe.cli.run_checks import check_video_spec

    specs = [SourceSpec(v) for v in videos or []]
    if sources_file is not None:
        specs += load_sources_file(sources_file)
    if not specs and demo_video is not None:
        specs = [SourceSpec(demo_video)]
    for spec in specs:
        check_video_spec(spec.video)
    return assign_ids(specs)


def source_entry(sid: str, source: Any, spec: SourceSpec, det_size: int) -> dict[str, Any]:
    """A source's header: ``source_started`` and its entry in ``run_started``'s ``sources``."""
    return {
        "id": sid,
        "url": spec.video,
        "kind": source.kind,
        "fps": source.fps,
        "width": source.width,
        "height": source.height,
        "frame_count": source.frame_count,
        "live": source.live,
        "det_size": det_size,
        "roi": list(spec.roi) if spec.roi is not None else None,
    }


def open_all(
    specs: list[SourceSpec],
    *,
    realtime: bool,
    reconnect_attempts: int,
    say: Callable[[str], None],
    warn: Callable[[str], None],
) -> Sources:
    """Open every source in parallel; refuse the run (one line) when none opens."""
    from facemoe.runtime.source_mux import open_sources
    from facemoe.runtime.video_source import VideoSource

    def make(spec: SourceSpec) -> VideoSource:
        prefix = f"{spec.id}: " if len(specs) > 1 else ""
        return VideoSource(
            spec.video,
            realtime=spec.realtime if spec.realtime is not None else realtime,
            reconnect_attempts=spec.reconnect_attempts if spec.reconnect_attempts is not None else reconnect_attempts,
            on_status=lambda msg: warn(prefix + msg),
        )

    result = Sources()
    for opened in open_sources(specs, make):
        sid = str(opened.spec.id)
        result.specs[sid] = opened.spec
        if opened.source is not None:
            result.opened[sid] = opened.source
        else:
            result.failed.append({"id": sid, "url": opened.spec.video, "error": opened.error})
    if not result.opened:
        if len(result.failed) == 1:
            raise InputError(str(result.failed[0]["error"]))
        raise FaceMoEError("no source could be opened: " + "; ".join(str(f["error"]) for f in result.failed))
    for sid, source in result.opened.items():
        roi = result.specs[sid].roi
        if roi is not None and (roi[0] + 16 > source.width or roi[1] + 16 > source.height):
            result.close()
            raise InputError(f"source {sid}: roi {list(roi)} lies outside its {source.width}x{source.height} frame")
    for entry in result.failed:
        warn(f"source {entry['id']} not opened: {entry['error']}")
    return result


__all__ = ["DetectEvery", "Sources", "SourcesOption", "VideoOption", "collect_specs", "open_all", "source_entry"]
