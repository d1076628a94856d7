"""ONNX Runtime backend: CUDA / TensorRT execution providers where present, else the CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from facemoe.bundle import Bundle
from facemoe.runtime.backends.base import Backend, BackendUnavailable
from facemoe.runtime.int8_cpu import choose_encoding
from facemoe.runtime.ort_session import create_session


def bundle_int8_encoding(bundle: Bundle, precision: str) -> str:
    """The int8 CPU encoding for this processor, from what the export's parity report passed."""
    if precision != "int8":
        return "auto"
    w7 = bundle.artifact(precision).parity.get("graph_level", {}).get("w7", {})
    return choose_encoding(fast_encoding_passed=bool(w7.get("passed")))


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
        int8_encoding: str = "auto",
    ) -> None:
        try:
            loaded = create_session(
                model_path, providers=providers, threads=threads, custom_ops=custom_ops, int8_encoding=int8_encoding
            )
        except Exception as exc:
            raise BackendUnavailable(f"{model_path}: ONNX Runtime cannot load the model: {exc}") from exc
        self.session = loaded.session
        self.int8_encoding = loaded.int8_encoding
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
        return cls(
            path,
            precision,
            providers,
            max_batch,
            threads,
            bundle.manifest.input_name,
            custom_ops=custom,
            int8_encoding=bundle_int8_encoding(bundle, precision),
        )

    @property
    def embedding_size(self) -> int:
        return self._embedding_size

    @property
    def input_size(self) -> int:
        return self._input_size

    def _embed_batch(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: batch})[0]

    def describe(self) -> str:
        encoding = f", int8 weights {self.int8_encoding}" if self.int8_encoding else ""
        return f"onnxruntime ({self.precision}{encoding}, {self.provider}, max batch {self.max_batch})"
