"""``facemoe triton-repo``: a Triton Inference Server model repository for GPU servers from a bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from facemoe.cli.common import OverwriteOption, console, out, user_errors
from facemoe.cli.options import OneLineErrors, Precision

app = typer.Typer(add_completion=False, help=__doc__)


def _sizes(text: str | None) -> list[int] | None:
    from facemoe.errors import FaceMoEError

    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise FaceMoEError(f"--preferred-batch-sizes {text!r}: expected integers separated by commas") from None


@app.command(cls=OneLineErrors)
@user_errors
def triton_repo(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Repository directory to write (absent or empty).")],
    precision: Annotated[
        Precision | None, typer.Option(help="The ONNX to serve (default: the fastest that passed parity).")
    ] = None,
    max_batch: Annotated[
        int | None, typer.Option(min=1, help="Triton max_batch_size (default: the bundle's export max batch).")
    ] = None,
    max_queue_delay_us: Annotated[
        int, typer.Option(min=0, help="How long the dynamic batcher may hold a request to form a batch (µs).")
    ] = 1000,
    preferred_batch_sizes: Annotated[
        str | None, typer.Option(help="Batch sizes the dynamic batcher prefers, e.g. 8,16,32 (default: powers of 2).")
    ] = None,
    instances: Annotated[int, typer.Option(min=1, help="Model instances per GPU.")] = 1,
    no_engine: Annotated[
        bool, typer.Option("--no-engine", help="Leave the bundle's TensorRT engine out of the repository.")
    ] = False,
    python_path: Annotated[
        list[Path] | None,
        typer.Option(help="Where the server's Python finds facemoe for the preprocessing model (repeatable)."),
    ] = None,
    overwrite: bool = OverwriteOption,
) -> None:
    """Write a Triton model repository: the bundle's ONNX on the onnxruntime backend (GPU, dynamic
    batching), its TensorRT engine if any, preprocessing and a crops -> embedding ensemble."""
    from facemoe.triton.gpu import write_gpu_repository

    repo = write_gpu_repository(
        bundle,
        out_dir,
        precision=precision.value if precision is not None else None,
        max_batch=max_batch,
        max_queue_delay_us=max_queue_delay_us,
        instances=instances,
        preferred_batch_sizes=_sizes(preferred_batch_sizes),
        python_path=[str(p) for p in python_path or []],
        include_engine=not no_engine,
        overwrite=overwrite,
    )
    for warning in repo.warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    out.print(f"wrote {repo.root} ({repo.precision}; models: {', '.join(repo.models)})", highlight=False)
    console.print(f"serve it: tritonserver --model-repository {repo.root.resolve()}", highlight=False)


__all__ = ["triton_repo"]
