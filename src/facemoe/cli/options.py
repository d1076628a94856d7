"""Option types the commands share: choices as enums (so ``--help`` lists them) and one-line usage errors.

Nothing here imports torch, ONNX or OpenCV: a command checks every value it was given before it loads
anything heavy, so a typo costs a fraction of a second instead of a model load.
"""

from __future__ import annotations

import enum
from typing import Any

import typer
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

from facemoe.cli.common import EXIT_USER_ERROR, console

try:  # typer >= 0.22 carries its own copy of click
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover - older typer on click
    from click.exceptions import UsageError  # type: ignore[no-redef,assignment]


def _print_version(value: bool) -> None:
    if value:
        from facemoe import __version__

        typer.echo(f"facemoe-edge {__version__}")
        raise typer.Exit()


# Every entry point (facemoe, facemoe-export, facemoe-run, facemoe-bench) answers --version the same way.
VersionOption = typer.Option(
    "--version", is_flag=True, callback=_print_version, is_eager=True, help="Show the version and exit."
)


class Precision(str, enum.Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    int8 = "int8"


class Preset(str, enum.Enum):
    """Model presets of ``facemoe.model.config.PRESETS`` ("small" is another name for "tiny")."""

    full = "full"
    tiny = "tiny"
    small = "small"


class CalibrationMethod(str, enum.Enum):
    """How INT8 activation ranges are taken from the calibration faces (facemoe.export.int8)."""

    max = "max"
    percentile = "percentile"
    entropy = "entropy"


class Gating(str, enum.Enum):
    onnx = "onnx"
    plugin = "plugin"


class RuntimeBackend(str, enum.Enum):
    """Inference backends a bundle runs on (facemoe.runtime.backends.open_backend)."""

    auto = "auto"
    tensorrt = "tensorrt"
    onnxruntime = "onnxruntime"
    torch = "torch"
    triton = "triton"


def _one_line(exc: UsageError) -> None:
    """Print a usage error as the one red line every other user error gets, and exit 2."""
    message = exc.format_message().replace("Value error, ", "")
    ctx = getattr(exc, "ctx", None)
    hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
    console.print(f"[bold red]error:[/] {escape(message)}{hint}", highlight=False, soft_wrap=True)
    raise typer.Exit(EXIT_USER_ERROR)


class OneLineErrors(TyperCommand):
    """A command whose bad arguments (out of range, not a choice, missing) give one line, not a panel."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except UsageError as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # shows the help, not an error
                raise
            _one_line(exc)
            raise  # unreachable: _one_line exits


class OneLineErrorsGroup(TyperGroup):
    """A command group whose sub-commands' bad arguments give one line (see ``OneLineErrors``)."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except UsageError as exc:
            _one_line(exc)
            raise  # unreachable: _one_line exits
