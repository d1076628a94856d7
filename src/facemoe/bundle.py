"""The deployment bundle: the contract between ``facemoe-export`` and the runtime.

A bundle is a directory holding ``manifest.json`` and the artifacts it lists (``model.fp32.onnx``,
``model.fp16.onnx``, ``model.int8.onnx``, ``engines/``). This module reads and validates it and must not
import torch: the runtime on an edge box loads bundles with numpy, ONNX Runtime and OpenCV only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from facemoe.errors import BundleError
from facemoe.fileio import sha256_file

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
PRECISIONS = ("fp32", "fp16", "int8")

# ArcFace 112x112 five-point template (left eye, right eye, nose tip, left mouth corner, right mouth
# corner), in pixels of the aligned crop. The public insightface reference values.
ARCFACE_TEMPLATE_112 = (
    (38.2946, 51.6963),
    (73.5318, 51.5014),
    (56.0252, 71.7366),
    (41.5493, 92.3655),
    (70.7299, 92.2041),
)


def default_preprocessing() -> dict[str, Any]:
    """Pre-processing of the official TinyFace evaluation (spec §7), which the runtime reproduces."""
    return {
        "color": "RGB",
        "layout": "NCHW",
        "aligned_size": 112,
        "input_size": 120,
        "interpolation": "pil-bicubic",
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
        "scale": 1.0 / 255.0,
        "alignment_template": [list(p) for p in ARCFACE_TEMPLATE_112],
        "flip_fusion": "pre_norm_vector_add",
    }


@dataclass
class Artifact:
    """One ONNX model in a bundle."""

    precision: str
    file: str
    sha256: str
    opset: int
    external_data: list[str] = field(default_factory=list)
    gating: str = "onnx"
    parity: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "precision": self.precision,
            "file": self.file,
            "sha256": self.sha256,
            "opset": self.opset,
            "external_data": self.external_data,
            "gating": self.gating,
            "parity": self.parity,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Artifact:
        return cls(
            precision=data["precision"],
            file=data["file"],
            sha256=data["sha256"],
            opset=int(data["opset"]),
            external_data=list(data.get("external_data", [])),
            gating=data.get("gating", "onnx"),
            parity=dict(data.get("parity", {})),
        )


@dataclass
class Manifest:
    """Parsed ``manifest.json``."""

    model: dict[str, Any]
    preprocessing: dict[str, Any]
    routing: dict[str, Any]
    embedding_size: int
    input_name: str = "input"
    output_name: str = "embedding"
    artifacts: dict[str, Artifact] = field(default_factory=dict)
    engines: list[dict[str, Any]] = field(default_factory=list)
    calibration: dict[str, Any] | None = None
    tools: dict[str, str] = field(default_factory=dict)
    created: str = ""
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> dict[str, Any]:
        return {
            "format": "facemoe-bundle",
            "schema_version": self.schema_version,
            "created": self.created,
            "model": self.model,
            "preprocessing": self.preprocessing,
            "routing": self.routing,
            "embedding_size": self.embedding_size,
            "input_name": self.input_name,
            "output_name": self.output_name,
            "artifacts": {name: art.to_json() for name, art in self.artifacts.items()},
            "engines": self.engines,
            "calibration": self.calibration,
            "tools": self.tools,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str = "manifest.json") -> Manifest:
        if data.get("format") != "facemoe-bundle":
            raise BundleError(f"{source}: not a FaceMoE bundle manifest (missing format: facemoe-bundle)")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise BundleError(
                f"{source}: manifest schema version {version!r} is not supported (this tool reads "
                f"{SCHEMA_VERSION}); re-export the bundle with this version of facemoe-export"
            )
        try:
            return cls(
                model=dict(data["model"]),
                preprocessing=dict(data["preprocessing"]),
                routing=dict(data["routing"]),
                embedding_size=int(data["embedding_size"]),
                input_name=data.get("input_name", "input"),
                output_name=data.get("output_name", "embedding"),
                artifacts={k: Artifact.from_json(v) for k, v in data.get("artifacts", {}).items()},
                engines=list(data.get("engines", [])),
                calibration=data.get("calibration"),
                tools=dict(data.get("tools", {})),
                created=data.get("created", ""),
                schema_version=version,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{source}: manifest is missing or has a malformed field: {exc}") from exc


class Bundle:
    """A bundle directory on disk."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        manifest_path = self.root / MANIFEST_NAME
        if self.root.exists() and not self.root.is_dir():
            raise BundleError(
                f"{self.root}: not a bundle directory (it is a file); pass the directory facemoe-export made"
            )
        if not self.root.is_dir():
            raise BundleError(f"{self.root}: bundle directory does not exist")
        if not manifest_path.is_file():
            raise BundleError(f"{self.root}: not a bundle (no {MANIFEST_NAME}; was the export interrupted?)")
        try:
            data = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise BundleError(f"{manifest_path}: unreadable manifest: {exc}") from exc
        self.manifest = Manifest.from_json(data, source=str(manifest_path))

    @property
    def precisions(self) -> list[str]:
        return [p for p in PRECISIONS if p in self.manifest.artifacts]

    def artifact(self, precision: str) -> Artifact:
        try:
            return self.manifest.artifacts[precision]
        except KeyError:
            have = ", ".join(self.precisions) or "none"
            raise BundleError(
                f"{self.root}: bundle has no {precision} model (it has: {have}); re-export with --{precision}"
                if precision != "fp32"
                else f"{self.root}: bundle has no fp32 model"
            ) from None

    def artifact_path(self, precision: str, verify: bool = False) -> Path:
        """Path of an ONNX artifact; with ``verify`` its sha256 is checked against the manifest."""
        art = self.artifact(precision)
        path = self.root / art.file
        if not path.is_file():
            raise BundleError(f"{path}: artifact listed in the manifest is missing")
        for extra in art.external_data:
            if not (self.root / extra).is_file():
                raise BundleError(f"{self.root / extra}: external weight file of {art.file} is missing")
        if verify:
            actual = sha256_file(path)
            if actual != art.sha256:
                raise BundleError(
                    f"{path}: sha256 {actual[:12]}... does not match the manifest ({art.sha256[:12]}...); "
                    "the file was modified or corrupted"
                )
        return path

    def parity_failure(self, precision: str) -> str | None:
        """Why ``precision``'s artifact failed the parity check recorded at export; None if it passed.

        ``facemoe-export --no-gate`` writes a bundle even when a gate is missed; the verdict stays in the
        artifact's ``parity`` entry (``passed``, ``failures``). An artifact without a record is not refused.
        """
        parity = self.artifact(precision).parity
        if not parity or parity.get("passed", True):
            return None
        failures = [str(f) for f in parity.get("failures") or []]
        return "; ".join(failures) or "the parity gate was missed"

    def verify(self) -> list[str]:
        """Problems of every file the manifest lists (artifacts, external weights, engines): missing or
        modified (sha256). An empty list means the bundle is intact."""
        problems = []
        for precision in self.precisions:
            try:
                self.artifact_path(precision, verify=True)
            except BundleError as exc:
                problems.append(str(exc))
        for engine in self.manifest.engines:
            path = self.root / str(engine.get("file", ""))
            if not path.is_file():
                problems.append(f"{path}: engine listed in the manifest is missing")
            elif engine.get("sha256") and sha256_file(path) != engine["sha256"]:
                problems.append(f"{path}: sha256 does not match the manifest; the engine was modified or corrupted")
        return problems
