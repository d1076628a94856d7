"""What the Triton Inference Server Python-backend models of a facemoe repository run.

The generated ``model.py`` files (facemoe.triton.model_files) only put facemoe on ``sys.path`` and hand
over to the classes here, so the arithmetic is facemoe's own and testable without a server
(docs/SCALE_OUT.md#serve-repository). ``pb_utils`` is Triton's ``triton_python_backend_utils``, which only
exists inside the server's Python stub: it is passed in, never imported here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from facemoe.bundle import Preprocessing
from facemoe.preprocess import preprocess_face

# Tensor names of the repository's models (docs/SCALE_OUT.md#serve-repository).
CROPS = "crops"
INPUT = "input"
EMBEDDING = "embedding"


def preprocess_settings(preprocessing: Preprocessing | Mapping[str, Any]) -> dict[str, Any]:
    """``preprocess_face`` arguments from the manifest's pre-processing, read exactly as FaceEncoder reads
    them (one mean and std for all channels), so served and local tensors are bit-identical."""
    pre = preprocessing if isinstance(preprocessing, Preprocessing) else Preprocessing.from_json(preprocessing)
    mean, std = pre.mean, pre.std
    return {
        "input_size": int(pre.input_size),
        "interpolation": str(pre.interpolation),
        "mean": float(mean[0] if isinstance(mean, (list, tuple)) else mean),
        "std": float(std[0] if isinstance(std, (list, tuple)) else std),
    }


def crops_to_inputs(crops: np.ndarray, preprocessing: Preprocessing | Mapping[str, Any]) -> np.ndarray:
    """(N, A, A, 3) uint8 aligned BGR crops -> (N, 3, S, S) float32 model inputs (the bundle's recipe)."""
    crops = np.asarray(crops)
    if crops.dtype != np.uint8 or crops.ndim != 4 or crops.shape[-1] != 3:
        raise ValueError(f"expected (N, H, W, 3) uint8 BGR crops, got {crops.dtype} {crops.shape}")
    settings = preprocess_settings(preprocessing)
    size = settings["input_size"]
    if crops.shape[0] == 0:
        return np.zeros((0, 3, size, size), dtype=np.float32)
    return np.stack([preprocess_face(crop, **settings) for crop in crops])


def parameters(model_config: Mapping[str, Any]) -> dict[str, str]:
    """The ``parameters`` of a model configuration as Triton hands it to a Python model (JSON form)."""
    raw = model_config.get("parameters") or {}
    return {key: str((value or {}).get("string_value", "")) for key, value in raw.items()}


def _batched(pb_utils: Any, requests: list[Any], name: str) -> tuple[np.ndarray, list[int]]:
    """Every request's ``name`` tensor concatenated on the batch axis, and each request's count."""
    arrays = [pb_utils.get_input_tensor_by_name(request, name).as_numpy() for request in requests]
    return np.concatenate(arrays), [len(a) for a in arrays]


def _respond(pb_utils: Any, name: str, result: np.ndarray, counts: list[int]) -> list[Any]:
    responses, start = [], 0
    for count in counts:
        part = np.ascontiguousarray(result[start : start + count])
        responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(name, part)]))
        start += count
    return responses


def _failed(pb_utils: Any, requests: list[Any], exc: BaseException) -> list[Any]:
    error = pb_utils.TritonError(f"{type(exc).__name__}: {exc}")
    return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]


def _log(pb_utils: Any, message: str) -> None:
    logger = getattr(pb_utils, "Logger", None)
    if logger is not None:
        logger.log_info(message)
    else:  # older Python backends have no Logger; the stub's stdout reaches the server log
        print(message, flush=True)


class PreprocessModel:
    """``facemoe_preprocess``: aligned uint8 crops -> float32 model inputs."""

    def __init__(self, model_config: Mapping[str, Any], pb_utils: Any) -> None:
        self.pb_utils = pb_utils
        params = parameters(model_config)
        self.preprocessing = Preprocessing.from_json(json.loads(params["facemoe_preprocessing"]))
        # float16 when the embedder it feeds takes fp16 input (a GPU repository's fp16 ONNX).
        self.dtype = np.dtype(params.get("facemoe_output_dtype") or "float32")

    def execute(self, requests: list[Any]) -> list[Any]:
        try:
            crops, counts = _batched(self.pb_utils, requests, CROPS)
            inputs = crops_to_inputs(crops, self.preprocessing).astype(self.dtype, copy=False)
            return _respond(self.pb_utils, INPUT, inputs, counts)
        except Exception as exc:  # a bad request fails its responses, never the model
            return _failed(self.pb_utils, requests, exc)

    def finalize(self) -> None:
        pass


class EmbedderModel:
    """``facemoe_embedder``: the bundle on facemoe's torch-free backends (ONNX Runtime, TensorRT).

    Triton's dynamic batcher hands ``execute`` several requests; they run as one backend call and the
    embeddings are split back per request.
    """

    def __init__(self, model_config: Mapping[str, Any], pb_utils: Any) -> None:
        from facemoe.runtime.backends.select import open_backend

        self.pb_utils = pb_utils
        params = parameters(model_config)
        max_batch = int(params.get("facemoe_max_batch") or model_config.get("max_batch_size") or 32)
        self.backend = open_backend(
            params["facemoe_bundle"],
            params.get("facemoe_backend") or "auto",
            params.get("facemoe_precision") or None,
            max_batch=max_batch,
        )
        _log(pb_utils, f"facemoe_embedder: {self.backend.selection}")

    def execute(self, requests: list[Any]) -> list[Any]:
        try:
            batch, counts = _batched(self.pb_utils, requests, INPUT)
            return _respond(self.pb_utils, EMBEDDING, self.backend.embed(batch), counts)
        except Exception as exc:
            return _failed(self.pb_utils, requests, exc)

    def finalize(self) -> None:
        self.backend.close()


__all__ = [
    "CROPS",
    "EMBEDDING",
    "INPUT",
    "EmbedderModel",
    "PreprocessModel",
    "crops_to_inputs",
    "parameters",
    "preprocess_settings",
]
