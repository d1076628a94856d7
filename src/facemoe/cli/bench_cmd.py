"""``facemoe bench`` / ``facemoe-bench``: latency and throughput per backend x precision x batch size."""

from __future__ import annotations

import enum
import re
from pathlib import Path
from typing import Annotated, Any

import typer

from facemoe.cli.common import OverwriteOption, console, out, user_errors
from facemoe.cli.options import OneLineErrors, Precision, Preset, VersionOption
from facemoe.errors import FaceMoEError
from facemoe.fileio import atomic_path, check_output

app = typer.Typer(add_completion=False, help=__doc__)

# Kept in step with facemoe.bench.BACKENDS (a test checks); here so a typo fails before numpy or torch load.
BENCH_BACKENDS = ("torch", "sparse", "onnxruntime", "tensorrt")
PRECISIONS = tuple(p.value for p in Precision)
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


class CudaGraphs(str, enum.Enum):
    on = "on"
    off = "off"
    both = "both"


class HalfMode(str, enum.Enum):
    gemm = "gemm"
    all = "all"


def _ints(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise FaceMoEError(f"{option} {text!r}: expected comma-separated integers, e.g. 1,8,64") from None
    if not values:
        raise FaceMoEError(f"{option}: give at least one batch size")
    if any(v < 1 for v in values):
        raise FaceMoEError(f"{option} {text!r}: batch sizes must be >= 1")
    return values


def _names(text: str, option: str, choices: tuple[str, ...]) -> tuple[str, ...]:
    values = tuple(dict.fromkeys(v for v in text.replace(" ", "").split(",") if v))
    if not values:
        raise FaceMoEError(f"{option}: give at least one of {', '.join(choices)}")
    unknown = [v for v in values if v not in choices]
    if unknown:
        kind = "backend" if option == "--backend" else "precision"
        raise FaceMoEError(f"{option} {text!r}: unknown {kind} {', '.join(unknown)}; choose from {', '.join(choices)}")
    return values


def _default_backends() -> str:
    from facemoe.runtime.backends.select import available_backends

    found = available_backends()
    names: list[str] = [n for n in ("torch", "onnxruntime", "tensorrt") if n in found]
    if "torch" in found:
        names.insert(1, "sparse")
    return ",".join(names)


def _nothing_measured(rows: list[Any]) -> str:
    """One line saying why no row has a measurement (every one skipped or failed)."""
    if not rows:
        return "no benchmark row matches the requested backends and precisions"
    reasons = dict.fromkeys(f"{r.backend} {r.precision}: {r.note or r.status}" for r in rows)
    return "nothing was measured, every requested row was skipped or failed (" + "; ".join(reasons) + ")"


@app.command(cls=OneLineErrors)
@user_errors
def bench(
    bundle: Annotated[Path | None, typer.Option("--bundle", "-b", help="Bundle to benchmark.")] = None,
    preset: Annotated[Preset, typer.Option(help="Model preset when no bundle is given.")] = Preset.tiny,
    random_weights: Annotated[
        bool, typer.Option("--random-weights", help="No bundle/checkpoint: benchmark random weights.")
    ] = False,
    checkpoint: Annotated[Path | None, typer.Option(help="Official checkpoint (instead of a bundle).")] = None,
    backend: Annotated[
        str | None,
        typer.Option(help=f"Comma list of {', '.join(BENCH_BACKENDS)} (default: all importable)."),
    ] = None,
    precision: Annotated[str, typer.Option(help=f"Comma list of {', '.join(PRECISIONS)}.")] = "fp16,fp32",
    batch: Annotated[str, typer.Option(help="Comma list of batch sizes (>= 1).")] = "1,8,32",
    sparse_batch: Annotated[
        str | None, typer.Option(help="Batch sizes for the sparse fp32 baseline (default: --batch).")
    ] = None,
    cuda_graphs: Annotated[CudaGraphs, typer.Option(help="CUDA graphs for torch/tensorrt rows.")] = CudaGraphs.on,
    compile: Annotated[
        bool, typer.Option("--compile/--no-compile", help="torch rows: compile each block with TorchInductor.")
    ] = False,
    half: Annotated[
        HalfMode, typer.Option(help="torch fp16: gemm (fp16 GEMMs, fp32 network) or all (whole network fp16).")
    ] = HalfMode.gemm,
    device: Annotated[str, typer.Option(help="torch device: auto, cpu, cuda or cuda:N.")] = "auto",
    warmup: Annotated[int, typer.Option(min=0, help="Untimed calls before timing.")] = 3,
    iterations: Annotated[int, typer.Option(min=1, help="Timed calls per row.")] = 20,
    threads: Annotated[int | None, typer.Option(min=1, help="ONNX Runtime intra-op threads.")] = None,
    seed: Annotated[int, typer.Option(min=0, help="Seed of random weights and inputs.")] = 0,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the results as JSON here.")] = None,
    markdown_out: Annotated[Path | None, typer.Option("--markdown", help="Write a markdown table here.")] = None,
    overwrite: bool = OverwriteOption,
    version: Annotated[bool, VersionOption] = False,
) -> None:
    """Sweep backends x precisions x batch sizes: p50/p95/p99 latency, img/s and peak memory.

    Exits non-zero, writing nothing, when no row could be measured (every one skipped or failed).
    """
    # Every value is checked before numpy, ONNX Runtime or torch load, and before any output is touched.
    backends = _names(backend, "--backend", BENCH_BACKENDS) if backend is not None else None
    precisions = _names(precision, "--precision", PRECISIONS)
    batch_sizes = _ints(batch, "--batch")
    sparse_sizes = _ints(sparse_batch, "--sparse-batch") if sparse_batch else None
    if not _DEVICE.fullmatch(device):
        raise FaceMoEError(f"--device {device!r}: choose auto, cpu, cuda or cuda:N")
    sources = [name for name, given in (("--bundle", bundle), ("--checkpoint", checkpoint)) if given is not None]
    if random_weights:
        sources.append("--random-weights")
    if len(sources) > 1:
        raise FaceMoEError(f"{' and '.join(sources)} exclude each other: benchmark one model")
    if not sources:
        raise FaceMoEError("give a bundle (--bundle), a checkpoint (--checkpoint) or --random-weights")
    if checkpoint is not None and not checkpoint.is_file():
        raise FaceMoEError(f"{checkpoint}: checkpoint file not found")
    if backends == ("torch",) and precisions == ("int8",):
        raise FaceMoEError("--backend torch has no int8 rows (int8 runs on onnxruntime and tensorrt)")
    outputs = [p for p in (json_out, markdown_out) if p is not None]
    for path in outputs:
        check_output(path, overwrite=overwrite, inputs=(bundle, checkpoint, *(p for p in outputs if p is not path)))

    from facemoe.bench import BenchConfig, prepare_source, run_bench

    config = BenchConfig(
        backends=backends or _names(_default_backends(), "--backend", BENCH_BACKENDS),
        precisions=precisions,
        batch_sizes=batch_sizes,
        sparse_batch_sizes=sparse_sizes,
        cuda_graphs={"on": (True,), "off": (False,), "both": (True, False)}[cuda_graphs.value],
        torch_compile=compile,
        torch_half=half.value,
        warmup=warmup,
        iterations=iterations,
        device=device,
        threads=threads,
        seed=seed,
    )
    config.validate()
    need_bundle = any(name in ("onnxruntime", "tensorrt") for name in config.backends)
    # Torch rows, random weights and checkpoints (exported to a bundle for the ORT rows) all need PyTorch.
    torch_rows = [name for name in config.backends if name in ("torch", "sparse")]
    if torch_rows or (bundle is None and (random_weights or checkpoint is not None)):
        from facemoe.extras import require_torch

        needs = f"--backend {torch_rows[0]}" if torch_rows else "--random-weights" if random_weights else "--checkpoint"
        require_torch(f"facemoe bench {needs}")

    def log(message: str) -> None:
        console.print(message, highlight=False)

    with prepare_source(
        bundle=bundle,
        preset=preset.value,
        random_weights=random_weights,
        checkpoint=checkpoint,
        need_bundle=need_bundle,
        bundle_precisions=config.precisions,
        seed=seed,
        log=log,
    ) as source:
        report = run_bench(config, source, log=log)
    if report.rows:
        report.print_table(out)
    if not any(row.status == "ok" for row in report.rows):
        raise FaceMoEError(_nothing_measured(report.rows) + "; no output written")
    if json_out is not None:
        report.write_json(json_out)
        console.print(f"wrote {json_out}")
    if markdown_out is not None:
        with atomic_path(markdown_out) as tmp:
            tmp.write_text(report.markdown())
        console.print(f"wrote {markdown_out}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
