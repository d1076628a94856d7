"""The bench's results: one row per measured (or skipped) configuration, as JSON, markdown or a rich table."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from facemoe.fileio import write_json_atomic

BENCH_FORMAT = "facemoe-bench"
BENCH_SCHEMA_VERSION = 1


@dataclass
class BenchRow:
    backend: str
    precision: str
    routing: str
    batch: int
    cuda_graphs: bool = False
    device: str = ""
    status: str = "ok"
    note: str = ""
    iterations: int = 0
    latency_ms: dict[str, float] = field(default_factory=dict)
    throughput_img_s: float | None = None
    peak_memory_bytes: int | None = None
    memory_kind: str = ""
    describe: str = ""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class BenchReport:
    rows: list[BenchRow]
    config: dict[str, Any]
    source: dict[str, Any]
    environment: dict[str, Any]
    created: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "format": BENCH_FORMAT,
            "schema_version": BENCH_SCHEMA_VERSION,
            "created": self.created,
            "source": self.source,
            "config": self.config,
            "environment": self.environment,
            "rows": [r.to_json() for r in self.rows],
        }

    def write_json(self, path: str | Path) -> None:
        write_json_atomic(path, self.to_json())

    def display_rows(self) -> list[BenchRow]:
        """Rows for tables: a configuration skipped at every batch size shows once, batches joined."""
        shown: list[BenchRow] = []
        for row in self.rows:
            last = shown[-1] if shown else None
            if (
                last is not None
                and row.status == last.status == "skipped"
                and (row.backend, row.precision, row.cuda_graphs, row.note)
                == (last.backend, last.precision, last.cuda_graphs, last.note)
            ):
                last.describe = f"{last.describe},{row.batch}"
                continue
            shown.append(dataclasses.replace(row, describe=str(row.batch)))
        return shown

    def markdown(self) -> str:
        env = self.environment
        lines = [
            f"FaceMoE bench, {self.created}: {self.source.get('description', '')}",
            "",
            f"Device: {env.get('gpu') or 'no GPU'}; CPU: {env.get('cpu_count')} cores; "
            f"torch {env.get('torch', '-')}, onnxruntime {env.get('onnxruntime', '-')}, "
            f"TensorRT {env.get('tensorrt') or '-'}; {self.config.get('iterations')} timed calls per row after "
            f"{self.config.get('warmup')} warm-up",
            "",
            "| backend | precision | routing | CUDA graphs | batch | p50 ms | p95 ms | p99 ms | img/s | peak memory "
            "| note |",
            "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in self.display_rows():
            lat = r.latency_ms
            note = r.note if r.status == "ok" else f"{r.status}: {r.note}"
            lines.append(
                f"| {r.backend} | {r.precision} | {r.routing} | {'on' if r.cuda_graphs else 'off'} | {r.describe} | "
                f"{_fmt(lat.get('p50'))} | {_fmt(lat.get('p95'))} | {_fmt(lat.get('p99'))} | "
                f"{_fmt(r.throughput_img_s, 1)} | {_bytes(r.peak_memory_bytes)} | {note} |"
            )
        return "\n".join(lines) + "\n"

    def print_table(self, console: Any = None) -> None:
        """A rich table (plain markdown when rich is not installed), on ``console`` or stdout."""
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            print(self.markdown())
            return
        table = Table(title=f"FaceMoE bench: {self.source.get('description', '')}")
        for column in ("backend", "precision", "routing", "graphs"):
            table.add_column(column)
        for column in ("batch", "p50 ms", "p95 ms", "p99 ms", "img/s", "peak mem"):
            table.add_column(column, justify="right")
        table.add_column("note")
        for r in self.display_rows():
            lat = r.latency_ms
            table.add_row(
                r.backend,
                r.precision,
                r.routing,
                "on" if r.cuda_graphs else "off",
                r.describe,
                _fmt(lat.get("p50")),
                _fmt(lat.get("p95")),
                _fmt(lat.get("p99")),
                _fmt(r.throughput_img_s, 1),
                _bytes(r.peak_memory_bytes),
                r.note if r.status == "ok" else f"[yellow]{r.status}[/]: {r.note}",
            )
        (console or Console()).print(table)


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _bytes(value: int | None) -> str:
    if value is None:
        return "-"
    return f"{value / 2**30:.2f} GiB" if value >= 2**30 else f"{value / 2**20:.0f} MiB"


__all__ = ["BENCH_FORMAT", "BENCH_SCHEMA_VERSION", "BenchReport", "BenchRow"]
