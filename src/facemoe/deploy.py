"""Open a bundle's backend, building its TensorRT engine first when asked: the step above runtime and export.

The runtime opens engines and never builds them (it imports nothing from the exporter); the exporter builds
them. Rebuilding a missing or mismatched engine for this GPU needs both, so it lives here, in the
composition layer (docs/ARCHITECTURE.md, "Package layering"). TensorRT and the builder are imported only
when an engine has to be built.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from facemoe.bundle import Bundle
from facemoe.runtime.backends.base import Backend, BackendUnavailable
from facemoe.runtime.backends.select import Report, engine_precision, open_backend
from facemoe.runtime.engine_identity import EngineUnavailable


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def build_for_backend(
    bundle: Bundle,
    precision: str,
    max_batch: int,
    *,
    device: str | None = None,
    plugin_libraries: Any = (),
    log: Callable[[str], None] = _stderr,
) -> Path:
    """Build (or reuse) the engine ``open_backend`` would look for; returns its path."""
    from facemoe.export.tensorrt import BuildOptions, build_engine

    if precision not in bundle.manifest.artifacts:
        raise EngineUnavailable(f"{bundle.root}: cannot build a {precision} engine: the bundle has no {precision} ONNX")
    device_index = int(device[5:] or 0) if device and device.startswith("cuda:") else 0
    options = BuildOptions(
        precision=precision,
        max_batch=max(max_batch, 32),
        opt_batch=min(8, max_batch),
        plugin_libraries=[Path(p) for p in plugin_libraries],
        device_index=device_index,
    )
    return build_engine(bundle, options, log=log).path


def prepare_backend(
    bundle: Bundle | str | Path,
    backend: str = "auto",
    precision: str | None = None,
    max_batch: int = 32,
    threads: int | None = None,
    report: Report | None = None,
    *,
    device: str | None = None,
    rebuild: bool = False,
    log: Callable[[str], None] = _stderr,
    **options: Any,
) -> Backend:
    """:func:`open_backend`, and with ``rebuild`` a missing or mismatched TensorRT engine is built first.

    With ``backend="torch"``, ``rebuild`` compiles and stores the bundle's torch package when none fits.
    ``rebuild`` applies to ``tensorrt`` and ``auto``: the engine is built for ``precision`` (by default the
    fastest one that passed parity) and opened. With ``auto``, a machine where TensorRT cannot run at all
    (not installed, no GPU) falls back as :func:`open_backend` does; a failed build is an error.
    """
    if not isinstance(bundle, Bundle):
        bundle = Bundle(bundle)
    if rebuild and backend == "torch":
        return _prepare_torch(bundle, precision, max_batch, threads, report, device, log, options)
    if not rebuild or backend not in ("auto", "tensorrt"):
        return open_backend(bundle, backend, precision, max_batch, threads, report, device=device, **options)
    wanted = precision or engine_precision(bundle)
    args = (bundle, "tensorrt", wanted, max_batch, threads, report)
    try:
        return open_backend(*args, device=device, **options)
    except EngineUnavailable:
        pass  # no engine fits: build one below
    except BackendUnavailable:
        if backend == "tensorrt":
            raise
        return open_backend(bundle, backend, precision, max_batch, threads, report, device=device, **options)
    libraries = options.get("plugin_libraries", ())
    build_for_backend(bundle, wanted, max_batch, device=device, plugin_libraries=libraries, log=log)
    # Read the manifest again: the build recorded the new engine in the bundle's manifest.json.
    return open_backend(Bundle(bundle.root), *args[1:], device=device, **options)


def _prepare_torch(
    bundle: Bundle,
    precision: str | None,
    max_batch: int,
    threads: int | None,
    report: Report | None,
    device: str | None,
    log: Callable[[str], None],
    options: dict[str, Any],
) -> Backend:
    """The torch backend, compiling and storing its package first when none in the bundle fits
    (docs/COMPILED.md#stored-compiled-packages)."""
    opened = open_backend(bundle, "torch", precision, max_batch, threads, None, device=device, **options)
    if getattr(opened, "package_path", None) is not None or getattr(opened, "routing", "") != "static":
        if report is not None:
            report(opened.selection)
        return opened
    from facemoe.export.aoti import build_package

    where, chosen = opened.device, opened.precision
    opened.close()
    sizes = (*(b for b in (1, 8, 64, 256) if b < max_batch), max_batch)
    build_package(bundle, device=where, precision=chosen, half=options.get("half", "gemm"), batch_sizes=sizes, log=log)
    return open_backend(Bundle(bundle.root), "torch", chosen, max_batch, threads, report, device=where, **options)


__all__ = ["build_for_backend", "prepare_backend"]
