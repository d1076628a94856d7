"""``facemoe-export``: official checkpoint -> deployment bundle (fp32 / fp16 / int8 ONNX, parity report)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from facemoe.cli.common import console, user_errors
from facemoe.errors import FaceMoEError

app = typer.Typer(add_completion=False, help=__doc__, no_args_is_help=True)


def _parse_gates(values: list[str]) -> dict[str, dict[str, float]]:
    gates: dict[str, dict[str, float]] = {}
    for item in values:
        try:
            key, value = item.split("=", 1)
            precision, metric = key.split(".", 1)
            gates.setdefault(precision, {})[metric] = float(value)
        except ValueError:
            raise FaceMoEError(
                f"--gate {item!r}: expected PRECISION.METRIC=VALUE, e.g. fp16.cosine_mean=0.999"
            ) from None
    return gates


def _load_config(config: str) -> str | dict[str, object] | None:
    if config == "infer":
        return None
    path = Path(config)
    if config.endswith(".json"):
        if not path.is_file():
            raise FaceMoEError(f"{path}: config file not found")
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise FaceMoEError(f"{path}: not valid JSON: {exc}") from exc
    return config


@app.command()
@user_errors
def export(
    out: Annotated[Path, typer.Option("--out", "-o", help="Bundle directory to create.")],
    checkpoint: Annotated[
        Path | None, typer.Option(help="Official model.pt (plain state dict) or checkpoint_gpu_*.pt.")
    ] = None,
    config: Annotated[
        str, typer.Option(help="'infer' (from the checkpoint's shapes), a preset (full, tiny) or a JSON file.")
    ] = "infer",
    k: Annotated[int, typer.Option(help="Experts per token. Not stored in checkpoints; the release uses 2.")] = 2,
    fp16: Annotated[bool, typer.Option("--fp16", help="Add the mixed-precision FP16 ONNX.")] = False,
    int8: Annotated[bool, typer.Option("--int8", help="Add the Q/DQ INT8 ONNX (needs --calib).")] = False,
    calib: Annotated[
        list[Path] | None, typer.Option(help="Calibration faces: folders of aligned crops, images or videos.")
    ] = None,
    calib_count: Annotated[int, typer.Option(help="Number of calibration faces.")] = 256,
    calib_method: Annotated[str, typer.Option(help="max, percentile or entropy.")] = "percentile",
    calib_seed: Annotated[int, typer.Option(help="Seed of sampling and degradations.")] = 0,
    calib_cache: Annotated[
        Path | None, typer.Option(help="Calibration cache directory (default: ~/.cache/facemoe/calibration).")
    ] = None,
    int8_float_blocks: Annotated[
        int, typer.Option(help="INT8: transformer blocks kept float, counted from the input (0: none).")
    ] = 1,
    int8_attention: Annotated[
        bool, typer.Option("--int8-attention", help="INT8: quantize the attention q@k and attn@v matmuls too.")
    ] = False,
    opset: Annotated[int, typer.Option(help="ONNX opset (>= 17).")] = 17,
    max_batch: Annotated[int, typer.Option(help="Largest batch the runtime should plan for.")] = 32,
    gating: Annotated[str, typer.Option(help="'onnx' (standard ops) or 'plugin' (custom facemoe op).")] = "onnx",
    random_weights: Annotated[
        bool, typer.Option("--random-weights", help="No checkpoint: random weights (demos and tests only).")
    ] = False,
    preset: Annotated[str, typer.Option(help="Preset for --random-weights.")] = "tiny",
    seed: Annotated[int, typer.Option(help="Seed for --random-weights.")] = 0,
    gate: Annotated[
        list[str] | None, typer.Option(help="Override a parity gate, e.g. fp16.cosine_mean=0.9995 (repeatable).")
    ] = None,
    no_gate: Annotated[
        bool, typer.Option("--no-gate", help="Write the bundle even when a gate fails (marked in the manifest).")
    ] = False,
    engine: Annotated[
        bool,
        typer.Option("--engine", help="Also build a TensorRT engine here (the fastest precision that passed parity)."),
    ] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing bundle.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")] = False,
) -> None:
    """Export a FaceMoE checkpoint into a deployment bundle and check every artifact against PyTorch."""
    import torch

    from facemoe.export.bundle_writer import CalibrationSpec, export_bundle
    from facemoe.fileio import sha256_file
    from facemoe.model import build_model, load_checkpoint
    from facemoe.model.random_weights import randomize

    if gating not in ("onnx", "plugin"):
        raise FaceMoEError(f"--gating {gating}: choose 'onnx' (standard ops) or 'plugin' (facemoe::SparseMoE)")
    if engine:
        from facemoe.export.tensorrt import require_tensorrt

        require_tensorrt()  # fail before a long export, not after it
    if int8 and not calib:
        raise FaceMoEError("--int8 needs --calib PATH (folders of aligned face crops, images or videos)")
    if int8_float_blocks < 0:
        raise FaceMoEError(f"--int8-float-blocks must be >= 0, got {int8_float_blocks}")
    if out.exists() and not overwrite:
        raise FaceMoEError(f"{out}: already exists (pass --overwrite to replace it)")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if checkpoint is None:
        if not random_weights:
            raise FaceMoEError(
                "no --checkpoint given. Get the official weights with `facemoe download`, or pass "
                "--random-weights for a demo bundle whose identities are meaningless"
            )
        model = randomize(build_model(preset), seed=seed).set_k(k)
        source: dict[str, object] = {"random_weights": True, "preset": preset, "seed": seed}
        console.print(f"[yellow]random weights ({preset} preset): embeddings carry no identity information[/]")
    else:
        if random_weights:
            raise FaceMoEError("--random-weights and --checkpoint exclude each other")
        model = load_checkpoint(checkpoint, config=_load_config(config), k=k)
        source = {"path": str(checkpoint.resolve()), "sha256": sha256_file(checkpoint), "k": k}
        console.print(f"loaded {checkpoint}: config {model.config.to_dict()}")
    spec = None
    if calib:
        cache_dir = calib_cache or Path.home() / ".cache" / "facemoe" / "calibration"
        spec = CalibrationSpec(
            paths=list(calib),
            count=calib_count,
            method=calib_method,
            seed=calib_seed,
            cache_dir=cache_dir,
            float_blocks=int8_float_blocks,
            quantize_attention_matmuls=int8_attention,
        )
    precisions = ["fp32"] + (["fp16"] if fp16 else []) + (["int8"] if int8 else [])
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
        gates=_parse_gates(gate or []),
        gating=gating,
        enforce_gates=not no_gate,
        progress=not quiet,
        console=console,
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
