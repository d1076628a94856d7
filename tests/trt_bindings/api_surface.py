"""Every TensorRT and cuda-python name FaceMoE uses, with how it is called, for checking against the real
bindings (tests/trt_bindings/check_tensorrt.py, check_cuda.py; run by .ci/trt_bindings.sh).

``tests/test_trt_api_surface.py`` keeps this table complete: each ``trt.X`` / ``trtp.X`` written in the
TensorRT modules of src/ must appear here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Use:
    """One name: ``path`` under the module; ``args``: positional arguments FaceMoE passes when it calls it
    (None: not called, or called through a Python-side helper); ``kwargs``: keyword names it passes;
    ``prop``: read as a property; ``since`` / ``until``: the versions that have it (the code checks for it
    with hasattr outside that range)."""

    path: str
    args: int | None = None
    kwargs: tuple[str, ...] = ()
    prop: bool = False
    since: tuple[int, int] = (0, 0)
    until: tuple[int, int] = (99, 0)

    def applies(self, version: tuple[int, int]) -> bool:
        return self.since <= version < self.until


TENSORRT: tuple[Use, ...] = (
    Use("__version__"),
    Use("Builder", args=1),
    Use("Builder.create_network", args=1),
    Use("Builder.create_builder_config", args=0),
    Use("Builder.create_optimization_profile", args=0),
    Use("Builder.build_serialized_network", args=2),
    Use("BuilderFlag.FP16", until=(11, 0)),
    Use("Dims", args=1),
    Use("ExecutionContextAllocationStrategy.USER_MANAGED"),
    Use("IBuilderConfig.add_optimization_profile", args=1),
    Use("IBuilderConfig.builder_optimization_level", prop=True),
    Use("IBuilderConfig.create_timing_cache", args=1),
    Use("IBuilderConfig.get_timing_cache", args=0),
    Use("IBuilderConfig.set_flag", args=1),
    Use("IBuilderConfig.set_memory_pool_limit", args=2),
    Use("IBuilderConfig.set_timing_cache", args=2),
    Use("ICudaEngine.create_execution_context", args=1),
    Use("ICudaEngine.device_memory_size_v2", prop=True),
    Use("ICudaEngine.get_tensor_dtype", args=1),
    Use("ICudaEngine.get_tensor_mode", args=1),
    Use("ICudaEngine.get_tensor_name", args=1),
    Use("ICudaEngine.get_tensor_profile_shape", args=2),
    Use("ICudaEngine.get_tensor_shape", args=1),
    Use("ICudaEngine.num_io_tensors", prop=True),
    Use("IExecutionContext.execute_async_v3", args=1),
    Use("IExecutionContext.set_device_memory", args=2),
    Use("IExecutionContext.set_input_shape", args=2),
    Use("IExecutionContext.set_tensor_address", args=2),
    Use("ILogger"),
    Use("ILogger.Severity.VERBOSE"),
    Use("ILogger.Severity.WARNING"),
    Use("ILogger.Severity.ERROR"),
    Use("ILogger.Severity.INTERNAL_ERROR"),
    Use("ILogger.log"),
    Use("INetworkDefinition.get_input", args=1),
    Use("INetworkDefinition.num_inputs", prop=True),
    Use("IOptimizationProfile.set_shape", args=4),
    Use("IPluginRegistry.load_library", args=1),
    Use("ITensor.name", prop=True),
    Use("ITensor.shape", prop=True),
    Use("ITimingCache.serialize", args=0),
    Use("Logger", args=1),
    Use("Logger.WARNING"),
    Use("MemoryPoolType.WORKSPACE"),
    Use("NetworkDefinitionCreationFlag.STRONGLY_TYPED"),
    Use("NetworkDefinitionCreationFlag.PREFER_AOT_PYTHON_PLUGINS", since=(10, 9)),
    Use("NetworkDefinitionCreationFlag.PREFER_JIT_PYTHON_PLUGINS", since=(10, 9)),
    Use("OnnxParser", args=2),
    Use("OnnxParser.get_error", args=1),
    Use("OnnxParser.num_errors", prop=True),
    Use("OnnxParser.parse_from_file", args=1),
    Use("ParserError.desc", args=0),
    Use("ParserError.node_name", args=0),
    Use("ParserError.node_operator", args=0),
    Use("QuickPluginCreationRequest.PREFER_AOT", since=(10, 9)),
    Use("QuickPluginCreationRequest.PREFER_JIT", since=(10, 9)),
    Use("Runtime", args=1),
    Use("Runtime.deserialize_cuda_engine", args=1),
    Use("TensorIOMode.INPUT"),
    Use("float16"),
    Use("float32"),
    Use("get_plugin_registry", args=0),
    Use("init_libnvinfer_plugins", args=2),
    Use("nptype"),
)

# tensorrt.plugin (tensorrt_bindings.plugin on the PyPI wheels of 10.6 to 10.13).
PLUGIN: tuple[Use, ...] = (
    Use("AutoTuneCombination", since=(10, 6)),
    Use("KernelLaunchParams", since=(10, 9)),
    Use("SymInt32", since=(10, 9)),
    Use("SymIntExprs.from_tuple", since=(10, 9)),
    Use("TensorDesc", since=(10, 6)),
    Use("aot_impl", since=(10, 9)),
    Use("autotune", since=(10, 6)),
    Use("cdiv", since=(10, 6)),
    Use("impl", since=(10, 6)),
    Use("register", since=(10, 6)),
)

# cuda-python's runtime module (cuda.bindings.runtime, or cuda.cudart before 12.6).
CUDART: tuple[Use, ...] = (
    Use("cudaError_t.cudaSuccess"),
    Use("cudaFree", args=1),
    Use("cudaFreeHost", args=1),
    Use("cudaGetDeviceCount", args=0),
    Use("cudaGetDeviceProperties", args=1),
    Use("cudaGetErrorString", args=1),
    Use("cudaGraphDestroy", args=1),
    Use("cudaGraphExecDestroy", args=1),
    Use("cudaGraphInstantiate", args=2),
    Use("cudaGraphLaunch", args=2),
    Use("cudaMalloc", args=1),
    Use("cudaMallocHost", args=1),
    Use("cudaMemGetInfo", args=0),
    Use("cudaMemcpyAsync", args=5),
    Use("cudaMemcpyKind.cudaMemcpyDeviceToHost"),
    Use("cudaMemcpyKind.cudaMemcpyHostToDevice"),
    Use("cudaSetDevice", args=1),
    Use("cudaStreamBeginCapture", args=2),
    Use("cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal"),
    Use("cudaStreamCreateWithFlags", args=1),
    Use("cudaStreamDestroy", args=1),
    Use("cudaStreamEndCapture", args=1),
    Use("cudaStreamNonBlocking"),
    Use("cudaStreamSynchronize", args=1),
    Use("cudaDeviceProp.name", prop=True),
    Use("cudaDeviceProp.major", prop=True),
    Use("cudaDeviceProp.minor", prop=True),
    Use("cudaDeviceProp.totalGlobalMem", prop=True),
)

# The source files whose trt./trtp. names the table must cover.
SOURCES = (
    "src/facemoe/export/tensorrt.py",
    "src/facemoe/export/tensorrt_options.py",
    "src/facemoe/gating/trt_plugin.py",
    "src/facemoe/runtime/backends/cuda_runtime.py",
    "src/facemoe/runtime/backends/plugin_libraries.py",
    "src/facemoe/runtime/backends/tensorrt_backend.py",
    "src/facemoe/runtime/device.py",
    "src/facemoe/runtime/engine_identity.py",
)
