"""``facemoe-export``: official checkpoint -> deployment bundle (fp32 / fp16 / int8 ONNX, parity report)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from facemoe.bundle import MANIFEST_NAME
from facemoe.cli.common import OverwriteOption, console, user_errors
from facemoe.cli.options import CalibrationMethod, Gating, OneLineErrors, Precision, Preset, VersionOption
from facemoe.errors import FaceMoEError, OutputError

app = typer.Typer(add_completion=False, help=__doc__, no_args_is_help=True)

# Parity metrics a --gate can set, with the range a meaningful threshold lies in; facemoe.export.parity
# (DEFAULT_GATES, compare) reads the same names. Kept here so a typo fails before torch is imported.
GATE_METRICS: dict[str, tuple[float, float]] = {
    "cosine_mean": (-1.0, 1.0),
    "cosine_min": (-1.0, 1.0),
    "routing_min": (0.0, 1.0),
}
# Opsets the export accepts: 17 keeps LayerNormalization one node (onnx_export); 20 is the newest the
# TorchScript exporter writes (torch 2.14).
MIN_OPSET, MAX_OPSET = 17, 20


def parse_gates(values: list[str], exported: list[str], gating: str = "onnx") -> dict[str, dict[str, float]]:
    """``PRECISION.METRIC=VALUE`` overrides -> ``{precision: {metric: value}}``; only real metrics of
    artifacts this export writes, with values in the metric's range."""
    gates: dict[str, dict[str, float]] = {}
    for item in values:
        key, has_value, text = item.partition("=")
        precision, has_metric, metric = key.strip().partition(".")
        if not has_value or not has_metric:
            raise FaceMoEError(f"--gate {item!r}: expected PRECISION.METRIC=VALUE, e.g. fp16.cosine_mean=0.999")
        if precision not in [p.value for p in Precision]:
            raise FaceMoEError(f"--gate {item!r}: unknown precision {precision!r}; choose fp32, fp16 or int8")
        if precision not in exported:
            raise FaceMoEError(f"--gate {item!r}: this export writes no {precision} artifact (add --{precision})")
        if metric not in GATE_METRICS:
            raise FaceMoEError(f"--gate {item!r}: unknown metric {metric!r}; choose {', '.join(GATE_METRICS)}")
        if metric == "routing_min" and gating == "plugin":
            raise FaceMoEError(
                f"--gate {item!r}: with --gating plugin the routing is decided inside the custom node and "
                "is not measured, so a routing gate cannot apply"
            )
        low, high = GATE_METRICS[metric]
        try:
            value = float(text)
        except ValueError:
            raise FaceMoEError(f"--gate {item!r}: {text.strip()!r} is not a number") from None
        if not low <= value <= high:  # also refuses nan
            raise FaceMoEError(f"--gate {item!r}: {metric} must be between {low:g} and {high:g}")
        gates.setdefault(precision, {})[metric] = value
    return gates


def load_config(config: str) -> str | dict[str, object] | None:
    """``--config``: 'infer' -> None, a preset name, or the dict of a JSON file."""
    if config == "infer":
        return None
    if config in [p.value for p in Preset]:
        return config
    path = Path(config)
    if not config.endswith(".json"):
        choices = ", ".join(p.value for p in Preset)
        raise FaceMoEError(f"--config {config!r}: choose infer, a preset ({choices}) or a .json file")
    if not path.is_file():
        raise FaceMoEError(f"{path}: config file not found")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FaceMoEError(f"{path}: not a valid JSON config: {exc}") from None
    if not isinstance(data, dict):
        raise FaceMoEError(f"{path}: expected a JSON object of model settings, found {type(data).__name__}")
    return data


def check_bundle_dir(out: Path, *, overwrite: bool, inputs: tuple[Path | None, ...]) -> None:
    """The bundle-directory form of ``facemoe.fileio.check_output``: refuse before any work starts.

    ``atomic_directory`` replaces an existing bundle only after the new one is complete; this refuses
    what must never be replaced: a plain file, a directory that holds an input, or a directory that is
    not a bundle (``--out ~ --overwrite`` must not delete a home directory).
    """
    resolved = out.expanduser().resolve()
    for source in inputs:
        if source is None:
            continue
        src = source.expanduser().resolve()
        if src == resolved or resolved in src.parents:
            raise OutputError(f"{out}: the output bundle would replace the input {source}; choose another path")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: is a file, expected a bundle directory path")
    if out.is_dir():
        if not overwrite:
            raise OutputError(f"{out}: already exists (pass --overwrite to replace it)")
        if not (out / MANIFEST_NAME).is_file() and any(out.iterdir()):
            raise OutputError(
                f"{out}: is not a FaceMoE bundle (no {MANIFEST_NAME}); refusing to replace it, choose another path"
            )


