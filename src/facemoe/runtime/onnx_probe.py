"""Routing probes of FaceMoE ONNX graphs: every MoE layer's chosen experts as extra outputs (torch-free).

Used by the export's parity report and by the runtime's live audit alike: quantisation can flip a
near-tied router decision, a failure unique to MoE (docs/ARCHITECTURE.md#routing-modes).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper


def routing_probe(model: onnx.ModelProto, in_place: bool = False) -> tuple[onnx.ModelProto, list[str]]:
    """``model`` (a copy unless ``in_place``) with the indices of every TopK as extra outputs, in graph order."""
    names = [node.output[1] for node in model.graph.node if node.op_type == "TopK"]
    probe = model if in_place else onnx.ModelProto()
    if not in_place:
        probe.CopyFrom(model)
    for name in names:
        probe.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.INT64, None))
    return probe, names


def routing_agreement(reference: list[np.ndarray], artifact: list[np.ndarray]) -> list[float]:
    """Per MoE layer: share of tokens whose set of selected experts (rows of ``(tokens, k)``) is the same.

    Empty when the artifact exposes no routing (a ``--gating plugin`` graph decides inside its custom node).
    """
    if not artifact:
        return []
    return [
        float((np.sort(a, axis=1) == np.sort(b, axis=1)).all(axis=1).mean())
        for a, b in zip(reference, artifact, strict=True)
    ]


__all__ = ["routing_agreement", "routing_probe"]
