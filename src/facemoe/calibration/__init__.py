"""INT8 calibration data: faces from crops, photos, videos and .npy stacks, degradations, range cache.

Public API:

* ``gather_faces(paths, detector=FaceDetector(), ...)`` -> ``FacePool``: every source read and detected
  once; distinct faces counted; aligned crop or scene decided per image
* ``build_calibration_set(pool_or_paths, count=256, seed=0, degrade=True, ...)`` -> (batch, summary)
* ``build_holdout_set(pool_or_paths, count=32, seed=1, calibration_count=256, calibration_seed=0, ...)``:
  faces calibration did not use, for parity
* ``MIN_DISTINCT_FACES``: below it the calibration summary carries a warning
* ``CalibrationCache(directory)``: activation ranges keyed by model, data, method and parameters
* ``DegradeConfig``, ``degrade_face``, ``degrade_faces``: the probe-like degradations
* ``FaceDetector``, ``DetectedFace``, ``Detector``: the runtime's detector as a calibration hook
* ``find_files``, ``read_image``, ``load_aligned_face``: the sources
"""

from __future__ import annotations

from facemoe.calibration.cache import CalibrationCache, model_hash
from facemoe.calibration.dataset import MIN_DISTINCT_FACES, build_calibration_set, build_holdout_set
from facemoe.calibration.degrade import DegradeConfig, degrade_face, degrade_faces
from facemoe.calibration.detect import DetectedFace, Detector, FaceDetector
from facemoe.calibration.pool import FacePool, gather_faces
from facemoe.calibration.sources import find_files, load_aligned_face, read_image

__all__ = [
    "MIN_DISTINCT_FACES",
    "CalibrationCache",
    "DegradeConfig",
    "DetectedFace",
    "Detector",
    "FaceDetector",
    "FacePool",
    "build_calibration_set",
    "build_holdout_set",
    "degrade_face",
    "degrade_faces",
    "find_files",
    "gather_faces",
    "load_aligned_face",
    "model_hash",
    "read_image",
]