@app.command(cls=OneLineErrors)
@user_errors
def export(
    out: Annotated[Path, typer.Option("--out", "-o", help="Bundle directory to create.")],
    checkpoint: Annotated[
        Path | None, typer.Option(help="Official model.pt (plain state dict) or checkpoint_gpu_*.pt.")
    ] = None,
    config: Annotated[
        str,
        typer.Option(
            help="The architecture: 'infer' (from the checkpoint's shapes; tiny with --random-weights), a preset "
            "(full, small, tiny) or a JSON file."
        ),
    ] = "infer",
    k: Annotated[
        int, typer.Option(min=1, help="Experts per token. Not stored in checkpoints; the release uses 2.")
    ] = 2,
    fp16: Annotated[bool, typer.Option("--fp16", help="Add the mixed-precision FP16 ONNX.")] = False,
    int8: Annotated[bool, typer.Option("--int8", help="Add the Q/DQ INT8 ONNX (needs --calib).")] = False,
    calib: Annotated[
        list[Path] | None, typer.Option(help="Calibration faces: folders of aligned crops, images or videos.")
    ] = None,
    calib_count: Annotated[int, typer.Option(min=1, help="Number of calibration faces.")] = 256,
    calib_method: Annotated[
        CalibrationMethod, typer.Option(help="How INT8 ranges are taken from the calibration activations.")
    ] = CalibrationMethod.percentile,
    calib_seed: Annotated[int, typer.Option(min=0, help="Seed of sampling and degradations.")] = 0,
    calib_cache: Annotated[
        Path | None,
        typer.Option(
            help="Calibration cache directory (default: $FACEMOE_CACHE/calibration, else ~/.cache/facemoe/calibration)."
        ),
    ] = None,
    int8_float_blocks: Annotated[
        int, typer.Option(min=0, help="INT8: transformer blocks kept float, counted from the input (0: none).")
    ] = 1,
    int8_attention: Annotated[
        bool, typer.Option("--int8-attention", help="INT8: quantize the attention q@k and attn@v matmuls too.")
    ] = False,
    opset: Annotated[int, typer.Option(min=MIN_OPSET, max=MAX_OPSET, help="ONNX opset.")] = 17,
    max_batch: Annotated[
        int, typer.Option(min=1, help="Largest number of faces per model call (recorded; the engine profile's max).")
    ] = 32,
    gating: Annotated[
        Gating, typer.Option(help="'onnx' (standard ops) or 'plugin' (custom facemoe::SparseMoE op).")
    ] = Gating.onnx,
    random_weights: Annotated[
        bool, typer.Option("--random-weights", help="No checkpoint: random weights (demos and tests only).")
    ] = False,
    preset: Annotated[Preset | None, typer.Option(hidden=True, help="Old name of --config PRESET.")] = None,
    seed: Annotated[int, typer.Option(min=0, help="Seed for --random-weights.")] = 0,
    gate: Annotated[
        list[str] | None,
        typer.Option(
            help="Override a parity gate: PRECISION.METRIC=VALUE, METRIC one of "
            f"{', '.join(GATE_METRICS)}; e.g. fp16.cosine_mean=0.9995 (repeatable)."
        ),
    ] = None,
    no_gate: Annotated[
        bool, typer.Option("--no-gate", help="Write the bundle even when a gate fails (marked in the manifest).")
    ] = False,
    engine: Annotated[
        bool,
        typer.Option("--engine", help="Also build a TensorRT engine here (the fastest precision that passed parity)."),
    ] = False,
    overwrite: bool = OverwriteOption,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")] = False,
    version: Annotated[bool, VersionOption] = False,
) -> None:
    """Export a FaceMoE checkpoint into a deployment bundle and check every artifact against PyTorch."""
    # Every check that needs no model runs before torch is imported (seconds on a cold start).
    precisions = ["fp32"] + (["fp16"] if fp16 else []) + (["int8"] if int8 else [])
    gates = parse_gates(gate or [], precisions, gating.value)
    if int8 and not calib:
        raise FaceMoEError("--int8 needs --calib PATH (folders of aligned face crops, images or videos)")
    if calib and not int8:
        raise FaceMoEError("--calib is only used for the INT8 artifact: add --int8, or leave out --calib")
    for path in calib or []:
        if not path.exists():
            raise FaceMoEError(f"{path}: calibration path not found (--calib)")
    if checkpoint is None and not random_weights:
        raise FaceMoEError(
            "no --checkpoint given. Get the official weights with `facemoe download`, or pass "
            "--random-weights for a demo bundle whose identities are meaningless"
        )
    if checkpoint is not None and random_weights:
        raise FaceMoEError("--random-weights and --checkpoint exclude each other")
    if checkpoint is not None and not checkpoint.is_file():
        raise FaceMoEError(f"{checkpoint}: checkpoint file not found")
    model_config = load_config(config)
    if preset is not None:  # the old --preset NAME is --config NAME
        if model_config is not None and model_config != preset.value:
            raise FaceMoEError(f"--preset {preset.value} and --config {config} disagree: use --config alone")
        model_config = preset.value
    if random_weights and model_config is None:
        model_config = Preset.tiny.value
    check_bundle_dir(out, overwrite=overwrite, inputs=(checkpoint, *(calib or [])))
    if engine:
        from facemoe.export.tensorrt import require_tensorrt

        require_tensorrt()  # fail before a long export, not after it

    from facemoe.extras import require_torch

    torch = require_torch("facemoe-export")

    from facemoe.cli.export_progress import RichExportReporter
    from facemoe.export.bundle_writer import CalibrationSpec, export_bundle
    from facemoe.fileio import sha256_file
    from facemoe.model import build_model, load_checkpoint
    from facemoe.model.random_weights import randomize

    torch.set_num_threads(max(1, torch.get_num_threads()))
    if checkpoint is None:
        assert model_config is not None  # set above for --random-weights
        arch = model_config if isinstance(model_config, str) else "custom"
        model = randomize(build_model(model_config), seed=seed)
        _check_k(k, model.config.num_experts, f"the {arch} config")
        model.set_k(k)
        source: dict[str, object] = {"random_weights": True, "preset": arch, "seed": seed}
        console.print(f"[yellow]random weights ({arch} config): embeddings carry no identity information[/]")
    else:
        model = load_checkpoint(checkpoint, config=model_config, k=k)
        source = {"path": str(checkpoint.resolve()), "sha256": sha256_file(checkpoint), "k": k}
        console.print(f"loaded {checkpoint}: config {model.config.to_dict()}")
    blocks = sum(model.config.depths)
    if int8 and int8_float_blocks > blocks:
        raise FaceMoEError(f"--int8-float-blocks {int8_float_blocks}: the model has only {blocks} blocks")
    spec = None
    if calib:
        from facemoe.calibration.cache import default_directory

        cache_dir = calib_cache or default_directory()
        spec = CalibrationSpec(
            paths=list(calib),
            count=calib_count,
            method=calib_method.value,
            seed=calib_seed,
            cache_dir=cache_dir,
            float_blocks=int8_float_blocks,
            quantize_attention_matmuls=int8_attention,
        )
    with RichExportReporter(console, progress=not quiet) as reporter:
        result = export_bundle(
            model,
            out,
            precisions=precisions,
            overwrite=overwrite,
            random_weights=checkpoint is None,
            source=source,
            calib=spec,
            opset=opset,
            max_batch=max_batch,
            gates=gates,
            gating=gating.value,
            enforce_gates=not no_gate,
            reporter=reporter,
        )
    console.print(f"[green]bundle written:[/] {result.path} ({', '.join(precisions)})")
    if engine:
        from facemoe.bundle import Bundle
        from facemoe.export.tensorrt import BuildOptions, build_engine
        from facemoe.runtime.backends.select import engine_precision

        target = engine_precision(Bundle(result.path))  # the precision `auto` tries first
        built = build_engine(
            result.path,
            BuildOptions(precision=target, opt_batch=min(8, max_batch), max_batch=max_batch),
            log=console.print,
        )
        console.print(f"[green]engine written:[/] {built}")


def _check_k(k: int, experts: int, where: str) -> None:
    if k > experts:
        raise FaceMoEError(f"--k {k}: {where} has {experts} experts per block, so k must be 1..{experts}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
