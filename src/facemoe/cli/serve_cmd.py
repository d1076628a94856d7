"""``facemoe serve BUNDLE``: a real Triton Inference Server on the bundle, in the foreground until stopped.

The serve repository (facemoe.triton.serve) runs the bundle on facemoe's own backends inside Triton's
Python backend, with dynamic batching; clients are ``facemoe-run --backend triton`` or any Triton client
(docs/SCALE_OUT.md#getting-the-server). SIGINT or SIGTERM stops the server cleanly (exit 0).
"""

from __future__ import annotations

import contextlib
import signal
import tempfile
import threading
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from facemoe.cli.common import console, user_errors
from facemoe.cli.options import Precision
from facemoe.errors import FaceMoEError


def _stop_signals() -> threading.Event:
    """An event set by SIGINT / SIGTERM / SIGHUP (the server was started in its own session)."""
    stop = threading.Event()

    def handler(_signum: int, _frame: Any) -> None:
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)
    return stop


@user_errors
def serve(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory made by facemoe-export.")],
    http_port: Annotated[int, typer.Option(min=0, max=65535, help="HTTP port (0: any free port).")] = 8000,
    grpc_port: Annotated[int, typer.Option(min=0, max=65535, help="gRPC port (0: any free port).")] = 8001,
    metrics_port: Annotated[
        int, typer.Option(min=0, max=65535, help="Prometheus metrics port (0: any free port).")
    ] = 8002,
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    precision: Annotated[
        Precision | None, typer.Option(help="Artifact to serve (default: what the backend policy picks).")
    ] = None,
    max_batch: Annotated[
        int | None, typer.Option(min=1, help="Largest batch Triton forms (default: the bundle's).")
    ] = None,
    max_queue_delay_us: Annotated[
        int, typer.Option(min=0, help="Longest a request waits for others to batch with (microseconds).")
    ] = 1000,
    instances: Annotated[int, typer.Option(min=1, help="Model instances (each a Python process).")] = 1,
    repo: Annotated[
        Path | None, typer.Option(help="Write the model repository here and keep it (default: a temporary one).")
    ] = None,
    ready_timeout: Annotated[float, typer.Option(min=1.0, help="Seconds to wait for the models to load.")] = 120.0,
) -> None:
    """Serve BUNDLE with NVIDIA Triton Inference Server (HTTP, gRPC, metrics) until Ctrl-C / SIGTERM."""
    from facemoe.triton.repository import default_python_path
    from facemoe.triton.serve import write_serve_repository
    from facemoe.triton.server import TritonServer, find_server, stub_python_path

    install = find_server()  # before anything is written: no server, no repository
    paths = stub_python_path() + default_python_path()
    with contextlib.ExitStack() as stack:
        if repo is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="facemoe-serve-"))) / "repository"
        else:
            root = repo
        written = write_serve_repository(
            bundle,
            root,
            precision=precision.value if precision is not None else None,
            max_batch=max_batch,
            max_queue_delay_us=max_queue_delay_us,
            instances=instances,
            python_path=paths,
        )
        log = Path(tempfile.gettempdir()) / f"facemoe-serve-{grpc_port or 'any'}.log"
        server = TritonServer(
            written.root,
            host=host,
            http_port=http_port,
            grpc_port=grpc_port,
            metrics_port=metrics_port,
            install=install,
            log_path=log,
            ready_timeout=ready_timeout,
        )
        stop = _stop_signals()
        console.print(f"starting Triton ({escape(install.origin)}) on {escape(str(written.root))} ...", highlight=False)
        server.start()
        stack.callback(server.stop)
        console.print(
            f"[green]ready[/]: models {', '.join(written.models)} (max batch {written.max_batch})\n"
            f"  gRPC    {server.grpc_url}\n  HTTP    {server.http_url}\n  metrics {server.metrics_url}\n"
            f"  log     {server.log_path}\n"
            f"  client: facemoe-run --backend triton --triton-url {server.grpc_url} --bundle {bundle} --video ...\n"
            "Ctrl-C or SIGTERM stops it.",
            highlight=False,
        )
        while not stop.wait(0.5):
            if not server.alive():
                raise FaceMoEError(f"tritonserver stopped on its own; see its log {server.log_path}")
        console.print("stopping Triton ...", highlight=False)
        code = server.stop()
        console.print(f"stopped (tritonserver exit code {code})", highlight=False)


__all__ = ["serve"]
