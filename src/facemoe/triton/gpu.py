"""The GPU repository: the bundle's ONNX on Triton's onnxruntime backend, its engine on tensorrt.

``facemoe triton-repo`` writes it for a GPU server running NVIDIA Triton Inference Server (the NGC
container has both backends); preprocessing and the ensemble are those of the serve repository
(docs/SCALE_OUT.md#gpu-repository).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from facemoe.bundle import Bundle, EngineEntry
from facemoe.errors import BundleError, FaceMoEError
from facemoe.fileio import sha256_file
from facemoe.runtime.backends.select import PRECISION_ORDER, engine_precision
from facemoe.triton.config import DynamicBatching, InstanceGroup, ModelConfig
from facemoe.triton.gpu_readme import engine_warning, repository_readme
from facemoe.triton.onnx_io import OnnxInterface, read_interface
from facemoe.triton.repository import (
    DEFAULT_QUEUE_DELAY_US,
    EMBEDDER,
    ENSEMBLE,
    PREPROCESS,
    batching,
    bundle_max_batch,
    copy_manifest,
    ensemble_config,
    identity_parameters,
    preprocess_config,
    staged_repository,
    write_model,
    write_preprocess,
)

EMBEDDER_TRT = "facemoe_embedder_trt"
ENSEMBLE_TRT = "facemoe_trt"


@dataclass
class GpuRepository:
    """A written GPU repository; ``warnings`` are for the user (an engine tied to its GPU, ...)."""

    root: Path
    precision: str
    models: list[str]
    engine: str | None = None
    warnings: list[str] = field(default_factory=list)


def _interface(bundle: Bundle, path: Path) -> OnnxInterface:
    """The ONNX's own interface, checked against the manifest (names, per-sample shapes, a dynamic batch)."""
    m = bundle.manifest
    io = read_interface(path)
    size, dim = int(m.preprocessing.input_size), int(m.embedding_size)
    problems = []
    if [t.name for t in io.inputs] != [m.input_name]:
        problems.append(f"inputs {[t.name for t in io.inputs]}, the manifest says one named {m.input_name!r}")
    elif any(d not in (want, -1) for d, want in zip(io.inputs[0].dims, (3, size, size), strict=False)):
        problems.append(f"input dims {io.inputs[0].dims}, the manifest says [3, {size}, {size}]")
    if m.output_name not in [t.name for t in io.outputs]:
        problems.append(f"outputs {[t.name for t in io.outputs]}, the manifest says one named {m.output_name!r}")
    elif io.output(m.output_name).dims not in ([dim], [-1]):
        problems.append(f"output dims {io.output(m.output_name).dims}, the manifest says [{dim}]")
    if io.fixed_batch is not None:
        problems.append(f"a fixed batch of {io.fixed_batch} (Triton batches need a dynamic first dimension)")
    if problems:
        raise BundleError(f"{path}: cannot be served: {'; '.join(problems)}")
    return io


def _choose_precision(bundle: Bundle, precision: str | None) -> tuple[str, list[str]]:
    if precision is not None and precision not in PRECISION_ORDER:
        raise FaceMoEError(f"unknown precision {precision!r}; choose {', '.join(PRECISION_ORDER)}")
    chosen = precision or engine_precision(bundle)
    artifact = bundle.artifact(chosen)  # one line naming the precisions the bundle has
    if artifact.gating != "onnx":
        raise BundleError(
            f"{bundle.root / artifact.file}: uses facemoe's custom gating op ({artifact.gating}), which Triton's "
            "onnxruntime backend cannot load; re-export with --gating onnx"
        )
    failure = bundle.parity_failure(chosen)
    notes = [f"the {chosen} model missed its parity gate at export: {failure}"] if failure else []
    return chosen, notes


def _embedder(
    name: str, platform: str, io: OnnxInterface, batch: int, dynamic: DynamicBatching, instances: int
) -> ModelConfig:
    return ModelConfig(
        name=name,
        platform=platform,
        max_batch_size=batch,
        inputs=io.inputs,
        outputs=io.outputs,
        dynamic_batching=dynamic,
        instance_groups=[InstanceGroup("KIND_GPU", instances)],
    )


def _engine(bundle: Bundle, precision: str) -> EngineEntry | None:
    """The engine to ship: one built from ``precision``'s ONNX, else none."""
    matching = [e for e in bundle.manifest.engines if e.precision == precision]
    return matching[0] if matching else None


