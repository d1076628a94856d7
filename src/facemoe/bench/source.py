"""What ``facemoe bench`` measures: a bundle, or a model built here (exported to a temporary bundle when the
ONNX Runtime / TensorRT rows need one)."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from facemoe.bundle import Bundle
from facemoe.errors import FaceMoEError


@dataclass
class BenchSource:
    """What is benchmarked: an in-memory model (torch rows) and/or a bundle (ORT / TensorRT rows)."""

    description: str
    model: Any = None
    bundle: Bundle | None = None
    checkpoint: Path | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "description": self.description,
            "bundle": str(self.bundle.root) if self.bundle else None,
            "checkpoint": str(self.checkpoint) if self.checkpoint else None,
        }


@contextmanager
def prepare_source(
    *,
    bundle: str | Path | None = None,
    preset: str = "tiny",
    random_weights: bool = False,
    checkpoint: str | Path | None = None,
    need_bundle: bool = False,
    bundle_precisions: Sequence[str] = ("fp32",),
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> Iterator[BenchSource]:
    """Open ``bundle``, or build the model (``preset`` + random weights or ``checkpoint``) and, when the
    backends need one, export a temporary bundle from it (deleted afterwards)."""
    if bundle is not None:
        opened = Bundle(bundle)
        yield BenchSource(f"bundle {opened.root}", bundle=opened)
        return
    if not random_weights and checkpoint is None:
        raise FaceMoEError("give a bundle (--bundle), a checkpoint (--checkpoint) or --random-weights")
    from facemoe.model import build_model, load_checkpoint
    from facemoe.model.random_weights import randomize

    if checkpoint is not None:
        model = load_checkpoint(checkpoint, config="infer" if preset == "infer" else preset)
        description = f"{preset} preset, checkpoint {checkpoint}"
    else:
        log(f"building the {preset} model with random weights (seed {seed})")
        model = randomize(build_model(preset), seed=seed)
        description = f"{preset} preset, random weights (seed {seed})"
    if not need_bundle:
        yield BenchSource(description, model=model, checkpoint=Path(checkpoint) if checkpoint else None)
        return
    from facemoe.export.bundle_writer import export_bundle

    with tempfile.TemporaryDirectory(prefix="facemoe-bench-") as tmp:
        precisions = tuple(p for p in bundle_precisions if p in ("fp32", "fp16")) or ("fp32",)
        log(f"exporting a temporary bundle ({', '.join(precisions)}) for the ONNX Runtime / TensorRT rows")
        source_info: dict[str, Any] = (
            {"path": str(Path(checkpoint).resolve())}
            if checkpoint
            else {"random_weights": True, "preset": preset, "seed": seed}
        )
        result = export_bundle(
            model,
            Path(tmp) / "bundle",
            precisions=precisions,
            random_weights=checkpoint is None,
            source=source_info,
        )
        yield BenchSource(
            description,
            model=model,
            bundle=Bundle(result.path),
            checkpoint=Path(checkpoint) if checkpoint else None,
        )


__all__ = ["BenchSource", "prepare_source"]
