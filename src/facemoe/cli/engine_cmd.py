"""``facemoe build-engine``: build (or reuse) the TensorRT engine of a bundle for this GPU."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated

import typer

from facemoe.bundle import Bundle
from facemoe.cli.common import OverwriteOption, console, out, user_errors
from facemoe.cli.options import OneLineErrors, Precision
from facemoe.errors import FaceMoEError, OutputError
from facemoe.runtime.engine_identity import ENGINES_DIR

app = typer.Typer(add_completion=False, help=__doc__)

_UNITS = {"": 1, "b": 1, "k": 2**10, "kib": 2**10, "m": 2**20, "mib": 2**20, "g": 2**30, "gib": 2**30}


def parse_size(text: str) -> int:
    """'2GiB', '512M', '1073741824' -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise FaceMoEError(f"--workspace {text!r}: expected a size such as 2GiB, 512MiB or a byte count")
    return int(float(match.group(1)) * _UNITS[unit])


def _check_engines_dir(engines: Path) -> None:
    """Engines are written into the bundle: refuse a bundle this user cannot write before building."""
    if engines.exists() and not engines.is_dir():
        raise OutputError(f"{engines}: is a file, expected the bundle's engines directory")
    writable = engines if engines.is_dir() else engines.parent
    if not os.access(writable, os.W_OK | os.X_OK):
        raise OutputError(f"{writable}: not writable, the engine cannot be stored in this bundle")


@app.command(cls=OneLineErrors)
@user_errors
def build_engine(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory (the engine goes to <bundle>/engines/).")],
    precision: Annotated[
        Precision | None,
        typer.Option(help="The ONNX to build (default: the fastest that passed parity)."),
    ] = None,
    min_batch: Annotated[int, typer.Option(min=1, help="Smallest batch of the optimisation profile.")] = 1,
    opt_batch: Annotated[int, typer.Option(min=1, help="Batch TensorRT tunes kernels for.")] = 8,
    max_batch: Annotated[
        int, typer.Option(min=1, help="Largest number of faces per model call (the engine profile's max).")
    ] = 32,
    workspace: Annotated[
        str | None, typer.Option(help="Builder workspace limit, e.g. 2GiB (default: 1GiB on Jetson, else all).")
    ] = None,
    opt_level: Annotated[
        int, typer.Option(min=0, max=5, help="Builder optimisation level (higher: slower build).")
    ] = 3,
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
    overwrite: bool = OverwriteOption,
    # The old name of --overwrite, kept working for existing scripts but no longer shown.
    force: Annotated[bool, typer.Option("--force", hidden=True, help="Old name of --overwrite.")] = False,
    device: Annotated[int, typer.Option(min=0, help="CUDA device index.")] = 0,
    backend: Annotated[
        str, typer.Option(help="tensorrt (an engine from the ONNX) or torch (an AOTInductor package).")
    ] = "tensorrt",
    torch_device: Annotated[
        str, typer.Option("--torch-device", help="--backend torch: cuda or cpu (default: cuda when present).")
    ] = "auto",
    batch_sizes: Annotated[
        str, typer.Option(help="--backend torch: batch buckets; the package serves 1..the largest.")
    ] = "1,8,64,256",
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show TensorRT's verbose log.")] = False,
) -> None:
    """Build the TensorRT engine for this GPU from the bundle's ONNX and record it in the manifest.

    A matching engine already in the bundle is reused; --overwrite rebuilds and replaces it.
    """
    # All of this is checked before TensorRT is loaded or the GPU is probed.
    if backend not in ("tensorrt", "torch"):
        raise FaceMoEError(f"--backend {backend!r}: choose tensorrt or torch")
    if backend == "torch":
        _build_torch(bundle, precision, torch_device, batch_sizes, overwrite or force)
        return
    if not min_batch <= opt_batch <= max_batch:
        raise FaceMoEError(
            f"batch profile must satisfy --min-batch <= --opt-batch <= --max-batch, got {min_batch}/{opt_batch}/"
            f"{max_batch}"
        )
    if weak_fp16 and precision not in (None, Precision.fp16):
        raise FaceMoEError(f"--weak-fp16 builds fp16 engines only, not {precision.value}")
    workspace_bytes = parse_size(workspace) if workspace else None
    for library in plugin or []:
        if not library.is_file():
            raise FaceMoEError(f"{library}: plugin library not found (--plugin)")
    loaded = Bundle(bundle)
    from facemoe.runtime.backends.select import engine_precision

    chosen = precision.value if precision is not None else ("fp16" if weak_fp16 else engine_precision(loaded))
    if chosen not in loaded.precisions and not weak_fp16:
        raise FaceMoEError(
            f"{bundle}: no {chosen} ONNX to build from (it has: {', '.join(loaded.precisions)}); "
            f"re-export with --{chosen}"
        )
    _check_engines_dir(loaded.root / ENGINES_DIR)

    from facemoe.export.tensorrt import BuildOptions
    from facemoe.export.tensorrt import build_engine as build

    options = BuildOptions(
        precision=chosen,
        min_batch=min_batch,
        opt_batch=opt_batch,
        max_batch=max_batch,
        workspace_bytes=workspace_bytes,
        optimization_level=opt_level,
        plugin_libraries=tuple(plugin or ()),
        plugin_mode=plugin_mode,
        weakly_typed_fp16=weak_fp16,
        timing_cache=not no_timing_cache,
        force=overwrite or force,
        device_index=device,
        verbose=verbose,
    )
    built = build(loaded, options, log=lambda msg: console.print(msg, highlight=False))
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


def _build_torch(bundle: Path, precision: Precision | None, device: str, batch_sizes: str, overwrite: bool) -> None:
    """Compile the bundle's PyTorch model into a stored package (docs/COMPILED.md#stored-compiled-packages)."""
    if device not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", device):
        raise FaceMoEError(f"--torch-device {device!r}: choose auto, cpu, cuda or cuda:N")
    try:
        sizes = tuple(int(b) for b in batch_sizes.split(",") if b.strip())
    except ValueError:
        raise FaceMoEError(f"--batch-sizes {batch_sizes!r}: expected comma-separated integers") from None
    if not sizes or min(sizes) < 1:
        raise FaceMoEError(f"--batch-sizes {batch_sizes!r}: give batch sizes >= 1")
    if precision is not None and precision.value == "int8":
        raise FaceMoEError("--backend torch compiles fp32 or fp16, not int8")
    loaded = Bundle(bundle)
    _check_engines_dir(loaded.root / ENGINES_DIR)
    from facemoe.extras import require_torch

    require_torch("facemoe build-engine --backend torch")
    import torch

    from facemoe.export.aoti import build_package

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    chosen = precision.value if precision is not None else ("fp16" if device.startswith("cuda") else "fp32")
    path, identity = build_package(
        loaded,
        device=device,
        precision=chosen,
        batch_sizes=sizes,
        overwrite=overwrite,
        log=lambda msg: console.print(msg, highlight=False),
    )
    out.print(f"[green]stored[/] {path}", highlight=False)
    where = identity.compute_capability if identity.device_kind == "cuda" else f"CPU {identity.cpu_isa}"
    out.print(
        f"  {identity.precision} for {where} ({identity.device_name}), torch {identity.torch_version}, "
        f"batch 1..{identity.max_batch}, key {identity.cache_key}",
        highlight=False,
    )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
