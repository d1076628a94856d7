"""Build the INT8 calibration batch: pick faces, degrade them like low-resolution probes, pre-process.

The result is reproducible: the same files, seed and parameters give the same batch bit for bit, and the
summary's ``data_hash`` (sha256 over the file list, the contents of the files used, the seed and every
parameter) identifies it in the bundle manifest and in the calibration cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from facemoe.calibration.degrade import DegradeConfig, degrade_face, summarize
from facemoe.calibration.detect import Detector
from facemoe.calibration.pool import FacePool, gather_faces, read_candidate
from facemoe.preprocess import preprocess_batch

DATASET_FORMAT = 2
# Below this many distinct source faces the calibration summary carries a warning (printed by the export).
# Per-tensor activation ranges are set by the faces' variety (identity, pose, light, background), which
# degradation does not add: it only varies resolution, blur, noise and JPEG. 64 keeps the default 256
# samples at no more than 4 degraded copies of each face, and is the per-source cap a single video gets, so
# one clip alone is never "enough".
MIN_DISTINCT_FACES = 64

PathLike = str | os.PathLike[str]
Warn = Callable[[str], None]

log = logging.getLogger(__name__)


def _pool(
    paths: FacePool | PathLike | Sequence[PathLike],
    detector: Detector | None,
    aligned: bool | None,
    frame_step: int,
    max_faces_per_source: int,
) -> FacePool:
    if isinstance(paths, FacePool):
        return paths
    return gather_faces(
        paths, detector=detector, aligned=aligned, frame_step=frame_step, max_faces_per_source=max_faces_per_source
    )


def _calibration_order(size: int, seed: int) -> np.ndarray:
    """The seeded order in which calibration takes faces (the hold-out set takes from its far end)."""
    select_seq = np.random.SeedSequence(seed).spawn(2)[0]
    return np.random.default_rng(select_seq).permutation(size)


def _materialize(
    pool: FacePool,
    chosen: np.ndarray,
    config: DegradeConfig | None,
    degrade_rng: np.random.Generator,
    seed: int,
    input_size: int,
    interpolation: str,
) -> tuple[np.ndarray, int, dict[str, Any] | None, dict[str, str]]:
    """Read, degrade and pre-process the chosen faces.

    Returns (batch, unique faces used, degradation summary, sha256 of every file whose content is in it).
    """
    crops: dict[int, np.ndarray] = {}
    used_files = dict(pool.used_files)  # a copy: the pool serves several sets, each hashes what it used
    stacks: dict[str, np.ndarray] = {}
    for index in dict.fromkeys(int(i) for i in chosen):
        candidate = pool.candidates[index]
        crops[index], digest = read_candidate(candidate, stacks)
        if digest is not None:
            used_files[candidate.label] = digest
    faces = [crops[int(i)] for i in chosen]
    degradation: dict[str, Any] | None = None
    if config is not None:
        records = []
        for k, face in enumerate(faces):
            faces[k], record = degrade_face(face, degrade_rng, config)
            records.append(record)
        degradation = summarize(records, seed, config)
    return preprocess_batch(faces, input_size, interpolation), len(crops), degradation, used_files


def _data_hash(parameters: dict[str, Any], pool: FacePool, used_files: dict[str, str]) -> str:
    digest = hashlib.sha256(json.dumps(parameters, sort_keys=True).encode())
    for listed_file in pool.listed:
        digest.update(f"\n{listed_file}".encode())
    for label in sorted(used_files):
        digest.update(f"\n{label}={used_files[label]}".encode())
    return digest.hexdigest()


def _degrade_config(degrade: bool | DegradeConfig) -> DegradeConfig | None:
    if isinstance(degrade, DegradeConfig):
        return degrade
    return DegradeConfig() if degrade else None


def _summary(
    parameters: dict[str, Any],
    pool: FacePool,
    batch: np.ndarray,
    unique: int,
    degradation: dict[str, Any] | None,
    used_files: dict[str, str],
    warnings: list[str],
) -> dict[str, Any]:
    """What a face set was built from and how; ``data_hash`` identifies it for the calibration cache."""
    return {
        **parameters,
        "sources": pool.sources,
        "distinct_faces": pool.distinct_faces,
        "min_distinct_faces": MIN_DISTINCT_FACES,
        "unique_faces": unique,
        "samples": len(batch),
        "degradation": degradation,
        "warnings": warnings,
        "data_hash": _data_hash(parameters, pool, used_files),
    }


def few_faces_warning(distinct: int, samples: int, files: int) -> str | None:
    if distinct >= MIN_DISTINCT_FACES:
        return None
    plural = "s" if files != 1 else ""
    return (
        f"calibration: only {distinct} distinct source faces (from {files} file{plural}) for {samples} samples, "
        f"below the minimum of {MIN_DISTINCT_FACES}; INT8 ranges will fit these few faces: add aligned crops, "
        "photos or videos of more people to --calib"
    )


def build_calibration_set(
    paths: FacePool | PathLike | Sequence[PathLike],
    count: int = 256,
    seed: int = 0,
    degrade: bool | DegradeConfig = True,
    *,
    detector: Detector | None = None,
    aligned: bool | None = None,
    frame_step: int = 5,
    max_faces_per_source: int = 64,
    input_size: int = 120,
    interpolation: str = "pil-bicubic",
    warn: Warn | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Calibration batch (count, 3, input_size, input_size) float32 and its summary.

    ``paths``: a ``FacePool`` from ``gather_faces`` (then ``detector``, ``aligned``, ``frame_step`` and
    ``max_faces_per_source`` are the pool's), or files and folders, gathered with those arguments (see
    ``facemoe.calibration.pool``). With more faces than ``count`` a seeded random subset is used; with
    fewer, ``degrade`` cycles through them again with fresh degradations, and without degradation only the
    distinct faces are returned. Fewer than ``MIN_DISTINCT_FACES`` distinct faces, and files that were
    skipped, are reported through ``warn`` (default: this module's logger) and listed in the summary's
    ``warnings``.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, not {count}")
    config = _degrade_config(degrade)
    pool = _pool(paths, detector, aligned, frame_step, max_faces_per_source)
    order = _calibration_order(pool.distinct_faces, seed)
    if len(order) >= count:
        chosen = order[:count]
    elif config is not None:
        chosen = np.resize(order, count)  # cycle: each repeat gets its own degradation
    else:
        chosen = order
    degrade_rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(2)[1])
    batch, unique, degradation, used = _materialize(pool, chosen, config, degrade_rng, seed, input_size, interpolation)

    parameters = {
        "format": DATASET_FORMAT,
        "count": count,
        "seed": seed,
        "degrade": config.to_dict() if config is not None else None,
        **pool.parameters,
        "input_size": input_size,
        "interpolation": interpolation,
    }
    files = sum(entry["files"] for entry in pool.sources)
    few = few_faces_warning(pool.distinct_faces, len(batch), files)
    warnings = [*pool.warnings, *([few] if few else [])]
    for message in warnings:
        (warn or log.warning)(message)
    return batch, _summary(parameters, pool, batch, unique, degradation, used, warnings)


def build_holdout_set(
    paths: FacePool | PathLike | Sequence[PathLike],
    count: int = 32,
    seed: int = 1,
    degrade: bool | DegradeConfig = True,
    *,
    calibration_count: int = 256,
    calibration_seed: int = 0,
    detector: Detector | None = None,
    aligned: bool | None = None,
    frame_step: int = 5,
    max_faces_per_source: int = 64,
    input_size: int = 120,
    interpolation: str = "pil-bicubic",
) -> tuple[np.ndarray, dict[str, Any]]:
    """Faces from the same sources that ``build_calibration_set`` did *not* use, for parity checks.

    Pass the same ``FacePool`` (or paths) and the calibration's ``count`` and ``seed`` as
    ``calibration_count``/``calibration_seed``: the faces calibration took are re-derived and left out (the
    defaults match ``build_calibration_set``'s). When calibration used every face there is nothing to hold
    out and the batch is empty (0, 3, S, S). Degraded like probes by default, with ``seed`` driving the pick
    among the remaining faces and the degradations. Faces of one video are alike: a video split between
    the two sets is not a clean hold-out. Warnings are not repeated here (calibration reports them).
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, not {count}")
    config = _degrade_config(degrade)
    pool = _pool(paths, detector, aligned, frame_step, max_faces_per_source)
    remaining = _calibration_order(pool.distinct_faces, calibration_seed)[calibration_count:]
    pick_seq, degrade_seq = np.random.SeedSequence([seed, 1]).spawn(2)
    chosen = np.random.default_rng(pick_seq).permutation(remaining)[:count]
    batch, unique, degradation, used = _materialize(
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
        **pool.parameters,
        "input_size": input_size,
        "interpolation": interpolation,
    }
    return batch, _summary(parameters, pool, batch, unique, degradation, used, list(pool.warnings))


__all__ = ["DATASET_FORMAT", "MIN_DISTINCT_FACES", "build_calibration_set", "build_holdout_set", "few_faces_warning"]
