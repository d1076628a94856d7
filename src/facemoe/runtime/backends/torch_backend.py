"""PyTorch backend: the FaceMoE module itself, on a CUDA GPU (fp16, CUDA graphs) or on the CPU (fp32).

Where it fits: a GPU box without TensorRT (a workstation, a cloud GPU) and the reference the other backends
are measured against. torch is imported inside functions only, so ``facemoe.runtime`` still imports on an
edge box without it; every failure to run here is a ``BackendUnavailable`` with the reason.

fp16 means fp16 GEMMs in an fp32 network (``apply_fp16``): the layers that hold the FLOPs run on half
weights and inputs, while the residual stream, LayerNorms, attention softmax, the MoE routers and the head
stay fp32 (DESIGN §1: the whole network in fp16 lost cosine 0.9994 on random weights; routers choose and
weight experts by raw logits, so every rounding in their input can flip a near-tied token).

CUDA graphs remove the per-kernel launch cost that dominates small batches (the model is ~1,100 kernels):
one graph per batch bucket (1, 2, 4, ... 256), inputs padded up to the bucket, captured on first use.

``compile=True`` runs each Swin block through TorchInductor (regional compilation: the 22 blocks come in five
variants, stage x shifted window, so compiled code is shared; measured 25-30 s per batch size on an H200); it
fuses the LayerNorms, GELUs, casts, rolls and window copies that eager mode runs as separate memory-bound
kernels. ``half="all"`` runs the whole network in fp16, with the experts packed (``MoE.pack_experts``).
"""

from __future__ import annotations

import copy
import importlib
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from facemoe.bundle import Bundle
from facemoe.errors import BundleError
from facemoe.fileio import sha256_file
from facemoe.runtime.backends.base import Backend, BackendUnavailable

if TYPE_CHECKING:
    import torch

    from facemoe.model.swin import FaceMoE

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _import_torch() -> ModuleType:
    try:
        return importlib.import_module("torch")
    except ImportError as exc:
        raise BackendUnavailable(
            f"PyTorch is not installed ({exc}); install the export extra: pip install 'facemoe-edge[export]'"
        ) from exc


def buckets_for(max_batch: int) -> tuple[int, ...]:
    """Graph batch sizes: the powers of two below ``max_batch``, then ``max_batch`` itself."""
    return (*[b for b in BUCKETS if b < max_batch], max_batch)


def _inputs_to_half(_module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
    # .half() on a tensor that already is fp16 returns it unchanged (no kernel).
    return tuple(a.half() if hasattr(a, "is_floating_point") and a.is_floating_point() else a for a in args)


def _output_to_float(_module: Any, _args: Any, out: Any) -> Any:
    return out.float()


def apply_fp16(model: FaceMoE) -> FaceMoE:
    """fp16 GEMMs, fp32 everything else; in place.

    Half weights and inputs for the layers that hold the FLOPs (patch embedding, qkv and output projections,
    expert MLPs, patch merging); their results return to fp32, except the first expert layer's, which stays
    fp16 through the GELU into the second. The residual stream, every LayerNorm, attention scores and
    softmax, the routers and the head stay fp32. Measured on the full model with random weights (CPU):
    the whole network in fp16 with fp32 LayerNorm/router/head flipped the top-2 expert set of 1-3.5% of
    tokens per layer (embedding cosine down to 0.987), because an fp16 residual stream perturbs every
    router input and a flipped token moves the output by its raw gate logit.
    """
    from facemoe.model.moe import Expert
    from facemoe.model.swin import PatchEmbed, PatchMerging, WindowAttention

    def half_gemm(layer: Any, back_to_float: bool = True) -> None:
        layer.half()
        layer.register_forward_pre_hook(_inputs_to_half)
        if back_to_float:
            layer.register_forward_hook(_output_to_float)

    for module in model.modules():
        if isinstance(module, WindowAttention):
            half_gemm(module.qkv)
            half_gemm(module.proj)
        elif isinstance(module, Expert):
            half_gemm(module.fc1, back_to_float=False)
            half_gemm(module.fc2)
        elif isinstance(module, PatchMerging):
            half_gemm(module.reduction)
        elif isinstance(module, PatchEmbed):
            half_gemm(module.proj)
    return model


def apply_full_fp16(model: FaceMoE) -> FaceMoE:
    """The whole network in fp16 (fp32 in and out); in place. Faster than ``apply_fp16``, see docs/BENCHMARKS.md."""
    model.half()
    model.register_forward_pre_hook(_inputs_to_half)
    model.register_forward_hook(_output_to_float)
    return model


def compile_blocks(model: FaceMoE, *, recompile_limit: int = 64) -> int:
    """Compile every Swin block in place with TorchInductor; returns how many.

    Identical blocks share one compiled graph per input shape. Shapes are static (``dynamic=False``): every
    batch bucket gets kernels specialised to its size, as a CUDA graph per bucket wants anyway. The limit of
    recompilations per code object is raised because each stage's width, shifted/unshifted windows and every
    bucket are a separate entry, and hitting the default limit silently falls back to eager mode.
    """
    torch = _import_torch()
    from facemoe.model.swin import SwinMoEBlock

    dynamo_config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(int(getattr(dynamo_config, name)), recompile_limit))
    blocks = [m for m in model.modules() if isinstance(m, SwinMoEBlock)]
    for block in blocks:
        block.compile(dynamic=False)
    return len(blocks)


