"""Calibration faces with the real RetinaFace detector: distinct-face counts, aligned-or-scene decisions,
near-duplicate video frames, one detection pass per source, and what the export's manifest records."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from facemoe.calibration import (
    MIN_DISTINCT_FACES,
    FaceDetector,
    build_calibration_set,
    build_holdout_set,
    gather_faces,
)
from facemoe.calibration.detect import thumbnail

from calib_fixtures import CARPHONE, DATA_DIR, background, carphone_frames, scene_with, write_face_video

HANKS = DATA_DIR / "Tom_Hanks_54745.png"
ASTRONAUT = DATA_DIR / "astronaut_aligned_112.png"


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    return FaceDetector()


def _image(path: Path) -> np.ndarray:
    image = cv2.imread(str(path))
    assert image is not None, path
    return image


def _distance(a: np.ndarray, b: np.ndarray) -> float:
    return 1.0 - float(thumbnail(a) @ thumbnail(b))


def _by_file(pool_or_summary: object) -> dict[str, dict]:  # type: ignore[type-arg]
    sources = getattr(pool_or_summary, "sources", None) or pool_or_summary["sources"]  # type: ignore[index]
    return {r["file"].rsplit("/", 1)[-1]: r for entry in sources for r in entry["per_file"]}


def test_shipped_test_faces_count_and_few_faces_warning(tmp_path: Path, detector: FaceDetector) -> None:
    # tests/data/calib: two ArcFace crops and a stack of 100 LFW faces = 102 distinct faces, no warning.
    told: list[str] = []
    batch, summary = build_calibration_set(DATA_DIR, count=256, detector=detector, warn=told.append)
    files = _by_file(summary)
    assert summary["distinct_faces"] == 102 and summary["unique_faces"] == 102 and summary["samples"] == 256
    assert len(batch) == 256 and told == [] and summary["warnings"] == []
    assert files["lfw_faces_25x25.npy"]["decision"] == "stack" and files["lfw_faces_25x25.npy"]["faces"] == 100
    for name in (HANKS.name, ASTRONAUT.name):  # both are confirmed on the template, not just assumed
        assert files[name]["decision"] == "aligned" and files[name]["reason"].startswith("a face on the ArcFace")

    # The two crops alone: 2 distinct faces stretched to 256 samples, and the summary says so.
    two = tmp_path / "two"
    two.mkdir()
    for path in (HANKS, ASTRONAUT):
        shutil.copy(path, two / path.name)
    _, summary = build_calibration_set(two, count=256, detector=detector, warn=told.append)
    assert summary["distinct_faces"] == 2 and summary["samples"] == 256 and summary["unique_faces"] == 2
    assert told == summary["warnings"] and len(told) == 1
    assert (
        f"only 2 distinct source faces (from 2 files) for 256 samples, below the minimum of {MIN_DISTINCT_FACES}"
        in (told[0])
    )


def test_aligned_crop_or_scene(tmp_path: Path, detector: FaceDetector) -> None:
    hanks, astronaut = _image(HANKS), _image(ASTRONAUT)
    frame = carphone_frames(step=30)[1]
    images = {
        "hanks_112.png": hanks,  # an ArcFace crop as shipped
        "hanks_224.png": cv2.resize(hanks, (224, 224), interpolation=cv2.INTER_CUBIC),  # larger aligned crop
        "hanks_scene.png": scene_with([(hanks, 250, 120)], 420, 300),  # the crop pasted off-centre
        "astronaut_padded.png": cv2.resize(cv2.copyMakeBorder(astronaut, *[20] * 4, cv2.BORDER_REFLECT), (224, 224)),
        "carphone_frame.png": frame,  # 176x144 video frame, one real face
        "two_faces.png": scene_with([(hanks, 40, 70), (astronaut, 330, 100)], 500, 260, seed=1),
        "no_face.png": background(300, 200, seed=2),
        "lfw_25.png": cv2.cvtColor(np.load(DATA_DIR / "lfw_faces_25x25.npy")[0], cv2.COLOR_GRAY2BGR),
    }
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name, image in images.items():
        assert cv2.imwrite(str(folder / name), image)
    pool = gather_faces(folder, detector=detector)
    files = _by_file(pool)
    decided = {name: (r["decision"], r["faces"]) for name, r in files.items()}
    assert decided == {
        "hanks_112.png": ("aligned", 1),
        "hanks_224.png": ("aligned", 1),
        "hanks_scene.png": ("scene", 1),
        "astronaut_padded.png": ("scene", 1),  # a face, but 1.3x too small for the template: re-aligned
        "carphone_frame.png": ("scene", 1),
        "two_faces.png": ("scene", 2),
        "no_face.png": ("skipped", 0),
        "lfw_25.png": ("aligned", 1),  # too small for the detector: taken as a crop, and the reason says so
    }
    assert files["hanks_224.png"]["reason"] == "a face on the ArcFace template as it is"
    assert 0.88 < files["hanks_224.png"]["fit"]["scale"] < 1.12 and files["hanks_224.png"]["fit"]["offset_px"] < 6
    assert files["astronaut_padded.png"]["fit"]["scale"] > 1.2
    assert files["lfw_25.png"]["reason"] == "crop-sized (<= 160 px), no face detected"
    assert pool.distinct_faces == 8 and pool.sources[0]["decisions"] == {"aligned": 3, "scene": 4, "skipped": 1}
    assert pool.warnings == [f"{folder}: no face detected in 1 file(s): mixed/no_face.png"]

    # The scene's face comes out of the detector aligned like the original crop, not as a resized scene.
    scene_face = next(c.crop for c in pool.candidates if "hanks_scene" in c.label)
    assert scene_face.shape == (112, 112, 3)
    assert _distance(scene_face, hanks) < 0.1 < _distance(cv2.resize(images["hanks_scene.png"], (112, 112)), hanks)
    assert _distance(scene_face, astronaut) > 0.2

    # Forced modes: aligned=True resizes every image as it is; aligned=False sends every image through the
    # detector (the 25 px crop then gives nothing).
    forced = gather_faces(folder, detector=detector, aligned=True)
    assert forced.distinct_faces == 8 and forced.sources[0]["decisions"] == {"aligned": 8}
    scenes = gather_faces(folder, detector=detector, aligned=False)
    assert scenes.sources[0]["decisions"] == {"scene": 6, "skipped": 2} and scenes.distinct_faces == 7


def test_video_faces_and_near_duplicates(tmp_path: Path, detector: FaceDetector) -> None:
    every_5th = _by_file(gather_faces(CARPHONE, detector=detector))["carphone_pristine.mp4"]
    assert every_5th["frames_sampled"] == 24 and every_5th["detections"] == 24
    assert every_5th["faces"] + every_5th["near_duplicates"] == 24 and every_5th["faces"] >= 20

    # Every frame: consecutive frames of a talking head repeat themselves; they do not count twice.
    every = _by_file(gather_faces(CARPHONE, detector=detector, frame_step=1, max_faces_per_source=1000))
    clip = every["carphone_pristine.mp4"]
    assert clip["frames_sampled"] == 120 and clip["detections"] == 120
    assert clip["near_duplicates"] >= 30 and clip["faces"] + clip["near_duplicates"] == 120

    # A still subject: one distinct face however many frames show it.
    still = write_face_video(tmp_path / "still.avi", [_image(HANKS)], frames=20)
    record = _by_file(gather_faces(still, detector=detector, frame_step=2))["still.avi"]
    assert (record["detections"], record["faces"], record["near_duplicates"]) == (10, 1, 9)

    capped = gather_faces(CARPHONE, detector=detector, frame_step=1, max_faces_per_source=10)
    assert capped.distinct_faces == 10


class _Counting:
    """The real detector, counting the frames it is given."""

    def __init__(self, detector: FaceDetector) -> None:
        self.detector, self.calls, self.name = detector, 0, detector.name

    def __call__(self, frame: np.ndarray) -> list:  # type: ignore[type-arg]
        self.calls += 1
        return self.detector(frame)


def test_sources_are_read_and_detected_once(tmp_path: Path, detector: FaceDetector) -> None:
    counting = _Counting(detector)
    scene = tmp_path / "scene.png"
    cv2.imwrite(str(scene), scene_with([(_image(HANKS), 200, 90)], 400, 300))
    pool = gather_faces([CARPHONE, scene], detector=counting)
    assert counting.calls == 24 + 1
    distinct = pool.distinct_faces
    calibration, summary = build_calibration_set(pool, count=16, degrade=False, warn=lambda _: None)
    holdout, held = build_holdout_set(pool, count=32, degrade=False, calibration_count=16)
    assert counting.calls == 24 + 1  # neither set decodes or detects again
    assert summary["distinct_faces"] == held["distinct_faces"] == distinct
    assert len(calibration) == 16 and len(holdout) == distinct - 16
    for face in holdout:
        assert not any(np.array_equal(face, used) for used in calibration)
    # Building from the shared pool gives the same data hash as building from the paths.
    _, fresh = build_calibration_set([CARPHONE, scene], count=16, degrade=False, detector=detector, warn=print)
    assert fresh["data_hash"] == summary["data_hash"]


def test_export_manifest_and_console_tell_the_truth(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from rich.console import Console

    from facemoe.cli.export_progress import RichExportReporter
    from facemoe.export.bundle_writer import CalibrationSpec, export_bundle
    from facemoe.model import build_model
    from facemoe.model.random_weights import randomize

    stream = io.StringIO()
    spec = CalibrationSpec(paths=[CARPHONE], count=16, cache_dir=tmp_path / "cache")
    export_bundle(
        randomize(build_model("tiny"), seed=0),
        tmp_path / "bundle",
        precisions=("fp32", "int8"),
        calib=spec,
        parity_count=8,
        enforce_gates=False,
        reporter=RichExportReporter(Console(file=stream, width=160), progress=False),
    )
    calibration = json.loads((tmp_path / "bundle" / "manifest.json").read_text())["calibration"]
    clip = calibration["sources"][0]["per_file"][0]
    assert calibration["distinct_faces"] == clip["faces"] and 20 <= clip["faces"] <= 24
    assert calibration["samples"] == 16 and calibration["min_distinct_faces"] == MIN_DISTINCT_FACES
    assert clip["decision"] == "video" and calibration["detector"].startswith("retinaface")
    [warning] = calibration["warnings"]
    assert f"only {clip['faces']} distinct source faces (from 1 file) for 16 samples" in warning
    printed = [line for line in stream.getvalue().splitlines() if "distinct source faces" in line]
    assert printed == [f"warning: {warning}"]
