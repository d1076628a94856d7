"""FaceMoE's cuda-python use against the real cuda-python releases (run by .ci/trt_bindings.sh).

cuda-python imports without a GPU or driver; its calls then fail with an error code (or, in 12.6, a
RuntimeError from the driver loader), which is exactly the "CUDA cannot start" path. Checks:

1. FaceMoE finds the runtime module (``cuda.bindings.runtime``) from the release under test;
2. every function, enum and struct field FaceMoE uses exists and accepts the call FaceMoE makes;
3. device detection reads "no GPU" instead of raising, and the backend's first CUDA call turns the
   failure into a one-line BackendUnavailable naming the CUDA error.

Usage: python check_cuda.py EXPECTED_VERSION TARGET_DIR (e.g. 12.6 /tmp/cuda-12.6).
"""

from __future__ import annotations

import sys
from pathlib import Path

from trt_bindings.api_surface import CUDART
from trt_bindings.surface import Report


def main() -> int:
    expected, target = sys.argv[1], Path(sys.argv[2]).resolve()
    report = Report(f"cuda-python {expected}")
    from importlib.metadata import version

    from facemoe.errors import FaceMoEError
    from facemoe.runtime import device as probe
    from facemoe.runtime.backends.base import BackendUnavailable
    from facemoe.runtime.backends.tensorrt_backend import CudaRuntime

    installed = version("cuda-python")
    report.item(installed.startswith(expected), "version", f"{installed} != {expected}")
    module = probe.load_cudart()
    report.item(module is not None, "load_cudart() finds the runtime module")
    if module is None:
        return report.finish()
    where = Path(module.__file__ or "").resolve()
    report.item(target in where.parents, "runtime module comes from the release under test", str(where))
    report.note(f"{module.__name__} from {where}")
    report.surface(module, CUDART, (0, 0))

    device = probe.detect_device()
    report.item(not device.has_gpu, "detect_device() without a driver: no GPU, no exception", device.describe())
    cuda = CudaRuntime(module)
    try:
        cuda.set_device(0)
        report.item(False, "set_device without a driver", "succeeded")
    except BackendUnavailable as exc:
        report.item(True, "set_device without a driver: BackendUnavailable")
        report.note(f"set_device: {exc}")
    except Exception as exc:
        report.item(False, "set_device without a driver: BackendUnavailable", f"{type(exc).__name__}: {exc}")
    error = module.cudaError_t.cudaErrorInsufficientDriver
    try:
        cuda._check((error,), "cudaProbe")
        report.item(False, "error codes are raised", "no error")
    except FaceMoEError as exc:
        # The text comes from cudaGetErrorString, which 12.6 cannot call once the driver failed to load.
        report.item("cudaErrorInsufficientDriver" in str(exc), "error codes become a FaceMoEError", str(exc))
        report.note(f"error message: {exc}")
    return report.finish()


if __name__ == "__main__":
    sys.exit(main())
