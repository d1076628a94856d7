"""ONNX Runtime backend: CUDA / TensorRT execution providers where present, else the CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from facemoe.bundle import Bundle
from facemoe.errors import BundleError
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
        backend = cls(path, precision, providers, max_batch, threads, bundle.manifest.input_name, custom_ops=custom)
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

    def describe(self) -> str:
        return f"onnxruntime ({self.precision}, {self.provider}, max batch {self.max_batch})"
