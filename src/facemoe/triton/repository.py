"""What both facemoe Triton Inference Server model repositories share (docs/SCALE_OUT.md#repositories).

Model and tensor names, the preprocessing model and the ensemble, the identity parameters that tie a
served model to its bundle, the copied manifest, and writing the whole repository under a temporary name
so that a failed or interrupted write leaves nothing that looks like a repository.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import site
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from facemoe.bundle import MANIFEST_NAME, Bundle
from facemoe.bundle import copy_manifest as copy_bundle_manifest
from facemoe.errors import FaceMoEError, OutputError
from facemoe.fileio import atomic_directory, sha256_file
from facemoe.triton.config import DynamicBatching, EnsembleStep, InstanceGroup, ModelConfig, Tensor
from facemoe.triton.model_files import SYS_PATH_PARAMETER, model_py
from facemoe.triton.python_models import CROPS, EMBEDDING, INPUT
from facemoe.triton.validate import validate_repository

ENSEMBLE = "facemoe"
EMBEDDER = "facemoe_embedder"
PREPROCESS = "facemoe_preprocess"
# The ensemble's name for the tensor between the two steps.
PREPROCESSED = "preprocessed"
DEFAULT_QUEUE_DELAY_US = 1000
# Identity parameters of the embedder (docs/SCALE_OUT.md#manifest-contract).
MANIFEST_SHA256 = "facemoe_manifest_sha256"
MODEL_SHA256 = "facemoe_model_sha256"
WEIGHTS_SHA256 = "facemoe_weights_sha256"
PRECISION = "facemoe_precision"


def default_python_path() -> list[str]:
    """Directories the server's Python stub needs to import facemoe and its dependencies: the one holding
    this facemoe package (a source checkout or site-packages) and this interpreter's site-packages."""
    import facemoe

    paths = [str(Path(facemoe.__file__).resolve().parent.parent)]
    candidates = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    with contextlib.suppress(AttributeError):  # virtualenv's old site module lacks it
        candidates += site.getsitepackages()
    candidates += [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
    for path in candidates:
        resolved = str(Path(path).resolve())
        if Path(resolved).is_dir() and resolved not in paths:
            paths.append(resolved)
    return paths


def bundle_max_batch(bundle: Bundle) -> int:
    export = bundle.manifest.model.export
    return int(export.max_batch) if export is not None and export.max_batch else 32


def batching(max_batch: int, preferred: list[int] | None, delay_us: int) -> DynamicBatching:
    """Dynamic batching; by default the powers of two from 4 up to ``max_batch`` (and ``max_batch``)."""
    if max_batch < 1:
        raise FaceMoEError(f"--max-batch {max_batch}: must be at least 1")
    if delay_us < 0:
        raise FaceMoEError(f"--max-queue-delay-us {delay_us}: must be at least 0")
    if preferred is None:
        preferred = [s for s in (4, 8, 16, 32, 64, 128, 256) if s < max_batch] + [max_batch]
    bad = [s for s in preferred if s < 1 or s > max_batch]
    if bad:
        raise FaceMoEError(f"preferred batch size {bad[0]} is not in 1..{max_batch} (the max batch)")
    return DynamicBatching(sorted(set(preferred)), delay_us)


def identity_parameters(bundle: Bundle, precision: str) -> dict[str, str]:
    """What a client compares with its local bundle before trusting the served embeddings."""
    return {
        MANIFEST_SHA256: sha256_file(bundle.root / MANIFEST_NAME),
        MODEL_SHA256: bundle.artifact(precision).sha256,
        WEIGHTS_SHA256: bundle.weights_fingerprint,
        PRECISION: precision,
    }


def preprocess_config(
    bundle: Bundle,
    max_batch: int,
    dynamic: DynamicBatching,
    instances: int,
    python_path: list[str],
    output_type: str = "TYPE_FP32",
) -> ModelConfig:
    pre = bundle.manifest.preprocessing
    aligned, size = int(pre.aligned_size), int(pre.input_size)
    return ModelConfig(
        name=PREPROCESS,
        backend="python",
        max_batch_size=max_batch,
        inputs=[Tensor(CROPS, "TYPE_UINT8", [aligned, aligned, 3])],
        outputs=[Tensor(INPUT, output_type, [3, size, size])],
        dynamic_batching=dynamic,
        instance_groups=[InstanceGroup("KIND_CPU", instances)],
        parameters={
            SYS_PATH_PARAMETER: os.pathsep.join(python_path),
            "facemoe_preprocessing": json.dumps(pre.to_json(), sort_keys=True),
            "facemoe_output_dtype": "float16" if output_type == "TYPE_FP16" else "float32",
        },
    )


def ensemble_config(
    bundle: Bundle, name: str, embedder: str, embedder_io: tuple[str, str], max_batch: int, output_type: str
) -> ModelConfig:
    """crops -> ``facemoe_preprocess`` -> ``embedder`` -> embedding; ``embedder_io`` = its (input, output)."""
    pre = bundle.manifest.preprocessing
    aligned = int(pre.aligned_size)
    return ModelConfig(
        name=name,
        platform="ensemble",
        max_batch_size=max_batch,
        inputs=[Tensor(CROPS, "TYPE_UINT8", [aligned, aligned, 3])],
        outputs=[Tensor(EMBEDDING, output_type, [int(bundle.manifest.embedding_size)])],
        ensemble_steps=[
            EnsembleStep(PREPROCESS, {CROPS: CROPS}, {INPUT: PREPROCESSED}),
            EnsembleStep(embedder, {embedder_io[0]: PREPROCESSED}, {embedder_io[1]: EMBEDDING}),
        ],
    )


def write_model(root: Path, config: ModelConfig, files: dict[str, Path | str] | None = None) -> Path:
    """``root/<name>/config.pbtxt`` and version 1 holding ``files`` (name -> source path, or text)."""
    model_dir = root / config.name
    version = model_dir / "1"
    version.mkdir(parents=True)
    (model_dir / "config.pbtxt").write_text(config.to_pbtxt(), encoding="utf-8")
    for name, source in (files or {}).items():
        if isinstance(source, Path):
            shutil.copyfile(source, version / name)
        else:
            (version / name).write_text(source, encoding="utf-8")
    return model_dir


def write_preprocess(root: Path, config: ModelConfig) -> None:
    write_model(root, config, {"model.py": model_py(PREPROCESS, "PreprocessModel")})


def copy_manifest(bundle: Bundle, root: Path) -> None:
    """The bundle's manifest (and parity report) beside the models: hashes and parity travel with them."""
    copy_bundle_manifest(bundle.root, root)
    parity = bundle.root / "parity.json"
    if parity.is_file():
        shutil.copyfile(parity, root / "parity.json")


def check_out_dir(out: Path, overwrite: bool, bundle: Bundle) -> bool:
    """Refuse an output that would destroy data; True when an existing (empty or replaceable) one goes."""
    resolved, source = out.expanduser().resolve(), bundle.root.resolve()
    if resolved == source or source in resolved.parents or resolved in source.parents:
        raise OutputError(f"{out}: the repository cannot be inside the bundle {bundle.root} or contain it")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: is a file, expected a directory for the model repository")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputError(f"{out}: already exists and is not empty (pass --overwrite to replace it)")
    if not out.parent.exists():
        raise OutputError(f"{out}: directory {out.parent} does not exist")
    return out.exists()


@contextlib.contextmanager
def staged_repository(out: Path, overwrite: bool, bundle: Bundle) -> Iterator[Path]:
    """Yield a temporary directory beside ``out``; it is validated and renamed to ``out`` at the end."""
    replace = check_out_dir(out, overwrite, bundle)
    with atomic_directory(out, overwrite=replace) as staging:
        yield staging
        validate_repository(staging)


__all__ = [
    "DEFAULT_QUEUE_DELAY_US",
    "EMBEDDER",
    "ENSEMBLE",
    "MANIFEST_SHA256",
    "MODEL_SHA256",
    "PRECISION",
    "PREPROCESS",
    "PREPROCESSED",
    "WEIGHTS_SHA256",
    "batching",
    "bundle_max_batch",
    "check_out_dir",
    "copy_manifest",
    "default_python_path",
    "ensemble_config",
    "identity_parameters",
    "preprocess_config",
    "staged_repository",
    "write_model",
    "write_preprocess",
]
