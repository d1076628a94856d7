"""``facemoe``: one command with sub-commands for everything besides export and run."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Annotated

import typer

from facemoe.cli.common import console, out, user_errors
from facemoe.cli.options import OneLineErrorsGroup

app = typer.Typer(
    add_completion=False,
    help="FaceMoE Edge: export, verify, benchmark and run FaceMoE.",
    cls=OneLineErrorsGroup,
    no_args_is_help=True,
)


@app.command()
@user_errors
def download(
    variant: Annotated[str, typer.Option(help="tinyface or briar (fine-tuned releases, N=3, k=2).")] = "tinyface",
    dest: Annotated[Path, typer.Option(help="Directory to store model.pt in.")] = Path("weights"),
) -> None:
    """Download official FaceMoE weights from the Hugging Face hub (needs network access)."""
    from facemoe.model.hub import download_official

    path = download_official(variant, dest)
    console.print(f"[green]downloaded[/] {path}\nexport it: facemoe-export --checkpoint {path} --fp16 --out bundle")


@app.command()
@user_errors
def parity(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory.")],
    checkpoint: Annotated[Path | None, typer.Option(help="Reference checkpoint (default: the manifest's).")] = None,
    count: Annotated[int, typer.Option(min=2, help="Number of held-out faces (two views each).")] = 32,
) -> None:
    """Re-check every artifact of a bundle against the PyTorch fp32 reference; exit 1 on a missed gate."""
    from facemoe.bundle import Bundle
    from facemoe.errors import FaceMoEError
    from facemoe.export.bundle_writer import parity_table
    from facemoe.export.inputs import paired_views, synthetic_faces
    from facemoe.export.parity import check_artifact, run_reference
    from facemoe.model import load_checkpoint
    from facemoe.model.random_weights import randomize

    loaded = Bundle(bundle)
    model_info = loaded.manifest.model
    src = model_info.get("source", {})
    cfg = model_info["config"]
    if checkpoint is not None:
        model = load_checkpoint(checkpoint, config=cfg, k=model_info["k"])
    elif src.get("random_weights"):
        from facemoe.model import build_model

        model = randomize(build_model(cfg), seed=int(src.get("seed", 0)))
    elif src.get("path") and Path(src["path"]).is_file():
        model = load_checkpoint(src["path"], config=cfg, k=model_info["k"])
    else:
        raise FaceMoEError(f"{bundle}: the reference checkpoint is not available here; pass --checkpoint")
    inputs = paired_views(synthetic_faces(count, size=cfg["img_size"], seed=777))
    reference = run_reference(model, inputs)
    results = {}
    for precision in loaded.precisions:
        path = loaded.artifact_path(precision, verify=True)
        results[precision] = check_artifact(
            model, path, precision, inputs, loaded.artifact(precision).parity.get("gates"), reference
        )
    out.print(parity_table(results))
    if not all(r.passed for r in results.values()):
        raise typer.Exit(1)


@app.command()
@user_errors
def info(bundle: Annotated[Path, typer.Argument(help="Bundle directory.")]) -> None:
    """Show what a bundle holds: model, artifacts, parity, engines."""
    from rich.table import Table

    from facemoe.bundle import Bundle

    loaded = Bundle(bundle)
    m = loaded.manifest
    console.print(
        f"model: {m.model.get('config')}  k={m.routing.get('k')}  random weights: {m.model.get('random_weights')}"
    )
    table = Table("artifact", "file", "opset", "cos mean", "cos min", "routing min", "parity")
    for precision in loaded.precisions:
        art = loaded.artifact(precision)
        p = art.parity
        table.add_row(
            precision,
            art.file,
            str(art.opset),
            f"{p.get('cosine_mean', float('nan')):.6f}",
            f"{p.get('cosine_min', float('nan')):.6f}",
            f"{p.get('routing_agreement_min') or float('nan'):.4f}",
            "pass" if p.get("passed") else "FAIL",
        )
    out.print(table)
    for engine in m.engines:
        out.print(f"engine: {engine}")


def _mount(module: str, attr: str, name: str) -> None:
    """Mount a command defined in another module when that module is present."""
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return
    func = getattr(mod, attr, None)
    if func is not None:
        app.command(name=name)(func)


_mount("facemoe.cli.export_cmd", "export", "export")
_mount("facemoe.cli.run_cmd", "run", "run")
_mount("facemoe.cli.enroll_cmd", "enroll", "enroll")
_mount("facemoe.cli.bench_cmd", "bench", "bench")
_mount("facemoe.cli.engine_cmd", "build_engine", "build-engine")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
