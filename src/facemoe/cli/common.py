"""What every command shares: one-line errors for user mistakes, and the rich console."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from facemoe.errors import FaceMoEError

# Progress and messages go to stderr, results (tables, JSON) to stdout. Off a terminal (logs, CI, pipes)
# rich would fall back to 80 columns and squeeze tables unreadably, so a wide fixed width is used there.
console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
out = Console(width=None if sys.stdout.isatty() else 160)
F = TypeVar("F", bound=Callable[..., Any])

# One overwrite convention for every command that writes (export, run, enroll, build-engine): existing
# outputs are kept unless this flag is given (facemoe.fileio.check_output).
OverwriteOption = typer.Option(False, "--overwrite", help="Replace existing output files.")

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def user_errors(func: F) -> F:
    """Turn ``FaceMoEError`` (and a few OS errors on user paths) into one red line and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except FaceMoEError as exc:
            console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(EXIT_USER_ERROR) from None
        except (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError) as exc:
            where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
            console.print(
                f"[bold red]error:[/] {escape(where + str(exc.strerror or exc))}", highlight=False, soft_wrap=True
            )
            raise typer.Exit(EXIT_USER_ERROR) from None
        except ModuleNotFoundError as exc:
            # An optional dependency missing on a path no explicit check covered: name the extra, no traceback.
            from facemoe.extras import missing_extra_message

            message = missing_extra_message(exc)
            if message is None:
                raise
            console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
            raise typer.Exit(EXIT_USER_ERROR) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]")
            raise typer.Exit(EXIT_INTERRUPTED) from None

    return wrapper  # type: ignore[return-value]


def fail(message: str) -> None:
    """Print a one-line error and exit with the user-error code."""
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    sys.exit(EXIT_USER_ERROR)
