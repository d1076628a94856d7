"""Parity of exported artifacts against the PyTorch fp32 reference (sparse routing, the official semantics).

Metrics per artifact, on faces that were not used for calibration or tracing:

* embedding cosine (min / mean) and max abs error on raw embeddings,
* routing agreement per MoE layer: share of tokens whose top-k expert *set* is unchanged. Quantisation
  can flip a near-tied 2nd/3rd router logit; that swaps an expert and is a failure mode unique to MoE.
  The artifact's decisions are read from a probe copy of its graph that exposes every TopK's indices,
* top-1 identification agreement: a probe matched against a gallery gives the same identity as with
  the reference embeddings,
* TAR at FAR=1e-3 on verification pairs, and its difference to the reference.

Gates (configurable) decide pass/fail; a failed gate fails the export.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from facemoe.export.onnx_graph import (
    EXTERNAL_DATA_THRESHOLD,
    remove_onnx,
    routing_agreement,
    routing_probe,
    save_onnx,
)
from facemoe.model.inference import run_reference
from facemoe.model.swin import FaceMoE
from facemoe.runtime.int8_cpu import CpuIsa, choose_encoding, detect_cpu
from facemoe.runtime.ort_session import Optimization, OrtSession, create_session

# The cosine gates apply to the mean over held-out faces; the min gets a looser floor. Measured on
# random-weight models: with routing unchanged, fp16 embeddings keep cosine >= 0.99999, but a token whose
# 2nd and 3rd router logits are nearly tied can swap experts under any rounding, and since the gate weight
# is the raw logit (not a softmax), one swapped token moves the embedding by up to ~1e-2. The min over a
# few dozen faces therefore measures how many near-ties the inputs happen to hit; the mean and the routing
# agreement measure the conversion.
DEFAULT_GATES: dict[str, dict[str, float]] = {
    "fp32": {"cosine_mean": 0.99999, "cosine_min": 0.9999},
    "fp16": {"cosine_mean": 0.999, "cosine_min": 0.99, "routing_min": 0.99},
    "int8": {"cosine_mean": 0.98, "cosine_min": 0.9, "routing_min": 0.95},
}


@dataclass
class ParityResult:
    precision: str
    cosine_min: float
    cosine_mean: float
    max_abs: float
    routing_min: float
    routing_mean: float
    routing_per_layer: dict[str, float]
    top1_agreement: float
    tar_at_far: float
    tar_at_far_reference: float
    num_inputs: int
    gates: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    failures_note: str = ""
    # Where the figures were computed: CPU ISA, ONNX Runtime version and optimisation level, int8 encoding.
    measured_with: dict[str, str] = field(default_factory=dict)
    # int8 only: the graph's own arithmetic per weight encoding (optimisations off), independent of this CPU.
    graph_level: dict[str, ParityResult] = field(default_factory=dict)
    # int8 only: which encoding each kind of processor serves (facemoe.runtime.int8_cpu).
    cpu_encodings: dict[str, str] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_json(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "num_inputs": self.num_inputs,
            "cosine_min": self.cosine_min,
            "cosine_mean": self.cosine_mean,
            "max_abs": self.max_abs,
            "routing_agreement_min": None if np.isnan(self.routing_min) else self.routing_min,
            "routing_agreement_mean": None if np.isnan(self.routing_mean) else self.routing_mean,
            "routing_agreement_per_layer": self.routing_per_layer,
            "top1_identification_agreement": self.top1_agreement,
            "tar_at_far_1e-3": self.tar_at_far,
            "tar_at_far_1e-3_reference": self.tar_at_far_reference,
            "tar_at_far_1e-3_diff": self.tar_at_far - self.tar_at_far_reference,
            "gates": self.gates,
            "failures": self.failures,
            "note": self.failures_note,
            "measured_with": self.measured_with,
            **({"graph_level": {k: v.to_json() for k, v in self.graph_level.items()}} if self.graph_level else {}),
            **({"cpu_encodings": self.cpu_encodings} if self.cpu_encodings else {}),
        }


def run_artifact(
    onnx_path: str | Path,
    inputs: np.ndarray,
    batch_size: int = 16,
    *,
    optimization: Optimization = "all",
    int8_encoding: str = "auto",
    work_dir: str | Path | None = None,
) -> tuple[np.ndarray, list[np.ndarray], OrtSession]:
    """Embeddings and per-layer top-k indices (tokens, k) of an ONNX artifact, and the session's settings.

    ``optimization="disabled"`` gives the graph's own arithmetic (what TensorRT computes from a Q/DQ
    graph); ``"all"`` gives the fused kernels this processor serves (facemoe.runtime.int8_cpu). The
    routing probe goes to ONNX Runtime in memory; one too large for a protobuf message is written to
    ``work_dir`` (default: the artifact's folder, the staging directory during an export) and removed.
    """
    model = onnx.load(str(onnx_path), load_external_data=True)
    probe, names = routing_probe(model, in_place=True)
    del model
    settings: dict[str, Any] = {
        "providers": ["CPUExecutionProvider"],
        "optimization": optimization,
        "int8_encoding": int8_encoding,
    }
    if probe.ByteSize() < EXTERNAL_DATA_THRESHOLD:
        session = create_session(probe, **settings)
    else:
        probe_path = Path(work_dir if work_dir is not None else Path(onnx_path).parent) / ".routing-probe.onnx"
        try:
            save_onnx(probe, probe_path)
            del probe
            session = create_session(probe_path, **settings)
        finally:
            remove_onnx(probe_path)
    from facemoe.export.onnx_export import release_memory

    release_memory()
    embeddings: list[np.ndarray] = []
    routes: list[list[np.ndarray]] = [[] for _ in names]
    for start in range(0, len(inputs), batch_size):
        outputs = session.run(inputs[start : start + batch_size])
        embeddings.append(outputs[0])
        for i, idx in enumerate(outputs[1:]):
            routes[i].append(idx.reshape(-1, idx.shape[-1]))
    return np.concatenate(embeddings), [np.concatenate(r) for r in routes], session


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def tar_at_far(genuine: np.ndarray, impostor: np.ndarray, far: float = 1e-3) -> float:
    """True-accept rate at the threshold where the impostor accept rate is ``far``."""
    if impostor.size == 0 or genuine.size == 0:
        return float("nan")
    threshold = np.quantile(impostor, 1.0 - far, method="higher")
    return float((genuine > threshold).mean())


def verification_scores(emb_a: np.ndarray, emb_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Genuine scores: row i of A vs row i of B (two views of one face); impostor: all i != j."""
    a, b = _normalize(emb_a), _normalize(emb_b)
    sims = a @ b.T
    genuine = np.diag(sims)
    impostor = sims[~np.eye(len(a), dtype=bool)]
    return genuine, impostor


def compare(
    precision: str,
    reference: tuple[np.ndarray, list[np.ndarray]],
    artifact: tuple[np.ndarray, list[np.ndarray]],
    layer_names: list[str],
    gates: dict[str, float] | None = None,
) -> ParityResult:
    """Compare artifact outputs with reference outputs on the same inputs.

    Inputs are expected in two halves: view A (faces) then view B (another view of the same faces,
    e.g. degraded or flipped); the verification metrics pair row i of each half.
    """
    ref_emb, ref_routes = reference
    art_emb, art_routes = artifact
    cos = (_normalize(ref_emb) * _normalize(art_emb)).sum(axis=1)
    agreement = routing_agreement(ref_routes, art_routes)
    half = len(ref_emb) // 2
    # Identification: views B as probes against a gallery of the reference's views A.
    gallery = _normalize(ref_emb[:half])
    top1_ref = (_normalize(ref_emb[half : 2 * half]) @ gallery.T).argmax(axis=1)
    top1_art = (_normalize(art_emb[half : 2 * half]) @ gallery.T).argmax(axis=1)
    tar_ref = tar_at_far(*verification_scores(ref_emb[:half], ref_emb[half : 2 * half]))
    tar_art = tar_at_far(*verification_scores(art_emb[:half], art_emb[half : 2 * half]))
    result = ParityResult(
        precision=precision,
        cosine_min=float(cos.min()),
        cosine_mean=float(cos.mean()),
        max_abs=float(np.abs(ref_emb - art_emb).max()),
        routing_min=float(min(agreement)) if agreement else float("nan"),
        routing_mean=float(np.mean(agreement)) if agreement else float("nan"),
        routing_per_layer=dict(zip(layer_names, agreement, strict=True)) if agreement else {},
        top1_agreement=float((top1_ref == top1_art).mean()) if half else float("nan"),
        tar_at_far=tar_art,
        tar_at_far_reference=tar_ref,
        num_inputs=len(ref_emb),
        gates=dict(gates if gates is not None else DEFAULT_GATES.get(precision, {})),
    )
    if "cosine_mean" in result.gates and not result.cosine_mean >= result.gates["cosine_mean"]:
        result.failures.append(f"cosine mean {result.cosine_mean:.6f} < {result.gates['cosine_mean']}")
    if "cosine_min" in result.gates and not result.cosine_min >= result.gates["cosine_min"]:
        result.failures.append(f"cosine min {result.cosine_min:.6f} < {result.gates['cosine_min']}")
    if not agreement:
        result.routing_per_layer = {}
        result.failures_note = "routing is decided inside the custom gating node: agreement not measured"
    elif "routing_min" in result.gates and not result.routing_min >= result.gates["routing_min"]:
        worst = min(result.routing_per_layer, key=result.routing_per_layer.__getitem__)
        result.failures.append(
            f"routing agreement {result.routing_min:.4f} < {result.gates['routing_min']} (worst layer {worst})"
        )
    return result


def check_artifact(
    model: FaceMoE,
    onnx_path: str | Path,
    precision: str,
    inputs: np.ndarray,
    gates: dict[str, float] | None = None,
    reference: tuple[np.ndarray, list[np.ndarray]] | None = None,
) -> ParityResult:
    """Parity of one artifact (``check_artifacts`` for one path)."""
    reference = reference if reference is not None else run_reference(model, inputs)
    names = [name for name, _ in model.moe_layers()]
    all_gates = {precision: gates} if gates is not None else dict(DEFAULT_GATES)
    return check_artifacts(reference, {precision: Path(onnx_path)}, inputs, names, all_gates)[0][precision]


def _measured_with(session: OrtSession, isa: CpuIsa) -> dict[str, str]:
    import onnxruntime

    info = {
        "cpu": isa.label,
        "onnxruntime": onnxruntime.__version__,
        "provider": session.provider,
        "graph_optimization": session.optimization,
    }
    if session.int8_encoding:
        info["int8_encoding"] = session.int8_encoding
    return info


def check_artifacts(
    reference: tuple[np.ndarray, list[np.ndarray]],
    artifacts: dict[str, Path],
    inputs: np.ndarray,
    layer_names: list[str],
    gates: dict[str, dict[str, float]],
) -> tuple[dict[str, ParityResult], dict[str, np.ndarray]]:
    """Parity of every artifact, the one procedure behind the export's gates and ``facemoe parity``.

    Each artifact is run as this machine serves it (ONNX Runtime CPU, all graph optimisations). An int8
    artifact is also run at graph level (optimisations off) in both weight encodings: ``s8`` is what
    TensorRT and VNNI CPUs compute, ``w7`` what the fast kernels of x86 CPUs without VNNI compute
    (docs/EXPORT.md, "INT8 on CPUs without VNNI"). Its verdict needs the served result and the ``s8``
    graph to pass; a failed ``w7`` only makes such CPUs serve the exact (slower) ``u8`` encoding.
    Returns the results and the served embeddings.
    """
    isa = detect_cpu()
    results: dict[str, ParityResult] = {}
    embeddings: dict[str, np.ndarray] = {}
    for precision, path in artifacts.items():
        precision_gates = gates.get(precision)
        graph_level: dict[str, ParityResult] = {}
        encoding = "auto"
        if precision == "int8":
            for graph_encoding in ("s8", "w7"):
                emb, routes, session = run_artifact(path, inputs, optimization="disabled", int8_encoding=graph_encoding)
                graph = compare(precision, reference, (emb, routes), layer_names, precision_gates)
                graph.measured_with = _measured_with(session, isa)
                graph_level[graph_encoding] = graph
            encoding = choose_encoding(isa, fast_encoding_passed=graph_level["w7"].passed)
        emb, routes, session = run_artifact(path, inputs, int8_encoding=encoding)
        result = compare(precision, reference, (emb, routes), layer_names, precision_gates)
        result.measured_with = _measured_with(session, isa)
        if graph_level:
            result.graph_level = graph_level
            result.cpu_encodings = {
                "x86 with VNNI, Arm, TensorRT": "s8",
                "x86 without VNNI": "w7" if graph_level["w7"].passed else "u8",
            }
            result.failures += [f"TensorRT graph (s8): {failure}" for failure in graph_level["s8"].failures]
        results[precision] = result
        embeddings[precision] = emb
    return results, embeddings


def noise_floor(
    model: FaceMoE,
    inputs: np.ndarray,
    reference: tuple[np.ndarray, list[np.ndarray]],
    layer_names: list[str],
    seed: int = 7,
) -> ParityResult:
    """The reference against itself with every input moved by up to ±0.5 grey level (below 8-bit rounding).

    How far the model itself moves under imperceptible noise: an artifact cannot be expected to agree with
    the reference much better than this. It has no gates; tables show it as "context".
    """
    jitter = np.random.default_rng(seed).uniform(-1.0, 1.0, inputs.shape).astype(np.float32) / 255.0
    return compare("fp32, inputs ±0.5 grey level", reference, run_reference(model, inputs + jitter), layer_names, {})
