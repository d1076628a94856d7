"""``manifest.json``: the typed manifest and its one writer (docs/BUNDLE.md#manifest).

Only this module writes ``manifest.json``: the exporter through :func:`write_manifest`, engine builds
through :func:`record_engine`. Both write atomically (a temporary file renamed into place), so a reader
never sees half a manifest.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from facemoe.bundle.model_section import ModelSection
from facemoe.bundle.sections import (
    Artifact,
    Calibration,
    EngineEntry,
    Preprocessing,
    Routing,
)
from facemoe.errors import BundleError
from facemoe.fileio import write_json_atomic

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "facemoe-bundle"
LOCK_NAME = ".manifest.lock"
_KNOWN = (
    "format",
    "schema_version",
    "created",
    "model",
    "preprocessing",
    "routing",
    "embedding_size",
    "input_name",
    "output_name",
    "artifacts",
    "engines",
    "calibration",
    "tools",
)


@dataclass
class Manifest:
    """Parsed ``manifest.json``; sections given as plain mappings are parsed into their typed form."""

    model: ModelSection
    preprocessing: Preprocessing
    routing: Routing
    embedding_size: int
    input_name: str = "input"
    output_name: str = "embedding"
    artifacts: dict[str, Artifact] = field(default_factory=dict)
    engines: list[EngineEntry] = field(default_factory=list)
    calibration: Calibration | None = None
    tools: dict[str, str] = field(default_factory=dict)
    created: str = ""
    schema_version: int = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)  # top-level keys this version does not know

    def __post_init__(self) -> None:
        if not isinstance(self.model, ModelSection):
            self.model = ModelSection.from_json(self.model)
        if not isinstance(self.preprocessing, Preprocessing):
            self.preprocessing = Preprocessing.from_json(self.preprocessing)
        if not isinstance(self.routing, Routing):
            self.routing = Routing.from_json(self.routing)
        self.engines = [EngineEntry.from_json(e) for e in self.engines]
        if self.calibration is not None and not isinstance(self.calibration, Calibration):
            self.calibration = Calibration.from_json(self.calibration)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "schema_version": self.schema_version,
            "created": self.created,
            "model": self.model.to_json(),
            "preprocessing": self.preprocessing.to_json(),
            "routing": self.routing.to_json(),
            "embedding_size": self.embedding_size,
            "input_name": self.input_name,
            "output_name": self.output_name,
            "artifacts": {name: art.to_json() for name, art in self.artifacts.items()},
            "engines": [engine.to_json() for engine in self.engines],
            "calibration": self.calibration.to_json() if self.calibration is not None else None,
            "tools": self.tools,
        } | self.extra

    @classmethod
    def from_json(cls, data: Mapping[str, Any], source: str = MANIFEST_NAME) -> Manifest:
        if data.get("format") != MANIFEST_FORMAT:
            raise BundleError(f"{source}: not a FaceMoE bundle manifest (missing format: {MANIFEST_FORMAT})")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise BundleError(
                f"{source}: manifest schema version {version!r} is not supported (this tool reads "
                f"{SCHEMA_VERSION}); re-export the bundle with this version of facemoe-export"
            )
        try:
            calibration = data.get("calibration")
            return cls(
                model=ModelSection.from_json(data["model"]),
                preprocessing=Preprocessing.from_json(data["preprocessing"]),
                routing=Routing.from_json(data["routing"]),
                embedding_size=int(data["embedding_size"]),
                input_name=data.get("input_name", "input"),
                output_name=data.get("output_name", "embedding"),
                artifacts={k: Artifact.from_json(v) for k, v in data.get("artifacts", {}).items()},
                engines=[EngineEntry.from_json(e) for e in data.get("engines", [])],
                calibration=Calibration.from_json(calibration) if calibration is not None else None,
                tools=dict(data.get("tools", {})),
                created=data.get("created", ""),
                schema_version=version,
                extra={k: v for k, v in data.items() if k not in _KNOWN},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BundleError(f"{source}: manifest is missing or has a malformed field: {exc}") from exc


def read_manifest(bundle_dir: str | Path) -> Manifest:
    """The manifest of ``bundle_dir``; ``BundleError`` naming the file when it is absent or unreadable."""
    path = Path(bundle_dir) / MANIFEST_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise BundleError(f"{bundle_dir}: not a bundle (no {MANIFEST_NAME}; was the export interrupted?)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: unreadable manifest: {exc}") from exc
    if not isinstance(data, dict):
        raise BundleError(f"{path}: not a FaceMoE bundle manifest (not a JSON object)")
    return Manifest.from_json(data, source=str(path))


def write_manifest(bundle_dir: str | Path, manifest: Manifest) -> Path:
    """Write ``bundle_dir/manifest.json`` atomically; the one place that writes a manifest."""
    path = Path(bundle_dir) / MANIFEST_NAME
    write_json_atomic(path, manifest.to_json())
    return path


def copy_manifest(bundle_dir: str | Path, directory: str | Path) -> Path:
    """The bundle's manifest, byte for byte, into ``directory`` (a Triton repository keeps it beside the models
    so hashes and parity travel with them, docs/SCALE_OUT.md#manifest-contract); the bundle is not changed."""
    target = Path(directory) / MANIFEST_NAME
    target.write_bytes((Path(bundle_dir) / MANIFEST_NAME).read_bytes())
    return target


@contextlib.contextmanager
def manifest_lock(bundle_dir: str | Path) -> Iterator[None]:
    """Serialise read-modify-write of a manifest between processes (POSIX; a no-op elsewhere)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(Path(bundle_dir) / LOCK_NAME, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def record_engine(bundle_dir: str | Path, entry: EngineEntry | Mapping[str, Any]) -> Manifest:
    """Add an engine to the manifest's ``engines`` list, replacing the entry for the same file.

    Read, change and write happen under :func:`manifest_lock`, so concurrent builds into one bundle keep
    each other's entries; keys this version does not know survive (they are kept in ``extra``).
    """
    engine = EngineEntry.from_json(entry)
    with manifest_lock(bundle_dir):
        manifest = read_manifest(bundle_dir)
        manifest.engines = [e for e in manifest.engines if e.file != engine.file] + [engine]
        write_manifest(bundle_dir, manifest)
    return manifest
