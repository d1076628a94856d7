"""Build the INT8 calibration batch: pick faces, degrade them like low-resolution probes, pre-process.

The result is reproducible: the same files, seed and parameters give the same batch bit for bit, and the
summary's ``data_hash`` (sha256 over the file list, the contents of the files used, the seed and every
parameter) identifies it in the bundle manifest and in the calibration cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from facemoe.calibration.degrade import DegradeConfig, degrade_face, summarize
from facemoe.calibration.sources import (
    ALIGNED_SIZE,
    Detector,
    SourceFile,
    decode_image,
    faces_from_source,
    find_files,
    read_bytes,
    to_aligned,
)
from facemoe.errors import InputError
from facemoe.fileio import sha256_file
from facemoe.preprocess import preprocess_batch

DATASET_FORMAT = 1

PathLike = str | os.PathLike[str]


@dataclass
class _Candidate:
    label: str
    source: SourceFile
    crop: np.ndarray | None = None  # set for detected faces; aligned files are read only when chosen


def _detector_name(detector: Detector | None) -> str | None:
    if detector is None:
        return None
    name = getattr(detector, "__qualname__", None) or type(detector).__qualname__
    return f"{getattr(detector, '__module__', '?')}.{name}"


@dataclass
class _Pool:
    """Every face the given paths offer, plus what the data hash needs to know about them."""

    candidates: list[_Candidate]
    sources: list[dict[str, Any]]
    listed: list[str]  # "kind:label" of every file found, in path order
    used_files: dict[str, str]  # label -> sha256 of the bytes used


def _gather(
    paths: PathLike | Sequence[PathLike],
    detector: Detector | None,
    aligned: bool,
    frame_step: int,
    max_faces_per_source: int,
) -> _Pool:
    roots = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    if not roots:
        raise InputError("no calibration paths given")
    pool = _Pool([], [], [], {})
    for position, root in enumerate(roots):
        files = find_files(root, aligned=aligned)
        explicit_file = os.path.isfile(root)
        entry: dict[str, Any] = {"path": str(root), "files": len(files), "faces": 0, "skipped_videos": 0}
        for source in files:
            # Labels are relative to the path given, prefixed by its position so two folders that share a
            # name stay distinct; the hash does not depend on where the data lives on disk.
            label = f"{position}:{source.label}"
            if source.kind == "aligned":
                pool.candidates.append(_Candidate(label, source))
                pool.listed.append(f"{source.kind}:{label}")
                entry["faces"] += 1
                continue
            if detector is None and not explicit_file and source.kind == "video":
                entry["skipped_videos"] += 1
                continue
            pool.listed.append(f"{source.kind}:{label}")
            faces = faces_from_source(source, detector, frame_step, max_faces_per_source, ALIGNED_SIZE)
            pool.used_files[label] = sha256_file(source.path)
            pool.candidates.extend(_Candidate(f"{label}#{i}", source, crop) for i, crop in enumerate(faces))
            entry["faces"] += len(faces)
        pool.sources.append(entry)
    if not pool.candidates:
        where = ", ".join(str(r) for r in roots)
        reason = "no faces detected" if detector is not None else "no aligned face images (videos need a detector)"
        raise InputError(f"{where}: {reason}")
    return pool


def _calibration_order(size: int, seed: int) -> np.ndarray:
    """The seeded order in which calibration takes faces (the hold-out set takes from its far end)."""
    select_seq = np.random.SeedSequence(seed).spawn(2)[0]
    return np.random.default_rng(select_seq).permutation(size)


def _materialize(
    pool: _Pool,
    chosen: np.ndarray,
    config: DegradeConfig | None,
    degrade_rng: np.random.Generator,
    seed: int,
    input_size: int,
    interpolation: str,
) -> tuple[np.ndarray, int, dict[str, Any] | None]:
    """Read, degrade and pre-process the chosen faces; returns (batch, unique faces, degradation summary)."""
    crops: dict[int, np.ndarray] = {}
    for index in dict.fromkeys(int(i) for i in chosen):
        candidate = pool.candidates[index]
        if candidate.crop is not None:
            crops[index] = candidate.crop
            continue
        data = read_bytes(candidate.source.path)
        pool.used_files[candidate.label] = hashlib.sha256(data).hexdigest()
        crops[index] = to_aligned(decode_image(data, candidate.source.path), ALIGNED_SIZE)
    faces = [crops[int(i)] for i in chosen]
    degradation: dict[str, Any] | None = None
    if config is not None:
        records = []
        for k, face in enumerate(faces):
            faces[k], record = degrade_face(face, degrade_rng, config)
            records.append(record)
        degradation = summarize(records, seed, config)
    return preprocess_batch(faces, input_size, interpolation), len(crops), degradation


def _data_hash(parameters: dict[str, Any], pool: _Pool) -> str:
    digest = hashlib.sha256(json.dumps(parameters, sort_keys=True).encode())
    for listed_file in pool.listed:
        digest.update(f"\n{listed_file}".encode())
    for label in sorted(pool.used_files):
        digest.update(f"\n{label}={pool.used_files[label]}".encode())
    return digest.hexdigest()


def _degrade_config(degrade: bool | DegradeConfig) -> DegradeConfig | None:
    if isinstance(degrade, DegradeConfig):
        return degrade
    return DegradeConfig() if degrade else None


def _summary(parameters: dict[str, Any], pool: Any, batch: np.ndarray, unique: int, degradation: Any) -> dict[str, Any]:
    """What a face set was built from and how; ``data_hash`` identifies it for the calibration cache."""
    return {
        **parameters,
        "sources": pool.sources,
        "available_faces": len(pool.candidates),
        "unique_faces": unique,
        "samples": len(batch),
        "degradation": degradation,
        "data_hash": _data_hash(parameters, pool),
    }


def build_calibration_set(
    paths: PathLike | Sequence[PathLike],
    count: int = 256,
    seed: int = 0,
    degrade: bool | DegradeConfig = True,
    *,
    detector: Detector | None = None,
    aligned: bool = True,
    frame_step: int = 5,
    max_faces_per_source: int = 64,
    input_size: int = 120,
    interpolation: str = "pil-bicubic",
) -> tuple[np.ndarray, dict[str, Any]]:
    """Calibration batch (count, 3, input_size, input_size) float32 and its summary.

    ``paths``: folders of aligned crops (any depth) or single files. Images are aligned crops unless
    ``aligned=False``, in which case they are scenes passed through ``detector``; videos always go through
    ``detector`` (inside folders they are skipped when there is none). With more faces than ``count`` a
    seeded random subset is used; with fewer, ``degrade`` cycles through them again with fresh
    degradations, and without degradation only the distinct faces are returned.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, not {count}")
    config = _degrade_config(degrade)
    pool = _gather(paths, detector, aligned, frame_step, max_faces_per_source)
    order = _calibration_order(len(pool.candidates), seed)
    if len(order) >= count:
        chosen = order[:count]
    elif config is not None:
        chosen = np.resize(order, count)  # cycle: each repeat gets its own degradation
    else:
        chosen = order
    degrade_rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(2)[1])
    batch, unique, degradation = _materialize(pool, chosen, config, degrade_rng, seed, input_size, interpolation)

    parameters = {
        "format": DATASET_FORMAT,
        "count": count,
        "seed": seed,
        "degrade": config.to_dict() if config is not None else None,
        "aligned": aligned,
        "detector": _detector_name(detector),
        "frame_step": frame_step,
        "max_faces_per_source": max_faces_per_source,
        "input_size": input_size,
        "interpolation": interpolation,
    }
    return batch, _summary(parameters, pool, batch, unique, degradation)


