# ruff: noqa: N801, N802, N815  (the stand-ins mirror the camelCase names of the CUDA bindings)
"""In-process stand-ins for ``tensorrt`` and cuda-python that keep to the documented API and refuse what
TensorRT refuses.

The engine "executes" with ONNX Runtime on host memory behind fake device pointers. The refusals mirror
TensorRT's (checked against the real bindings by ``.ci/trt_bindings.sh`` where the behaviour is Python-side):

* ``trt.Builder`` / ``trt.Runtime`` raise ``TypeError: pybind11::init(): factory function returned nullptr``
  when CUDA cannot start (the real bindings do exactly this when the native factory returns null);
* ``IPluginRegistry.load_library`` returns None for a file that is not a loadable shared object;
* an optimisation profile with min > opt > max, or other than the network's static dimensions, makes
  ``add_optimization_profile`` return -1;
* the ONNX parser fails on a custom node with no plugin creator for it, and on a Python plugin with both
  AOT and JIT implementations when the network prefers neither (10.9+);
* the runtime refuses a plan from another TensorRT or GPU, and a JIT plugin engine whose plugin is not
  registered;
* the timing cache refuses a blob from another GPU (``set_timing_cache`` -> False) and a corrupt one
  (``create_timing_cache`` -> None).
"""

from __future__ import annotations

import ctypes
import enum
import importlib.machinery
import json
import types
from typing import Any

import numpy as np

NULLPTR = "pybind11::init(): factory function returned nullptr"


class FakeCuda:
    """cuda-python's runtime module: ``(err, value)`` tuples, host memory standing in for device memory."""

    class cudaError_t(enum.IntEnum):
        cudaSuccess = 0
        cudaErrorInsufficientDriver = 35
        cudaErrorStreamCaptureInvalidated = 901

    class cudaMemcpyKind(enum.IntEnum):
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    class cudaStreamCaptureMode(enum.IntEnum):
        cudaStreamCaptureModeThreadLocal = 1

    cudaStreamNonBlocking = 1

    class Stream:
        def __init__(self, handle: int) -> None:
            self.handle, self.capture = handle, None

        def __int__(self) -> int:
            return self.handle

    def __init__(self, capability: tuple[int, int] = (8, 7), name: bytes = b"Orin (fake)") -> None:
        self.capability, self.name = capability, name
        self.buffers: dict[int, Any] = {}
        self.streams: dict[int, FakeCuda.Stream] = {}
        self.launches = 0
        self.invalidate_capture = False  # the next capture ends invalidated (as a foreign sync would do)
        self.driver_ok = True  # False: CUDA cannot start (TensorRT's factories return null)

    def cudaGetDeviceCount(self) -> tuple[Any, int]:
        if not self.driver_ok:
            return self.cudaError_t.cudaErrorInsufficientDriver, 0
        return self.cudaError_t.cudaSuccess, 1

    def cudaGetDeviceProperties(self, index: int) -> tuple[int, Any]:
        major, minor = self.capability
        return 0, types.SimpleNamespace(name=self.name, major=major, minor=minor, totalGlobalMem=8 << 30)

    def cudaSetDevice(self, index: int) -> tuple[int]:
        return (0,)

    def cudaMemGetInfo(self) -> tuple[int, int, int]:
        used = sum(ctypes.sizeof(b) for b in self.buffers.values())
        return 0, (8 << 30) - used, 8 << 30

    def _alloc(self, size: int) -> tuple[int, int]:
        buf = ctypes.create_string_buffer(size)
        self.buffers[ctypes.addressof(buf)] = buf
        return 0, ctypes.addressof(buf)

    cudaMalloc = _alloc
    cudaMallocHost = _alloc

    def _free(self, ptr: int) -> tuple[int]:
        del self.buffers[ptr]
        return (0,)

    cudaFree = _free
    cudaFreeHost = _free

    def cudaStreamCreateWithFlags(self, flags: int) -> tuple[int, Any]:
        stream = FakeCuda.Stream(1000 + len(self.streams))
        self.streams[stream.handle] = stream
        return 0, stream

    def cudaStreamDestroy(self, stream: Any) -> tuple[int]:
        del self.streams[int(stream)]
        return (0,)

    def cudaStreamSynchronize(self, stream: Any) -> tuple[int]:
        if self.streams[int(stream)].capture is not None:
            return (self.cudaError_t.cudaErrorStreamCaptureInvalidated,)  # illegal while capturing
        return (0,)

    def submit(self, handle: int, op: Any) -> None:
        stream = self.streams[handle]
        if stream.capture is not None:
            stream.capture.append(op)
        else:
            op()

    def cudaMemcpyAsync(self, dst: int, src: int, size: int, kind: Any, stream: Any) -> tuple[int]:
        self.submit(int(stream), lambda: ctypes.memmove(dst, src, size))
        return (0,)

    def cudaStreamBeginCapture(self, stream: Any, mode: Any) -> tuple[int]:
        stream.capture = []
        return (0,)

    def cudaStreamEndCapture(self, stream: Any) -> tuple[Any, Any]:
        graph, stream.capture = stream.capture, None
        if self.invalidate_capture:
            self.invalidate_capture = False
            return self.cudaError_t.cudaErrorStreamCaptureInvalidated, None
        return 0, graph

    def cudaGraphInstantiate(self, graph: Any, flags: int) -> tuple[int, Any]:
        return 0, list(graph)

    def cudaGraphLaunch(self, graph_exec: Any, stream: Any) -> tuple[int]:
        self.launches += 1
        for op in graph_exec:
            op()
        return (0,)

    def cudaGraphExecDestroy(self, graph_exec: Any) -> tuple[int]:
        return (0,)

    def cudaGraphDestroy(self, graph: Any) -> tuple[int]:
        return (0,)

    def cudaGetErrorString(self, err: Any) -> tuple[int, bytes]:
        return 0, b"fake error"


