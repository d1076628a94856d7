"""INT8 calibration data: low-resolution face sets from folders or videos, degradations, range cache.

Public API:

* ``build_calibration_set(paths, count=256, seed=0, degrade=True, ...)`` -> (batch, summary)
* ``build_holdout_set(paths, count=32, seed=1, calibration_count=256, calibration_seed=0, ...)``: faces
  calibration did not use, for parity
* ``CalibrationCache(directory)``: activation ranges keyed by model, data, method and parameters
* ``DegradeConfig``, ``degrade_face``, ``degrade_faces``: the probe-like degradations
* ``find_files``, ``read_image``, ``load_aligned_face``, ``Detector``: the sources
"""

from __future__ import annotations

from facemoe.calibration.cache import CalibrationCache, model_hash
from facemoe.calibration.dataset import build_calibration_set, build_holdout_set
from facemoe.calibration.degrade import DegradeConfig, degrade_face, degrade_faces
from facemoe.calibration.sources import Detector, find_files, load_aligned_face, read_image

__all__ = [
    "CalibrationCache",
    "DegradeConfig",
    "Detector",
    "build_calibration_set",
    "build_holdout_set",
    "degrade_face",
    "degrade_faces",
    "find_files",
    "load_aligned_face",
    "model_hash",
    "read_image",
]
