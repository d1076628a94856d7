"""What a TensorRT engine was built for, and whether it may run here (torch-free, TensorRT-free).

A serialized engine is only valid on the GPU architecture (compute capability), the exact TensorRT
version and the plugin builds it was made with; loading it elsewhere fails deep inside TensorRT or, worse,
works with the wrong kernels. So every engine in a bundle carries a sidecar ``<engine>.json`` recording
its :class:`EngineIdentity` and the engine file's sha256, its file name spells the fields that decide
compatibility, and the runtime compares the sidecar with :func:`detect_device` before deserialising,
refusing with a sentence a person can act on: "built on sm_87 with TensorRT 10.3, this is sm_89 with
TensorRT 10.13". The device itself is probed by :mod:`facemoe.runtime.device`; its names are re-exported
here for callers that import them from this module.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import facemoe
from facemoe.bundle import Bundle
from facemoe.errors import BundleError, EngineMismatchError
from facemoe.fileio import sha256_file, write_json_atomic
from facemoe.runtime.backends.base import BackendUnavailable
from facemoe.runtime.device import (
    DeviceInfo,
    detect_device,
    import_tensorrt,
    is_jetson,
    load_cudart,
    tensorrt_version,
)

SIDECAR_FORMAT = "facemoe-engine"
SIDECAR_SCHEMA_VERSION = 1
ENGINES_DIR = "engines"


class EngineUnavailable(BackendUnavailable, EngineMismatchError):
    """No engine in the bundle fits this GPU / TensorRT / request.

    Both a ``BackendUnavailable`` (so ``auto`` backend selection moves on to ONNX Runtime) and an
    ``EngineMismatchError`` (so callers asking for TensorRT explicitly can tell it from a missing library).
    """


# ------------------------------------------------------------------------------------------- identity


@dataclass(frozen=True)
class EngineIdentity:
    """Everything an engine was built from and for (the sidecar's ``identity``)."""

    gpu_name: str
    compute_capability: str
    tensorrt_version: str
    precision: str
    min_batch: int
    opt_batch: int
    max_batch: int
    onnx_sha256: str
    onnx_file: str = ""
    plugin_hashes: Mapping[str, str] = field(default_factory=dict)
    builder_optimization_level: int = 3
    strongly_typed: bool = True
    workspace_bytes: int | None = None
    # "aot" / "jit": the engine holds facemoe::SparseMoE through the Python plugin (a JIT engine needs the
    # plugin registered, with torch and triton, before it can be deserialised); "" otherwise.
    python_plugin: str = ""
    build_time: str = ""
    build_seconds: float | None = None
    facemoe_version: str = facemoe.__version__

    def compatibility_fields(self) -> dict[str, Any]:
        """The fields an engine is built from and for: an engine is reused only when all of them match.

        The GPU model is among them, not only its architecture: TensorRT warns that a plan is tuned for the
        exact device. Build time and duration are not.
        """
        return {
            "compute_capability": self.compute_capability,
            "gpu_model": gpu_model(self.gpu_name),
            "tensorrt_version": self.tensorrt_version,
            "precision": self.precision,
            "profile": [self.min_batch, self.opt_batch, self.max_batch],
            "onnx_sha256": self.onnx_sha256,
            "plugins": dict(sorted(self.plugin_hashes.items())),
            "python_plugin": self.python_plugin,
            "optimization_level": self.builder_optimization_level,
            "workspace_bytes": self.workspace_bytes,
            "strongly_typed": self.strongly_typed,
        }

    @property
    def cache_key(self) -> str:
        canonical = json.dumps(self.compatibility_fields(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def engine_file_name(self) -> str:
        """E.g. ``model.fp16.sm_87.trt10.3.0.b1-8-32.0123456789ab.engine``: readable, and unique per key."""
        version = ".".join(self.tensorrt_version.split(".")[:3])
        profile = f"b{self.min_batch}-{self.opt_batch}-{self.max_batch}"
        return f"model.{self.precision}.{self.compute_capability}.trt{version}.{profile}.{self.cache_key[:12]}.engine"

    def covers(self, batch: int) -> bool:
        return self.min_batch <= batch <= self.max_batch

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["plugin_hashes"] = dict(sorted(self.plugin_hashes.items()))
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any], source: str = "sidecar") -> EngineIdentity:
        known = {f.name for f in dataclasses.fields(cls)}
        try:
            kwargs = {k: v for k, v in data.items() if k in known}
            kwargs["plugin_hashes"] = dict(kwargs.get("plugin_hashes") or {})
            identity = cls(**kwargs)
            for name in ("min_batch", "opt_batch", "max_batch"):
                int(getattr(identity, name))
        except (TypeError, ValueError) as exc:
            raise BundleError(f"{source}: malformed engine identity: {exc}") from exc
        return identity

    @staticmethod
    def now() -> str:
        return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def gpu_model(name: str) -> str:
    """A GPU name compared across detection sources: case, spacing and the "NVIDIA " prefix ignored."""
    text = " ".join(name.lower().split())
    return text.removeprefix("nvidia ").strip()


def _version_pair(recorded: str, current: str) -> tuple[str, str]:
    """Shortest dotted prefixes (at least major.minor) that tell two versions apart."""
    a, b = recorded.split("."), current.split(".")
    for width in range(2, max(len(a), len(b)) + 1):
        if a[:width] != b[:width]:
            return ".".join(a[:width]), ".".join(b[:width])
    return recorded, current


def compare(recorded: EngineIdentity, current: EngineIdentity, check_profile: bool = True) -> list[str]:
    """Why an engine built as ``recorded`` cannot serve ``current``; empty when it can.

    ``current`` is the identity an engine built here and now would have (this GPU, this TensorRT, the
    bundle's ONNX, the plugin libraries found here). A plugin library present here but not used by the
    engine is not a mismatch.
    """
    problems = []
    if (recorded.compute_capability, recorded.tensorrt_version) != (
        current.compute_capability,
        current.tensorrt_version,
    ):
        old, new = _version_pair(recorded.tensorrt_version, current.tensorrt_version)
        problems.append(
            f"built on {recorded.compute_capability} ({recorded.gpu_name}) with TensorRT {old}, "
            f"this is {current.compute_capability} ({current.gpu_name}) with TensorRT {new}"
        )
    if recorded.precision != current.precision:
        problems.append(f"built for {recorded.precision}, {current.precision} was requested")
    if recorded.onnx_sha256 and current.onnx_sha256 and recorded.onnx_sha256 != current.onnx_sha256:
        problems.append(
            f"built from an ONNX with sha256 {recorded.onnx_sha256[:12]}..., the bundle's "
            f"{current.onnx_file or 'model'} has {current.onnx_sha256[:12]}... (the model was re-exported)"
        )
    for name, digest in sorted(recorded.plugin_hashes.items()):
        have = current.plugin_hashes.get(name)
        if have is None:
            problems.append(f"built with plugin library {name}, which is not available here")
        elif have != digest:
            problems.append(f"built with plugin library {name} {digest[:12]}..., the one here is {have[:12]}...")
    if check_profile and (recorded.min_batch, recorded.opt_batch, recorded.max_batch) != (
        current.min_batch,
        current.opt_batch,
        current.max_batch,
    ):
        problems.append(
            f"built for batch {recorded.min_batch}..{recorded.max_batch} (opt {recorded.opt_batch}), "
            f"{current.min_batch}..{current.max_batch} (opt {current.opt_batch}) was requested"
        )
    return problems


# -------------------------------------------------------------------------------------------- sidecar


def sidecar_path(engine_path: str | Path) -> Path:
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def write_sidecar(engine_path: str | Path, identity: EngineIdentity, engine_sha256: str | None = None) -> Path:
    """Write ``<engine>.json`` (atomically) next to a finished engine file."""
    engine_path = Path(engine_path)
    digest = engine_sha256 or sha256_file(engine_path)
    path = sidecar_path(engine_path)
    write_json_atomic(
        path,
        {
            "format": SIDECAR_FORMAT,
            "schema_version": SIDECAR_SCHEMA_VERSION,
            "engine_file": engine_path.name,
            "engine_sha256": digest,
            "engine_bytes": engine_path.stat().st_size,
            "cache_key": identity.cache_key,
            "identity": identity.to_json(),
        },
    )
    return path


def read_sidecar(engine_path: str | Path, identity_type: Any = None) -> tuple[Any, str]:
    """(identity, recorded engine sha256) of an engine; BundleError when the sidecar is missing or bad."""
    path = sidecar_path(engine_path)
    if not path.is_file():
        raise BundleError(f"{path}: engine sidecar is missing; an engine without one cannot be checked, rebuild it")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: unreadable engine sidecar: {exc}") from exc
    if data.get("format") != SIDECAR_FORMAT or data.get("schema_version") != SIDECAR_SCHEMA_VERSION:
        raise BundleError(f"{path}: not a FaceMoE engine sidecar of schema {SIDECAR_SCHEMA_VERSION}")
    digest = data.get("engine_sha256")
    if not isinstance(digest, str) or len(digest) != 64:
        raise BundleError(f"{path}: engine sidecar has no valid engine_sha256")
    # The same sidecar holds a TensorRT engine's identity or a stored torch package's (its own type).
    return (identity_type or EngineIdentity).from_json(data.get("identity") or {}, source=str(path)), digest


def verify_engine_file(engine_path: str | Path, expected_sha256: str) -> None:
    """Refuse an engine whose bytes are not the ones its sidecar recorded (before TensorRT parses them)."""
    engine_path = Path(engine_path)
    if not engine_path.is_file():
        raise BundleError(f"{engine_path}: engine file is missing")
    actual = sha256_file(engine_path)
    if actual != expected_sha256:
        raise EngineMismatchError(
            f"{engine_path}: sha256 {actual[:12]}... does not match its sidecar ({expected_sha256[:12]}...); "
            "the engine file was modified or truncated: rebuild it with facemoe build-engine"
        )


def manifest_entry(bundle_root: str | Path, engine_path: str | Path, identity: EngineIdentity, sha: str) -> dict:
    """The summary of one engine kept in manifest.json's ``engines`` list (the sidecar stays authoritative)."""
    root, engine_path = Path(bundle_root), Path(engine_path)
    rel = engine_path.relative_to(root).as_posix()
    return {
        "file": rel,
        "sidecar": sidecar_path(engine_path).relative_to(root).as_posix(),
        "sha256": sha,
        "cache_key": identity.cache_key,
        "precision": identity.precision,
        "gpu_name": identity.gpu_name,
        "compute_capability": identity.compute_capability,
        "tensorrt_version": identity.tensorrt_version,
        "min_batch": identity.min_batch,
        "opt_batch": identity.opt_batch,
        "max_batch": identity.max_batch,
        "python_plugin": identity.python_plugin,
        "built": identity.build_time,
    }


# ------------------------------------------------------------------------------------------ selection


def plugin_hashes(paths: list[Path] | tuple[Path, ...]) -> dict[str, str]:
    """File name -> sha256 of plugin libraries (the name is what an engine records)."""
    hashes = {}
    for path in paths:
        if not Path(path).is_file():
            raise BundleError(f"{path}: plugin library not found")
        hashes[Path(path).name] = sha256_file(path)
    return hashes


def current_identity(
    recorded: EngineIdentity, bundle: Bundle, device: DeviceInfo, plugins: Mapping[str, str]
) -> EngineIdentity:
    """The identity an engine like ``recorded`` would have if it were built here from this bundle."""
    onnx_sha, onnx_file = "", recorded.onnx_file
    for art in bundle.manifest.artifacts.values():
        if art.file == recorded.onnx_file:
            onnx_sha = art.sha256
    return dataclasses.replace(
        recorded,
        gpu_name=device.gpu_name or "no GPU",
        compute_capability=device.compute_capability or "none",
        tensorrt_version=device.tensorrt_version or "none",
        onnx_sha256=onnx_sha,
        onnx_file=onnx_file,
        plugin_hashes=dict(plugins),
    )


@dataclass
class EngineChoice:
    path: Path
    identity: EngineIdentity
    sha256: str
    # Set when the engine was built on another model of this GPU architecture (it runs, maybe slower).
    note: str = ""


def select_engine(
    bundle: Bundle,
    precision: str,
    batch: int,
    device: DeviceInfo,
    plugins: Mapping[str, str] | None = None,
    verify: bool = True,
) -> EngineChoice:
    """The bundle's engine for ``precision`` that runs here and serves batches up to ``batch``.

    Among fitting engines the one with the smallest maximum batch wins (least activation memory).
    Raises ``EngineUnavailable`` listing, per engine, why it does not fit; with ``verify`` the chosen
    file's sha256 is checked against its sidecar (``EngineMismatchError`` when it differs).
    """
    plugins = dict(plugins or {})
    candidates = [
        e for e in bundle.manifest.engines if e.get("precision") == precision and e.get("kind") in (None, "tensorrt")
    ]
    if not candidates:
        have = sorted({str(e.get("precision")) for e in bundle.manifest.engines})
        raise EngineUnavailable(
            f"{bundle.root}: no {precision} TensorRT engine in the bundle"
            + (f" (it has engines for: {', '.join(have)})" if have else "")
            + f"; build one here with: facemoe build-engine {bundle.root} --precision {precision}"
        )
    fitting: list[EngineChoice] = []
    reasons: list[str] = []
    for entry in candidates:
        path = bundle.root / str(entry.get("file", ""))
        try:
            identity, digest = read_sidecar(path)
        except BundleError as exc:
            reasons.append(str(exc))
            continue
        problems = compare(identity, current_identity(identity, bundle, device, plugins), check_profile=False)
        if not identity.covers(batch):
            problems.append(
                f"serves batches {identity.min_batch}..{identity.max_batch}, max batch {batch} was requested"
            )
        if problems:
            reasons.append(f"engine {path.relative_to(bundle.root).as_posix()}: " + "; ".join(problems))
        else:
            fitting.append(EngineChoice(path, identity, digest))
    if not fitting:
        raise EngineUnavailable(
            "no usable TensorRT engine: "
            + " | ".join(reasons)
            + f". Rebuild for this device with: facemoe build-engine {bundle.root} --precision {precision}"
            + (f" --max-batch {batch}" if batch > 32 else "")
        )
    here = gpu_model(device.gpu_name or "")
    # An engine tuned on this very GPU model first, then the one with the least activation memory.
    choice = min(fitting, key=lambda c: (gpu_model(c.identity.gpu_name) != here, c.identity.max_batch))
    if gpu_model(choice.identity.gpu_name) != here:
        choice.note = (
            f"engine {choice.path.name} was built on {choice.identity.gpu_name}, this is {device.gpu_name} (same "
            f"{choice.identity.compute_capability}): it runs, but rebuilding here gives kernels tuned for this GPU"
        )
    if verify:
        verify_engine_file(choice.path, choice.sha256)
    return choice


__all__ = [
    "DeviceInfo",
    "EngineChoice",
    "EngineIdentity",
    "EngineUnavailable",
    "compare",
    "detect_device",
    "gpu_model",
    "import_tensorrt",
    "is_jetson",
    "load_cudart",
    "manifest_entry",
    "plugin_hashes",
    "read_sidecar",
    "select_engine",
    "sidecar_path",
    "tensorrt_version",
    "verify_engine_file",
    "write_sidecar",
]
