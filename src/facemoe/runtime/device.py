"""This machine's GPU and TensorRT, found without torch (docs/TENSORRT.md).

cuda-python where installed (what the TensorRT backend uses anyway), else ``nvidia-smi``, else the Jetson
device tree, else "no GPU". :mod:`facemoe.runtime.engine_identity` compares what it finds with the
identity an engine was built for.
"""

from __future__ import annotations

import dataclasses
import importlib
import platform
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from facemoe.extras import import_tensorrt

# Monkeypatched in tests; real locations on Linux / L4T.
TEGRA_RELEASE = Path("/etc/nv_tegra_release")
DEVICE_TREE = Path("/proc/device-tree")

# Jetson SoCs whose integrated GPU nvidia-smi may not describe (JetPack 5 ships no nvidia-smi at all).
_TEGRA_SOCS = {
    "tegra234": ("sm_87", "Jetson Orin"),
    "tegra194": ("sm_72", "Jetson Xavier"),
    "tegra186": ("sm_62", "Jetson TX2"),
    "tegra210": ("sm_53", "Jetson Nano/TX1"),
}


@dataclass(frozen=True)
class DeviceInfo:
    """The GPU (if any) and TensorRT (if any) of this machine."""

    gpu_name: str | None
    compute_capability: str | None
    total_memory_bytes: int | None = None
    tensorrt_version: str | None = None
    is_jetson: bool = False
    source: str = "none"

    @property
    def has_gpu(self) -> bool:
        return self.compute_capability is not None

    def describe(self) -> str:
        gpu = f"{self.compute_capability} ({self.gpu_name})" if self.has_gpu else "no GPU"
        trt = f"TensorRT {self.tensorrt_version}" if self.tensorrt_version else "no TensorRT"
        return f"{gpu} with {trt}"


def load_cudart() -> ModuleType | None:
    """cuda-python's runtime module: ``cuda.bindings.runtime`` (12.6+), else the older ``cuda.cudart``."""
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


def tensorrt_version() -> str | None:
    trt = import_tensorrt()
    return str(getattr(trt, "__version__", "unknown")) if trt is not None else None


def _read_device_tree(name: str) -> str:
    try:
        return (DEVICE_TREE / name).read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def is_jetson() -> bool:
    """An NVIDIA Jetson (L4T): unified CPU/GPU memory, so builds need a smaller workspace."""
    if TEGRA_RELEASE.exists():
        return True
    if platform.machine() != "aarch64":
        return False
    return "tegra" in platform.release().lower() or "tegra" in _read_device_tree("compatible").lower()


def _probe_cuda_python(index: int) -> DeviceInfo | None:
    cudart = load_cudart()
    if cudart is None:
        return None
    try:
        err, count = cudart.cudaGetDeviceCount()
        if int(err) != 0 or count <= index:
            return None
        err, prop = cudart.cudaGetDeviceProperties(index)
        if int(err) != 0:
            return None
    except Exception:  # a driver/library mismatch surfaces as RuntimeError from the bindings
        return None
    name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
    return DeviceInfo(
        gpu_name=name.rstrip("\0").strip(),
        compute_capability=f"sm_{prop.major}{prop.minor}",
        total_memory_bytes=int(prop.totalGlobalMem),
        source="cuda-python",
    )


def _run_nvidia_smi(args: list[str]) -> str | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        done = subprocess.run([exe, *args], capture_output=True, text=True, timeout=15, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def _probe_nvidia_smi(index: int) -> DeviceInfo | None:
    out = _run_nvidia_smi(
        ["--query-gpu=name,compute_cap,memory.total", "--format=csv,noheader,nounits", f"--id={index}"]
    )
    if not out or not out.strip():
        return None
    parts = [p.strip() for p in out.strip().splitlines()[0].split(",")]
    if len(parts) < 2:
        return None
    name, cap = parts[0], parts[1]
    try:
        major, minor = cap.split(".")
        capability = f"sm_{int(major)}{int(minor)}"
    except ValueError:  # drivers before 510 cannot report compute_cap
        return None
    try:
        memory = int(float(parts[2])) * 1024 * 1024 if len(parts) > 2 else None
    except ValueError:
        memory = None
    return DeviceInfo(gpu_name=name, compute_capability=capability, total_memory_bytes=memory, source="nvidia-smi")


def _probe_tegra() -> DeviceInfo | None:
    compatible = _read_device_tree("compatible").lower()
    for soc, (capability, family) in _TEGRA_SOCS.items():
        if soc in compatible:
            model = _read_device_tree("model") or family
            return DeviceInfo(gpu_name=model, compute_capability=capability, source="device tree")
    return None


def detect_device(index: int = 0) -> DeviceInfo:
    """GPU ``index`` and the TensorRT version of this machine, without torch."""
    jetson = is_jetson()
    found = _probe_cuda_python(index) or _probe_nvidia_smi(index) or (_probe_tegra() if jetson else None)
    if found is None:
        found = DeviceInfo(gpu_name=None, compute_capability=None)
    return dataclasses.replace(found, tensorrt_version=tensorrt_version(), is_jetson=jetson)


__all__ = [
    "DEVICE_TREE",
    "TEGRA_RELEASE",
    "DeviceInfo",
    "detect_device",
    "import_tensorrt",
    "is_jetson",
    "load_cudart",
    "tensorrt_version",
]
