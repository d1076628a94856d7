"""ONNX Runtime backend: CUDA / TensorRT execution providers where present, else the CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from facemoe.bundle import Bundle
from facemoe.runtime.backends.base import Backend, BackendUnavailable

# Preference order; the CPU provider is always last and always present.
_PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def _session_options(threads: int | None):  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    return options


def load_custom_ops(options) -> None:  # type: ignore[no-untyped-def]
    """Register FaceMoE's custom-op implementation (only ``--gating plugin`` graphs need it).

    Called only for such graphs: onnxruntime-extensions imports torch when it is installed, which a
    standard-op runtime must not pay for.
    """
    from facemoe.export.gating_ort import register_custom_ops

    register_custom_ops(options, required=True)


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(
        self,
        model_path: str | Path,
        precision: str = "fp32",
        providers: list[str] | None = None,
        max_batch: int = 32,
        threads: int | None = None,
        input_name: str | None = None,
        custom_ops: bool = False,
    ) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:  # pragma: no cover - onnxruntime is a core dependency
            raise BackendUnavailable("onnxruntime is not installed") from exc
        available = ort.get_available_providers()
        chosen = providers or [p for p in _PROVIDER_ORDER if p in available]
        options = _session_options(threads)
        if custom_ops:
            load_custom_ops(options)
        try:
            self.session = ort.InferenceSession(str(model_path), sess_options=options, providers=chosen)
        except Exception as exc:
            raise BackendUnavailable(f"{model_path}: ONNX Runtime cannot load the model: {exc}") from exc
        self.precision = precision
        self.max_batch = max_batch
        self.input_name = input_name or self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self._embedding_size = int(self.session.get_outputs()[0].shape[-1])
        self._input_size = int(self.session.get_inputs()[0].shape[-1])
        active = self.session.get_providers()[0]
        self.device = "cpu" if active == "CPUExecutionProvider" else "cuda"
        self.provider = active

    @classmethod
    def from_bundle(
        cls,
        bundle: Bundle,
        precision: str = "fp32",
        providers: list[str] | None = None,
        max_batch: int = 32,
        threads: int | None = None,
    ) -> OnnxRuntimeBackend:
        path = bundle.artifact_path(precision, verify=True)
        custom = bundle.artifact(precision).gating == "plugin"
        return cls(path, precision, providers, max_batch, threads, bundle.manifest.input_name, custom_ops=custom)

    @property
    def embedding_size(self) -> int:
        return self._embedding_size

    @property
    def input_size(self) -> int:
        return self._input_size

    def _embed_batch(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: batch})[0]

    def describe(self) -> str:
        return f"onnxruntime ({self.precision}, {self.provider}, max batch {self.max_batch})"
