"""TensorRT plugin for ``facemoe::SparseMoE`` through TensorRT's Python plugin API (``tensorrt.plugin``).

NOT exercised in this repository's CI: it needs TensorRT >= 10.6 (``tensorrt.plugin``, the IPluginV3-based
"quickly deployable plugins"), TensorRT >= 10.9 for the ahead-of-time (AOT) implementation, an NVIDIA GPU,
and triton (plus torch for the JIT implementation). JetPack 6 ships TensorRT 10.3, which has neither:
there the standard-op graph (``--gating onnx``) is the path. See docs/GATING_OP.md.

Two implementations are registered for the plugin id ``facemoe::SparseMoE``:

* ``aot_impl`` (TensorRT >= 10.9): the single-launch Triton kernel ``_fused_token_tile_kernel`` compiled
  to PTX at build time and embedded in the engine, so the engine runs without Python. TensorRT launches
  exactly one kernel per plugin, which rules out the grouped pipeline (it needs a routing pass, a sort and
  two GEMMs): this kernel skips an expert per 16-token tile only and recomputes fc1 per output tile, so it
  is a portability path, not the fast one.
* ``impl`` (JIT, TensorRT >= 10.6): calls the grouped Triton pipeline through torch on TensorRT's stream.
  The engine then needs Python, torch, triton and this module at run time.

The ONNX parser maps the node to the plugin by op type plus namespace: the exporter writes the
``plugin_namespace="facemoe"`` attribute (TensorRT >= 10.10 also reads the node's domain).

This module imports without TensorRT, torch or triton; :func:`register` does the TensorRT work.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

PLUGIN_ID = "facemoe::SparseMoE"
MIN_TRT_JIT = (10, 6)
MIN_TRT_AOT = (10, 9)
# Shared memory a kernel may use without an opt-in attribute, which AOT launches do not set.
_STATIC_SMEM_LIMIT = 48 * 1024

_registered: set[str] = set()


def trt_version() -> tuple[int, int] | None:
    try:
        import tensorrt as trt
    except ImportError:
        return None
    major, minor = (int(p) for p in trt.__version__.split(".")[:2])
    return major, minor


def available(aot: bool = False) -> bool:
    """Whether this TensorRT can host the plugin (the AOT form when ``aot``)."""
    version = trt_version()
    return version is not None and version >= (MIN_TRT_AOT if aot else MIN_TRT_JIT)


@dataclass(frozen=True)
class AotKernel:
    name: str
    ptx: str
    threads: int
    shared: int
    block_t: int
    block_n: int


def _strip_trailing_params(ptx: str, name: str, keep: int) -> str:
    """Drop kernel parameters after the first ``keep`` from the PTX entry.

    Triton >= 3.3 appends scratch-buffer pointers to every kernel; TensorRT passes only the plugin's
    inputs, extra arguments and outputs. Removing them is safe only when the body never reads them.
    """
    pattern = re.compile(rf"(\.entry {re.escape(name)}\()(.*?)(\))", re.S)
    match = pattern.search(ptx)
    if match is None:
        raise RuntimeError(f"PTX has no entry {name!r}")
    params = [p.strip() for p in match.group(2).split(",") if p.strip()]
    for dropped in params[keep:]:
        param_name = dropped.split()[-1]
        if ptx.count(param_name) > 1:
            raise RuntimeError(f"kernel {name} uses its hidden parameter {param_name}: cannot launch it from TensorRT")
    body = ",\n\t".join(params[:keep])
    return ptx[: match.start()] + f"{match.group(1)}\n\t{body}\n{match.group(3)}" + ptx[match.end() :]


def compile_fused_kernel(dtype: str, dim: int, hidden: int, num_experts: int, k: int, target: Any = None) -> AotKernel:
    """PTX of the single-launch kernel for one block shape (``dtype`` 'fp16' or 'fp32').

    Needs triton and torch but no GPU when ``target`` is given (e.g. ``GPUTarget("cuda", 90, 32)``).
    """
    import triton
    from triton.compiler import ASTSource

    from facemoe.kernels import sparse_moe_triton as smt

    cfg = smt.pick_fused_config(dim, hidden)
    constexprs = smt.fused_constexprs(dim, hidden, num_experts, k, dtype == "fp32", cfg)
    kernel = smt._fused_token_tile_kernel
    signature = {
        name: "constexpr" if name in constexprs else "i32" if name == "tokens" else f"*{dtype}"
        for name in kernel.arg_names
    }
    options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs), target, options)
    meta = compiled.metadata
    if meta.shared > _STATIC_SMEM_LIMIT:
        raise RuntimeError(f"fused kernel needs {meta.shared} bytes of shared memory (> {_STATIC_SMEM_LIMIT})")
    runtime_args = sum(1 for v in signature.values() if v != "constexpr")
    ptx = _strip_trailing_params(compiled.asm["ptx"], meta.name, runtime_args)
    return AotKernel(meta.name, ptx, meta.num_warps * 32, meta.shared, cfg.block_t, cfg.block_n)


def register(aot: bool = True) -> bool:
    """Register the plugin with TensorRT's registry (idempotent). Returns False when TensorRT is too old.

    Call it before parsing the ONNX graph and, for JIT engines, before deserialising them.
    """
    if not available():
        return False
    if "jit" in _registered:
        return True
    import numpy as np
    import tensorrt as trt
    import tensorrt.plugin as trtp

    dtype_names = {trt.float16: "fp16", trt.float32: "fp32"}

    @trtp.register(PLUGIN_ID)
    def _describe(
        x: trtp.TensorDesc,
        router: trtp.TensorDesc,
        w1: trtp.TensorDesc,
        b1: trtp.TensorDesc,
        w2: trtp.TensorDesc,
        b2: trtp.TensorDesc,
        k: int,
        num_experts: int,
    ) -> trtp.TensorDesc:
        return x.like()

    @trtp.autotune(PLUGIN_ID)
    def _formats(x, router, w1, b1, w2, b2, outputs):  # type: ignore[no-untyped-def]
        # Every input and the output share one dtype (fp32 or fp16); the kernels accumulate in fp32.
        return [trtp.AutoTuneCombination(", ".join(["FP32|FP16"] * 7))]

    @trtp.impl(PLUGIN_ID)
    def _run(x, router, w1, b1, w2, b2, k: int, num_experts: int, outputs, stream) -> None:  # type: ignore[no-untyped-def]
        import torch

        from facemoe.kernels.sparse_moe_triton import sparse_moe

        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            args = [torch.as_tensor(t, device="cuda") for t in (x, router, w1, b1, w2, b2)]
            out = torch.as_tensor(outputs[0], device="cuda")
            out.copy_(sparse_moe(*args, k=int(k)))

    _registered.add("jit")
    if aot and available(aot=True) and "aot" not in _registered:

        @trtp.aot_impl(PLUGIN_ID)
        def _compile(x, router, w1, b1, w2, b2, k: int, num_experts: int, outputs, tactic):  # type: ignore[no-untyped-def]
            dims = [w1.shape_expr[i] for i in (0, 1, 2)]
            if not all(d.is_constant for d in dims):
                raise RuntimeError("facemoe::SparseMoE AOT: expert weights must have build-time constant shapes")
            experts, hidden, dim = (int(d.constant_value()) for d in dims)
            kernel = compile_fused_kernel(dtype_names[x.dtype], dim, hidden, experts, int(k))
            tokens = x.shape_expr[0]
            launch = trtp.KernelLaunchParams()
            launch.grid_x = trtp.cdiv(tokens, kernel.block_t)
            launch.grid_y = int(np.ceil(dim / kernel.block_n))
            launch.block_x = kernel.threads
            launch.shared_mem = kernel.shared
            extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(tokens)])
            return kernel.name.encode(), kernel.ptx.encode(), launch, extra

        _registered.add("aot")
    return True


__all__ = ["MIN_TRT_AOT", "MIN_TRT_JIT", "PLUGIN_ID", "AotKernel", "available", "compile_fused_kernel", "register"]
