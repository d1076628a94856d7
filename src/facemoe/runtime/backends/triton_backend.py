"""Triton backend: the faces this box prepared are embedded by a Triton Inference Server (gRPC or HTTP).

The local bundle stays the source of truth: pre-processing, embedding size and the gallery fingerprint come
from it, and before the first face is sent the served model's ``facemoe_manifest_sha256`` parameter must
equal the local ``manifest.json``'s hash (a server serving another export would give embeddings from another
space without any error) (docs/SCALE_OUT.md#getting-the-server). The live audit's ``onnx``
reference is the local fp32 ONNX, so the served embeddings are checked against this box's own copy.

Models taking pre-processed float faces (``facemoe_embedder``) serve ``embed``; models taking aligned uint8
crops (the ``facemoe`` ensemble) serve ``embed_crops``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from facemoe.bundle import MANIFEST_NAME, Bundle
from facemoe.errors import FaceMoEError
from facemoe.fileio import sha256_file
from facemoe.runtime.backends.base import Backend
from facemoe.triton.client import NUMPY_TYPES, TritonClient, TritonError, parameters

DEFAULT_MODEL = "facemoe_embedder"
MANIFEST_PARAMETER = "facemoe_manifest_sha256"
MODEL_PARAMETER = "facemoe_model_sha256"


def _identity(client: TritonClient, model: str, config: dict[str, Any]) -> dict[str, str]:
    """The facemoe identity parameters of ``model``, or of the ensemble step that carries them."""
    found = parameters(config)
    if MANIFEST_PARAMETER in found:
        return found
    steps = (config.get("ensemble_scheduling") or {}).get("step") or []
    for step in steps:
        name = str(step.get("model_name") or step.get("modelName") or "")
        if name:
            inner = parameters(client.config(name))
            if MANIFEST_PARAMETER in inner:
                return inner
    return found


def check_same_model(client: TritonClient, model: str, config: dict[str, Any], bundle: Bundle) -> str:
    """The served precision, after checking the served manifest hash against the local bundle's."""
    served = _identity(client, model, config)
    local = sha256_file(bundle.root / MANIFEST_NAME)
    remote = served.get(MANIFEST_PARAMETER)
    if not remote:
        raise TritonError(
            f"{client.url}: model {model} carries no {MANIFEST_PARAMETER} parameter, so it cannot be checked "
            f"against {bundle.root}; serve the bundle with 'facemoe serve' or 'facemoe triton-repo'"
        )
    if remote != local:
        raise TritonError(
            f"{client.url} serves a different model (manifest sha256 {remote[:12]} != local bundle "
            f"{local[:12]}, {bundle.root}); run with the bundle the server was made from"
        )
    digest = served.get(MODEL_PARAMETER, "")
    for precision, artifact in bundle.manifest.artifacts.items():
        if artifact.sha256 == digest:
            return str(precision)
    return str(served.get("facemoe_precision") or "fp32")


