"""The CUDA runtime calls the TensorRT backend makes, through cuda-python, error-checked and typed.

Why cuda-python (``cuda.bindings.runtime``) and not pycuda for device memory, pinned buffers and streams:
it is NVIDIA's own binding, released with each CUDA version, shipped as pip wheels for x86_64 and aarch64
(Jetson included) with nothing to compile; it is a thin, one-to-one wrapper over the CUDA runtime API (the
API TensorRT itself uses), so it shares the runtime's primary context with TensorRT instead of creating one
of its own. pycuda has to be compiled against the local CUDA on a Jetson and creates and pushes its own
driver context (``pycuda.autoinit``), which must then be kept current around every TensorRT call. The
bindings are wrapped below in a small typed class that checks every returned error code.
"""

from __future__ import annotations

import contextlib
from types import ModuleType
from typing import Any

from facemoe.errors import FaceMoEError
from facemoe.runtime.backends.base import BackendUnavailable
from facemoe.runtime.device import load_cudart


class CudaRuntime:
    """Typed, error-checked subset of the CUDA runtime API (cuda-python returns ``(err, *values)`` tuples)."""

    def __init__(self, module: ModuleType) -> None:
        self._rt = module

    @classmethod
    def load(cls) -> CudaRuntime:
        module = load_cudart()
        if module is None:
            raise BackendUnavailable(
                "cuda-python is not installed (the TensorRT backend allocates GPU memory and streams through "
                "it): pip install 'facemoe-edge[trt]'"
            )
        return cls(module)

    def _check(self, result: Any, what: str) -> Any:
        values = result if isinstance(result, tuple) else (result,)
        err = values[0]
        if int(err) != 0:
            detail = ""
            with contextlib.suppress(Exception):  # the string is a nicety; the code is reported anyway
                detail = self._rt.cudaGetErrorString(err)[1].decode()
            name = getattr(err, "name", str(err))
            raise FaceMoEError(f"CUDA {what} failed: {name} {detail}".rstrip())
        rest = values[1:]
        return rest[0] if len(rest) == 1 else rest

    def set_device(self, index: int) -> None:
        """The first CUDA call of a backend: where a machine without a usable driver is found out."""
        try:
            result = self._rt.cudaSetDevice(index)
        except RuntimeError as exc:  # cuda-python 12.6 raises "Failed to dlopen libcuda.so.1" itself
            raise BackendUnavailable(f"CUDA could not start (no NVIDIA driver?): {exc}") from exc
        try:
            self._check(result, "cudaSetDevice")
        except FaceMoEError as exc:
            raise BackendUnavailable(str(exc)) from exc

    def mem_get_info(self) -> tuple[int, int]:
        free, total = self._check(self._rt.cudaMemGetInfo(), "cudaMemGetInfo")
        return int(free), int(total)

    def malloc(self, size: int) -> int:
        return int(self._check(self._rt.cudaMalloc(max(size, 1)), "cudaMalloc"))

    def free(self, ptr: int) -> None:
        self._check(self._rt.cudaFree(ptr), "cudaFree")

    def malloc_host(self, size: int) -> int:
        return int(self._check(self._rt.cudaMallocHost(max(size, 1)), "cudaMallocHost"))

    def free_host(self, ptr: int) -> None:
        self._check(self._rt.cudaFreeHost(ptr), "cudaFreeHost")

    def stream_create(self) -> Any:
        return self._check(
            self._rt.cudaStreamCreateWithFlags(self._rt.cudaStreamNonBlocking), "cudaStreamCreateWithFlags"
        )

    def stream_destroy(self, stream: Any) -> None:
        self._check(self._rt.cudaStreamDestroy(stream), "cudaStreamDestroy")

    def stream_synchronize(self, stream: Any) -> None:
        self._check(self._rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")

    def copy_htod_async(self, dst: int, src: int, size: int, stream: Any) -> None:
        kind = self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._check(self._rt.cudaMemcpyAsync(dst, src, size, kind, stream), "cudaMemcpyAsync (host to device)")

    def copy_dtoh_async(self, dst: int, src: int, size: int, stream: Any) -> None:
        kind = self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._check(self._rt.cudaMemcpyAsync(dst, src, size, kind, stream), "cudaMemcpyAsync (device to host)")

    def begin_capture(self, stream: Any) -> None:
        # Thread-local: CUDA calls other threads make meanwhile (a decoder, another backend) stay legal.
        mode = self._rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        self._check(self._rt.cudaStreamBeginCapture(stream, mode), "cudaStreamBeginCapture")

    def end_capture(self, stream: Any) -> Any:
        return self._check(self._rt.cudaStreamEndCapture(stream), "cudaStreamEndCapture")

    def graph_instantiate(self, graph: Any) -> Any:
        return self._check(self._rt.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")

    def graph_launch(self, graph_exec: Any, stream: Any) -> None:
        self._check(self._rt.cudaGraphLaunch(graph_exec, stream), "cudaGraphLaunch")

    def graph_destroy_graph(self, graph: Any) -> None:
        self._check(self._rt.cudaGraphDestroy(graph), "cudaGraphDestroy")

    def graph_destroy(self, graph: Any, graph_exec: Any) -> None:
        self._check(self._rt.cudaGraphExecDestroy(graph_exec), "cudaGraphExecDestroy")
        self._check(self._rt.cudaGraphDestroy(graph), "cudaGraphDestroy")


__all__ = ["CudaRuntime"]