def load_model_from_bundle(bundle: Bundle, checkpoint: str | Path | None = None) -> FaceMoE:
    """Rebuild the bundle's FaceMoE in PyTorch from its source checkpoint (or recorded random-weight seed).

    The ONNX files are not turned back into a module: their weights are fused and renamed by the export,
    and the official checkpoint is the honest source. The result is checked against the manifest's
    ``weights_sha256`` when the bundle records one.
    """
    _import_torch()
    from facemoe.model import build_model, load_checkpoint
    from facemoe.model.config import FaceMoEConfig

    section = bundle.manifest.model
    try:
        config = FaceMoEConfig.from_dict(dict(section["config"]))
    except (KeyError, TypeError) as exc:
        raise BundleError(f"{bundle.root}: manifest has no model.config to rebuild the PyTorch model from") from exc
    source = dict(section.get("source") or {})
    recorded = checkpoint or source.get("path") or source.get("checkpoint")
    seed = source.get("seed", source.get("random_seed"))
    if recorded:
        path = Path(recorded)
        if not path.is_file() and (bundle.root / path).is_file():
            path = bundle.root / path
        if not path.is_file():
            raise BackendUnavailable(
                f"the torch backend rebuilds FaceMoE from its checkpoint, and {path} (recorded in "
                f"{bundle.root}/manifest.json as model.source.path) is not here; pass the checkpoint "
                "explicitly (checkpoint=... / --checkpoint)"
            )
        if checkpoint is None and source.get("sha256") and sha256_file(path) != source["sha256"]:
            raise BundleError(f"{path}: checkpoint differs from the one the bundle was exported from (sha256)")
        model = load_checkpoint(path, config=config, k=config.k)
    elif section.get("random_weights") and seed is not None:
        from facemoe.model.random_weights import randomize

        model = randomize(build_model(config), seed=int(seed), strength=float(source.get("strength", 1.0)))
    else:
        raise BackendUnavailable(
            f"the torch backend rebuilds FaceMoE from its checkpoint, and {bundle.root}/manifest.json records "
            "none (model.source.path is empty); pass the checkpoint explicitly (checkpoint=... / --checkpoint)"
        )
    expected = section.get("weights_sha256")
    if expected:
        from facemoe.model.fingerprint import model_fingerprint

        if model_fingerprint(model) != expected:
            raise BundleError(
                f"{bundle.root}: the PyTorch weights do not match the bundle's (weights_sha256); the checkpoint "
                "is not the one this bundle was exported from"
            )
    return model.eval()


