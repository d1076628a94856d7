"""``facemoe-run``'s live view and end-of-run summary (stderr)."""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from rich.table import Table


def live_table(stats: Any, backend: str, tracks: list[Any]) -> Table:
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    dropped = stats.source.dropped
    table.add_row("frames", f"{stats.frames}" + (f"  (dropped {dropped})" if dropped else ""))
    table.add_row("fps", f"{stats.fps:.1f}")
    table.add_row("faces/s", f"{stats.faces_per_second:.1f}  (embedded {stats.faces_embedded})")
    names = escape(", ".join(f"#{t.track_id} {t.identity or '…'}" for t in tracks[:8]))
    table.add_row("tracks", f"{len(tracks)} active, {stats.tracks} total" + (f"  [{names}]" if names else ""))
    table.add_row("backend", escape(backend))
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


__all__ = ["live_table", "summary", "totals"]
