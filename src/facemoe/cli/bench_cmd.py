"""``facemoe bench`` / ``facemoe-bench``: latency and throughput per backend x precision x batch size."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from facemoe.cli.common import console, out, user_errors
from facemoe.errors import FaceMoEError

app = typer.Typer(add_completion=False, help=__doc__)


def _ints(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise FaceMoEError(f"{option} {text!r}: expected comma-separated integers, e.g. 1,8,64") from None
    if not values:
        raise FaceMoEError(f"{option}: give at least one batch size")
    return values


def _names(text: str) -> tuple[str, ...]:
    return tuple(v for v in text.replace(" ", "").split(",") if v)


def _graph_modes(value: str) -> tuple[bool, ...]:
    modes = {"on": (True,), "off": (False,), "both": (True, False)}
    if value not in modes:
        raise FaceMoEError(f"--cuda-graphs {value!r}: choose on, off or both")
    return modes[value]


def _default_backends() -> str:
    from facemoe.runtime.backends.select import available_backends

    found = available_backends()
    names: list[str] = [n for n in ("torch", "onnxruntime", "tensorrt") if n in found]
    if "torch" in found:
        names.insert(1, "sparse")
    return ",".join(names)


@app.command()
@user_errors
def bench(
    bundle: Annotated[Path | None, typer.Option("--bundle", "-b", help="Bundle to benchmark.")] = None,
    preset: Annotated[str, typer.Option(help="Model preset when no bundle is given: full or tiny.")] = "tiny",
    random_weights: Annotated[
        bool, typer.Option("--random-weights", help="No bundle/checkpoint: benchmark random weights.")
    ] = False,
    checkpoint: Annotated[Path | None, typer.Option(help="Official checkpoint (instead of a bundle).")] = None,
    backend: Annotated[
        str | None,
        typer.Option(help="Comma list of torch, sparse, onnxruntime, tensorrt (default: all importable)."),
    ] = None,
    precision: Annotated[str, typer.Option(help="Comma list of fp16, fp32, int8.")] = "fp16,fp32",
    batch: Annotated[str, typer.Option(help="Comma list of batch sizes.")] = "1,8,32",
    sparse_batch: Annotated[
        str | None, typer.Option(help="Batch sizes for the sparse fp32 baseline (default: --batch).")
    ] = None,
    cuda_graphs: Annotated[str, typer.Option(help="CUDA graphs for torch/tensorrt rows: on, off or both.")] = "on",
    compile: Annotated[
        bool, typer.Option("--compile/--no-compile", help="torch rows: compile each block with TorchInductor.")
    ] = False,
    half: Annotated[
        str, typer.Option(help="torch fp16: gemm (fp16 GEMMs, fp32 network) or all (whole network fp16).")
    ] = "gemm",
    device: Annotated[str, typer.Option(help="torch device: auto, cuda, cuda:1 or cpu.")] = "auto",
    warmup: Annotated[int, typer.Option(help="Untimed calls before timing.")] = 3,
    iterations: Annotated[int, typer.Option(help="Timed calls per row.")] = 20,
    threads: Annotated[int | None, typer.Option(help="ONNX Runtime intra-op threads.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of random weights and inputs.")] = 0,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the results as JSON here.")] = None,
    markdown_out: Annotated[Path | None, typer.Option("--markdown", help="Write a markdown table here.")] = None,
) -> None:
    """Sweep backends x precisions x batch sizes: p50/p95/p99 latency, img/s and peak memory."""
    from facemoe.bench import BenchConfig, prepare_source, run_bench

    config = BenchConfig(
        backends=_names(backend or _default_backends()),
        precisions=_names(precision),
        batch_sizes=_ints(batch, "--batch"),
        sparse_batch_sizes=_ints(sparse_batch, "--sparse-batch") if sparse_batch else None,
        cuda_graphs=_graph_modes(cuda_graphs),
        torch_compile=compile,
        torch_half=half,
        warmup=warmup,
        iterations=iterations,
        device=device,
        threads=threads,
        seed=seed,
    )
    config.validate()
    if preset not in ("full", "tiny", "small"):
        raise FaceMoEError(f"--preset {preset!r}: choose full or tiny")
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
        preset=preset,
        random_weights=random_weights,
        checkpoint=checkpoint,
        need_bundle=need_bundle,
        bundle_precisions=config.precisions,
        seed=seed,
        log=log,
    ) as source:
        report = run_bench(config, source, log=log)
    report.print_table(out)
    if json_out is not None:
        report.write_json(json_out)
        console.print(f"wrote {json_out}")
    if markdown_out is not None:
        markdown_out.parent.mkdir(parents=True, exist_ok=True)
        markdown_out.write_text(report.markdown())
        console.print(f"wrote {markdown_out}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
