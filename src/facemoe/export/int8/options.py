"""What ``quantize_int8`` may be asked to do: placement of Q/DQ and how ranges are calibrated."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

CalibrationMethod = Literal["max", "percentile", "entropy"]
CALIBRATION_METHODS: tuple[str, ...] = ("max", "percentile", "entropy")
QUANTIZABLE_OPS: tuple[str, ...] = ("MatMul", "Gemm", "Conv")


@dataclass(frozen=True)
class Int8Options:
    """Placement and calibration options of the INT8 pass (the package docstring says why the defaults).

    Placement: ``exclude_router`` keeps the router gate fp32, ``quantize_attention_matmuls`` adds Q/DQ to
    the activation-activation matmuls, ``quantize_head`` / ``quantize_first_layer`` the head Linear and the
    image-reading Conv, ``float_blocks`` keeps that many transformer blocks from the input side float,
    ``nodes_to_exclude`` are fnmatch patterns of node names, ``op_types`` limits the quantized op types.
    Calibration: ``method`` with ``percentile``, ``num_bins`` histogram bins and ``batch_size`` faces per
    ONNX Runtime run. ``split_gemm_bias``: see ``insert_qdq``. ``check_samples`` calibration faces are run
    through both graphs as a smoke test.
    """

    method: CalibrationMethod | str = "percentile"
    percentile: float = 99.99
    num_bins: int = 2048
    batch_size: int = 16
    exclude_router: bool = True
    quantize_attention_matmuls: bool = False
    quantize_head: bool = True
    quantize_first_layer: bool = False
    float_blocks: int = 1
    nodes_to_exclude: Sequence[str] = ()
    op_types: Sequence[str] = QUANTIZABLE_OPS
    split_gemm_bias: bool = True
    check_samples: int = 4

    def validate(self) -> None:
        if self.method not in CALIBRATION_METHODS:
            raise ValueError(
                f"unknown calibration method {self.method!r}; choose one of {', '.join(CALIBRATION_METHODS)}"
            )
        if not 0.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], not {self.percentile}")
        if self.num_bins < 256 or self.num_bins & (self.num_bins - 1):
            raise ValueError(f"num_bins must be a power of two >= 256, not {self.num_bins}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, not {self.batch_size}")

    def calibration_params(self, algorithm: int) -> dict[str, Any]:
        """The parameters that change the computed ranges (the calibration cache key's ``params``)."""
        params: dict[str, Any] = {"algorithm": algorithm}
        if self.method == "percentile":
            params["percentile"] = self.percentile
        if self.method != "max":
            params.update(num_bins=self.num_bins, batch_size=self.batch_size)
        return params

    def placement_json(self) -> dict[str, Any]:
        """The placement options as recorded in the manifest's quantization report."""
        return {
            "exclude_router": self.exclude_router,
            "quantize_attention_matmuls": self.quantize_attention_matmuls,
            "quantize_head": self.quantize_head,
            "nodes_to_exclude": list(self.nodes_to_exclude),
            "op_types": list(self.op_types),
            "split_gemm_bias": self.split_gemm_bias,
            "quantize_first_layer": self.quantize_first_layer,
            "float_blocks": self.float_blocks,
        }
