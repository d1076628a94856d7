"""The contract of ``facemoe::SparseMoE``: what every implementation agrees on (docs/GATING_OP.md).

Pure data and one check; no third-party imports, so the exporter, the ONNX Runtime kernel, the Triton
kernels and the TensorRT plugin can all read it without pulling each other in.
"""

from __future__ import annotations

DOMAIN = "facemoe"
OP_TYPE = "SparseMoE"
OP_VERSION = 1

# Inputs in node order with their shapes: T tokens (dynamic), C channels, N experts, H expert hidden size.
INPUTS: tuple[tuple[str, str], ...] = (
    ("X", "(T, C)"),
    ("router_weight", "(N, C)"),
    ("fc1_weight", "(N, H, C)"),
    ("fc1_bias", "(N, H)"),
    ("fc2_weight", "(N, C, H)"),
    ("fc2_bias", "(N, C)"),
)
OUTPUTS: tuple[tuple[str, str], ...] = (("Y", "(T, C)"),)
# Names the exporter gives the stacked weights: ``<block>.experts.<name>`` (inputs 1..5).
WEIGHT_NAMES: tuple[str, ...] = tuple(name for name, _ in INPUTS[1:])
# Attributes: k and num_experts are ints; plugin_namespace (always DOMAIN) is how the TensorRT ONNX parser
# finds the plugin ("<plugin_namespace>::<op_type>"); ONNX Runtime ignores it.
ATTRIBUTES: dict[str, str] = {"k": "int", "num_experts": "int", "plugin_namespace": "string"}

# What the GPU kernels implement: k experts kept in registers per token, N logits compared in one pass,
# and 16-wide MMA tiles along the channel and hidden dimensions. The numpy ONNX Runtime kernel is general,
# but a graph that only runs on the CPU would defeat the purpose, so export refuses what the GPU kernels
# cannot run.
MAX_EXPERTS = 8
SUPPORTED_K = (1, 2)
DIM_MULTIPLE = 16


def plugin_support_problems(dim: int, hidden: int, num_experts: int, k: int) -> list[str]:
    """Why a block of this shape cannot use the op (empty when it can)."""
    problems = []
    if k not in SUPPORTED_K:
        problems.append(f"k={k} (supported: {', '.join(map(str, SUPPORTED_K))})")
    if not 2 <= num_experts <= MAX_EXPERTS:
        problems.append(f"num_experts={num_experts} (supported: 2..{MAX_EXPERTS})")
    if k > num_experts:
        problems.append(f"k={k} > num_experts={num_experts}")
    if dim % DIM_MULTIPLE:
        problems.append(f"channels {dim} not a multiple of {DIM_MULTIPLE}")
    if hidden % DIM_MULTIPLE:
        problems.append(f"expert hidden size {hidden} not a multiple of {DIM_MULTIPLE}")
    return problems


def support_summary() -> str:
    """The supported range in words, for error messages."""
    return (
        f"k in {{{', '.join(map(str, SUPPORTED_K))}}}, 2..{MAX_EXPERTS} experts and channel and hidden "
        f"sizes that are multiples of {DIM_MULTIPLE}"
    )


def is_sparse_moe(domain: str, op_type: str) -> bool:
    return domain == DOMAIN and op_type == OP_TYPE


__all__ = [
    "ATTRIBUTES",
    "DIM_MULTIPLE",
    "DOMAIN",
    "INPUTS",
    "MAX_EXPERTS",
    "OP_TYPE",
    "OP_VERSION",
    "OUTPUTS",
    "SUPPORTED_K",
    "WEIGHT_NAMES",
    "is_sparse_moe",
    "plugin_support_problems",
    "support_summary",
]
