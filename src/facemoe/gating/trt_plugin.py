"""TensorRT plugin for ``facemoe::SparseMoE`` through TensorRT's Python plugin API (``tensorrt.plugin``).

It needs TensorRT >= 10.6 (``tensorrt.plugin``, the IPluginV3-based "quickly deployable plugins"),
TensorRT >= 10.9 for the ahead-of-time (AOT) implementation, an NVIDIA GPU, and triton (plus torch for the
JIT implementation). CI registers it through NVIDIA's real ``tensorrt.plugin`` code of 10.6 to 11.x
(``.ci/trt_bindings.sh``); building and running the engine needs a GPU (``benchmarks/trt_verify.py``).
JetPack 6 ships TensorRT 10.3, which has neither: there the standard-op graph (``--gating onnx``) is the
path. See docs/GATING_OP.md and docs/TENSORRT.md.

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

This module imports without TensorRT, torch or triton; :func:`register` does the TensorRT work, and
:func:`python_plugin_mode` picks and registers the implementation an engine build uses. It imports nothing
from the model, the export or the runtime (docs/GATING_OP.md, "Code layout").

It deliberately has no ``from __future__ import annotations``: ``tensorrt.plugin`` reads the decorated
functions' annotations with ``inspect.signature`` and compares them with classes, so they must be real
objects, not strings. Integer attributes are declared as ``numpy.typing.NDArray[np.int32]`` rather than
``int``: TensorRT 10.6 to 11.0 turn an ``int`` attribute into a Python int with ``int(array)`` on a
one-element array, which numpy >= 2.4 refuses; an array attribute is passed through as an array on every
version (docs/TENSORRT.md, "Python plugin").
"""

import importlib
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, no_type_check

import numpy as np
import numpy.typing as npt

from facemoe.errors import FaceMoEError
from facemoe.extras import import_tensorrt
from facemoe.gating.spec import DOMAIN

PLUGIN_ID = "facemoe::SparseMoE"
PLUGIN_NAMESPACE, PLUGIN_NAME = PLUGIN_ID.split("::")
MIN_TRT_JIT = (10, 6)
MIN_TRT_AOT = (10, 9)
MODES = ("aot", "jit")
# Shared memory a kernel may use without an opt-in attribute, which AOT launches do not set.
_STATIC_SMEM_LIMIT = 48 * 1024
# How the integer attributes k and num_experts are declared (see the module docstring).
IntAttr = npt.NDArray[np.int32]

# What has been registered with TensorRT in this process: "describe" (register + autotune), "jit", "aot".
# Only steps that completed are recorded, so a failed AOT registration is retried by the next call.
_registered: set[str] = set()


def trt_version() -> tuple[int, int] | None:
    """(major, minor) of the installed TensorRT; None without a usable one (stubs, broken install)."""
    trt = import_tensorrt()
    if trt is None:
        return None
    try:
        major, minor = (int(p) for p in str(trt.__version__).split(".")[:2])
    except (AttributeError, ValueError):
        return None
    return major, minor


def plugin_module() -> ModuleType | None:
    """TensorRT's Python plugin API.

    ``tensorrt.plugin`` on JetPack and in the PyPI ``tensorrt`` 11 wheels; the PyPI wheels of 10.6 to 10.13
    ship it only as ``tensorrt_bindings.plugin`` (their ``tensorrt`` package is a one-file alias).
    """
    if import_tensorrt() is None:
        return None
    for name in ("tensorrt.plugin", "tensorrt_bindings.plugin"):
        try:
            return importlib.import_module(name)
        except Exception:  # ImportError, or a broken install raising from inside the package
            continue
    return None


def available(aot: bool = False) -> bool:
    """Whether this TensorRT can host the plugin (the AOT form when ``aot``)."""
    version = trt_version()
    if version is None or version < (MIN_TRT_AOT if aot else MIN_TRT_JIT):
        return False
    if aot:
        trt = import_tensorrt()
        flags = getattr(getattr(trt, "NetworkDefinitionCreationFlag", None), "__members__", {})
        if not hasattr(trt, "QuickPluginCreationRequest") or "PREFER_AOT_PYTHON_PLUGINS" not in flags:
            return False
    return plugin_module() is not None


def default_mode() -> str | None:
    """ "aot" when this TensorRT and triton allow it (the engine then runs without Python), else "jit"."""
    if available(aot=True) and importlib.util.find_spec("triton") is not None:
        return "aot"
    return "jit" if available() else None


def _scalar(value: Any) -> int:
    """An integer attribute as TensorRT hands it over (an int32 array of one element) -> int."""
    return int(np.asarray(value).reshape(-1)[0])


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

    from facemoe.gating import triton as smt

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


