"""Console side of an export: the rich progress bar, warnings and the parity table.

``facemoe.export.bundle_writer`` reports through the small ``ExportReporter`` protocol and never imports
rich; this module is the reporter ``facemoe-export`` uses, and the table ``facemoe parity`` prints too.
"""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from facemoe.export.parity import ParityResult

NOISE_FLOOR_ROW = "reference, inputs ±0.5 grey level"
NOISE_FLOOR_CAPTION = (
    "context row: the fp32 PyTorch reference against itself with every input pixel moved by up to half a grey "
    "level (below 8-bit rounding), i.e. how far the model itself moves under imperceptible noise; no artifact "
    "can be expected to agree with the reference much better. Artifacts pass or fail on their own gates."
)
_GRAPH_LEVEL_LABELS = {"s8": "graph, s8 weights (TensorRT, VNNI CPUs)", "w7": "graph, w7 weights (x86 w/o VNNI)"}


def parity_table(results: dict[str, ParityResult]) -> Table:
    """One row per artifact as this machine serves it, and for int8 one row per graph-level encoding."""
    table = Table(title="Parity against the PyTorch fp32 reference (sparse routing)")
    for column in (
        "artifact",
        "measured with",
        "cos min",
        "cos mean",
        "max abs",
        "routing min",
        "top-1 agr",
        "ΔTAR@1e-3",
        "result",
    ):
        table.add_column(column, justify="right" if column not in ("artifact", "measured with") else "left")

    def row(name: str, r: ParityResult, where: str) -> None:
        if not r.gates:
            verdict = "[dim]context[/]"
        else:
            verdict = "[green]pass[/]" if r.passed else "[red]FAIL: " + "; ".join(r.failures) + "[/]"
        table.add_row(
            name,
            where,
            f"{r.cosine_min:.6f}",
            f"{r.cosine_mean:.6f}",
            f"{r.max_abs:.3g}",
            f"{r.routing_min:.4f}",
            f"{r.top1_agreement:.3f}",
            f"{r.tar_at_far - r.tar_at_far_reference:+.3f}",
            verdict,
        )

    for name, r in results.items():
        m = r.measured_with
        served = f"{m.get('cpu', '')}, ORT opt {m.get('graph_optimization', '')}" if m else "PyTorch"
        if m.get("int8_encoding"):
            served += f", {m['int8_encoding']}"
        row(name, r, served)
        for encoding, graph in r.graph_level.items():
            row(f"  {name} {_GRAPH_LEVEL_LABELS.get(encoding, encoding)}", graph, "ORT opt disabled (any CPU)")
    return table


def print_parity(console: Console, results: dict[str, ParityResult], noise: ParityResult) -> None:
    """The parity table with the noise-floor context row and its caption."""
    console.print(parity_table({**results, NOISE_FLOOR_ROW: noise}))
    console.print(NOISE_FLOOR_CAPTION, style="dim")


class RichExportReporter:
    """An ``ExportReporter`` for the terminal: one bar over the stages, warnings and the parity table.

    Use as a context manager around ``export_bundle``; ``progress=False`` hides the bar only.
    """

    def __init__(self, console: Console | None = None, progress: bool = True) -> None:
        self.console = console or Console(stderr=True)
        self._bar = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            TimeElapsedColumn(),
            console=self.console,
            disable=not progress,
            transient=False,
        )
        self._task: TaskID | None = None

    def __enter__(self) -> RichExportReporter:
        self._bar.__enter__()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self._bar.__exit__(kind, error, trace)

    def plan(self, stages: list[str]) -> None:
        self._task = self._bar.add_task("export", total=len(stages))

    def stage_started(self, name: str, description: str) -> None:
        if self._task is not None:
            self._bar.update(self._task, description=f"[cyan]{description}")

    def stage_finished(self, name: str, seconds: float) -> None:
        if self._task is not None:
            self._bar.advance(self._task)

    def warn(self, message: str) -> None:
        self.console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)

    def parity(self, results: dict[str, ParityResult], noise: ParityResult) -> None:
        print_parity(self.console, results, noise)
