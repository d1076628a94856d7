"""Compile a bundle's PyTorch model once with AOTInductor and store it in ``engines/`` (docs/COMPILED.md).

One package per device kind / precision with a dynamic batch dimension (``torch.export`` with a batch
``Dim``; static top-k routing has no data-dependent control flow, docs/ARCHITECTURE.md#routing-modes).
The sidecar and the manifest entry are written with the engine helpers, after the package file is complete.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from facemoe.bundle import Bundle
from facemoe.errors import OutputError
from facemoe.fileio import sha256_file
from facemoe.runtime.engine_identity import ENGINES_DIR, EngineIdentity, write_sidecar
from facemoe.runtime.torch_package import PackageIdentity, probe


def build_package(
    bundle: Bundle,
    *,
    device: str = "cpu",
    precision: str = "fp32",
    half: str = "gemm",
    batch_sizes: Sequence[int] = (1, 8, 64, 256),
    attention: str = "matmul",
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> tuple[Path, PackageIdentity]:
    """Compile, write ``engines/<package>.pt2`` and its sidecar, record it in the manifest; returns both."""
    import dataclasses

    import torch

    from facemoe.model.inference import apply_fp16, apply_full_fp16, load_reference_model

    if precision == "fp16" and not device.startswith("cuda"):
        raise OutputError("fp16 packages need a CUDA device; on the CPU build fp32")
    buckets = tuple(sorted(set(int(b) for b in batch_sizes)))
    here = probe(device, bundle, precision, half, max(buckets))
    identity = dataclasses.replace(
        here, attention=attention, batch_buckets=buckets, min_batch=1, build_time=EngineIdentity.now()
    )
    engines = bundle.root / ENGINES_DIR
    path = engines / identity.file_name()
    if path.exists() and not overwrite and _intact(path, here):
        log(f"reused {path} (same identity; --overwrite rebuilds it)")
        return path, identity
    start = time.perf_counter()
    model = load_reference_model(bundle).eval().set_routing("static").set_attention(attention)  # type: ignore[arg-type]
    if precision == "fp16":
        apply_fp16(model) if half == "gemm" else apply_full_fp16(model)
    model = model.to(device)
    example = torch.zeros((2, 3, model.config.img_size, model.config.img_size), device=device)
    batch = torch.export.Dim("batch", min=1, max=max(max(buckets), 2))
    with torch.inference_mode():
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    engines.mkdir(exist_ok=True)
    partial = path.with_name(path.stem + ".partial.pt2")  # AOTInductor wants the .pt2 suffix
    torch._inductor.aoti_compile_and_package(program, package_path=str(partial))
    partial.replace(path)
    identity = dataclasses.replace(identity, build_seconds=round(time.perf_counter() - start, 2))
    sha = sha256_file(path)
    write_sidecar(path, identity, sha)  # type: ignore[arg-type]
    bundle.record_engine(identity.manifest_entry(bundle.root, path, sha))
    log(f"built {path} in {identity.build_seconds} s")
    return path, identity


def _intact(path: Path, here: PackageIdentity) -> bool:
    """The stored package at ``path`` has a sidecar that fits ``here`` and the bytes it records."""
    from facemoe.errors import BundleError, EngineMismatchError
    from facemoe.runtime.engine_identity import read_sidecar, verify_engine_file
    from facemoe.runtime.torch_package import compare

    try:
        recorded, digest = read_sidecar(path, PackageIdentity)
        verify_engine_file(path, digest)
    except (BundleError, EngineMismatchError):
        return False
    return not compare(recorded, here)


def load_package(path: Path) -> tuple[object, float]:
    """The callable compiled model of a stored package and the seconds loading took."""
    import torch

    start = time.perf_counter()
    runner = torch._inductor.aoti_load_package(str(path))
    return runner, time.perf_counter() - start


__all__ = ["build_package", "load_package"]
