"""``facemoe-run --backend triton``'s options (docs/SCALE_OUT.md#getting-the-server), kept out of run_cmd."""

from __future__ import annotations

import math
from typing import Annotated, Any

import typer

from facemoe.errors import FaceMoEError

TritonUrl = Annotated[
    str | None,
    typer.Option(help="Triton server for --backend triton: grpc://HOST:PORT or http://HOST:PORT."),
]
TritonModel = Annotated[
    str,
    typer.Option(help="Model on the Triton server that embeds pre-processed faces (see 'facemoe serve')."),
]
TritonTimeout = Annotated[
    float, typer.Option(min=0.1, help="Seconds a Triton call may take before it is retried (a few times, backing off).")
]
DEFAULT_MODEL = "facemoe_embedder"


def triton_options(backend: str, url: str | None, model: str, timeout: float) -> dict[str, Any]:
    """``open_backend`` keywords for --backend triton; the Triton options with another backend are refused."""
    if backend != "triton":
        if url is not None:
            raise FaceMoEError(f"--triton-url is for --backend triton (not --backend {backend})")
        return {}
    if url is None:
        raise FaceMoEError("--backend triton needs --triton-url grpc://HOST:PORT or http://HOST:PORT")
    if not math.isfinite(timeout):
        raise FaceMoEError(f"--triton-timeout must be a finite number of seconds, got {timeout:g}")
    from facemoe.triton.client import parse_url

    parse_url(url)  # a malformed URL is refused before anything is loaded
    return {"url": url, "model": model, "timeout": timeout}


__all__ = ["DEFAULT_MODEL", "TritonModel", "TritonTimeout", "TritonUrl", "triton_options"]
