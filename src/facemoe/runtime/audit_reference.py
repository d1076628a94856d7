"""The references a live accuracy audit embeds sampled faces with, and the deployed artifact's routing probe.

* ``onnx``: the bundle's fp32 ONNX on the CPU. The export checked it against PyTorch to about 1e-5
  (docs/EXPORT.md, "Parity"), so it is a faithful stand-in on an edge box without PyTorch.
* ``torch``: the PyTorch fp32 model in ``sparse`` routing (each expert runs on its routed tokens only, the
  official semantics), rebuilt from the checkpoint or random-weight seed the manifest records and checked
  against its ``weights_sha256``. torch is imported only when this reference is made.
* ``auto``: torch when it is installed and the weights are here, else onnx; the reason is kept.

Both return raw embeddings and, per MoE layer, the (tokens, k) expert indices each token was routed to.
Sessions run on few threads: the audit runs beside the stream and must not take its cores.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from facemoe.bundle import Bundle
from facemoe.errors import FaceMoEError

REFERENCES = ("auto", "torch", "onnx")
# Threads each reference computation may use: the audit is a background check, not a second pipeline.
REFERENCE_THREADS = 1


def _probe_session(model_path: Any, *, providers: list[str] | None, threads: int, int8_encoding: str) -> Any:
    """An ONNX Runtime session of ``model_path`` that also returns every TopK's indices (the routing)."""
    import onnx

    from facemoe.runtime.ort_session import create_session

    model = onnx.load(str(model_path), load_external_data=True)
    from facemoe.runtime.onnx_probe import routing_probe

    probe, _ = routing_probe(model, in_place=True)
    return create_session(probe, providers=providers, threads=threads, int8_encoding=int8_encoding)


def _run_probe(session: Any, batch: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    outputs = session.run(np.ascontiguousarray(batch, dtype=np.float32))
    return outputs[0], [np.asarray(r).reshape(-1, np.asarray(r).shape[-1]) for r in outputs[1:]]


class OnnxReference:
    """The bundle's fp32 ONNX on the CPU."""

    name = "onnx"

    def __init__(self, bundle: Bundle, threads: int = REFERENCE_THREADS) -> None:
        path = bundle.artifact_path("fp32", verify=True)
        if bundle.artifact("fp32").gating == "plugin":
            raise FaceMoEError(f"{path}: the fp32 artifact decides routing inside a custom node; no onnx reference")
        self.session = _probe_session(path, providers=["CPUExecutionProvider"], threads=threads, int8_encoding="auto")
        self.detail = f"fp32 ONNX {path.name} on the CPU (ONNX Runtime)"

    def embed(self, batch: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        return _run_probe(self.session, batch)


class TorchReference:
    """PyTorch fp32, sparse routing, on the CPU, rebuilt from the bundle's recorded weights."""

    name = "torch"

    def __init__(self, bundle: Bundle, checkpoint: str | None = None) -> None:
        already = "torch" in sys.modules  # the deployed backend is torch: leave its thread settings alone
        from facemoe.model.inference import load_reference_model

        self.model = load_reference_model(bundle, checkpoint)  # checks weights_sha256
        import torch

        if not already:
            torch.set_num_threads(REFERENCE_THREADS)
        source = bundle.manifest.model.get("source") or {}
        origin = f"seed {source.get('seed')}" if bundle.manifest.model.get("random_weights") else "checkpoint"
        self.detail = f"PyTorch {torch.__version__} fp32, sparse routing, CPU ({origin}, weights_sha256 verified)"

    def embed(self, batch: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        from facemoe.model.inference import run_reference

        return run_reference(self.model, np.ascontiguousarray(batch, dtype=np.float32))


Reference = OnnxReference | TorchReference


@dataclass
class Chosen:
    reference: Any  # OnnxReference | TorchReference (or anything with name, detail and embed)
    why: str  # for auto: why this one


def open_reference(bundle: Bundle, kind: str = "auto", checkpoint: str | None = None) -> Chosen:
    """The reference ``kind`` names; ``auto`` prefers torch and says why it fell back to onnx."""
    if kind not in REFERENCES:
        raise FaceMoEError(f"audit reference {kind!r}: expected one of {', '.join(REFERENCES)}")
    if kind == "onnx":
        return Chosen(OnnxReference(bundle), "asked for")
    if kind == "torch":
        if importlib.util.find_spec("torch") is None:
            raise FaceMoEError("--audit-reference torch needs PyTorch (pip install 'facemoe-edge[export]'); use onnx")
        try:
            return Chosen(TorchReference(bundle, checkpoint), "asked for")
        except ImportError as exc:  # installed but not importable (broken install, blocked on purpose)
            raise FaceMoEError(f"--audit-reference torch: PyTorch cannot be imported ({exc}); use onnx") from None
    if importlib.util.find_spec("torch") is None:
        return Chosen(OnnxReference(bundle), "auto: PyTorch is not installed")
    try:
        return Chosen(TorchReference(bundle, checkpoint), "auto: PyTorch and the recorded weights are here")
    except (FaceMoEError, ImportError) as exc:
        return Chosen(OnnxReference(bundle), f"auto: the PyTorch reference is unavailable ({exc})")


class ArtifactRouting:
    """The deployed ONNX artifact's routing decisions, from a probe copy of its graph.

    Only an ONNX Runtime backend runs a graph whose TopK nodes can be exposed: a TensorRT engine is compiled
    (its routing is internal), a ``--gating plugin`` graph routes inside its custom node, and the torch
    backend's static routing is not the artifact. ``unavailable`` says why when there is no probe.
    """

    def __init__(self, bundle: Bundle, engine: Any) -> None:
        self.session: Any = None
        self.unavailable = ""
        precision = str(getattr(engine, "precision", ""))
        name = str(getattr(engine, "name", ""))
        if name == "tensorrt":
            self.unavailable = "not exposed: a TensorRT engine routes inside its compiled kernels"
            return
        if name != "onnxruntime":
            self.unavailable = f"not compared: the {name or 'this'} backend does not run the artifact's graph"
            return
        if bundle.artifact(precision).gating == "plugin":
            self.unavailable = "decided inside the custom gating node (--gating plugin)"
            return
        provider = str(getattr(engine, "provider", "CPUExecutionProvider"))
        encoding = getattr(engine, "int8_encoding", None) or "auto"
        self.session = _probe_session(
            bundle.artifact_path(precision),
            providers=[provider, "CPUExecutionProvider"] if provider != "CPUExecutionProvider" else [provider],
            threads=REFERENCE_THREADS,
            int8_encoding=encoding,
        )

    def routes(self, batch: np.ndarray) -> list[np.ndarray] | None:
        return None if self.session is None else _run_probe(self.session, batch)[1]


__all__ = ["REFERENCES", "ArtifactRouting", "Chosen", "OnnxReference", "TorchReference", "open_reference"]
