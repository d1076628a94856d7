"""The serve repository: the bundle on facemoe's own backends inside Triton's Python backend.

For ``facemoe serve`` on CPU boxes and in CI, where the Triton Inference Server at hand (the one the
``nvidia-pytriton`` wheel carries) has only the Python backend: ``facemoe_embedder`` opens the bundle with
``facemoe.runtime.backends.open_backend`` (ONNX Runtime on a CPU, TensorRT where an engine fits)
(docs/SCALE_OUT.md#serve-repository).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from facemoe.bundle import Bundle
from facemoe.errors import FaceMoEError
from facemoe.runtime.backends.select import BACKEND_NAMES, PRECISION_ORDER
from facemoe.triton.config import InstanceGroup, ModelConfig, Tensor
from facemoe.triton.model_files import SYS_PATH_PARAMETER, model_py
from facemoe.triton.python_models import EMBEDDING, INPUT
from facemoe.triton.repository import (
    DEFAULT_QUEUE_DELAY_US,
    EMBEDDER,
    ENSEMBLE,
    PREPROCESS,
    batching,
    bundle_max_batch,
    copy_manifest,
    default_python_path,
    ensemble_config,
    identity_parameters,
    preprocess_config,
    staged_repository,
    write_model,
    write_preprocess,
)


@dataclass
class ServeRepository:
    """A written serve repository: where it is, its models and the embedder's parameters."""

    root: Path
    ensemble: str = ENSEMBLE
    embedder: str = EMBEDDER
    preprocess: str = PREPROCESS
    max_batch: int = 32
    aligned_size: int = 112
    input_size: int = 120
    embedding_size: int = 512
    parameters: dict[str, str] = field(default_factory=dict)

    @property
    def models(self) -> list[str]:
        return [self.preprocess, self.embedder, self.ensemble]


def write_serve_repository(
    bundle_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    precision: str | None = None,
    backend: str = "auto",
    max_batch: int | None = None,
    max_queue_delay_us: int = DEFAULT_QUEUE_DELAY_US,
    instances: int = 1,
    preferred_batch_sizes: list[int] | None = None,
    python_path: list[str] | None = None,
    overwrite: bool = False,
) -> ServeRepository:
    """Write the serve repository for ``bundle_dir`` at ``out_dir`` (validated, all or nothing).

    ``precision`` None lets the backend policy choose (ONNX Runtime fp32 on a CPU); ``max_batch`` None is
    the bundle's; ``python_path`` (default: :func:`facemoe.triton.repository.default_python_path`) goes to
    the models' ``facemoe_sys_path`` parameter, made absolute. ``out_dir`` must be absent or empty unless
    ``overwrite``.
    """
    bundle = Bundle(bundle_dir)
    if precision is not None and precision not in PRECISION_ORDER:
        raise FaceMoEError(f"unknown precision {precision!r}; choose {', '.join(PRECISION_ORDER)}")
    if backend not in BACKEND_NAMES:
        raise FaceMoEError(f"unknown backend {backend!r}; choose one of {', '.join(BACKEND_NAMES)}")
    if instances < 1:
        raise FaceMoEError(f"--instances {instances}: must be at least 1")
    served = precision or "fp32"  # what ONNX Runtime serves when the policy chooses on a CPU
    bundle.artifact_path(served, verify=True)
    batch = max_batch if max_batch is not None else bundle_max_batch(bundle)
    dynamic = batching(batch, preferred_batch_sizes, max_queue_delay_us)
    paths = [str(Path(p).expanduser().resolve()) for p in (python_path or default_python_path())]
    m = bundle.manifest
    size, dim = int(m.preprocessing.input_size), int(m.embedding_size)
    parameters = {
        SYS_PATH_PARAMETER: os.pathsep.join(paths),
        "facemoe_bundle": str(bundle.root.resolve()),
        "facemoe_backend": backend,
        "facemoe_max_batch": str(batch),
        **identity_parameters(bundle, served),
    }
    if precision is None:
        parameters["facemoe_precision"] = ""  # the backend policy decides; the hash names the CPU's fp32
    embedder = ModelConfig(
        name=EMBEDDER,
        backend="python",
        max_batch_size=batch,
        inputs=[Tensor(INPUT, "TYPE_FP32", [3, size, size])],
        outputs=[Tensor(EMBEDDING, "TYPE_FP32", [dim])],
        dynamic_batching=dynamic,
        instance_groups=[InstanceGroup("KIND_CPU", instances)],
        parameters=parameters,
    )
    with staged_repository(Path(out_dir), overwrite, bundle) as root:
        write_preprocess(root, preprocess_config(bundle, batch, dynamic, instances, paths))
        write_model(root, embedder, {"model.py": model_py(EMBEDDER, "EmbedderModel")})
        write_model(root, ensemble_config(bundle, ENSEMBLE, EMBEDDER, (INPUT, EMBEDDING), batch, "TYPE_FP32"))
        copy_manifest(bundle, root)
    return ServeRepository(
        root=Path(out_dir),
        max_batch=batch,
        aligned_size=int(m.preprocessing.aligned_size),
        input_size=size,
        embedding_size=dim,
        parameters=parameters,
    )


__all__ = ["ServeRepository", "write_serve_repository"]
