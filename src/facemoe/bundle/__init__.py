"""The deployment bundle: the contract between ``facemoe-export`` and the runtime.

A bundle is a directory holding ``manifest.json`` and the artifacts it lists (``model.fp32.onnx``,
``model.fp16.onnx``, ``model.int8.onnx``, ``engines/``). This module reads and validates it and must not
import torch: the runtime on an edge box loads bundles with numpy, ONNX Runtime and OpenCV only.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from facemoe.bundle.manifest import (
    LOCK_NAME,
    MANIFEST_NAME,
    SCHEMA_VERSION,
    Manifest,
    copy_manifest,
    read_manifest,
    record_engine,
    write_manifest,
)
from facemoe.bundle.model_section import ExportInfo, ModelSection, ModelSource
from facemoe.bundle.sections import (
    ARCFACE_TEMPLATE_112,
    FLIP_FUSIONS,
    Artifact,
    Calibration,
    EngineEntry,
    Preprocessing,
    Routing,
    default_preprocessing,
)
from facemoe.errors import BundleError
from facemoe.fileio import sha256_file

PRECISIONS = ("fp32", "fp16", "int8")


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
        self.manifest = read_manifest(self.root)

    @property
    def weights_fingerprint(self) -> str:
        """Identifies the weights the bundle was exported from (galleries only match the same weights).

        All artifacts of a bundle (fp32 / fp16 / int8) share one embedding space: the model's
        ``weights_sha256`` (every exporter since the first writes it), else the fp32 artifact's sha256.
        """
        if self.manifest.model.weights_sha256:
            return self.manifest.model.weights_sha256
        if "fp32" in self.manifest.artifacts:
            return self.manifest.artifacts["fp32"].sha256
        first = next(iter(self.manifest.artifacts.values()), None)
        return first.sha256 if first is not None else ""

    def record_engine(self, entry: EngineEntry | Mapping[str, Any]) -> None:
        """Add (or replace, same file) an engine in the manifest on disk and in ``self.manifest``."""
        self.manifest = record_engine(self.root, entry)

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
            path = self.root / engine.file
            if not path.is_file():
                problems.append(f"{path}: engine listed in the manifest is missing")
            elif engine.sha256 and sha256_file(path) != engine.sha256:
                problems.append(f"{path}: sha256 does not match the manifest; the engine was modified or corrupted")
        return problems


__all__ = [
    "ARCFACE_TEMPLATE_112",
    "FLIP_FUSIONS",
    "LOCK_NAME",
    "MANIFEST_NAME",
    "PRECISIONS",
    "SCHEMA_VERSION",
    "Artifact",
    "Bundle",
    "Calibration",
    "EngineEntry",
    "ExportInfo",
    "Manifest",
    "ModelSection",
    "ModelSource",
    "Preprocessing",
    "Routing",
    "copy_manifest",
    "default_preprocessing",
    "read_manifest",
    "record_engine",
    "write_manifest",
]
