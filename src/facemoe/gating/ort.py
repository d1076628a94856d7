"""ONNX Runtime implementation of ``facemoe::SparseMoE`` (CPU, numpy; torch is never imported).

Graphs exported with ``gating="plugin"`` carry one ``SparseMoE`` node (domain ``facemoe``) per MoE block.
ONNX Runtime runs them once :func:`register_custom_ops` has been called on the session options (the one
session helper, ``facemoe.runtime.ort_session.create_session``, does it for such graphs). The kernel is a
Python op of onnxruntime-extensions (``pip install onnxruntime-extensions``): that package ships prebuilt
wheels matched to ONNX Runtime releases, so nothing is compiled on the user's machine. Its ``onnx_op``
accepts a ``"domain::op"`` type and registers the op in that domain, so the graph keeps the ``facemoe``
domain (no renaming to ``ai.onnx.contrib``).

The kernel computes only the selected experts: tokens are grouped per expert, each expert runs two
matmuls on its own tokens, and the results are added back with the raw router logits as weights, in
ascending expert index starting from zero (the reference summation order). Semantics: docs/GATING_OP.md.
"""

from __future__ import annotations

import math
import sys
from types import ModuleType
from typing import Any

import numpy as np

from facemoe.gating.spec import DOMAIN, OP_TYPE

_registered = False
_SQRT_PI = math.sqrt(math.pi)
# The series converges quickly below this |z|; the continued fraction above it.
_ERF_SPLIT = 3.0
_ERF_TERMS = 64


def erf(x: np.ndarray) -> np.ndarray:
    """Error function in float64 (max abs error ~2e-15): numpy has none, and scipy is not a runtime dependency.

    |z| < 3: the all-positive series exp(-z^2) * sum 2^n z^(2n+1) / (2n+1)!!, which has no cancellation;
    |z| >= 3: 1 - erfc(z) with erfc from its continued fraction, evaluated from the tail.
    """
    z = np.asarray(x, dtype=np.float64)
    a = np.abs(z)
    out = np.empty_like(a)
    small = a < _ERF_SPLIT
    s = a[small]
    term = s.copy()
    total = s.copy()
    two_s2 = 2.0 * s * s
    for n in range(1, _ERF_TERMS):
        term *= two_s2 / (2 * n + 1)
        total += term
    out[small] = (2.0 / _SQRT_PI) * np.exp(-s * s) * total
    big = a[~small]
    frac = big.copy()
    for n in range(_ERF_TERMS, 0, -1):
        frac = big + (n / 2.0) / frac
    out[~small] = 1.0 - np.exp(-big * big) / (_SQRT_PI * frac)
    return np.copysign(out, z)


def gelu(x: np.ndarray) -> np.ndarray:
    """Exact (erf) GELU, evaluated in float64 and returned in the input's dtype."""
    wide = x.astype(np.float64)
    return (0.5 * wide * (1.0 + erf(wide * (1.0 / math.sqrt(2.0))))).astype(x.dtype)


def top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """(T, k) indices of the k largest logits per row, descending; ties go to the lower index (ONNX TopK)."""
    # A stable sort of the negated logits keeps equal values in index order.
    return np.argsort(-logits, axis=-1, kind="stable")[:, :k]


def sparse_moe(
    x: np.ndarray,
    router: np.ndarray,
    w1: np.ndarray,
    b1: np.ndarray,
    w2: np.ndarray,
    b2: np.ndarray,
    *,
    k: int,
) -> np.ndarray:
    """``SparseMoE`` on tokens ``x`` of shape (T, C); see docs/GATING_OP.md for the layout of the weights."""
    if x.ndim != 2:
        raise ValueError(f"SparseMoE expects (tokens, channels) input, got shape {x.shape}")
    num_experts = router.shape[0]
    logits = x @ router.T
    selected = top_k(logits, k)
    out = np.zeros_like(x)
    for e in range(num_experts):
        rows = np.flatnonzero((selected == e).any(axis=-1))
        if rows.size == 0:
            continue
        tokens = x[rows]
        hidden = gelu(tokens @ w1[e].T + b1[e])
        y = hidden @ w2[e].T + b2[e]
        out[rows] += logits[rows, e : e + 1] * y
    return out


def _import_extensions() -> ModuleType:
    """Import onnxruntime_extensions without letting it import torch.

    Its package init imports torch when installed (for a Whisper converter this module never uses):
    3-4 s and hundreds of MB that an ONNX Runtime deployment must not pay. Hiding torch for the
    duration of the import makes that optional import fail quietly.
    """
    if "onnxruntime_extensions" in sys.modules or "torch" in sys.modules:
        import onnxruntime_extensions

        return onnxruntime_extensions
    sys.modules["torch"] = None  # type: ignore[assignment]
    try:
        import onnxruntime_extensions
    finally:
        del sys.modules["torch"]
    return onnxruntime_extensions


def _register_pyop() -> None:
    global _registered
    if _registered:
        return
    ext = _import_extensions()
    PyCustomOpDef, onnx_op = ext.PyCustomOpDef, ext.onnx_op  # noqa: N806

    float_t = PyCustomOpDef.dt_float

    @onnx_op(
        op_type=f"{DOMAIN}::{OP_TYPE}",
        inputs=[float_t] * 6,
        outputs=[float_t],
        attrs={"k": PyCustomOpDef.dt_int64, "num_experts": PyCustomOpDef.dt_int64},
    )
    def _sparse_moe_op(x: np.ndarray, router: Any, w1: Any, b1: Any, w2: Any, b2: Any, **attrs: Any) -> np.ndarray:
        k = int(attrs["k"])
        if int(attrs.get("num_experts", router.shape[0])) != router.shape[0]:
            raise ValueError(f"SparseMoE: num_experts={attrs['num_experts']} but the router has {router.shape[0]}")
        return sparse_moe(x, router, w1, b1, w2, b2, k=k)

    _registered = True


def custom_ops_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxruntime_extensions") is not None


def register_custom_ops(session_options: Any, required: bool = False) -> bool:
    """Make ``facemoe::SparseMoE`` available to sessions created with ``session_options``.

    Returns False (and changes nothing) when onnxruntime-extensions is not installed, so that standard
    graphs keep working on machines without it; ``required=True`` raises instead, with the fix.
    """
    try:
        get_library_path = _import_extensions().get_library_path
    except ImportError:
        if required:
            raise ImportError(
                "graphs exported with --gating plugin need onnxruntime-extensions for the facemoe::SparseMoE op "
                "on ONNX Runtime: pip install onnxruntime-extensions"
            ) from None
        return False
    _register_pyop()
    session_options.register_custom_ops_library(get_library_path())
    return True


__all__ = [
    "DOMAIN",
    "OP_TYPE",
    "custom_ops_available",
    "erf",
    "gelu",
    "register_custom_ops",
    "sparse_moe",
    "top_k",
]
