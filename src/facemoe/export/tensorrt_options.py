"""What the TensorRT engine builder is asked for and what it finds: build options, the built engine, and the
capabilities of the installed ``tensorrt`` module (probed on the module, never assumed from a version number;
docs/PRECISION.md). ``tensorrt`` is imported inside the functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from facemoe.errors import FaceMoEError
from facemoe.runtime.device import import_tensorrt
from facemoe.runtime.engine_identity import EngineIdentity

DEFAULT_PROFILE = (1, 8, 32)
# Jetson shares one DRAM between CPU and GPU; TensorRT's default workspace (all device memory) makes the
# builder's tactic search compete with the weights for the same memory and end in out-of-memory.
JETSON_WORKSPACE_BYTES = 1 << 30


def require_tensorrt() -> ModuleType:
    """The ``tensorrt`` module, or a FaceMoEError saying how to get it."""
    trt_module = import_tensorrt()
    if trt_module is None:
        raise FaceMoEError(
            "TensorRT is not installed: on a Jetson it comes with JetPack (python3-libnvinfer), on x86 "
            "`pip install tensorrt-cu12` for a CUDA 12 driver or `pip install tensorrt-cu13` for a CUDA 13 one "
            "(a bare `pip install tensorrt` pulls the CUDA 13 build). Without it, run the bundle with "
            "--backend onnxruntime"
        )
    return trt_module


@dataclass(frozen=True)
class TensorRTCapabilities:
    """What the installed TensorRT can do, probed on the module itself."""

    version: str
    major: int
    strongly_typed_flag: bool
    always_strongly_typed: bool
    weak_fp16: bool
    optimization_level: bool
    plugin_registry_loader: bool

    @property
    def strongly_typed(self) -> bool:
        return self.always_strongly_typed or self.strongly_typed_flag


def capabilities() -> TensorRTCapabilities:
    require_tensorrt()
    import tensorrt as trt

    version = str(trt.__version__)
    try:
        major = int(version.split(".")[0])
    except ValueError:
        major = 0
    flags = getattr(trt.NetworkDefinitionCreationFlag, "__members__", {})
    return TensorRTCapabilities(
        version=version,
        major=major,
        strongly_typed_flag="STRONGLY_TYPED" in flags,
        always_strongly_typed=major >= 11,
        weak_fp16=hasattr(trt.BuilderFlag, "FP16"),
        optimization_level=hasattr(trt.IBuilderConfig, "builder_optimization_level"),
        plugin_registry_loader=hasattr(trt.IPluginRegistry, "load_library"),
    )


@dataclass
class BuildOptions:
    """Engine build settings (the ``facemoe build-engine`` options)."""

    precision: str = "fp16"
    min_batch: int = DEFAULT_PROFILE[0]
    opt_batch: int = DEFAULT_PROFILE[1]
    max_batch: int = DEFAULT_PROFILE[2]
    # None: 1 GiB on Jetson, TensorRT's default (the whole device) elsewhere.
    workspace_bytes: int | None = None
    optimization_level: int = 3
    plugin_libraries: Sequence[Path] = ()
    # Graphs with facemoe::SparseMoE nodes and no plugin library: which implementation of the Python plugin
    # (facemoe.gating.trt_plugin) the engine embeds. "auto": AOT where TensorRT and triton allow it.
    plugin_mode: str = "auto"
    weakly_typed_fp16: bool = False
    timing_cache: bool = True
    force: bool = False
    device_index: int = 0
    verbose: bool = False

    def validate(self) -> None:
        if self.precision not in ("fp32", "fp16", "int8"):
            raise FaceMoEError(f"unknown precision {self.precision!r}; choose fp32, fp16 or int8")
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise FaceMoEError(
                f"batch profile must satisfy 1 <= min <= opt <= max, got {self.min_batch}/{self.opt_batch}/"
                f"{self.max_batch}"
            )
        if not 0 <= self.optimization_level <= 5:
            raise FaceMoEError(f"builder optimisation level must be 0..5, got {self.optimization_level}")
        if self.workspace_bytes is not None and self.workspace_bytes < 16 << 20:
            raise FaceMoEError(f"workspace {self.workspace_bytes} bytes is too small (at least 16 MiB)")
        if self.plugin_mode not in ("auto", "aot", "jit"):
            raise FaceMoEError(f"unknown plugin mode {self.plugin_mode!r}; choose auto, aot or jit")
        if self.weakly_typed_fp16 and self.precision != "fp16":
            raise FaceMoEError("the weakly typed fallback only builds fp16 engines")

    def effective_workspace(self, jetson: bool) -> int | None:
        if self.workspace_bytes is not None:
            return self.workspace_bytes
        return JETSON_WORKSPACE_BYTES if jetson else None


@dataclass
class BuiltEngine:
    path: Path
    identity: EngineIdentity
    sha256: str
    reused: bool = False
    notes: list[str] = field(default_factory=list)


__all__ = [
    "DEFAULT_PROFILE",
    "JETSON_WORKSPACE_BYTES",
    "BuildOptions",
    "BuiltEngine",
    "TensorRTCapabilities",
    "capabilities",
    "require_tensorrt",
]
