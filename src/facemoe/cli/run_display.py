"""``facemoe-run``'s live view and end-of-run summary (stderr): run totals and a row per source."""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from rich.table import Table

from facemoe.cli.common import console


def live_table(stats: Any, backend: str, pipeline: Any) -> Table:
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    dropped = stats.source.dropped
    table.add_row("frames", f"{stats.frames}" + (f"  (dropped {dropped})" if dropped else ""))
    table.add_row("fps", f"{stats.fps:.1f}")
    table.add_row("faces/s", f"{stats.faces_per_second:.1f}  (embedded {stats.faces_embedded})")
    active = [t for stream in pipeline.streams for t in stream.tracker.active]
    if len(pipeline.streams) == 1:
        names = escape(", ".join(f"#{t.track_id} {t.identity or '…'}" for t in active[:8]))
        table.add_row("tracks", f"{len(active)} active, {stats.tracks} total" + (f"  [{names}]" if names else ""))
    else:
        table.add_row("tracks", f"{len(active)} active, {stats.tracks} total")
        for stream in pipeline.streams:
            table.add_row(f"  {escape(stream.id)}", escape(source_row(stream, stats.wall_seconds)))
    table.add_row("backend", escape(backend))
    return table


def source_row(stream: Any, wall: float) -> str:
    s, src = stream.stats, stream.stats.source
    fps = s.frames / wall if wall > 0 else 0.0
    state = f"  [{stream.ended}]" if stream.ended else ""
    return (
        f"{s.frames} frames {fps:.1f} fps, {s.faces} faces, {s.tracks} tracks, "
        f"{src.dropped} dropped, {src.reconnects} reconnects{state}"
    )


def sources_table(pipeline: Any, wall: float) -> Table:
    table = Table(title="sources", title_justify="left")
    for name in ("source", "fps", "frames", "faces", "tracks", "drops", "reconnects", "ended"):
        table.add_column(name, justify="left" if name in ("source", "ended") else "right")
    for stream in pipeline.streams:
        s, src = stream.stats, stream.stats.source
        fps = s.frames / wall if wall > 0 else 0.0
        row = (stream.id, f"{fps:.1f}", s.frames, s.faces, s.tracks, src.dropped, src.reconnects, stream.ended or "")
        table.add_row(*(escape(str(v)) for v in row))
    return table


def summary(stats: Any) -> Table:
    table = Table(title="facemoe-run summary", title_justify="left")
    table.add_column("stage")
    table.add_column("total s", justify="right")
    table.add_column("ms / frame", justify="right")
    table.add_column("share", justify="right")
    total = sum(stats.stage_seconds.values()) or 1.0
    frames = max(1, stats.frames)
    for stage, seconds in stats.stage_seconds.items():
        table.add_row(stage, f"{seconds:.3f}", f"{1000 * seconds / frames:.2f}", f"{100 * seconds / total:.0f}%")
    table.add_row("wall", f"{stats.wall_seconds:.3f}", f"{1000 * stats.wall_seconds / frames:.2f}", "")
    return table


def totals(stats: Any, events: Any, backend: str) -> str:
    mean_batch = stats.faces_embedded / stats.batches if stats.batches else 0.0
    return (
        f"{stats.frames} frames at {stats.fps:.1f} fps; {stats.faces} faces ({stats.faces_per_second:.1f}/s); "
        f"{stats.faces_embedded} embedded in {stats.batches} batches (mean {mean_batch:.1f}); "
        f"{stats.tracks} tracks; {sum(events.counts.values())} events; backend {backend}"
    )


def report(pipeline: Any, stats: Any, events: Any, backend: str, min_eye_distance: float) -> None:
    """The end-of-run summary: stages, a row per source (several sources), totals and warnings."""
    say = console.print
    say(summary(stats))
    if len(pipeline.streams) > 1:
        say(sources_table(pipeline, stats.wall_seconds))
    say("(sources are decoded in background threads, beside the other stages)")
    say(escape(totals(stats, events, backend)), highlight=False)
    if stats.frames == 0:
        say("[yellow]warning:[/] no frame could be processed", highlight=False)
    elif stats.faces == 0:
        say(f"[yellow]warning:[/] no faces detected in {stats.frames} frames", highlight=False)
    for reason, count in stats.skipped_frames.items():
        say(f"[yellow]skipped {count} frames:[/] {reason.replace('_', ' ')}", highlight=False)
    if stats.faces_too_small:
        say(f"skipped {stats.faces_too_small} faces below {min_eye_distance:g} px eye distance", highlight=False)
    for stream in pipeline.streams:
        src = stream.stats.source
        prefix = f"{escape(stream.id)}: " if len(pipeline.streams) > 1 else ""
        if src.corrupt:
            say(f"[yellow]{prefix}skipped {src.corrupt} undecodable frames[/]", highlight=False)
        if src.ended_early:
            count = stream.header.get("frame_count", 0)
            say(
                f"[yellow]warning:[/] {prefix}the file ended after {src.decoded} of {count} frames "
                "(truncated or damaged)",
                highlight=False,
            )


__all__ = ["live_table", "report", "source_row", "sources_table", "summary", "totals"]
