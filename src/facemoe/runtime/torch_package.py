"""What a stored compiled PyTorch package was built for, and whether it may run here (torch-free module).

An AOTInductor package (docs/COMPILED.md#stored-compiled-packages) holds machine code for one device kind
(CUDA compute capability, or a CPU vector ISA), made by one torch / Triton / CUDA build from one set of
weights. Like a TensorRT engine it lives in the bundle's ``engines/`` with a sidecar ``<package>.json`` and
a manifest entry (``kind`` ``"torch-aoti"``); the sidecar, sha256 check and manifest summary are the
engine ones (:mod:`facemoe.runtime.engine_identity`), only the identity differs. torch is imported inside
:func:`probe` only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import facemoe
from facemoe.bundle import Bundle
from facemoe.errors import BundleError, EngineMismatchError
from facemoe.runtime.backends.base import BackendUnavailable
from facemoe.runtime.engine_identity import EngineIdentity, _version_pair, read_sidecar, verify_engine_file

KIND = "torch-aoti"


class PackageUnavailable(BackendUnavailable, EngineMismatchError):
    """No stored package fits here; the torch backend compiles or runs eagerly instead, saying why."""


@dataclass(frozen=True)
class PackageIdentity:
    """Everything a stored package was compiled from and for (the sidecar's ``identity``)."""

    device_kind: str  # "cuda" or "cpu"
    device_name: str  # GPU name, or the CPU model name
    compute_capability: str  # "sm_90"; "none" on the CPU
    cpu_isa: str  # Inductor's vector ISA on the CPU ("avx512", "avx2", ...); "" on CUDA
    torch_version: str
    triton_version: str
    cuda_version: str
    precision: str  # fp32 / fp16
    half: str  # fp16 policy: "gemm" or "all"; "" for fp32
    attention: str  # docs/COMPILED.md#attention-modes
    min_batch: int
    max_batch: int
    batch_buckets: tuple[int, ...]
    weights_sha256: str
    kind: str = KIND
    build_time: str = ""
    build_seconds: float | None = None
    facemoe_version: str = facemoe.__version__

    def compatibility_fields(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "device": [self.device_kind, self.compute_capability, self.cpu_isa],
            "versions": [self.torch_version, self.triton_version, self.cuda_version],
            "precision": [self.precision, self.half, self.attention],
            "batch": [self.min_batch, self.max_batch, list(self.batch_buckets)],
            "weights_sha256": self.weights_sha256,
        }

    @property
    def cache_key(self) -> str:
        canonical = json.dumps(self.compatibility_fields(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def file_name(self) -> str:
        """E.g. ``model.torch.fp32.cpu-avx512.torch2.14.1.b1-256.0123456789ab.pt2``."""
        where = (
            self.compute_capability if self.device_kind == "cuda" else f"cpu-{(self.cpu_isa or 'generic').split()[0]}"
        )
        version = self.torch_version.split("+")[0]
        batch = f"b{self.min_batch}-{self.max_batch}"
        return f"model.torch.{self.precision}.{where}.torch{version}.{batch}.{self.cache_key[:12]}.pt2"

    def covers(self, batch: int) -> bool:
        return self.min_batch <= batch <= self.max_batch

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["batch_buckets"] = list(self.batch_buckets)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any], source: str = "sidecar") -> PackageIdentity:
        if data.get("kind") != KIND:
            raise BundleError(f"{source}: not a stored torch package sidecar (kind {data.get('kind')!r})")
        known = {f.name for f in dataclasses.fields(cls)}
        try:
            kwargs = {k: v for k, v in data.items() if k in known}
            kwargs["batch_buckets"] = tuple(int(b) for b in kwargs.get("batch_buckets") or ())
            identity = cls(**kwargs)
            int(identity.min_batch), int(identity.max_batch)
        except (TypeError, ValueError) as exc:
            raise BundleError(f"{source}: malformed package identity: {exc}") from exc
        return identity

    def manifest_entry(self, bundle_root: Path, path: Path, sha: str) -> dict[str, Any]:
        rel = path.relative_to(bundle_root).as_posix()
        return {
            "file": rel,
            "sidecar": rel + ".json",
            "sha256": sha,
            "cache_key": self.cache_key,
            "kind": KIND,
            "precision": self.precision,
            "gpu_name": self.device_name if self.device_kind == "cuda" else None,
            "compute_capability": self.compute_capability,
            "torch_version": self.torch_version,
            "min_batch": self.min_batch,
            "max_batch": self.max_batch,
            "built": self.build_time,
        }


def compare(recorded: PackageIdentity, here: PackageIdentity) -> list[str]:
    """Why a package compiled as ``recorded`` cannot run as ``here`` (this device, torch, weights); [] if it can."""
    problems = []
    if recorded.device_kind != here.device_kind:
        problems.append(f"compiled for {recorded.device_kind}, this run is on {here.device_kind}")
    elif recorded.device_kind == "cuda" and recorded.compute_capability != here.compute_capability:
        problems.append(
            f"compiled on {recorded.compute_capability} ({recorded.device_name}), "
            f"this is {here.compute_capability} ({here.device_name})"
        )
    elif recorded.device_kind == "cpu" and recorded.cpu_isa != here.cpu_isa:
        problems.append(f"compiled for the {recorded.cpu_isa} CPU vector ISA, this CPU uses {here.cpu_isa}")
    for name, old, new in (
        ("torch", recorded.torch_version, here.torch_version),
        ("Triton", recorded.triton_version, here.triton_version),
        ("CUDA", recorded.cuda_version, here.cuda_version),
    ):
        if old != new and (name == "torch" or recorded.device_kind == "cuda"):
            a, b = _version_pair(old or "none", new or "none")
            problems.append(f"compiled with {name} {a}, this is {name} {b}")
    if (recorded.precision, recorded.half) != (here.precision, here.half):
        problems.append(
            f"compiled for {recorded.precision}{f' ({recorded.half})' if recorded.half else ''}, "
            f"{here.precision}{f' ({here.half})' if here.half else ''} was requested"
        )
    if recorded.weights_sha256 != here.weights_sha256:
        problems.append(
            f"compiled from weights {recorded.weights_sha256[:12]}..., the bundle's are {here.weights_sha256[:12]}..."
        )
    if not recorded.covers(here.max_batch):
        problems.append(f"serves batches {recorded.min_batch}..{recorded.max_batch}, {here.max_batch} was requested")
    return problems


def probe(device: str, bundle: Bundle, precision: str, half: str, max_batch: int) -> PackageIdentity:
    """The identity a package compiled here and now for ``bundle`` would have (imports torch)."""
    import platform

    import torch

    is_cuda = device.startswith("cuda")
    try:
        import triton

        triton_version = str(triton.__version__)
    except ImportError:
        triton_version = ""
    if is_cuda:
        index = torch.device(device).index or 0
        major, minor = torch.cuda.get_device_capability(index)
        name, capability, isa = torch.cuda.get_device_name(index), f"sm_{major}{minor}", ""
    else:
        from torch._inductor import cpu_vec_isa

        name, capability, isa = platform.processor() or platform.machine(), "none", str(cpu_vec_isa.pick_vec_isa())
    return PackageIdentity(
        device_kind="cuda" if is_cuda else "cpu",
        device_name=name,
        compute_capability=capability,
        cpu_isa=isa,
        torch_version=str(torch.__version__),
        triton_version=triton_version if is_cuda else "",
        cuda_version=str(torch.version.cuda or "") if is_cuda else "",
        precision=precision,
        half=half if precision == "fp16" else "",
        attention="matmul",
        min_batch=1,
        max_batch=max_batch,
        batch_buckets=(),
        weights_sha256=bundle.weights_fingerprint,
    )


def select_package(bundle: Bundle, here: PackageIdentity, verify: bool = True) -> tuple[Path, PackageIdentity]:
    """The bundle's stored package that runs ``here``; ``PackageUnavailable`` listing why each does not."""
    entries = [e for e in bundle.manifest.engines if e.get("kind") == KIND]
    if not entries:
        raise PackageUnavailable(
            f"{bundle.root}: no stored torch package; build one with: "
            f"facemoe build-engine {bundle.root} --backend torch"
        )
    reasons, fitting = [], []
    for entry in entries:
        path = bundle.root / str(entry.get("file", ""))
        try:
            recorded, digest = read_sidecar(path, PackageIdentity)
        except BundleError as exc:
            reasons.append(str(exc))
            continue
        problems = compare(recorded, here)
        if problems:
            reasons.append(f"package {path.name}: " + "; ".join(problems))
        else:
            fitting.append((path, recorded, digest))
    if not fitting:
        raise PackageUnavailable(
            "no usable stored torch package: " + " | ".join(reasons) + f". Rebuild it here with: facemoe "
            f"build-engine {bundle.root} --backend torch --device {here.device_kind} --precision {here.precision}"
        )
    path, recorded, digest = min(fitting, key=lambda f: f[1].max_batch)
    if verify:
        verify_engine_file(path, digest)
    return path, recorded


__all__ = ["KIND", "EngineIdentity", "PackageIdentity", "PackageUnavailable", "compare", "probe", "select_package"]
