"""An ONNX model's inputs and outputs as Triton tensors, read from the graph itself (weights not loaded)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from facemoe.errors import BundleError
from facemoe.triton.config import NUMPY_TYPES, Tensor


@dataclass
class OnnxInterface:
    """Per-sample tensors (batch dimension removed) of a model whose first dimension is a dynamic batch."""

    inputs: list[Tensor]
    outputs: list[Tensor]
    fixed_batch: int | None = None  # a model exported for one batch size only

    def input(self, name: str) -> Tensor:
        return next(t for t in self.inputs if t.name == name)

    def output(self, name: str) -> Tensor:
        return next(t for t in self.outputs if t.name == name)


def _tensor(path: Path, value: onnx.ValueInfoProto) -> tuple[Tensor, int | None]:
    kind = value.type.tensor_type
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(kind.elem_type)).name
    if dtype not in NUMPY_TYPES:
        raise BundleError(f"{path}: tensor {value.name} has type {dtype}, which Triton cannot carry")
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in kind.shape.dim]
    if not dims:
        raise BundleError(f"{path}: tensor {value.name} has no batch dimension")
    batch = dims[0] if dims[0] > 0 else None
    return Tensor(value.name, NUMPY_TYPES[dtype], dims[1:]), batch


def read_interface(path: str | Path) -> OnnxInterface:
    """The graph inputs (initializers excluded) and outputs of ``path``."""
    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and others for a damaged file
        raise BundleError(f"{path}: not a readable ONNX model ({exc})") from None
    initializers = {init.name for init in model.graph.initializer}
    inputs, outputs, batches = [], [], set()
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor, batch = _tensor(path, value)
        inputs.append(tensor)
        batches.add(batch)
    for value in model.graph.output:
        tensor, batch = _tensor(path, value)
        outputs.append(tensor)
        batches.add(batch)
    fixed = [b for b in batches if b is not None]
    return OnnxInterface(inputs, outputs, fixed[0] if fixed else None)


__all__ = ["OnnxInterface", "read_interface"]
