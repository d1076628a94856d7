"""The enrolment gallery: names and L2-normalised template embeddings, matched by cosine, open set.

Stored as ``.npz`` without pickled objects (``allow_pickle=False`` on load, so a gallery from elsewhere can
not execute code): ``names`` (N,) unicode, ``embeddings`` (N, D) float32 unit vectors, ``counts`` (N,) int
faces per identity, ``meta`` a JSON string (format, version, model fingerprint, embedding size, ...).
One template per identity: the norm-weighted mean of all its faces' raw embeddings, as for tracks.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from facemoe.bundle import Bundle
from facemoe.errors import InputError
from facemoe.fileio import atomic_path

GALLERY_FORMAT = "facemoe-gallery"
GALLERY_VERSION = 1
UNKNOWN = "unknown"


def model_fingerprint(bundle: Bundle) -> str:
    """Identifies the weights a bundle was exported from; galleries only match bundles with the same one."""
    return bundle.weights_fingerprint


@dataclass
class Match:
    identity: str  # a gallery name, or "unknown" below the threshold
    similarity: float  # cosine to the best gallery entry
    best: str | None  # the best entry even when below the threshold
    second: str | None = None
    second_similarity: float | None = None


@dataclass
class Gallery:
    names: list[str]
    embeddings: np.ndarray  # (N, D) float32, unit rows
    counts: list[int]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.embeddings = np.asarray(self.embeddings, dtype=np.float32)
        if self.embeddings.ndim != 2 or self.embeddings.shape[0] != len(self.names):
            raise InputError(f"gallery has {len(self.names)} names but embeddings of shape {self.embeddings.shape}")
        if len(set(self.names)) != len(self.names):
            raise InputError("gallery has duplicate names")

    def __len__(self) -> int:
        return len(self.names)

    @property
    def embedding_size(self) -> int:
        return int(self.embeddings.shape[1])

    def match(self, vector: np.ndarray, threshold: float) -> Match:
        """Best cosine match of a unit vector; ``unknown`` when the best is below ``threshold``."""
        if not self.names:
            return Match(UNKNOWN, 0.0, None)
        sims = self.embeddings @ np.asarray(vector, dtype=np.float32).reshape(-1)
        order = np.argsort(-sims)
        best = int(order[0])
        similarity = float(sims[best])
        second = int(order[1]) if len(order) > 1 else None
        return Match(
            identity=self.names[best] if similarity >= threshold else UNKNOWN,
            similarity=similarity,
            best=self.names[best],
            second=self.names[second] if second is not None else None,
            second_similarity=float(sims[second]) if second is not None else None,
        )

    def check_compatible(self, fingerprint: str, embedding_size: int, source: str = "gallery") -> None:
        if self.embedding_size != embedding_size:
            raise InputError(
                f"{source}: embeddings have {self.embedding_size} dimensions, the model produces {embedding_size}; "
                "re-enrol with this bundle (facemoe enroll)"
            )
        theirs = self.meta.get("model_fingerprint", "")
        if theirs and fingerprint and theirs != fingerprint:
            raise InputError(
                f"{source}: enrolled with another model ({theirs[:12]}...) than this bundle's ({fingerprint[:12]}...); "
                "embeddings of different models are not comparable, re-enrol with this bundle (facemoe enroll)"
            )

    def save(self, path: str | Path) -> None:
        meta = dict(self.meta)
        meta.setdefault("format", GALLERY_FORMAT)
        meta.setdefault("version", GALLERY_VERSION)
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            # A file handle, not a name: np.savez would append ".npz" to the temporary name.
            np.savez(
                handle,
                names=np.array(self.names, dtype=np.str_).reshape(-1),
                embeddings=self.embeddings.astype(np.float32),
                counts=np.array(self.counts, dtype=np.int64).reshape(-1),
                meta=np.array(json.dumps(meta)),
            )

    @classmethod
    def load(cls, path: str | Path) -> Gallery:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: gallery file not found" if not path.exists() else f"{path}: not a file")
        # A gallery is a zip (.npz). Anything else would reach numpy's pickle branch, whose error talks about
        # allow_pickle: say plainly that this is not a gallery file instead.
        if not zipfile.is_zipfile(path):
            raise InputError(f"{path}: not a FaceMoE gallery file (expected the .npz that `facemoe enroll` writes)")
        try:
            with np.load(path, allow_pickle=False) as data:
                missing = {"names", "embeddings", "meta"} - set(data.files)
                if missing:
                    raise InputError(f"{path}: not a FaceMoE gallery (missing {', '.join(sorted(missing))})")
                names = [str(n) for n in data["names"].reshape(-1)]
                embeddings = np.asarray(data["embeddings"], dtype=np.float32)
                counts = [int(c) for c in data["counts"]] if "counts" in data.files else [1] * len(names)
                meta = json.loads(str(data["meta"]))
        except InputError:
            raise
        except ValueError as exc:
            if "allow_pickle" in str(exc):  # an .npz holding Python objects: not written by facemoe enroll
                raise InputError(
                    f"{path}: not a FaceMoE gallery file (it holds Python objects, which are never loaded)"
                ) from None
            raise InputError(f"{path}: unreadable gallery ({exc})") from None
        except (OSError, zipfile.BadZipFile, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise InputError(f"{path}: unreadable gallery ({exc})") from None
        if meta.get("format") != GALLERY_FORMAT:
            raise InputError(f"{path}: not a FaceMoE gallery (meta format is {meta.get('format')!r})")
        if int(meta.get("version", 0)) > GALLERY_VERSION:
            raise InputError(f"{path}: gallery version {meta.get('version')} is newer than this tool reads")
        if not names:
            raise InputError(f"{path}: gallery holds no identities")
        if embeddings.ndim != 2 or embeddings.shape[0] != len(names):
            raise InputError(f"{path}: {len(names)} names but embeddings of shape {embeddings.shape}")
        if not np.all(np.isfinite(embeddings)):
            raise InputError(f"{path}: gallery holds non-finite embeddings")
        norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
        # Tolerate galleries written by other tools with raw vectors: matching is by cosine either way.
        embeddings = embeddings / np.maximum(norms, 1e-12)
        return cls(names=names, embeddings=embeddings, counts=counts, meta=meta)


__all__ = ["GALLERY_FORMAT", "GALLERY_VERSION", "UNKNOWN", "Gallery", "Match", "model_fingerprint"]
