"""``facemoe build-engine``: build (or reuse) the TensorRT engine of a bundle for this GPU."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer

from facemoe.cli.common import console, out, user_errors
from facemoe.errors import FaceMoEError

app = typer.Typer(add_completion=False, help=__doc__)

_UNITS = {"": 1, "b": 1, "k": 2**10, "kib": 2**10, "m": 2**20, "mib": 2**20, "g": 2**30, "gib": 2**30}


def parse_size(text: str) -> int:
    """'2GiB', '512M', '1073741824' -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise FaceMoEError(f"--workspace {text!r}: expected a size such as 2GiB, 512MiB or a byte count")
    return int(float(match.group(1)) * _UNITS[unit])


@app.command()
@user_errors
def build_engine(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory (the engine goes to <bundle>/engines/).")],
    precision: Annotated[
        str | None,
        typer.Option(help="fp16, int8 or fp32: the ONNX to build (default: the fastest that passed parity)."),
    ] = None,
    min_batch: Annotated[int, typer.Option(help="Smallest batch of the optimisation profile.")] = 1,
    opt_batch: Annotated[int, typer.Option(help="Batch TensorRT tunes kernels for.")] = 8,
    max_batch: Annotated[int, typer.Option(help="Largest batch the engine accepts.")] = 32,
    workspace: Annotated[
        str | None, typer.Option(help="Builder workspace limit, e.g. 2GiB (default: 1GiB on Jetson, else all).")
    ] = None,
    opt_level: Annotated[int, typer.Option(help="Builder optimisation level 0-5 (higher: slower build).")] = 3,
    plugin: Annotated[
        list[Path] | None, typer.Option(help="TensorRT plugin library to load and record (repeatable).")
    ] = None,
    plugin_mode: Annotated[
        str,
        typer.Option(help="--gating plugin bundles without --plugin: aot (no Python at run time), jit, or auto."),
    ] = "auto",
    weak_fp16: Annotated[
        bool,
        typer.Option("--weak-fp16", help="TensorRT 10.x only: fp16 engine from the fp32 ONNX (weakly typed)."),
    ] = False,
    no_timing_cache: Annotated[
        bool, typer.Option("--no-timing-cache", help="Neither read nor write engines/timing.cache.")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even when a matching engine exists.")] = False,
    device: Annotated[int, typer.Option(help="CUDA device index.")] = 0,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show TensorRT's verbose log.")] = False,
) -> None:
    """Build the TensorRT engine for this GPU from the bundle's ONNX and record it in the manifest."""
    from facemoe.bundle import Bundle
    from facemoe.export.tensorrt import BuildOptions
    from facemoe.export.tensorrt import build_engine as build
    from facemoe.runtime.backends.select import engine_precision

    options = BuildOptions(
        precision=precision or engine_precision(Bundle(bundle)),
        min_batch=min_batch,
        opt_batch=opt_batch,
        max_batch=max_batch,
        workspace_bytes=parse_size(workspace) if workspace else None,
        optimization_level=opt_level,
        plugin_libraries=tuple(plugin or ()),
        plugin_mode=plugin_mode,
        weakly_typed_fp16=weak_fp16,
        timing_cache=not no_timing_cache,
        force=force,
        device_index=device,
        verbose=verbose,
    )
    built = build(bundle, options, log=lambda msg: console.print(msg, highlight=False))
    identity = built.identity
    verb = "reused" if built.reused else "built"
    out.print(f"[green]{verb}[/] {built.path}", highlight=False)
    out.print(
        f"  {identity.precision} for {identity.compute_capability} ({identity.gpu_name}), TensorRT "
        f"{identity.tensorrt_version}, batch {identity.min_batch}/{identity.opt_batch}/{identity.max_batch}, "
        f"key {identity.cache_key}",
        highlight=False,
    )
    for note in built.notes:
        console.print(f"  {note}", highlight=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
