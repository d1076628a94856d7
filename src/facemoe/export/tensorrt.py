"""TensorRT engine builder: a bundle's ONNX -> ``<bundle>/engines/<name>.engine`` + sidecar + manifest entry.

Precision is decided in the ONNX graph (docs/PRECISION.md): the fp16 artifact is a mixed-precision graph, the
int8 artifact carries explicit Q/DQ nodes, and the network is built *strongly typed*, so TensorRT keeps the
fp32 islands (LayerNorm, Softmax, router) the export chose instead of re-deciding them. TensorRT 11 only
has strongly typed networks (the FP16/INT8 builder flags and calibrators are gone); 10.x has them behind
``NetworkDefinitionCreationFlag.STRONGLY_TYPED``. On 10.x only, and only when asked, an fp16 engine can
still be built the old weakly typed way (fp32 ONNX + ``BuilderFlag.FP16``) for bundles without an fp16
artifact. Capabilities are detected on the installed module, never assumed from a version number alone.

``tensorrt`` is imported inside the functions: this module imports (and its errors read) on machines
without TensorRT.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from facemoe.bundle import Bundle, record_engine
from facemoe.errors import BundleError, FaceMoEError
from facemoe.export.tensorrt_options import (
    DEFAULT_PROFILE,
    JETSON_WORKSPACE_BYTES,
    BuildOptions,
    BuiltEngine,
    TensorRTCapabilities,
    capabilities,
    require_tensorrt,
)
from facemoe.export.tensorrt_plugins import needs_plugins
from facemoe.fileio import atomic_path, sha256_file
from facemoe.gating.trt_plugin import python_plugin_mode
from facemoe.runtime.backends.plugin_libraries import bundle_plugin_libraries, load_plugin_libraries
from facemoe.runtime.device import DeviceInfo, detect_device, is_jetson, load_cudart
from facemoe.runtime.engine_identity import ENGINES_DIR, EngineIdentity, manifest_entry, read_sidecar, write_sidecar

if TYPE_CHECKING:
    import tensorrt as trt

# One timing cache per GPU architecture and TensorRT version: TensorRT rejects (or, told to ignore the
# mismatch, mis-times with) a cache from another device or release.
TIMING_CACHE_PATTERN = "timing.{capability}.trt{version}.cache"

_OOM_MARKERS = (
    "out of memory",
    "outofmemory",
    "cudaerrormemoryallocation",
    "requested amount of gpu memory",
    "insufficient memory",
    "failed to allocate",
    "bad_alloc",
    "allocation failed",
)


# --------------------------------------------------------------------------------------------- build


def _logger(verbose: bool, messages: list[tuple[int, str]]) -> trt.ILogger:
    import tensorrt as trt

    shown = int(trt.ILogger.Severity.VERBOSE if verbose else trt.ILogger.Severity.WARNING)

    class _CapturingLogger(trt.ILogger):
        """Keeps every message (errors feed the final message and OOM detection), echoes warnings and worse."""

        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: trt.ILogger.Severity, msg: str) -> None:
            messages.append((int(severity), msg))
            if int(severity) <= shown:
                # stderr: stdout may carry a command's results (JSON Lines events with --out -).
                print(f"[TensorRT {getattr(severity, 'name', severity)}] {msg}", file=sys.stderr, flush=True)

    return _CapturingLogger()


def _errors(messages: list[tuple[int, str]]) -> list[str]:
    # Severity order is INTERNAL_ERROR (0), ERROR (1), WARNING (2), INFO (3), VERBOSE (4).
    return [msg for level, msg in messages if level <= 1]


def _network_flags(caps: TensorRTCapabilities, weak: bool, plugin_mode: str | None = None) -> int:
    """Network creation flags: strong typing (10.x), and which Python plugin implementation to prefer.

    With both an AOT and a JIT implementation registered, TensorRT >= 10.9 refuses to create the plugin
    unless the network says which one it prefers.
    """
    import tensorrt as trt

    members = getattr(trt.NetworkDefinitionCreationFlag, "__members__", {})
    flags = 0
    if not weak and not caps.always_strongly_typed:  # 11.x is always strongly typed and needs no flag
        flags |= 1 << int(members["STRONGLY_TYPED"])
    if plugin_mode is not None:
        name = f"PREFER_{plugin_mode.upper()}_PYTHON_PLUGINS"
        if name in members:
            flags |= 1 << int(members[name])
        elif plugin_mode == "aot":
            raise FaceMoEError(f"TensorRT {caps.version} has no {name}: AOT plugins need TensorRT 10.9 or newer")
    return flags


def _parse_onnx(parser: trt.OnnxParser, path: Path) -> None:
    # parse_from_file (not parse(bytes)) so the parser resolves external weight files beside the model.
    if parser.parse_from_file(str(path)):
        return
    errors = []
    for index in range(parser.num_errors):
        error = parser.get_error(index)
        where = ""
        with contextlib.suppress(AttributeError):
            where = f" at node {error.node_name() or error.node()} ({error.node_operator()})"
        errors.append(f"{error.desc()}{where}")
    raise FaceMoEError(f"{path}: TensorRT's ONNX parser failed: " + "; ".join(errors[:5]))


def timing_cache_path(bundle_root: Path, capability: str, version: str) -> Path:
    return bundle_root / ENGINES_DIR / TIMING_CACHE_PATTERN.format(capability=capability, version=version)


def _timing_cache(config: trt.IBuilderConfig, path: Path, enabled: bool, notes: list[str]) -> trt.ITimingCache | None:
    """Attach the timing cache at ``path``; a corrupt or foreign one is replaced by an empty cache."""
    if not enabled:
        return None
    data = path.read_bytes() if path.is_file() else b""
    if data:
        cache = None
        with contextlib.suppress(RuntimeError, TypeError, ValueError):  # a blob TensorRT cannot parse
            cache = config.create_timing_cache(data)
        if cache is not None and config.set_timing_cache(cache, False):
            notes.append(f"reused timing cache {path.name} ({len(data)} bytes)")
            return cache
        notes.append(f"timing cache {path.name} is corrupt or from another GPU: starting a new one")
    cache = config.create_timing_cache(b"")
    if cache is None or not config.set_timing_cache(cache, False):
        notes.append("TensorRT refused an empty timing cache: building without one")
        return None
    return cache


def _out_of_memory_message(errors: list[str], options: BuildOptions, workspace: int | None, jetson: bool) -> str:
    ws = f"{workspace / 2**30:.1f} GiB" if workspace else "TensorRT default (all device memory)"
    hints = [
        f"a smaller --workspace (now {ws})",
        f"a smaller --max-batch (now {options.max_batch})",
        f"a lower --opt-level (now {options.optimization_level})",
        "closing other programs that hold GPU memory",
    ]
    if jetson:
        hints.append(
            "on Jetson the GPU shares system memory: stop the desktop (sudo systemctl isolate multi-user.target) "
            "and add swap"
        )
    first = errors[0] if errors else "no detail"
    return f"TensorRT ran out of memory while building the {options.precision} engine ({first}). Try " + ", ".join(
        hints
    )


def _is_oom(text: str) -> bool:
    text = text.lower()
    return any(marker in text for marker in _OOM_MARKERS)


def _existing(bundle: Bundle, identity: EngineIdentity) -> BuiltEngine | None:
    path = bundle.root / ENGINES_DIR / identity.engine_file_name()
    if not path.is_file():
        return None
    try:
        recorded, digest = read_sidecar(path)
    except BundleError:
        return None
    if recorded.cache_key != identity.cache_key or sha256_file(path) != digest:
        return None
    return BuiltEngine(path, recorded, digest, reused=True)


def _source_onnx(bundle: Bundle, options: BuildOptions, caps: TensorRTCapabilities) -> tuple[str, bool]:
    """(artifact precision to parse, weakly typed?)."""
    if options.weakly_typed_fp16:
        if not caps.weak_fp16 or caps.always_strongly_typed:
            raise FaceMoEError(
                f"TensorRT {caps.version} has no weakly typed FP16 (removed in TensorRT 11): export the "
                "mixed-precision fp16 ONNX (facemoe-export --fp16) and build from it"
            )
        return "fp32", True
    if not caps.strongly_typed:
        raise FaceMoEError(
            f"TensorRT {caps.version} cannot build strongly typed networks; TensorRT 10.0 or newer is needed"
            + (" (or pass --weak-fp16 for an fp16 engine from the fp32 ONNX)" if caps.weak_fp16 else "")
        )
    if options.precision not in bundle.manifest.artifacts:
        hint = (
            " or pass --weak-fp16 to build from the fp32 ONNX" if options.precision == "fp16" and caps.weak_fp16 else ""
        )
        raise BundleError(
            f"{bundle.root}: no {options.precision} ONNX to build from (it has: {', '.join(bundle.precisions)}); "
            f"re-export with --{options.precision}{hint}"
        )
    return options.precision, False


def build_engine(
    bundle: Bundle | str | Path,
    options: BuildOptions | None = None,
    *,
    device: DeviceInfo | None = None,
    log: Callable[[str], None] | None = None,
) -> BuiltEngine:
    """Build (or reuse) the engine for ``options`` on this GPU and record it in the bundle."""
    options = options or BuildOptions()
    options.validate()
    say = log or (lambda _msg: None)
    if not isinstance(bundle, Bundle):
        bundle = Bundle(bundle)
    require_tensorrt()
    import tensorrt as trt

    caps = capabilities()
    device = device or detect_device(options.device_index)
    if not device.has_gpu:
        raise FaceMoEError("no NVIDIA GPU found: TensorRT engines are built on the GPU they will run on")
    source_precision, weak = _source_onnx(bundle, options, caps)
    onnx_path = bundle.artifact_path(source_precision, verify=True)
    artifact = bundle.artifact(source_precision)

    libraries = [Path(p) for p in options.plugin_libraries] or bundle_plugin_libraries(bundle)
    plugin_mode: str | None = None
    if needs_plugins(bundle, source_precision) and not libraries:
        plugin_mode = python_plugin_mode(onnx_path, options.plugin_mode, caps.version)
    plugins = load_plugin_libraries(libraries)

    jetson = device.is_jetson or is_jetson()
    workspace = options.effective_workspace(jetson)
    identity = EngineIdentity(
        gpu_name=device.gpu_name or "unknown",
        compute_capability=device.compute_capability or "unknown",
        tensorrt_version=caps.version,
        precision=options.precision,
        min_batch=options.min_batch,
        opt_batch=options.opt_batch,
        max_batch=options.max_batch,
        onnx_sha256=artifact.sha256,
        onnx_file=artifact.file,
        plugin_hashes=plugins,
        builder_optimization_level=options.optimization_level,
        strongly_typed=not weak,
        workspace_bytes=workspace,
        python_plugin=plugin_mode or "",
    )
    if not options.force and (found := _existing(bundle, identity)) is not None:
        say(f"engine {found.path.name} already matches this GPU, TensorRT and ONNX: reusing it")
        record_engine(bundle.root, manifest_entry(bundle.root, found.path, found.identity, found.sha256))
        return found

    if options.device_index:
        cudart = load_cudart()
        if cudart is not None:
            cudart.cudaSetDevice(options.device_index)
    messages: list[tuple[int, str]] = []
    notes: list[str] = []
    logger = _logger(options.verbose, messages)
    trt.init_libnvinfer_plugins(logger, "")
    try:
        builder = trt.Builder(logger)
    except TypeError as exc:  # pybind11: "factory function returned nullptr" when CUDA cannot start
        raise FaceMoEError(
            f"TensorRT {caps.version} could not create a builder: CUDA failed to initialise (no GPU visible, or a "
            f"driver older than this TensorRT's CUDA needs); {'; '.join(_errors(messages)) or exc}"
        ) from exc
    network = builder.create_network(_network_flags(caps, weak, plugin_mode))
    parser = trt.OnnxParser(network, logger)
    say(f"parsing {onnx_path.name} ({'weakly typed + FP16 flag' if weak else 'strongly typed'})")
    _parse_onnx(parser, onnx_path)

    config = builder.create_builder_config()
    if workspace is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    if caps.optimization_level:
        config.builder_optimization_level = options.optimization_level
    if weak:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        dims = [int(tensor.shape[i]) for i in range(len(tensor.shape))]
        if any(d < 0 for d in dims[1:]):
            raise FaceMoEError(f"{onnx_path}: input {tensor.name!r} has dynamic non-batch dims {dims}")
        batches = {options.min_batch, options.opt_batch, options.max_batch}
        if dims and dims[0] >= 0 and batches != {dims[0]}:
            raise FaceMoEError(
                f"{onnx_path}: input {tensor.name!r} has a static batch dimension of {dims[0]}, so TensorRT cannot "
                f"build the batch {options.min_batch}..{options.max_batch} profile; re-export the bundle (its ONNX "
                f"has a dynamic batch) or build with --min-batch/--opt-batch/--max-batch {dims[0]}"
            )
        profile.set_shape(
            tensor.name,
            trt.Dims([options.min_batch, *dims[1:]]),
            trt.Dims([options.opt_batch, *dims[1:]]),
            trt.Dims([options.max_batch, *dims[1:]]),
        )
    if config.add_optimization_profile(profile) < 0:
        raise FaceMoEError(
            f"{onnx_path}: TensorRT rejected the optimisation profile (batch {options.min_batch}/{options.opt_batch}/"
            f"{options.max_batch}): " + ("; ".join(_errors(messages)[-3:]) or "see the TensorRT log above")
        )
    cache_path = timing_cache_path(bundle.root, identity.compute_capability, caps.version)
    _timing_cache(config, cache_path, options.timing_cache, notes)

    say(
        f"building {options.precision} engine for {identity.compute_capability} ({identity.gpu_name}), "
        f"batch {options.min_batch}/{options.opt_batch}/{options.max_batch}, opt level {options.optimization_level}"
    )
    start = time.perf_counter()
    try:
        serialized = builder.build_serialized_network(network, config)
    except (MemoryError, RuntimeError) as exc:
        errors = [*_errors(messages), str(exc)]
        if _is_oom(" ".join(errors)) or isinstance(exc, MemoryError):
            raise FaceMoEError(_out_of_memory_message(errors, options, workspace, jetson)) from exc
        raise FaceMoEError(f"TensorRT engine build failed: {exc}") from exc
    seconds = time.perf_counter() - start
    if serialized is None:
        errors = _errors(messages)
        if _is_oom(" ".join(errors)):
            raise FaceMoEError(_out_of_memory_message(errors, options, workspace, jetson))
        raise FaceMoEError(
            "TensorRT engine build failed: " + ("; ".join(errors[-3:]) or "no error reported (run with --verbose)")
        )

    identity = dataclasses.replace(identity, build_time=EngineIdentity.now(), build_seconds=seconds)
    engine_path = bundle.root / ENGINES_DIR / identity.engine_file_name()
    with atomic_path(engine_path) as tmp:
        tmp.write_bytes(memoryview(serialized))
    digest = sha256_file(engine_path)
    write_sidecar(engine_path, identity, digest)
    if options.timing_cache:
        timing = config.get_timing_cache()
        if timing is not None:
            with atomic_path(cache_path) as tmp:
                tmp.write_bytes(memoryview(timing.serialize()))
    record_engine(bundle.root, manifest_entry(bundle.root, engine_path, identity, digest))
    notes.append(f"built in {seconds:.1f} s")
    return BuiltEngine(engine_path, identity, digest, reused=False, notes=notes)


__all__ = [
    "DEFAULT_PROFILE",
    "JETSON_WORKSPACE_BYTES",
    "BuildOptions",
    "BuiltEngine",
    "TensorRTCapabilities",
    "build_engine",
    "bundle_plugin_libraries",
    "capabilities",
    "load_plugin_libraries",
    "needs_plugins",
    "python_plugin_mode",
    "record_engine",
    "require_tensorrt",
    "timing_cache_path",
]