class TritonBackend(Backend):
    name = "triton"
    device = "remote"

    def __init__(self, bundle: Bundle, client: TritonClient, model: str, max_batch: int) -> None:
        self.bundle = bundle
        self.client = client
        self.model = model
        config = client.config(model)
        self.precision = check_same_model(client, model, config, bundle)
        served_batch = int(config.get("max_batch_size") or 0)
        self.max_batch = min(max_batch, served_batch) if served_batch > 0 else max_batch
        meta = client.metadata(model)
        inputs, outputs = meta.get("inputs") or [], meta.get("outputs") or []
        if len(inputs) != 1 or not outputs:
            raise TritonError(
                f"{client.url}: model {model} has inputs {inputs} and outputs {outputs}; expected one each"
            )
        spec = inputs[0]
        self.input_name, self.datatype = str(spec["name"]), str(spec["datatype"])
        shape = [int(d) for d in spec.get("shape", [])][-3:]
        if self.datatype not in NUMPY_TYPES:
            raise TritonError(
                f"{client.url}: model {model} takes {self.datatype} input; facemoe sends FP32, FP16 or UINT8"
            )
        self.takes_crops = self.datatype == "UINT8"
        self._input_size = int(shape[-2] if self.takes_crops else shape[-1])
        self.output_name = str(outputs[0]["name"])
        self._embedding_size = int(bundle.manifest.embedding_size)
        served_dim = int([int(d) for d in outputs[0].get("shape", [-1])][-1])
        if served_dim > 0 and served_dim != self._embedding_size:
            raise TritonError(
                f"{client.url}: model {model} returns {served_dim}-dim embeddings, the bundle {self._embedding_size}"
            )

    @classmethod
    def from_bundle(
        cls,
        bundle: Bundle,
        precision: str | None = None,
        max_batch: int = 32,
        *,
        device: str | None = None,
        threads: int | None = None,
        url: str | None = None,
        model: str | None = None,
        timeout: float = 10.0,
        retries: int = 3,
    ) -> TritonBackend:
        """Connect to ``url`` and check that ``model`` is ready and serves this bundle.

        ``precision``, ``device`` and ``threads`` are the server's business; a precision other than the
        served one is refused.
        """
        if not url:
            raise FaceMoEError("--backend triton needs --triton-url grpc://HOST:PORT or http://HOST:PORT")
        client = TritonClient(url, timeout=timeout, retries=retries)
        try:
            client.server_ready()
            name = model or DEFAULT_MODEL
            client.model_ready(name)
            backend = cls(bundle, client, name, max_batch)
        except BaseException:
            client.close()
            raise
        if precision is not None and precision != backend.precision:
            backend.close()
            raise TritonError(f"{url} serves {name} at {backend.precision}, not {precision}")
        return backend

    @property
    def embedding_size(self) -> int:
        return self._embedding_size

    @property
    def input_size(self) -> int:
        return self._input_size

    def _request(self, batch: np.ndarray) -> np.ndarray:
        out = self.client.infer(self.model, self.input_name, batch, self.datatype, self.output_name)
        if out.shape != (len(batch), self._embedding_size):
            raise TritonError(f"{self.client.url}: {self.model} returned shape {out.shape} for {len(batch)} faces")
        return out.astype(np.float32, copy=False)

    def _embed_batch(self, batch: np.ndarray) -> np.ndarray:
        if self.takes_crops:
            raise TritonError(
                f"{self.client.url}: model {self.model} takes aligned uint8 crops; facemoe-run sends pre-processed "
                f"faces: use --triton-model {DEFAULT_MODEL}"
            )
        return self._request(np.ascontiguousarray(batch, dtype=NUMPY_TYPES[self.datatype]))

    def embed_crops(self, crops: np.ndarray) -> np.ndarray:
        """(N, A, A, 3) uint8 aligned BGR crops -> (N, D) raw embeddings, through a crop-taking model."""
        if self._closed:
            raise FaceMoEError(f"the {self.name} backend was closed")
        if not self.takes_crops:
            raise TritonError(f"{self.client.url}: model {self.model} takes {self.datatype} faces, not uint8 crops")
        crops = np.ascontiguousarray(crops, dtype=np.uint8)
        if len(crops) == 0:
            return np.zeros((0, self._embedding_size), dtype=np.float32)
        parts = [self._request(crops[i : i + self.max_batch]) for i in range(0, len(crops), self.max_batch)]
        return np.concatenate(parts)

    def describe(self) -> str:
        return f"triton ({self.model} at {self.client.url}, {self.precision}, max batch {self.max_batch})"

    def use_cuda_graphs(self, enabled: bool) -> bool:
        self.cuda_graphs = False  # the server's business
        return False

    def close(self) -> None:
        if not self._closed:
            self.client.close()
        self._closed = True


__all__ = ["DEFAULT_MODEL", "TritonBackend", "check_same_model"]