def _flags(major: int, minor: int) -> dict[str, int]:
    """NetworkDefinitionCreationFlag members and values as in the real bindings of that version."""
    if major >= 11:
        return {"STRONGLY_TYPED": 0, "PREFER_JIT_PYTHON_PLUGINS": 1, "PREFER_AOT_PYTHON_PLUGINS": 2}
    flags = {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1}
    if (major, minor) >= (10, 9):
        flags |= {"PREFER_JIT_PYTHON_PLUGINS": 2, "PREFER_AOT_PYTHON_PLUGINS": 3}
    return flags


def make_fake_plugin_api(registry: Any) -> types.ModuleType:
    """``tensorrt.plugin``: the decorators record implementations in the fake registry's Python creators."""
    trtp = types.ModuleType("tensorrt.plugin")

    def _decorator(kind: str) -> Any:
        def wrap(plugin_id: str) -> Any:
            def record(func: Any) -> Any:
                registry.python_plugins.setdefault(plugin_id, {})[kind] = func
                return func

            return record

        return wrap

    for kind in ("register", "autotune", "impl", "aot_impl"):
        setattr(trtp, kind, _decorator(kind))
    for name in ("TensorDesc", "AutoTuneCombination", "KernelLaunchParams", "SymIntExprs", "SymInt32"):
        setattr(trtp, name, type(name, (), {}))
    trtp.cdiv = lambda a, b: -(-a // b)  # type: ignore[attr-defined]
    return trtp


def make_fake_tensorrt(version: str, cuda: FakeCuda) -> types.ModuleType:
    """The parts of the ``tensorrt`` module FaceMoE uses, as documented for 10.x / 11.x."""
    import onnx
    import onnxruntime as ort

    major, minor = (int(p) for p in version.split(".")[:2])
    trt = types.ModuleType("tensorrt")
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
    trt.__version__ = version  # type: ignore[attr-defined]
    trt.built = []  # type: ignore[attr-defined]

    class _Severity(enum.IntEnum):
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

    class ILogger:
        Severity = _Severity
        WARNING = _Severity.WARNING

        def __init__(self) -> None:
            pass

    class Logger(ILogger):
        def __init__(self, min_severity: Any = _Severity.WARNING) -> None:
            super().__init__()

        def log(self, severity: Any, msg: str) -> None:
            pass

    flags = _flags(major, minor)
    trt.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", flags)  # type: ignore[attr-defined]
    if (major, minor) >= (10, 9):
        trt.QuickPluginCreationRequest = enum.IntEnum(  # type: ignore[attr-defined]
            "QuickPluginCreationRequest", {"UNKNOWN": 0, "PREFER_JIT": 1, "PREFER_AOT": 2}
        )
    builder_flags = {"TF32": 7} if major >= 11 else {"FP16": 0, "INT8": 1, "TF32": 7}
    trt.BuilderFlag = enum.IntEnum("BuilderFlag", builder_flags)  # type: ignore[attr-defined]
    trt.MemoryPoolType = enum.IntEnum("MemoryPoolType", {"WORKSPACE": 0})  # type: ignore[attr-defined]
    trt.TensorIOMode = enum.IntEnum("TensorIOMode", {"NONE": 0, "INPUT": 1, "OUTPUT": 2})  # type: ignore[attr-defined]
    trt.DataType = enum.IntEnum("DataType", {"FLOAT": 0, "HALF": 1})  # type: ignore[attr-defined]
    trt.float32, trt.float16 = trt.DataType.FLOAT, trt.DataType.HALF  # type: ignore[attr-defined]
    trt.nptype = lambda dt: {0: np.float32, 1: np.float16}[int(dt)]  # type: ignore[attr-defined]
    trt.ILogger, trt.Logger = ILogger, Logger  # type: ignore[attr-defined]

    class Dims(list):
        pass

    class IPluginRegistry:
        def __init__(self) -> None:
            self.loaded: list[str] = []
            self.python_plugins: dict[str, dict[str, Any]] = {}

        def load_library(self, path: str) -> object | None:
            try:  # TensorRT dlopens the library and returns null (logging why) when it cannot
                handle = ctypes.CDLL(path)
            except OSError:
                return None
            self.loaded.append(path)
            return handle

        def creator_for(self, plugin_id: str) -> str | None:
            """Which kind of creator provides ``plugin_id``: "library", "python" or None."""
            if self.loaded:  # a loaded plugin library stands for one that registers the facemoe ops
                return "library"
            return "python" if "register" in self.python_plugins.get(plugin_id, {}) else None

    registry = IPluginRegistry()
    trt.Dims, trt.IPluginRegistry = Dims, IPluginRegistry  # type: ignore[attr-defined]
    trt.get_plugin_registry = lambda: registry  # type: ignore[attr-defined]
    trt.init_libnvinfer_plugins = lambda logger, namespace: True  # type: ignore[attr-defined]
    trt.plugin = make_fake_plugin_api(registry)  # type: ignore[attr-defined]

    class Tensor:
        def __init__(self, name: str, shape: list[int]) -> None:
            self.name, self.shape = name, Dims(shape)

    class Network:
        def __init__(self, flags: int) -> None:
            self.flags, self.inputs, self.onnx = flags, [], None
            self.python_plugin = ""

        @property
        def num_inputs(self) -> int:
            return len(self.inputs)

        def get_input(self, index: int) -> Tensor:
            return self.inputs[index]

        def has_flag(self, name: str) -> bool:
            return name in flags and bool(self.flags & (1 << flags[name]))

    class ParserError:
        def __init__(self, text: str) -> None:
            self.text = text

        def desc(self) -> str:
            return self.text

    class OnnxParser:
        def __init__(self, network: Network, logger: ILogger) -> None:
            self.network, self.errors = network, []

        @property
        def num_errors(self) -> int:
            return len(self.errors)

        def _custom_node(self, node: Any) -> str | None:
            namespace = next((a.s.decode() for a in node.attribute if a.name == "plugin_namespace"), node.domain)
            plugin_id = f"{namespace}::{node.op_type}"
            kind = registry.creator_for(plugin_id)
            if kind is None:
                return f"No importer registered for op: {node.op_type}. Plugin not found: {plugin_id}"
            if kind == "python":
                impls = registry.python_plugins[plugin_id]
                both = "impl" in impls and "aot_impl" in impls
                aot = self.network.has_flag("PREFER_AOT_PYTHON_PLUGINS")
                jit = self.network.has_flag("PREFER_JIT_PYTHON_PLUGINS")
                if both and not (aot or jit):
                    return (
                        f"Plugin '{plugin_id}' has both AOT and JIT implementations. NetworkDefinitionCreationFlag."
                        "PREFER_AOT_PYTHON_PLUGINS or NetworkDefinitionCreationFlag.PREFER_JIT_PYTHON_PLUGINS "
                        "should be specified."
                    )
                self.network.python_plugin = "aot" if (aot and "aot_impl" in impls) or "impl" not in impls else "jit"
            return None

        def parse_from_file(self, path: str) -> bool:
            try:
                model = onnx.load(path, load_external_data=False)
            except Exception:
                self.errors.append(ParserError("not an ONNX file"))
                return False
            for node in model.graph.node:
                if node.domain not in ("", "ai.onnx"):
                    problem = self._custom_node(node)
                    if problem:
                        self.errors.append(ParserError(problem))
                        return False
            value = model.graph.input[0]
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]
            self.network.inputs.append(Tensor(value.name, dims))
            self.network.onnx = path
            return True

        def get_error(self, index: int) -> ParserError:
            return self.errors[index]

    class TimingCache:
        """Serialised as b"TC|<capability>|<builds>": TensorRT's blob also records the device it was timed on."""

        def __init__(self, capability: str, builds: int) -> None:
            self.capability, self.builds = capability, builds

        def serialize(self) -> bytes:
            return f"TC|{self.capability}|{self.builds + 1}".encode()

    def _here() -> str:
        return "sm_{}{}".format(*cuda.capability)

    class IBuilderConfig:
        builder_optimization_level = 3

        def __init__(self, logger: Any) -> None:
            self.logger = logger
            self.pools: dict[Any, int] = {}
            self.flags: set[Any] = set()
            self.profiles: list[Any] = []
            self.cache: TimingCache | None = None

        def set_memory_pool_limit(self, pool: Any, size: int) -> None:
            self.pools[pool] = size

        def set_flag(self, flag: Any) -> None:
            self.flags.add(flag)

        def add_optimization_profile(self, profile: Any) -> int:
            if profile.problem:
                self.logger.log(_Severity.ERROR, f"IOptimizationProfile: {profile.problem}")
                return -1
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def create_timing_cache(self, data: bytes) -> TimingCache | None:
            if not data:
                return TimingCache(_here(), 0)
            parts = bytes(data).split(b"|")
            if len(parts) != 3 or parts[0] != b"TC" or not parts[2].isdigit():
                self.logger.log(_Severity.ERROR, "Timing cache: corrupt or unsupported blob")
                return None
            return TimingCache(parts[1].decode(), int(parts[2]))

        def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
            if cache.capability != _here() and not ignore_mismatch:
                return False
            self.cache = cache
            return True

        def get_timing_cache(self) -> TimingCache | None:
            return self.cache

    class Profile:
        def __init__(self, network: Network | None) -> None:
            self.shapes: dict[str, tuple] = {}
            self.problem = ""
            self.network = network

        def set_shape(self, name: str, low: Dims, opt: Dims, high: Dims) -> None:
            if not all(a <= b <= c for a, b, c in zip(low, opt, high, strict=True)):
                self.problem = f"{name}: min {list(low)} / opt {list(opt)} / max {list(high)} out of order"
            static = next((t.shape for t in (self.network.inputs if self.network else []) if t.name == name), [])
            for axis, size in enumerate(static):
                if size >= 0 and {low[axis], opt[axis], high[axis]} != {size}:
                    self.problem = f"{name}: dimension {axis} is static ({size}) but the profile asks for another"
            self.shapes[name] = (list(low), list(opt), list(high))

    class Builder:
        def __init__(self, logger: ILogger) -> None:
            if not cuda.driver_ok:
                raise TypeError(NULLPTR)
            self.logger = logger
            self.network: Network | None = None

        def create_network(self, flags: int = 0) -> Network:
            self.network = Network(flags)
            return self.network

        def create_builder_config(self) -> IBuilderConfig:
            return IBuilderConfig(self.logger)

        def create_optimization_profile(self) -> Profile:
            return Profile(self.network)

        def build_serialized_network(self, network: Network, config: IBuilderConfig) -> bytes:
            (name, (low, opt, high)) = next(iter(config.profiles[0].shapes.items()))
            plan = {
                "version": version,
                "capability": list(cuda.capability),
                "onnx": network.onnx,
                "input": name,
                "profile": [low, opt, high],
                "network_flags": network.flags,
                "builder_flags": sorted(int(f) for f in config.flags),
                "workspace": config.pools.get(trt.MemoryPoolType.WORKSPACE),
                "opt_level": config.builder_optimization_level,
                "timing_cache_in": config.cache.builds if config.cache else None,
                "python_plugin": network.python_plugin,
            }
            trt.built.append(plan)  # type: ignore[attr-defined]
            return json.dumps(plan).encode()

    trt.ExecutionContextAllocationStrategy = enum.IntEnum(  # type: ignore[attr-defined]
        "ExecutionContextAllocationStrategy", {"STATIC": 0, "ON_PROFILE_CHANGE": 1, "USER_MANAGED": 2}
    )

    class IExecutionContext:
        def set_device_memory(self, memory: int, size: int) -> None:
            self.device_memory = (memory, size)

    class Context(IExecutionContext):
        def __init__(self, engine: Engine, user_managed: bool) -> None:
            self.engine, self.addresses, self.batch = engine, {}, None
            self.device_memory: tuple[int, int] | None = None
            self.user_managed = user_managed
            engine.contexts.append(self)

        def set_tensor_address(self, name: str, ptr: int) -> bool:
            self.addresses[name] = ptr
            return True

        def set_input_shape(self, name: str, shape: Any) -> bool:
            low, high = self.engine.plan["profile"][0][0], self.engine.plan["profile"][2][0]
            if not low <= shape[0] <= high:
                return False
            self.batch = shape[0]
            return True

        def execute_async_v3(self, stream_handle: int) -> bool:
            if self.user_managed and self.device_memory is None:
                return False  # TensorRT refuses to run a USER_MANAGED context without memory
            n, item = self.batch, self.engine.item
            src, dst = self.addresses[self.engine.input], self.addresses["embedding"]
            session = self.engine.session

            def run() -> None:
                x = np.frombuffer(ctypes.string_at(src, n * int(np.prod(item)) * 4), np.float32).reshape(n, *item)
                y = np.ascontiguousarray(session.run(None, {self.engine.input: x})[0], dtype=np.float32)
                ctypes.memmove(dst, y.ctypes.data, y.nbytes)

            cuda.submit(stream_handle, run)
            return True

    class Engine:
        def __init__(self, plan: dict) -> None:
            from facemoe.export.gating_ort import register_custom_ops

            self.plan, self.input = plan, plan["input"]
            options = ort.SessionOptions()
            register_custom_ops(options)  # plugin graphs: facemoe::SparseMoE through onnxruntime-extensions
            self.session = ort.InferenceSession(plan["onnx"], options, providers=["CPUExecutionProvider"])
            self.item = list(self.session.get_inputs()[0].shape[1:])
            self.embedding = int(self.session.get_outputs()[0].shape[-1])
            self.num_io_tensors = 2
            self.device_memory_size_v2 = 12345
            self.contexts: list[Context] = []

        def get_tensor_name(self, index: int) -> str:
            return [self.input, "embedding"][index]

        def get_tensor_mode(self, name: str) -> Any:
            return trt.TensorIOMode.INPUT if name == self.input else trt.TensorIOMode.OUTPUT  # type: ignore[attr-defined]

        def get_tensor_shape(self, name: str) -> Dims:
            return Dims([-1, *self.item] if name == self.input else [-1, self.embedding])

        def get_tensor_profile_shape(self, name: str, index: int) -> list[Dims]:
            return [Dims(s) for s in self.plan["profile"]]

        def get_tensor_dtype(self, name: str) -> Any:
            return trt.DataType.FLOAT  # type: ignore[attr-defined]

        def create_execution_context(self, strategy: Any = None) -> Context:
            return Context(self, user_managed=strategy == trt.ExecutionContextAllocationStrategy.USER_MANAGED)  # type: ignore[attr-defined]

    class Runtime:
        def __init__(self, logger: ILogger) -> None:
            if not cuda.driver_ok:
                raise TypeError(NULLPTR)

        def deserialize_cuda_engine(self, data: bytes) -> Engine | None:
            plan = json.loads(bytes(data))
            # TensorRT refuses plans from another version or GPU architecture.
            if plan["version"] != trt.__version__ or plan["capability"] != list(cuda.capability):
                return None
            # A JIT Python plugin is re-created from the registry; an AOT one travels inside the plan.
            if plan.get("python_plugin") == "jit" and "impl" not in registry.python_plugins.get(
                "facemoe::SparseMoE", {}
            ):
                return None
            return Engine(plan)

    trt.IExecutionContext = IExecutionContext  # type: ignore[attr-defined]
    trt.OnnxParser, trt.IBuilderConfig, trt.Builder, trt.Runtime = OnnxParser, IBuilderConfig, Builder, Runtime  # type: ignore[attr-defined]
    return trt


def install(monkeypatch: Any, tmp_path: Any, root: Any, version: str) -> types.SimpleNamespace:
    """Put a fake GPU (sm_87) and a fake TensorRT ``version`` in place of the real modules for one test."""
    import sys

    from facemoe.gating import trt_plugin
    from facemoe.runtime import device as probe

    cuda = FakeCuda()
    trt = make_fake_tensorrt(version, cuda)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", trt.plugin)
    monkeypatch.setattr(trt_plugin, "_registered", set())
    monkeypatch.setattr(probe, "load_cudart", lambda: cuda)
    monkeypatch.setattr("facemoe.runtime.backends.cuda_runtime.load_cudart", lambda: cuda)
    monkeypatch.setattr(probe, "_run_nvidia_smi", lambda args: None)
    monkeypatch.setattr(probe, "TEGRA_RELEASE", tmp_path / "no-tegra")
    return types.SimpleNamespace(trt=trt, cuda=cuda, root=root, version=version)


__all__ = ["NULLPTR", "FakeCuda", "install", "make_fake_plugin_api", "make_fake_tensorrt"]
