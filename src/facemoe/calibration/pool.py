"""Gather calibration faces: every source read and detected once, aligned-or-scene decided, faces counted.

``gather_faces`` returns a ``FacePool`` that both the calibration set and the parity hold-out set draw from,
so an export decodes and detects each video and scene image once, with one detector.

What counts as one distinct source face (docs/EXPORT.md#calibration-faces):

* an image that is an aligned crop: one face;
* a scene image: one per face the detector finds;
* a video: one per face detected in each sampled frame (every ``frame_step``-th), except near-duplicates
  of a face already kept from the same video (a still subject gives the same crop frame after frame);
* a ``.npy`` stack: N faces, taken as aligned crops as they are.

Images are decided one by one (``aligned=None``, the default) with the detector:

* a face that a plain resize (``to_aligned``) already puts on the ArcFace template makes the image an
  aligned crop, used as it is; in an image that is not crop-sized (square or 96 x 112, at most
  ``SMALL_CROP_SIDE`` px) it must be the only face;
* otherwise every detected face is aligned from its landmarks: the image is a scene;
* with no face detected, a crop-sized image is still an aligned crop (tiny crops defeat the detector) and
  a larger one is skipped.

Without a detector, crop-sized images are taken as aligned crops unchecked; larger images and videos are
skipped (an error when the file was named directly). ``aligned=True`` takes every image as a crop,
``aligned=False`` every image as a scene.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from facemoe.calibration.detect import (
    NEAR_DUPLICATE_DISTANCE,
    DetectedFace,
    Detector,
    DistinctFaces,
    detector_name,
    on_template,
    template_fit,
)
from facemoe.calibration.sources import (
    ALIGNED_SIZE,
    SourceFile,
    decode_image,
    find_files,
    iter_video_frames,
    open_stack,
    read_bytes,
    stack_face,
    to_aligned,
    to_bgr8,
)
from facemoe.errors import InputError
from facemoe.fileio import sha256_file

PathLike = str | os.PathLike[str]

# Aligned crops ship at 112 (ArcFace), 96 x 112 (SphereFace), 128-160 (re-scaled dataset releases). An image
# that size and shape in which the detector finds no face is still taken as a crop: tiny or poor crops
# defeat the detector, and a scene that small holds no face worth calibrating on anyway.
SMALL_CROP_SIDE = 160
# Per-file decisions listed in the summary for each given path; the counts always cover every file.
MAX_LISTED_FILES = 100


@dataclass
class Candidate:
    """One distinct face; ``crop`` is set for detected faces, files and stack rows are read when chosen."""

    label: str
    source: SourceFile
    crop: np.ndarray | None = None
    index: int | None = None  # row of a .npy stack


@dataclass
class FacePool:
    """Every distinct face the given paths offer, with what was decided per file and what the hash needs."""

    candidates: list[Candidate]
    sources: list[dict[str, Any]]  # per given path
    listed: list[str]  # "decision:label" of every file found, in path order
    used_files: dict[str, str]  # label -> sha256 of files whose content decided something
    parameters: dict[str, Any]
    warnings: list[str] = field(default_factory=list)

    @property
    def distinct_faces(self) -> int:
        return len(self.candidates)


def _detect(detector: Detector, frame: np.ndarray, source: SourceFile) -> list[DetectedFace]:
    """Run the hook; plain crops (no landmarks) are accepted and brought to the aligned size."""
    faces = []
    for found in detector(frame):
        if isinstance(found, DetectedFace):
            crop, landmarks, score = found.crop, found.landmarks, found.score
        else:
            crop, landmarks, score = np.asarray(found), None, None
        if crop.ndim not in (2, 3) or crop.size == 0:
            raise InputError(f"{source.path}: the detector returned a crop of shape {crop.shape}, not an image")
        faces.append(DetectedFace(to_aligned(to_bgr8(crop, source.path), ALIGNED_SIZE), landmarks, score))
    return faces


def _is_small_crop(height: int, width: int) -> bool:
    return max(height, width) <= SMALL_CROP_SIDE and (height == width or height * 96 == width * 112)


class _Gatherer:
    def __init__(self, detector: Detector | None, aligned: bool | None, frame_step: int, max_faces: int) -> None:
        self.detector = detector
        self.aligned = aligned
        self.frame_step = frame_step
        self.max_faces = max_faces
        self.pool = FacePool([], [], [], {}, {})

    def _add(self, label: str, source: SourceFile, crop: np.ndarray | None = None, index: int | None = None) -> None:
        self.pool.candidates.append(Candidate(label, source, crop, index))

    def image(self, source: SourceFile, label: str, explicit: bool) -> dict[str, Any]:
        data = read_bytes(source.path)
        image = decode_image(data, source.path)
        self.pool.used_files[label] = _sha256(data)  # its content decides what it is
        height, width = image.shape[:2]
        small = _is_small_crop(height, width)
        record: dict[str, Any] = {"file": source.label, "size": [width, height]}
        aligned = {**record, "decision": "aligned", "faces": 1}
        if self.aligned is True:
            self._add(label, source)  # re-read when chosen: folders of crops can be large
            return {**aligned, "reason": "aligned=True"}
        if self.detector is None:
            if small and self.aligned is None:
                self._add(label, source)
                return {**aligned, "reason": f"crop-sized (<= {SMALL_CROP_SIDE} px), not checked: no detector"}
            if explicit:
                raise InputError(f"{source.path}: a {width}x{height} scene image needs a face detector")
            return {**record, "decision": "skipped", "reason": "scene, no detector", "faces": 0}
        faces = _detect(self.detector, image, source)
        if self.aligned is None:
            fits = [template_fit(f.landmarks, height, width) if f.landmarks is not None else None for f in faces]
            # A crop may show part of a second face at its border; a larger image must hold only the one.
            on = [fit for fit in fits if fit is not None and on_template(fit)]
            if on and (small or len(faces) == 1):
                self._add(label, source)
                return {**aligned, "reason": "a face on the ArcFace template as it is", "fit": on[0]}
            if not faces and small:
                self._add(label, source)
                return {**aligned, "reason": f"crop-sized (<= {SMALL_CROP_SIDE} px), no face detected"}
            if fits and fits[0] is not None:
                record["fit"] = fits[0]
        if not faces:
            return {**record, "decision": "skipped", "reason": "no face detected", "faces": 0}
        kept = faces[: self.max_faces]
        for i, face in enumerate(kept):
            self._add(f"{label}#{i}", source, face.crop)
        if self.aligned is False:
            reason = "aligned=False"
        elif small and len(faces) == 1:
            reason = "crop-sized, but its face is off the ArcFace template: re-aligned from its landmarks"
        else:
            reason = f"{len(faces)} face(s) detected, aligned from their landmarks"
        return {**record, "decision": "scene", "reason": reason, "faces": len(kept)}

    def video(self, source: SourceFile, label: str, explicit: bool) -> dict[str, Any]:
        record: dict[str, Any] = {"file": source.label}
        if self.detector is None:
            if explicit:
                raise InputError(f"{source.path}: videos need a face detector (detector=...)")
            return {**record, "decision": "skipped", "reason": "video, no detector", "faces": 0}
        distinct = DistinctFaces()
        frames = detections = kept = 0
        for _, frame in iter_video_frames(source.path, self.frame_step):
            frames += 1
            for face in _detect(self.detector, frame, source):
                detections += 1
                if distinct.add(face.crop):
                    self._add(f"{label}#{kept}", source, face.crop)
                    kept += 1
            if kept >= self.max_faces:
                break
        self.pool.used_files[label] = sha256_file(source.path)
        return {
            **record,
            "decision": "video" if kept else "skipped",
            "reason": f"1 frame in {self.frame_step}" if kept else "no face detected",
            "frames_sampled": frames,
            "detections": detections,
            "near_duplicates": distinct.duplicates,
            "faces": kept,
        }

    def stack(self, source: SourceFile, label: str) -> dict[str, Any]:
        rows = open_stack(source.path)
        self.pool.used_files[label] = sha256_file(source.path)
        for i in range(len(rows)):
            self._add(f"{label}#{i}", source, index=i)
        shape = list(rows.shape[1:])
        return {"file": source.label, "decision": "stack", "reason": f"aligned crops {shape}", "faces": len(rows)}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _path_warnings(root: PathLike, records: list[dict[str, Any]]) -> list[str]:
    warnings = []
    no_detector = [r for r in records if r["decision"] == "skipped" and "no detector" in r["reason"]]
    if no_detector:
        warnings.append(f"{root}: {len(no_detector)} video(s) or scene image(s) skipped: they need a face detector")
    no_face = [r for r in records if r["reason"] == "no face detected"]
    if no_face:
        names = ", ".join(r["file"] for r in no_face[:3]) + (", ..." if len(no_face) > 3 else "")
        warnings.append(f"{root}: no face detected in {len(no_face)} file(s): {names}")
    return warnings


def gather_faces(
    paths: PathLike | Sequence[PathLike],
    *,
    detector: Detector | None = None,
    aligned: bool | None = None,
    frame_step: int = 5,
    max_faces_per_source: int = 64,
) -> FacePool:
    """Read (and detect) every source under ``paths`` once; see the module docstring for the rules."""
    roots = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    if not roots:
        raise InputError("no calibration paths given")
    if frame_step < 1 or max_faces_per_source < 1:
        raise ValueError("frame_step and max_faces_per_source must be >= 1")
    gatherer = _Gatherer(detector, aligned, frame_step, max_faces_per_source)
    pool = gatherer.pool
    pool.parameters = {
        "aligned": aligned,
        "small_crop_side": SMALL_CROP_SIDE,
        "detector": detector_name(detector),
        "frame_step": frame_step,
        "max_faces_per_source": max_faces_per_source,
        "near_duplicate_distance": NEAR_DUPLICATE_DISTANCE,
    }
    for position, root in enumerate(roots):
        files = find_files(root)
        explicit = os.path.isfile(root)
        records = []
        for source in files:
            # Labels are relative to the path given, prefixed by its position so two folders that share a
            # name stay distinct; the hash does not depend on where the data lives on disk.
            label = f"{position}:{source.label}"
            if source.kind == "image":
                record = gatherer.image(source, label, explicit)
            elif source.kind == "video":
                record = gatherer.video(source, label, explicit)
            else:
                record = gatherer.stack(source, label)
            records.append(record)
            pool.listed.append(f"{record['decision']}:{label}")
        decisions: dict[str, int] = {}
        for record in records:
            decisions[record["decision"]] = decisions.get(record["decision"], 0) + 1
        pool.sources.append(
            {
                "path": str(root),
                "files": len(files),
                "faces": sum(r["faces"] for r in records),
                "decisions": decisions,
                "per_file": records[:MAX_LISTED_FILES],
                "files_not_listed": max(0, len(records) - MAX_LISTED_FILES),
            }
        )
        pool.warnings.extend(_path_warnings(root, records))
    if not pool.candidates:
        where = ", ".join(str(r) for r in roots)
        reason = (
            "no faces detected" if detector is not None else "no aligned face crops (scenes and videos need a detector)"
        )
        raise InputError(f"{where}: {reason}")
    return pool


def read_candidate(candidate: Candidate, stacks: dict[str, np.ndarray]) -> tuple[np.ndarray, str | None]:
    """The aligned crop of a candidate, and the sha256 of the file it had to read (None if already held)."""
    if candidate.crop is not None:
        return candidate.crop, None
    path = candidate.source.path
    if candidate.index is not None:
        key = str(path)
        if key not in stacks:
            stacks[key] = open_stack(path)
        return stack_face(stacks[key], candidate.index, path, ALIGNED_SIZE), None
    data = read_bytes(path)
    return to_aligned(decode_image(data, path), ALIGNED_SIZE), _sha256(data)


__all__ = ["MAX_LISTED_FILES", "SMALL_CROP_SIDE", "Candidate", "FacePool", "gather_faces", "read_candidate"]