def build_holdout_set(
    paths: PathLike | Sequence[PathLike],
    count: int = 32,
    seed: int = 1,
    degrade: bool | DegradeConfig = True,
    *,
    calibration_count: int = 256,
    calibration_seed: int = 0,
    detector: Detector | None = None,
    aligned: bool = True,
    frame_step: int = 5,
    max_faces_per_source: int = 64,
    input_size: int = 120,
    interpolation: str = "pil-bicubic",
) -> tuple[np.ndarray, dict[str, Any]]:
    """Faces from the same paths that ``build_calibration_set`` did *not* use, for parity checks.

    Pass the calibration's ``count`` and ``seed`` as ``calibration_count``/``calibration_seed``: the faces
    calibration took are re-derived and left out (the defaults match ``build_calibration_set``'s). When
    calibration used every face there is nothing to hold out and the batch is empty (0, 3, S, S). Degraded
    like probes by default, with ``seed`` driving the pick among the remaining faces and the degradations.
    Frames of one video are near-duplicates: a video split between the two sets is not a clean hold-out.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, not {count}")
    config = _degrade_config(degrade)
    pool = _gather(paths, detector, aligned, frame_step, max_faces_per_source)
    remaining = _calibration_order(len(pool.candidates), calibration_seed)[calibration_count:]
    pick_seq, degrade_seq = np.random.SeedSequence([seed, 1]).spawn(2)
    chosen = np.random.default_rng(pick_seq).permutation(remaining)[:count]
    batch, unique, degradation = _materialize(
        pool, chosen, config, np.random.default_rng(degrade_seq), seed, input_size, interpolation
    )
    parameters = {
        "format": DATASET_FORMAT,
        "role": "holdout",
        "count": count,
        "seed": seed,
        "calibration_count": calibration_count,
        "calibration_seed": calibration_seed,
        "degrade": config.to_dict() if config is not None else None,
        "aligned": aligned,
        "detector": _detector_name(detector),
        "frame_step": frame_step,
        "max_faces_per_source": max_faces_per_source,
        "input_size": input_size,
        "interpolation": interpolation,
    }
    return batch, _summary(parameters, pool, batch, unique, degradation)


__all__ = ["DATASET_FORMAT", "build_calibration_set", "build_holdout_set"]
