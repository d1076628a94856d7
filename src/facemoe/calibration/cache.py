"""Calibration cache: activation ranges keyed by model, calibration data, method and parameters.

Calibrating the full model on the CPU takes minutes, and re-exporting (another opset, another placement
option, a rebuilt bundle) should not repeat it. An entry is two files, ``<key>.npz`` (the amax values) and
``<key>.json`` (tensor names, what the key was made of, the npz checksum). Both are written atomically,
json last: a reader that finds the json finds the matching npz, and an npz whose checksum does not match
(a crash between the two writes, a manual edit) is treated as a miss, never as ranges.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from facemoe import __version__, userdirs
from facemoe.fileio import atomic_path, sha256_file, write_json_atomic

CACHE_FORMAT = 1


def default_directory() -> Path:
    """Where ``facemoe-export`` caches calibration ranges unless told otherwise (honours ``$FACEMOE_CACHE``)."""
    return userdirs.cache_dir("calibration")


def model_hash(path: str | os.PathLike[str]) -> str:
    """sha256 over an ONNX file and the external data files it references."""
    import onnx

    path = Path(path)
    digest = hashlib.sha256(sha256_file(path).encode())
    proto = onnx.load(str(path), load_external_data=False)
    locations = sorted(
        {
            entry.value
            for init in proto.graph.initializer
            if init.data_location == onnx.TensorProto.EXTERNAL
            for entry in init.external_data
            if entry.key == "location"
        }
    )
    for location in locations:
        digest.update(location.encode())
        digest.update(sha256_file(path.parent / location).encode())
    return digest.hexdigest()


class CalibrationCache:
    """Directory of cached activation ranges; ``hits``/``misses``/``writes`` count this object's use."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.hits = 0
        self.misses = 0
        self.writes = 0
        self._components: dict[str, dict[str, Any]] = {}

    def key(self, model_hash: str, data_hash: str, method: str, params: dict[str, Any]) -> str:
        components = {
            "format": CACHE_FORMAT,
            "model_hash": model_hash,
            "data_hash": data_hash,
            "method": method,
            "params": params,
        }
        key = hashlib.sha256(json.dumps(components, sort_keys=True).encode()).hexdigest()[:32]
        self._components[key] = components
        return key

    def _paths(self, key: str) -> tuple[Path, Path]:
        return self.directory / f"{key}.npz", self.directory / f"{key}.json"

    def _read(self, key: str) -> dict[str, float] | None:
        npz_path, json_path = self._paths(key)
        try:
            meta = json.loads(json_path.read_text())
            if meta.get("format") != CACHE_FORMAT or sha256_file(npz_path) != meta.get("npz_sha256"):
                return None
            with np.load(npz_path) as data:
                values = data["amax"]
            names = list(meta["tensors"])
        except (OSError, ValueError, KeyError):
            return None
        if len(names) != len(values) or not np.all(np.isfinite(values)):
            return None
        return {name: float(v) for name, v in zip(names, values, strict=True)}

    def load(self, key: str, tensors: Iterable[str] | None = None) -> dict[str, float] | None:
        """Cached ranges for ``key`` covering all of ``tensors``, or None (a miss)."""
        ranges = self._read(key)
        if ranges is not None and tensors is not None and not set(tensors) <= set(ranges):
            ranges = None
        if ranges is None:
            self.misses += 1
        else:
            self.hits += 1
        return ranges

    def save(self, key: str, ranges: dict[str, float], meta: dict[str, Any] | None = None) -> None:
        # Same key = same model, data and method, so ranges cached for other tensors stay valid: keep them.
        merged = {**(self._read(key) or {}), **ranges}
        names = list(merged)
        npz_path, json_path = self._paths(key)
        self.directory.mkdir(parents=True, exist_ok=True)
        with atomic_path(npz_path) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, amax=np.array([merged[n] for n in names], dtype=np.float64))
        record: dict[str, Any] = {
            "format": CACHE_FORMAT,
            "key": key,
            **self._components.get(key, {}),
            **(meta or {}),
            "tensors": names,
            "npz_sha256": sha256_file(npz_path),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "facemoe_version": __version__,
        }
        write_json_atomic(json_path, record)
        self.writes += 1

    def entries(self) -> list[dict[str, Any]]:
        found = []
        for path in sorted(self.directory.glob("*.json")):
            try:
                found.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue
        return found


__all__ = ["CACHE_FORMAT", "CalibrationCache", "model_hash"]
