"""TensorRT backend: a bundle's engine, checked against this GPU, driven through cuda-python.

Before TensorRT sees an engine, the sidecar identity is compared with this device (compute capability,
TensorRT version, ONNX and plugin hashes) and the file's sha256 with the sidecar: a mismatched engine is
refused with the reason ("built on sm_87 with TensorRT 10.3, this is sm_89 with TensorRT 10.13"). Building
one is the exporter's job: ``facemoe.deploy.prepare_backend(..., rebuild=True)`` builds and then opens.

cuda-python drives memory, pinned buffers and streams (runtime/backends/cuda_runtime.py says why).

No torch here: the runtime must run on an edge box that carries TensorRT, numpy and cuda-python only.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from facemoe.bundle import Bundle
from facemoe.errors import EngineMismatchError, FaceMoEError
from facemoe.runtime.backends.base import Backend, BackendUnavailable
from facemoe.runtime.backends.cuda_runtime import CudaRuntime
from facemoe.runtime.backends.plugin_libraries import bundle_plugin_libraries, load_plugin_libraries
from facemoe.runtime.device import detect_device, import_tensorrt
from facemoe.runtime.engine_identity import (
    EngineIdentity,
    EngineUnavailable,
    compare,
    plugin_hashes,
    read_sidecar,
    select_engine,
    verify_engine_file,
)

if TYPE_CHECKING:
    import tensorrt as trt


def _pinned_array(ptr: int, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = memoryview((ctypes.c_byte * nbytes).from_address(ptr)).cast("B")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def _require_tensorrt() -> None:
    if import_tensorrt() is None:
        raise BackendUnavailable(
            "TensorRT is not installed (JetPack's python3-libnvinfer on Jetson; on x86 `pip install tensorrt-cu12` "
            "or `tensorrt-cu13`, matching the driver's CUDA major version)"
        )


def _register_jit_plugin(engine_path: Path) -> None:
    """An engine built with the JIT facemoe::SparseMoE plugin calls back into Python: register it first."""
    from facemoe.gating import trt_plugin

    missing = [name for name in ("torch", "triton") if importlib.util.find_spec(name) is None]
    registered: frozenset[str] = frozenset()
    if not missing:
        registered = trt_plugin.register(aot=False)
    if missing or "jit" not in registered:
        need = " and ".join(missing) if missing else "TensorRT 10.6 or newer with its Python plugin API"
        raise EngineUnavailable(
            f"{engine_path}: the engine runs facemoe::SparseMoE through the JIT Python plugin, which needs {need} "
            "here; rebuild it with --plugin-mode aot (no Python at run time) or re-export with --gating onnx"
        )


class TensorRTBackend(Backend):
    """Runs one engine with static IO buffers sized for ``max_batch`` and, optionally, CUDA graphs."""

    name = "tensorrt"

    def __init__(
        self,
        engine_path: str | Path,
        *,
        precision: str = "fp16",
        max_batch: int = 32,
        expected_sha256: str | None = None,
        identity: EngineIdentity | None = None,
        cuda_graphs: bool = False,
        device_index: int = 0,
        plugin_libraries: Sequence[str | Path] = (),
    ) -> None:
        _require_tensorrt()
        import tensorrt as trt

        self._closed = True
        self.note = ""  # why this engine may not be the best one for this GPU (see select_engine)
        self.cuda = CudaRuntime.load()
        self.engine_path = Path(engine_path)
        self.identity = identity
        self.precision = precision
        self.device = f"cuda:{device_index}"
        self.cuda_graphs = cuda_graphs
        self.cuda_graph_error: str | None = None
        if expected_sha256 is not None:
            verify_engine_file(self.engine_path, expected_sha256)
        load_plugin_libraries(list(plugin_libraries))
        if identity is not None and identity.python_plugin == "jit":
            _register_jit_plugin(self.engine_path)
        self.cuda.set_device(device_index)
        free_before, _ = self.cuda.mem_get_info()

        logger = trt.Logger(trt.Logger.WARNING)
        try:
            self._runtime = trt.Runtime(logger)
        except TypeError as exc:  # pybind11: "factory function returned nullptr" when CUDA cannot start
            raise BackendUnavailable(
                f"TensorRT {trt.__version__} could not create its runtime: CUDA failed to initialise (no GPU "
                "visible, or a driver older than this TensorRT's CUDA needs)"
            ) from exc
        engine = self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if engine is None:
            raise EngineMismatchError(
                f"{self.engine_path}: TensorRT {trt.__version__} could not deserialise the engine (see the TensorRT "
                "error above); it was probably built with another TensorRT version or plugin: rebuild it with "
                "facemoe build-engine"
            )
        self.engine: trt.ICudaEngine = engine
        inputs: list[str] = []
        outputs: list[str] = []
        for index in range(engine.num_io_tensors):
            tensor = engine.get_tensor_name(index)
            (inputs if engine.get_tensor_mode(tensor) == trt.TensorIOMode.INPUT else outputs).append(tensor)
        if len(inputs) != 1 or len(outputs) != 1:
            raise EngineMismatchError(
                f"{self.engine_path}: expected one input and one output, found {inputs} and {outputs}"
            )
        self.input_name, self.output_name = inputs[0], outputs[0]
        in_shape = engine.get_tensor_shape(self.input_name)
        out_shape = engine.get_tensor_shape(self.output_name)
        self._item_shape = tuple(int(in_shape[i]) for i in range(1, len(in_shape)))
        self._out_item_shape = tuple(int(out_shape[i]) for i in range(1, len(out_shape)))
        profile = engine.get_tensor_profile_shape(self.input_name, 0)
        self.min_batch, profile_max = int(profile[0][0]), int(profile[2][0])
        if max_batch > profile_max:
            raise EngineUnavailable(
                f"{self.engine_path}: engine serves batches up to {profile_max}, max batch {max_batch} was "
                "requested; rebuild with a larger --max-batch"
            )
        self.max_batch = max_batch
        self._in_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(self.input_name)))
        self._out_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(self.output_name)))
        self._in_item_bytes = int(np.prod(self._item_shape)) * self._in_dtype.itemsize
        self._out_item_bytes = int(np.prod(self._out_item_shape)) * self._out_dtype.itemsize

        self._stream = self.cuda.stream_create()
        self._stream_handle = int(self._stream)
        self._d_in = self.cuda.malloc(self._in_item_bytes * max_batch)
        self._d_out = self.cuda.malloc(self._out_item_bytes * max_batch)
        self._h_in_ptr = self.cuda.malloc_host(self._in_item_bytes * max_batch)
        self._h_out_ptr = self.cuda.malloc_host(self._out_item_bytes * max_batch)
        self._closed = False
        self._h_in = _pinned_array(self._h_in_ptr, (max_batch, *self._item_shape), self._in_dtype)
        self._h_out = _pinned_array(self._h_out_ptr, (max_batch, *self._out_item_shape), self._out_dtype)
        # Every context (the eager one, one per captured batch size) shares one activation buffer when this
        # TensorRT lets the application provide it (10.1+): they only ever run one after another on one stream.
        self._scratch_bytes = int(
            getattr(engine, "device_memory_size_v2", 0) or getattr(engine, "device_memory_size", 0)
        )
        self._shared_scratch = hasattr(trt, "ExecutionContextAllocationStrategy") and hasattr(
            trt.IExecutionContext, "set_device_memory"
        )
        self._scratch = self.cuda.malloc(self._scratch_bytes) if self._shared_scratch else 0
        self.context = self._new_context()
        self._bound_batch = 0
        self._graphs: dict[int, tuple[Any, Any, trt.IExecutionContext]] = {}
        free_after, _ = self.cuda.mem_get_info()
        self.device_memory_bytes = max(free_before - free_after, 0)

    @classmethod
    def from_bundle(
        cls,
        bundle: Bundle,
        precision: str = "fp16",
        max_batch: int = 32,
        *,
        device: str | None = None,
        threads: int | None = None,
        cuda_graphs: bool = False,
        device_index: int = 0,
        plugin_libraries: Sequence[str | Path] = (),
    ) -> TensorRTBackend:
        """The bundle's engine for this GPU; ``EngineUnavailable`` says why none fits (build one, or use
        ``facemoe.deploy.prepare_backend(..., rebuild=True)``).

        ``device``: ``cuda`` or ``cuda:N`` (overrides ``device_index``); ``threads`` is accepted for the
        common signature and unused (nothing runs on the CPU).
        """
        if device is not None:
            if device != "cuda" and not (device.startswith("cuda:") and device[5:].isdigit()):
                raise BackendUnavailable(f"device {device!r}: TensorRT runs on cuda or cuda:N")
            device_index = int(device[5:] or 0)
        _require_tensorrt()
        CudaRuntime.load()
        gpu = detect_device(device_index)
        if not gpu.has_gpu:
            raise BackendUnavailable("no NVIDIA GPU found (checked cuda-python, nvidia-smi and the Jetson device tree)")
        libraries = [Path(p) for p in plugin_libraries] or bundle_plugin_libraries(bundle)
        choice = select_engine(bundle, precision, max_batch, gpu, plugin_hashes(libraries))
        backend = cls(
            choice.path,
            precision=precision,
            max_batch=max_batch,
            identity=choice.identity,
            cuda_graphs=cuda_graphs,
            device_index=device_index,
            plugin_libraries=libraries,
        )
        backend.note = choice.note
        return backend

    @classmethod
    def from_engine_file(cls, engine_path: str | Path, device_index: int = 0, **kwargs: Any) -> TensorRTBackend:
        """Open an engine outside a bundle; its sidecar still decides whether it may run here."""
        _require_tensorrt()
        identity, digest = read_sidecar(engine_path)
        device = detect_device(device_index)
        here = dataclasses.replace(
            identity,
            gpu_name=device.gpu_name or "no GPU",
            compute_capability=device.compute_capability or "none",
            tensorrt_version=device.tensorrt_version or "none",
        )
        problems = compare(identity, here, check_profile=False)
        if problems:
            raise EngineUnavailable(f"{engine_path}: " + "; ".join(problems))
        kwargs.setdefault("precision", identity.precision)
        return cls(engine_path, expected_sha256=digest, identity=identity, device_index=device_index, **kwargs)

    @property
    def embedding_size(self) -> int:
        return int(self._out_item_shape[-1])

    @property
    def input_size(self) -> int:
        return int(self._item_shape[-1])

    def _new_context(self) -> trt.IExecutionContext:
        import tensorrt as trt

        if self._shared_scratch:
            context = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            context.set_device_memory(self._scratch, self._scratch_bytes)
        else:
            context = self.engine.create_execution_context()
        # IO buffers never move, so their addresses are bound once per context.
        context.set_tensor_address(self.input_name, self._d_in)
        context.set_tensor_address(self.output_name, self._d_out)
        return context

    def _set_batch(self, context: trt.IExecutionContext, n: int) -> None:
        if not context.set_input_shape(self.input_name, (n, *self._item_shape)):
            raise FaceMoEError(f"TensorRT rejected batch {n} (engine profile {self.min_batch}..{self.max_batch})")

    def _enqueue(self, context: trt.IExecutionContext, n: int) -> None:
        self.cuda.copy_htod_async(self._d_in, self._h_in_ptr, n * self._in_item_bytes, self._stream)
        if not context.execute_async_v3(self._stream_handle):
            raise FaceMoEError("TensorRT execute_async_v3 failed (see the TensorRT error above)")
        self.cuda.copy_dtoh_async(self._h_out_ptr, self._d_out, n * self._out_item_bytes, self._stream)

    def _graph(self, n: int) -> Any | None:
        """The instantiated graph for batch ``n``, captured on first use (None when capture fails).

        Each graph gets its own execution context fixed at its shape: a graph replays the kernels and
        parameters of its capture, so the context it came from must not be re-shaped afterwards.
        """
        if n in self._graphs:
            return self._graphs[n][1]
        context = self._new_context()
        self._set_batch(context, n)
        # One plain run first: TensorRT finishes deferred per-shape work on the first enqueue after a shape
        # change, and that work must not end up inside the graph.
        self._enqueue(context, n)
        self.cuda.stream_synchronize(self._stream)
        self.cuda.begin_capture(self._stream)
        graph = None
        try:
            self._enqueue(context, n)
            graph = self.cuda.end_capture(self._stream)
            graph_exec = self.cuda.graph_instantiate(graph)
        except FaceMoEError as exc:
            # The capture may have been invalidated (end_capture then fails too); either way the stream must
            # leave capture mode before it is used again, and this batch runs eagerly from now on.
            if graph is None:
                with contextlib.suppress(FaceMoEError):
                    self.cuda.end_capture(self._stream)
            else:
                with contextlib.suppress(FaceMoEError):
                    self.cuda.graph_destroy_graph(graph)
            self.cuda_graphs, self.cuda_graph_error = False, f"capture failed, running without CUDA graphs: {exc}"
            return None
        self._graphs[n] = (graph, graph_exec, context)
        return graph_exec

    def _embed_batch(self, batch: np.ndarray) -> np.ndarray:
        if self._closed:
            raise FaceMoEError("the TensorRT backend was closed")
        n = batch.shape[0]
        if n < self.min_batch:
            padded = np.zeros((self.min_batch, *batch.shape[1:]), dtype=batch.dtype)
            padded[:n] = batch
            return self._embed_batch(padded)[:n]
        self._h_in[:n] = batch
        graph_exec = self._graph(n) if self.cuda_graphs else None
        if graph_exec is not None:
            self.cuda.graph_launch(graph_exec, self._stream)
        else:
            if n != self._bound_batch:
                self._set_batch(self.context, n)
                self._bound_batch = n
            self._enqueue(self.context, n)
        self.cuda.stream_synchronize(self._stream)
        return self._h_out[:n].astype(np.float32, copy=True)

    def memory_stats(self) -> dict[str, Any]:
        engine = self.engine
        # device_memory_size_v2 appeared in 10.1 and is the only one left in 11.
        activations = getattr(engine, "device_memory_size_v2", 0) or getattr(engine, "device_memory_size", 0)
        return {
            **super().memory_stats(),
            "peak_device_memory_bytes": int(self.device_memory_bytes),
            "engine_activation_bytes": int(activations),
            "kind": "TensorRT: device memory taken by engine + context + IO buffers (cudaMemGetInfo)",
        }

    def describe(self) -> str:
        where = self.identity.compute_capability if self.identity else self.device
        graphs = ", CUDA graphs" if self.cuda_graphs else ""
        return f"tensorrt ({self.precision}, {where}, max batch {self.max_batch}{graphs})"

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        cuda = self.cuda
        cuda.stream_synchronize(self._stream)
        for graph, graph_exec, _context in self._graphs.values():
            cuda.graph_destroy(graph, graph_exec)
        self._graphs.clear()
        del self.context
        for ptr in (self._d_in, self._d_out, self._scratch):
            if ptr:
                cuda.free(ptr)
        del self._h_in, self._h_out
        for ptr in (self._h_in_ptr, self._h_out_ptr):
            cuda.free_host(ptr)
        cuda.stream_destroy(self._stream)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown may have torn down cuda-python already
            self.close()


__all__ = ["CudaRuntime", "TensorRTBackend"]
