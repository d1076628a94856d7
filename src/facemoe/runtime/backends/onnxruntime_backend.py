"""ONNX Runtime backend: CUDA / TensorRT execution providers where present, else the CPU.

Memory: ONNX Runtime's Python API reports no arena statistics, so ``memory_stats`` gives the process's
resident set (``Backend.memory_stats``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from facemoe.bundle import Bundle
from facemoe.errors import BundleError
from facemoe.runtime.backends.base import Backend, BackendUnavailable
from facemoe.runtime.int8_cpu import choose_encoding
from facemoe.runtime.ort_session import create_session


def bundle_int8_encoding(bundle: Bundle, precision: str) -> str:
    """The int8 CPU encoding for this processor, from what the export's parity report passed."""
    if precision != "int8":
        return "auto"
    w7 = bundle.artifact(precision).parity.get("graph_level", {}).get("w7", {})
    return choose_encoding(fast_encoding_passed=bool(w7.get("passed")))


def _fixed(dim: object) -> int | None:
    return dim if isinstance(dim, int) and dim > 0 else None


def check_interface(session, bundle: Bundle, path: Path) -> None:  # type: ignore[no-untyped-def]
    """Refuse a model whose inputs / outputs do not fit the manifest, at load time and naming the file.

    A matching sha256 only proves the file is the one the manifest lists; a hand-edited manifest (another
    model re-hashed into the bundle) would otherwise fail with an ONNX Runtime traceback mid-run.
    """
    m = bundle.manifest
    size = int(m.preprocessing.get("input_size", 0)) or None
    problems = []
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or inputs[0].name != m.input_name:
        problems.append(f"inputs {[i.name for i in inputs]}, the manifest says one named {m.input_name!r}")
    else:
        shape = list(inputs[0].shape)
        if len(shape) != 4:
            problems.append(f"input rank {len(shape)} ({shape}), expected 4 (batch, 3, size, size)")
        elif _fixed(shape[1]) not in (None, 3) or any(_fixed(d) not in (None, size) for d in shape[2:] if size):
            problems.append(f"input shape {shape}, the manifest says (batch, 3, {size}, {size})")
    names = [o.name for o in outputs]
    if m.output_name not in names:
        problems.append(f"outputs {names}, the manifest says one named {m.output_name!r}")
    else:
        shape = list(outputs[names.index(m.output_name)].shape)
        if len(shape) != 2 or _fixed(shape[-1]) not in (None, m.embedding_size):
            problems.append(f"output shape {shape}, the manifest says (batch, {m.embedding_size})")
    if problems:
        raise BundleError(f"{path}: does not fit the bundle manifest: {'; '.join(problems)}")


def _providers_for(device: str | None) -> list[str] | None:
    if device is None:
        return None
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device not in ("cuda", "cuda:0"):
        raise BackendUnavailable(f"device {device!r}: the ONNX Runtime backend runs on cpu or cuda (GPU 0)")
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise BackendUnavailable(
            f"this onnxruntime {ort.__version__} has no CUDA provider (install onnxruntime-gpu) or use device cpu"
        )
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


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
        max_batch: int = 32,
        *,
        device: str | None = None,
        threads: int | None = None,
        providers: list[str] | None = None,
    ) -> OnnxRuntimeBackend:
        """``device`` picks the execution providers: ``cpu``, or ``cuda`` (CUDA, the CPU for what it lacks).
        With None, ``ort_session.create_session`` takes the first available in its ``PROVIDER_ORDER``;
        explicit ``providers`` override both."""
        path = bundle.artifact_path(precision, verify=True)
        custom = bundle.artifact(precision).gating == "plugin"
        backend = cls(
            path,
            precision,
            providers or _providers_for(device),
            max_batch,
            threads,
            bundle.manifest.input_name,
            custom_ops=custom,
            int8_encoding=bundle_int8_encoding(bundle, precision),
        )
        check_interface(backend.session, bundle, path)
        return backend

    @property
    def embedding_size(self) -> int:
        return self._embedding_size

    @property
    def input_size(self) -> int:
        return self._input_size

    def _embed_batch(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: batch})[0]

    def use_cuda_graphs(self, enabled: bool) -> bool:
        # ONNX Runtime's own CUDA-graph mode needs fixed input addresses, which this backend does not keep.
        self.cuda_graphs = False
        return False

    def close(self) -> None:
        """Drop the session: ONNX Runtime frees its memory arena with it."""
        self._closed = True
        self.session = None

    def describe(self) -> str:
        encoding = f", int8 weights {self.int8_encoding}" if self.int8_encoding else ""
        return f"onnxruntime ({self.precision}{encoding}, {self.provider}, max batch {self.max_batch})"
