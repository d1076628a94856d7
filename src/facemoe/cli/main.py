"""``facemoe``: one command with sub-commands for everything besides export and run."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from facemoe.cli.common import console, fail, out, user_errors
from facemoe.cli.options import OneLineErrorsGroup, VersionOption
from facemoe.extras import missing_extra_message

app = typer.Typer(
    add_completion=False,
    help="FaceMoE Edge: export, verify, benchmark and run FaceMoE.",
    cls=OneLineErrorsGroup,
    no_args_is_help=True,
)


@app.callback()
def _root(version: Annotated[bool, VersionOption] = False) -> None:
    """FaceMoE Edge: export, verify, benchmark and run FaceMoE."""


@app.command()
@user_errors
def download(
    variant: Annotated[str, typer.Option(help="tinyface or briar (fine-tuned releases, N=3, k=2).")] = "tinyface",
    dest: Annotated[Path, typer.Option(help="Directory to store model.pt in.")] = Path("weights"),
) -> None:
    """Download official FaceMoE weights from the Hugging Face hub (needs network access)."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from facemoe.hub import download_official

    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task(f"downloading {variant}", total=None)
        path = download_official(
            variant, dest, progress=lambda done, total: bar.update(task, completed=done, total=total)
        )
    console.print(f"[green]downloaded[/] {path}\nexport it: facemoe-export --checkpoint {path} --fp16 --out bundle")


@app.command()
@user_errors
def parity(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory.")],
    checkpoint: Annotated[Path | None, typer.Option(help="Reference checkpoint (default: the manifest's).")] = None,
    count: Annotated[
        int,
        typer.Option(
            min=2, help="Synthetic held-out faces (two views each), for bundles that do not store their inputs."
        ),
    ] = 32,
    faces: Annotated[
        Path | None,
        typer.Option(help="Check on your own aligned face crops instead (e.g. those facemoe-run --audit-save kept)."),
    ] = None,
) -> None:
    """Re-check every artifact of a bundle against the PyTorch fp32 reference; exit 1 on a missed gate."""
    from facemoe.extras import require_torch

    require_torch("facemoe parity")
    from facemoe.bundle import Bundle
    from facemoe.cli.export_progress import NOISE_FLOOR_CAPTION, NOISE_FLOOR_ROW, parity_table
    from facemoe.export.inputs import recorded_parity_inputs
    from facemoe.export.parity import DEFAULT_GATES, check_artifacts, noise_floor, run_reference
    from facemoe.model.inference import load_reference_model

    loaded = Bundle(bundle)
    # The same loader as the torch backend: refuses weights other than the bundle's (weights_sha256).
    model = load_reference_model(loaded, checkpoint)
    if faces is not None:
        from facemoe.export.user_faces import load_face_inputs

        inputs, said = load_face_inputs(faces, loaded.manifest.preprocessing)
    else:
        export_info = loaded.manifest.model.export
        recorded = (export_info.parity_inputs if export_info is not None else None) or {}
        inputs, said = recorded_parity_inputs(Path(bundle), recorded, count)
    console.print(f"inputs: {said}")
    reference = run_reference(model, inputs)
    layer_names = [name for name, _ in model.moe_layers()]
    paths = {precision: loaded.artifact_path(precision, verify=True) for precision in loaded.precisions}
    gates = {
        precision: loaded.artifact(precision).parity.get("gates") or DEFAULT_GATES[precision] for precision in paths
    }
    results, _ = check_artifacts(reference, paths, inputs, layer_names, gates)
    out.print(parity_table({**results, NOISE_FLOOR_ROW: noise_floor(model, inputs, reference, layer_names)}))
    console.print(NOISE_FLOOR_CAPTION, style="dim")
    if not all(r.passed for r in results.values()):
        raise typer.Exit(1)


@app.command()
@user_errors
def info(bundle: Annotated[Path, typer.Argument(help="Bundle directory.")]) -> None:
    """Show what a bundle holds (model, artifacts, parity, engines) and check every file's presence and sha256.

    Exits 2 when a listed file is missing or modified.
    """
    from rich.table import Table

    from facemoe.bundle import Bundle
    from facemoe.errors import BundleError

    loaded = Bundle(bundle)
    problems = loaded.verify()
    m = loaded.manifest
    source = m.model.source
    origin = f"random weights (seed {source.seed})" if m.model.random_weights else (source.path or "unrecorded")
    console.print(f"model: {m.model.config}  k={m.routing.k}  weights: {origin}")
    table = Table("artifact", "file", "opset", "cos mean", "cos min", "routing min", "parity", "files")
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
            "BROKEN" if any(str(loaded.root / art.file) in problem for problem in problems) else "ok",
        )
    out.print(table)
    for engine in m.engines:
        out.print(
            f"engine: {engine.file}  {engine.precision}  {engine.gpu_name} ({engine.compute_capability})  "
            f"TensorRT {engine.tensorrt_version}  batch {engine.min_batch}/{engine.opt_batch}/{engine.max_batch}"
        )
    if problems:
        raise BundleError(f"{bundle}: broken bundle: " + "; ".join(problems))
    console.print(f"[green]verified[/] {len(loaded.precisions)} artifacts, {len(m.engines)} engines (sha256)")


def _unavailable(name: str, module: str, exc: ImportError) -> Callable[..., None]:
    """A stand-in for a command whose module failed to import: listed in --help, one line when run."""
    hint = missing_extra_message(exc, f"facemoe {name}") or f"facemoe {name} is unavailable: {module}: {exc}"

    def command(args: Annotated[list[str] | None, typer.Argument(hidden=True)] = None) -> None:
        fail(hint)

    command.__doc__ = f"(unavailable here) {hint}"
    return command


def _mount(module: str, attr: str, name: str) -> None:
    """Mount a command defined in another module; if that module cannot be imported, a stand-in that says why.

    A command never silently disappears from ``facemoe --help``: the command modules import only typer and
    rich at the top (heavy dependencies load inside the command), so a failure here is a broken install.
    """
    try:
        func = getattr(importlib.import_module(module), attr)
    except ImportError as exc:
        settings = {"allow_extra_args": True, "ignore_unknown_options": True}
        app.command(name=name, context_settings=settings)(_unavailable(name, module, exc))
        return
    app.command(name=name)(func)


_mount("facemoe.cli.serve_cmd", "serve", "serve")
_mount("facemoe.cli.export_cmd", "export", "export")
_mount("facemoe.cli.run_cmd", "run", "run")
_mount("facemoe.cli.enroll_cmd", "enroll", "enroll")
_mount("facemoe.cli.bench_cmd", "bench", "bench")
_mount("facemoe.cli.engine_cmd", "build_engine", "build-engine")
_mount("facemoe.cli.triton_cmd", "triton_repo", "triton-repo")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