class TorchBackend(Backend):
    """FaceMoE in PyTorch: ``cuda`` fp16/fp32 (static routing, CUDA graphs) or ``cpu`` fp32.

    ``routing="sparse"`` runs the official-code-equivalent path (each expert on its routed tokens only);
    its data-dependent shapes rule out CUDA graphs.
    """

    name = "torch"

    def __init__(
        self,
        model: FaceMoE,
        *,
        precision: str = "fp16",
        device: str = "cuda",
        max_batch: int = 32,
        cuda_graphs: bool = True,
        routing: str = "static",
        copy_model: bool = True,
        compile: bool = False,
        half: str = "gemm",
    ) -> None:
        torch = _import_torch()
        if precision not in ("fp32", "fp16"):
            raise BackendUnavailable(f"the torch backend runs fp32 or fp16, not {precision}")
        if routing not in ("static", "sparse"):
            raise BackendUnavailable(f"routing must be 'static' or 'sparse', not {routing!r}")
        self.torch_device = torch.device(device)
        is_cuda = self.torch_device.type == "cuda"
        if is_cuda and not torch.cuda.is_available():
            raise BackendUnavailable(
                f"PyTorch sees no CUDA GPU (torch {torch.__version__}, CUDA build {torch.version.cuda}); "
                "use device='cpu' (fp32) or another backend"
            )
        if not is_cuda and precision != "fp32":
            raise BackendUnavailable("fp16 needs a CUDA GPU; on the CPU the torch backend runs fp32")
        if half not in ("gemm", "all"):
            raise BackendUnavailable(f"half must be 'gemm' (fp16 GEMMs in an fp32 network) or 'all', not {half!r}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if compile and routing == "sparse":
            raise BackendUnavailable("compile needs static routing (sparse routing has data-dependent shapes)")
        model = copy.deepcopy(model) if copy_model else model
        model.eval().set_routing(routing)  # type: ignore[arg-type]
        if precision == "fp16":
            apply_fp16(model) if half == "gemm" else apply_full_fp16(model)
        self.half = half if precision == "fp16" else ""
        self.model: FaceMoE = model.to(self.torch_device)
        if routing == "static" and self.half != "gemm":
            # The hybrid keeps per-expert fp16 hooks, which the packed path would bypass.
            for _, moe in self.model.moe_layers():
                moe.pack_experts()
        self.compiled = bool(compile) and compile_blocks(self.model) > 0
        self.precision = precision
        self.routing = routing
        self.device = str(self.torch_device)
        self.max_batch = max_batch
        self.cuda_graphs = bool(cuda_graphs and is_cuda and routing == "static")
        self.buckets = buckets_for(max_batch)
        self._graphs: dict[int, tuple[Any, Any, Any]] = {}
        self._pool: Any = None
        cfg = model.config
        self._input_size = int(cfg.img_size)
        self._embedding_size = int(cfg.embedding_size)

    @classmethod
    def from_bundle(
        cls,
        bundle: Bundle,
        precision: str = "fp16",
        max_batch: int = 32,
        *,
        device: str = "cuda",
        cuda_graphs: bool = True,
        routing: str = "static",
        checkpoint: str | Path | None = None,
        compile: bool = False,
        half: str = "gemm",
    ) -> TorchBackend:
        torch = _import_torch()
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendUnavailable(
                f"PyTorch sees no CUDA GPU (torch {torch.__version__}, CUDA build {torch.version.cuda})"
            )
        model = load_model_from_bundle(bundle, checkpoint)
        return cls(
            model,
            precision=precision,
            device=device,
            max_batch=max_batch,
            cuda_graphs=cuda_graphs,
            routing=routing,
            copy_model=False,
            compile=compile,
            half=half,
        )

    @property
    def embedding_size(self) -> int:
        return self._embedding_size

    @property
    def input_size(self) -> int:
        return self._input_size

    def _eager(self, batch: np.ndarray) -> np.ndarray:
        torch = _import_torch()
        with torch.inference_mode():
            x = torch.from_numpy(batch).to(self.torch_device, non_blocking=True)
            out = self.model(x)
            return out.float().cpu().numpy()

    def _capture(self, bucket: int) -> tuple[torch.Tensor, torch.Tensor, Any]:
        torch = _import_torch()
        static_in = torch.zeros((bucket, 3, self._input_size, self._input_size), device=self.device)
        if self._pool is None:
            # One memory pool for every bucket: replays are sequential on one stream and outputs are copied
            # out right after each replay, so graphs may reuse each other's scratch memory.
            self._pool = torch.cuda.graph_pool_handle()
        with torch.inference_mode():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside the graph: cuBLAS handles, autotuning, lazy init
                for _ in range(2):
                    self.model(static_in)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                static_out = self.model(static_in)
        self._graphs[bucket] = (static_in, static_out, graph)
        return self._graphs[bucket]

    def _replay(self, batch: np.ndarray) -> np.ndarray:
        torch = _import_torch()
        n = batch.shape[0]
        bucket = next(b for b in self.buckets if b >= n)
        static_in, static_out, graph = self._graphs.get(bucket) or self._capture(bucket)
        with torch.inference_mode():
            static_in[:n].copy_(torch.from_numpy(batch))
            graph.replay()
            return static_out[:n].float().cpu().numpy()

    def _embed_batch(self, batch: np.ndarray) -> np.ndarray:
        return self._replay(batch) if self.cuda_graphs else self._eager(batch)

    def warmup(self, batch_sizes: tuple[int, ...] = (1,)) -> None:
        # Largest first: with a shared pool, smaller graphs then fit in memory the larger one already holds.
        for size in sorted(set(batch_sizes), reverse=True):
            self.embed(np.zeros((size, 3, self._input_size, self._input_size), dtype=np.float32))

    def reset_peak_memory(self) -> None:
        torch = _import_torch()
        if self.torch_device.type == "cuda":
            torch.cuda.synchronize(self.torch_device)
            torch.cuda.reset_peak_memory_stats(self.torch_device)

    def memory_stats(self) -> dict[str, Any]:
        torch = _import_torch()
        if self.torch_device.type != "cuda":
            return {}
        return {
            "peak_device_memory_bytes": int(torch.cuda.max_memory_allocated(self.torch_device)),
            "kind": "torch.cuda.max_memory_allocated",
        }

    def describe(self) -> str:
        graphs = ", CUDA graphs" if self.cuda_graphs else ""
        options = (", whole network fp16" if self.half == "all" else "") + (", compiled" if self.compiled else "")
        return (
            f"torch ({self.precision}, {self.routing} routing, {self.device}, max batch {self.max_batch}"
            f"{graphs}{options})"
        )

    def close(self) -> None:
        self._graphs.clear()
        self._pool = None


__all__ = [
    "BUCKETS",
    "TorchBackend",
    "apply_fp16",
    "apply_full_fp16",
    "buckets_for",
    "compile_blocks",
    "load_model_from_bundle",
]