def write_gpu_repository(
    bundle_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    precision: str | None = None,
    max_batch: int | None = None,
    max_queue_delay_us: int = DEFAULT_QUEUE_DELAY_US,
    instances: int = 1,
    preferred_batch_sizes: list[int] | None = None,
    python_path: list[str] | None = None,
    include_engine: bool = True,
    overwrite: bool = False,
) -> GpuRepository:
    """Write the GPU repository for ``bundle_dir`` at ``out_dir`` (validated, all or nothing).

    ``precision`` None: the fastest that passed parity. ``python_path``: where the server's Python finds
    facemoe for the preprocessing model (default none: facemoe installed in the server's Python).
    """
    bundle = Bundle(bundle_dir)
    chosen, warnings = _choose_precision(bundle, precision)
    if instances < 1:
        raise FaceMoEError(f"--instances {instances}: must be at least 1")
    onnx_path = bundle.artifact_path(chosen, verify=True)
    io = _interface(bundle, onnx_path)
    m = bundle.manifest
    batch = max_batch if max_batch is not None else bundle_max_batch(bundle)
    dynamic = batching(batch, preferred_batch_sizes, max_queue_delay_us)
    in_type, out_type = io.inputs[0].data_type, io.output(m.output_name).data_type
    embedder = _embedder(EMBEDDER, "onnxruntime_onnx", io, batch, dynamic, instances)
    embedder.parameters = identity_parameters(bundle, chosen)
    files: dict[str, Path | str] = {"model.onnx": onnx_path}
    files |= {Path(extra).name: bundle.root / extra for extra in bundle.artifact(chosen).external_data}
    engine = _engine(bundle, chosen) if include_engine else None
    engine_path = bundle.root / engine.file if engine is not None else None
    if engine_path is not None and engine is not None:
        if not engine_path.is_file():
            raise BundleError(f"{engine_path}: engine listed in the manifest is missing")
        if engine.sha256 and sha256_file(engine_path) != engine.sha256:
            raise BundleError(f"{engine_path}: sha256 does not match the manifest; the engine was modified")
        warnings.append(engine_warning(engine))
    paths = [str(Path(p).expanduser().resolve()) for p in (python_path or [])]
    models = [PREPROCESS, EMBEDDER, ENSEMBLE]
    with staged_repository(Path(out_dir), overwrite, bundle) as root:
        write_preprocess(root, preprocess_config(bundle, batch, dynamic, instances, paths, in_type))
        write_model(root, embedder, files)
        write_model(root, ensemble_config(bundle, ENSEMBLE, EMBEDDER, (m.input_name, m.output_name), batch, out_type))
        if engine is not None and engine_path is not None:
            trt_batch = min(batch, engine.max_batch or batch)
            trt_dynamic = batching(
                trt_batch, [s for s in dynamic.preferred_batch_size if s <= trt_batch], max_queue_delay_us
            )
            trt = _embedder(EMBEDDER_TRT, "tensorrt_plan", io, trt_batch, trt_dynamic, instances)
            trt.parameters = identity_parameters(bundle, chosen) | {
                "facemoe_engine_sha256": engine.sha256 or sha256_file(engine_path),
                "facemoe_engine_gpu": f"{engine.gpu_name} ({engine.compute_capability})",
                "facemoe_engine_tensorrt": str(engine.tensorrt_version),
            }
            write_model(root, trt, {"model.plan": engine_path})
            (root / EMBEDDER_TRT / "README.md").write_text(engine_warning(engine) + "\n", encoding="utf-8")
            ensemble = ensemble_config(
                bundle, ENSEMBLE_TRT, EMBEDDER_TRT, (m.input_name, m.output_name), trt_batch, out_type
            )
            write_model(root, ensemble)
            models += [EMBEDDER_TRT, ENSEMBLE_TRT]
        copy_manifest(bundle, root)
        (root / "README.md").write_text(repository_readme(bundle, chosen, models, batch, bool(paths)), encoding="utf-8")
    return GpuRepository(Path(out_dir), chosen, models, engine.file if engine else None, warnings)


__all__ = ["EMBEDDER_TRT", "ENSEMBLE_TRT", "GpuRepository", "write_gpu_repository"]