def _define_plugin(trtp: ModuleType) -> None:
    """Register the plugin's description, format combinations and JIT implementation."""

    @trtp.register(PLUGIN_ID)
    @no_type_check  # the annotations are runtime objects of tensorrt.plugin, which mypy cannot resolve here
    def _describe(
        x: trtp.TensorDesc,
        router: trtp.TensorDesc,
        w1: trtp.TensorDesc,
        b1: trtp.TensorDesc,
        w2: trtp.TensorDesc,
        b2: trtp.TensorDesc,
        k: IntAttr,
        num_experts: IntAttr,
    ) -> trtp.TensorDesc:
        return x.like()

    @trtp.autotune(PLUGIN_ID)
    def _formats(x, router, w1, b1, w2, b2, outputs):  # type: ignore[no-untyped-def]
        # Every input and the output share one dtype (fp32 or fp16); the kernels accumulate in fp32.
        return [trtp.AutoTuneCombination(", ".join(["FP32|FP16"] * 7))]

    @trtp.impl(PLUGIN_ID)
    def _run(x, router, w1, b1, w2, b2, k, num_experts, outputs, stream) -> None:  # type: ignore[no-untyped-def]
        import torch

        from facemoe.gating.triton import sparse_moe

        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            args = [torch.as_tensor(t, device="cuda") for t in (x, router, w1, b1, w2, b2)]
            out = torch.as_tensor(outputs[0], device="cuda")
            out.copy_(sparse_moe(*args, k=_scalar(k)))


def _define_aot(trtp: ModuleType, trt: ModuleType) -> None:
    """Register the ahead-of-time implementation (PTX compiled by triton at engine build time)."""
    dtype_names = {trt.float16: "fp16", trt.float32: "fp32"}

    @trtp.aot_impl(PLUGIN_ID)
    @no_type_check
    def _compile(
        x, router, w1, b1, w2, b2, k, num_experts, outputs, tactic
    ) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]:
        dims = [w1.shape_expr[i] for i in (0, 1, 2)]
        if not all(d.is_constant for d in dims):
            raise RuntimeError("facemoe::SparseMoE AOT: expert weights must have build-time constant shapes")
        experts, hidden, dim = (int(d.constant_value()) for d in dims)
        kernel = compile_fused_kernel(dtype_names[x.dtype], dim, hidden, experts, _scalar(k))
        tokens = x.shape_expr[0]
        launch = trtp.KernelLaunchParams()
        launch.grid_x = trtp.cdiv(tokens, kernel.block_t)
        launch.grid_y = int(np.ceil(dim / kernel.block_n))
        launch.block_x = kernel.threads
        launch.shared_mem = kernel.shared
        extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(tokens)])
        return kernel.name.encode(), kernel.ptx.encode(), launch, extra


def register(aot: bool = True) -> frozenset[str]:
    """Register the plugin with TensorRT's registry; returns the implementations now registered.

    Empty when this TensorRT cannot host it (older than 10.6, or no plugin API). Idempotent: what was
    registered stays, and a step that failed (say the AOT one) is tried again by the next call. Call it
    before parsing the ONNX graph and, for engines built with the JIT implementation, before
    deserialising them (an AOT engine carries its kernel and needs neither this module nor torch).
    """
    if not available():
        return frozenset()
    trtp = plugin_module()
    trt = import_tensorrt()
    if trtp is None or trt is None:
        return frozenset()
    if "describe" not in _registered:
        try:
            _define_plugin(trtp)
        except Exception as exc:  # TensorRT's validation of the signatures, or its registry
            raise FaceMoEError(f"TensorRT {trt.__version__} refused the {PLUGIN_ID} plugin: {exc}") from exc
        _registered.update(("describe", "jit"))
    if aot and "aot" not in _registered and available(aot=True):
        try:
            _define_aot(trtp, trt)
        except Exception as exc:
            raise FaceMoEError(
                f"TensorRT {trt.__version__} refused the AOT implementation of {PLUGIN_ID}: {exc}"
            ) from exc
        _registered.add("aot")
    return frozenset(_registered & set(MODES))


def python_plugin_mode(onnx_path: Path, requested: str, tensorrt_version: str) -> str:
    """Register facemoe::SparseMoE for an engine build; returns the implementation used, "aot" or "jit".

    Used for graphs with custom gating nodes when no compiled plugin library is given. The engine built
    with the AOT implementation embeds its kernel and runs without Python; the JIT one calls back into
    torch and triton at run time (docs/TENSORRT.md, "Python plugin").
    """
    mode = default_mode() if requested == "auto" else requested
    if mode is None or not available(aot=mode == "aot"):
        need = "10.9 for the AOT implementation" if mode == "aot" else "10.6"
        raise FaceMoEError(
            f"{onnx_path}: the graph has custom gating nodes (domain {DOMAIN!r}); TensorRT "
            f"{tensorrt_version} cannot host their Python plugin (it needs TensorRT {need}). Pass --plugin "
            "path/to/library.so, or re-export with --gating onnx"
        )
    missing = [name for name in ("torch", "triton") if importlib.util.find_spec(name) is None]
    if missing:
        raise FaceMoEError(
            f"{onnx_path}: building the {mode.upper()} facemoe::SparseMoE plugin needs {' and '.join(missing)} "
            "(pip install 'facemoe-edge[export]'), or re-export with --gating onnx"
        )
    registered = register(aot=mode == "aot")
    if mode not in registered:
        raise FaceMoEError(f"the {mode.upper()} implementation of {PLUGIN_ID} could not be registered")
    return mode


__all__ = [
    "MIN_TRT_AOT",
    "MIN_TRT_JIT",
    "MODES",
    "PLUGIN_ID",
    "AotKernel",
    "IntAttr",
    "available",
    "compile_fused_kernel",
    "default_mode",
    "plugin_module",
    "python_plugin_mode",
    "register",
    "trt_version",
]
