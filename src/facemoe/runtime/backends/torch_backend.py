"""PyTorch backend: the FaceMoE module itself, on a CUDA GPU (fp16, CUDA graphs) or on the CPU (fp32).

Where it fits: a GPU box without TensorRT (a workstation, a cloud GPU) and the reference the other backends
are measured against. torch is imported inside functions only, so ``facemoe.runtime`` still imports on an
edge box without it; every failure to run here is a ``BackendUnavailable`` with the reason.

The model-side choices live with the model (``facemoe.model.inference``): the fp16 policies (``half="gemm"``:
fp16 GEMMs in an fp32 network; ``half="all"``: the whole network, experts packed), ``compile=True``
(TorchInductor per Swin block) and the reference model rebuilt from a bundle. This module adds what is
about running: devices, batching and CUDA graphs, which remove the per-kernel launch cost that dominates
small batches (the model is ~1,100 kernels): one graph per batch bucket (1, 2, 4, ... 256), inputs padded
up to the bucket, captured on first use.
"""

from __future__ import annotations

import copy
import importlib
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from facemoe.bundle import Bundle
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


class TorchBackend(Backend):
    """FaceMoE in PyTorch: ``cuda`` fp16/fp32 (static routing, CUDA graphs) or ``cpu`` fp32.

    ``routing="sparse"`` runs the official-code-equivalent path (each expert on its routed tokens only);
    its data-dependent shapes rule out CUDA graphs.
    """

    name = "torch"
    # The stored compiled package in use (docs/COMPILED.md#stored-compiled-packages), or why none was.
    package_path: Path | None = None
    package_load_s: float = 0.0
    package_note: str = ""

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
        from facemoe.model.inference import apply_fp16, apply_full_fp16, compile_blocks

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
            self.model.pack_experts()
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
        device: str | None = None,
        threads: int | None = None,
        cuda_graphs: bool = True,
        routing: str = "static",
        checkpoint: str | Path | None = None,
        compile: bool = False,
        half: str = "gemm",
        stored: bool = True,
    ) -> TorchBackend:
        """The bundle's model rebuilt from its checkpoint (``facemoe.model.inference.load_reference_model``).

        ``device`` None means ``cuda``; ``threads`` sets PyTorch's CPU intra-op threads (process-wide).
        With ``stored`` a matching compiled package in the bundle's ``engines/`` is loaded instead
        (docs/COMPILED.md#stored-compiled-packages); a mismatched one is refused and the reason kept in
        ``package_note``, shown by ``describe``, as the model is rebuilt and run eagerly (or compiled).
        """
        torch = _import_torch()
        from facemoe.model.inference import ReferenceUnavailable, load_reference_model

        device = device or "cuda"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendUnavailable(
                f"PyTorch sees no CUDA GPU (torch {torch.__version__}, CUDA build {torch.version.cuda})"
            )
        if threads:
            torch.set_num_threads(threads)
        package_note = ""
        if stored and routing == "static" and (precision == "fp32" or not device.startswith("cpu")):
            from facemoe.runtime.torch_package import KIND, PackageUnavailable, probe, select_package

            try:
                path, identity = select_package(bundle, probe(device, bundle, precision, half, max_batch))
                return cls._from_package(bundle, path, identity, device, max_batch, cuda_graphs)
            except PackageUnavailable as exc:
                if any(e.get("kind") == KIND for e in bundle.manifest.engines):
                    package_note = f"stored package not used ({exc}); {'compiling' if compile else 'eager'}"
        try:
            model = load_reference_model(bundle, checkpoint)
        except ReferenceUnavailable as exc:
            raise BackendUnavailable(f"the torch backend: {exc}") from exc
        backend = cls(
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
        backend.package_note = package_note
        return backend

    @classmethod
    def _from_package(
        cls, bundle: Bundle, path: Path, identity: Any, device: str, max_batch: int, cuda_graphs: bool
    ) -> TorchBackend:
        """A backend whose model is the stored AOTInductor package (no checkpoint read, nothing compiled)."""
        import time

        torch = _import_torch()
        start = time.perf_counter()
        runner = torch._inductor.aoti_load_package(str(path))
        self = cls.__new__(cls)
        self.torch_device = torch.device(device)
        self.model = runner
        self.compiled, self.half, self.routing = True, identity.half, "static"
        self.precision, self.device, self.max_batch = identity.precision, str(self.torch_device), max_batch
        self.cuda_graphs = bool(cuda_graphs and self.torch_device.type == "cuda")
        self.buckets = buckets_for(max_batch)
        self._graphs, self._pool = {}, None
        self._input_size = int(bundle.manifest.preprocessing.get("input_size", 120))
        self._embedding_size = int(bundle.manifest.embedding_size)
        self.package_path, self.package_load_s = path, time.perf_counter() - start
        return self

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

    def use_cuda_graphs(self, enabled: bool) -> bool:
        # Sparse routing has data-dependent shapes, which a graph cannot replay.
        self.cuda_graphs = bool(enabled) and self.torch_device.type == "cuda" and self.routing == "static"
        return self.cuda_graphs

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
        stats = super().memory_stats()
        if self.torch_device.type == "cuda":
            torch = _import_torch()
            stats["peak_device_memory_bytes"] = int(torch.cuda.max_memory_allocated(self.torch_device))
            stats["device_memory_bytes"] = int(torch.cuda.memory_allocated(self.torch_device))
            stats["kind"] = "torch.cuda.max_memory_allocated"
        return stats

    def notes(self) -> list[str]:
        options = ["compiled"] if self.compiled else []
        if self.package_path is not None:
            options.append(f"stored package loaded in {self.package_load_s:.2f} s")
        elif self.package_note:
            options.append(self.package_note)
        if self.half == "all":
            options.append("whole network fp16")
        return [*options, *super().notes()]

    def describe(self) -> str:
        graphs = ", CUDA graphs" if self.cuda_graphs else ""
        options = (", whole network fp16" if self.half == "all" else "") + (", compiled" if self.compiled else "")
        if self.package_path is not None:
            options += f", stored package {self.package_path.name} loaded in {self.package_load_s:.2f} s"
        elif self.package_note:
            options += f"; {self.package_note}"
        return (
            f"torch ({self.precision}, {self.routing} routing, {self.device}, max batch {self.max_batch}"
            f"{graphs}{options})"
        )

    def close(self) -> None:
        """Drop the CUDA graphs, their memory pool and the model, and return cached GPU memory."""
        if self._closed:
            return
        self._closed = True
        self._graphs.clear()
        self._pool = None
        del self.model
        torch = _import_torch()
        if self.torch_device.type == "cuda":
            torch.cuda.empty_cache()


__all__ = ["BUCKETS", "TorchBackend", "buckets_for"]
