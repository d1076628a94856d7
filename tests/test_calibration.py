"""Calibration sets: sources, degradations, the dataset builder and the range cache."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from facemoe.calibration import (
    MIN_DISTINCT_FACES,
    CalibrationCache,
    DegradeConfig,
    FaceDetector,
    build_calibration_set,
    build_holdout_set,
    degrade_faces,
    find_files,
)
from facemoe.calibration.degrade import degrade_face
from facemoe.calibration.sources import load_aligned_face, read_image, to_aligned
from facemoe.errors import InputError

from calib_fixtures import (
    background,
    make_aligned_face_folder,
    real_faces,
    write_face_video,
)


@pytest.fixture(scope="module")
def face_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_aligned_face_folder(tmp_path_factory.mktemp("faces") / "crops", count=30)


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    return FaceDetector()


def _high_frequency(image: np.ndarray) -> float:
    """Mean squared Laplacian: falls as detail is removed."""
    grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY).astype(np.float64)
    return float(np.mean(cv2.Laplacian(grey, cv2.CV_64F) ** 2))


# ------------------------------------------------------------------------------------------------ sources


def test_find_files_walks_nested_folders_and_ignores_other_files(face_folder: Path) -> None:
    files = find_files(face_folder)
    assert len(files) == 30
    assert {f.path.suffix for f in files} == {".png", ".jpg", ".bmp"}
    assert any("deeper" in f.label for f in files)
    assert [f.label for f in files] == sorted(f.label for f in files)
    assert all(f.kind == "image" for f in files)
    np.save(face_folder / "set_a" / "stack.npy", np.zeros((3, 25, 25), np.uint8))
    try:
        kinds = {f.label.rsplit("/", 1)[-1]: f.kind for f in find_files(face_folder)}
    finally:
        (face_folder / "set_a" / "stack.npy").unlink()
    assert kinds["stack.npy"] == "stack" and len(kinds) == 31


def test_odd_images_become_112_bgr_uint8(face_folder: Path) -> None:
    for source in find_files(face_folder):
        face = load_aligned_face(source.path)
        assert face.shape == (112, 112, 3) and face.dtype == np.uint8, source.path
    grey = read_image(next(p for p in face_folder.rglob("face_003.*")))
    assert grey.shape == (112, 112, 3) and np.array_equal(grey[..., 0], grey[..., 2])


def test_non_square_crops() -> None:
    face = real_faces()[0]
    sphereface = cv2.resize(face[:, 8:104], (96, 112))  # the 96x112 template is ArcFace's minus 8 px each side
    padded = to_aligned(sphereface)
    assert padded.shape == (112, 112, 3)
    assert np.all(padded[:, :8] == 0) and np.abs(padded[:, 8:104].astype(int) - face[:, 8:104]).mean() < 1
    wide = to_aligned(np.zeros((100, 300, 3), np.uint8))
    assert wide.shape == (112, 112, 3)


# ------------------------------------------------------------------------------------------- degradations


def test_degradations_are_deterministic_for_a_seed() -> None:
    faces = real_faces()[:12]
    first, summary_a = degrade_faces(faces, seed=7)
    second, summary_b = degrade_faces(faces, seed=7)
    other, _ = degrade_faces(faces, seed=8)
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    assert summary_a == summary_b and summary_a["seed"] == 7
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))
    assert summary_a["config"] == DegradeConfig().to_dict()
    assert 8 <= summary_a["size_px"]["min"] <= summary_a["size_px"]["max"] <= 32


def test_downsampling_reduces_resolution() -> None:
    only_resize = DegradeConfig(downsample_p=1.0, blur_p=0.0, noise_p=0.0, jpeg_p=0.0)
    rng = np.random.default_rng(0)
    for face in real_faces()[:2]:  # the two full-resolution colour crops
        degraded, record = degrade_face(face, rng, only_resize)
        size = record["size"]
        assert degraded.shape == face.shape and 8 <= size <= 32
        assert _high_frequency(degraded) < 0.5 * _high_frequency(face)
        # Information content is that of a size x size image: going down and up again changes little.
        again = cv2.resize(cv2.resize(degraded, (size, size), interpolation=cv2.INTER_AREA), (112, 112))
        original_again = cv2.resize(cv2.resize(face, (size, size), interpolation=cv2.INTER_AREA), (112, 112))
        assert np.abs(again.astype(int) - degraded).mean() < np.abs(original_again.astype(int) - face).mean()


def test_each_degradation_step_records_its_parameters() -> None:
    everything = DegradeConfig(downsample_p=1.0, blur_p=1.0, noise_p=1.0, jpeg_p=1.0)
    _, record = degrade_face(real_faces()[0], np.random.default_rng(1), everything)
    assert record["size"] is not None and record["blur_sigma"] is not None
    assert record["noise_sigma"] is not None and 20 <= record["jpeg_quality"] <= 90
    nothing = DegradeConfig(downsample_p=0.0, blur_p=0.0, noise_p=0.0, jpeg_p=0.0)
    face = real_faces()[0]
    same, record = degrade_face(face, np.random.default_rng(1), nothing)
    assert np.array_equal(same, face) and all(v is None for v in record.values())
    with pytest.raises(ValueError):
        DegradeConfig(min_size=40, max_size=32)


# ------------------------------------------------------------------------------------------------ dataset


def test_build_calibration_set(face_folder: Path) -> None:
    batch, summary = build_calibration_set(face_folder, count=16, seed=0)
    assert batch.shape == (16, 3, 120, 120) and batch.dtype == np.float32
    assert batch.min() >= -1.0 and batch.max() <= 1.0
    assert summary["samples"] == 16 and summary["distinct_faces"] == 30 and summary["unique_faces"] == 16
    assert summary["degradation"]["seed"] == 0 and len(summary["data_hash"]) == 64
    assert summary["sources"][0]["files"] == 30 and summary["sources"][0]["decisions"] == {"aligned": 30}
    # Without a detector, crops are taken as aligned unchecked, and the summary says so.
    assert all("not checked" in r["reason"] for r in summary["sources"][0]["per_file"])
    assert summary["min_distinct_faces"] == MIN_DISTINCT_FACES and len(summary["warnings"]) == 1

    again, summary_again = build_calibration_set(face_folder, count=16, seed=0)
    assert np.array_equal(batch, again) and summary_again["data_hash"] == summary["data_hash"]

    other_seed, summary_seed = build_calibration_set(face_folder, count=16, seed=1)
    assert summary_seed["data_hash"] != summary["data_hash"] and not np.array_equal(batch, other_seed)

    clean, summary_clean = build_calibration_set(face_folder, count=16, seed=0, degrade=False)
    assert summary_clean["degradation"] is None and summary_clean["data_hash"] != summary["data_hash"]
    # Same selection, no degradation: the clean batch has more detail.
    assert np.abs(np.diff(clean, axis=-1)).mean() > np.abs(np.diff(batch, axis=-1)).mean()


def test_data_hash_follows_file_contents(tmp_path: Path) -> None:
    folder = make_aligned_face_folder(tmp_path / "crops", count=6, odd_files=False)
    _, before = build_calibration_set(folder, count=6, seed=0)
    target = sorted(folder.rglob("face_000.png"))[0]
    cv2.imwrite(str(target), cv2.bitwise_not(read_image(target)))
    _, after = build_calibration_set(folder, count=6, seed=0)
    assert before["data_hash"] != after["data_hash"]


def test_several_paths_with_the_same_folder_name(tmp_path: Path) -> None:
    first = make_aligned_face_folder(tmp_path / "a" / "crops", count=4, odd_files=False, seed=0)
    second = make_aligned_face_folder(tmp_path / "b" / "crops", count=4, odd_files=False, seed=1)
    batch, summary = build_calibration_set([first, second], count=8, degrade=False)
    assert len(batch) == 8 and summary["unique_faces"] == 8 and len(summary["sources"]) == 2
    _, only_first = build_calibration_set([first], count=8, degrade=False)
    assert only_first["data_hash"] != summary["data_hash"]


def test_fewer_faces_than_count_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = make_aligned_face_folder(tmp_path / "few", count=5, odd_files=False)
    with caplog.at_level("WARNING", logger="facemoe.calibration.dataset"):
        batch, summary = build_calibration_set(folder, count=12, seed=0)
    assert len(batch) == 12 and summary["unique_faces"] == 5 and summary["distinct_faces"] == 5
    expected = f"only 5 distinct source faces (from 5 files) for 12 samples, below the minimum of {MIN_DISTINCT_FACES}"
    assert len(summary["warnings"]) == 1 and expected in summary["warnings"][0]
    # No warn callback: the module's logger reports it, once.
    assert [r.getMessage() for r in caplog.records] == summary["warnings"]
    told: list[str] = []
    clean, summary_clean = build_calibration_set(folder, count=12, seed=0, degrade=False, warn=told.append)
    assert len(clean) == 5 and summary_clean["samples"] == 5 and told == summary_clean["warnings"]
    assert "for 5 samples" in told[0]


def test_holdout_set_leaves_out_the_calibration_faces(face_folder: Path) -> None:
    calibration, _ = build_calibration_set(face_folder, count=16, seed=3, degrade=False)
    holdout, summary = build_holdout_set(
        face_folder, count=32, seed=1, degrade=False, calibration_count=16, calibration_seed=3
    )
    assert len(holdout) == 30 - 16 and summary["samples"] == 14 and summary["role"] == "holdout"
    for face in holdout:
        assert not any(np.array_equal(face, used) for used in calibration)
    degraded, _ = build_holdout_set(face_folder, count=4, calibration_count=16, calibration_seed=3)
    assert degraded.shape == (4, 3, 120, 120)
    nothing, summary = build_holdout_set(face_folder, count=8, calibration_count=30)
    assert nothing.shape == (0, 3, 120, 120) and summary["samples"] == 0


def test_without_a_detector_videos_and_scenes_are_skipped_and_reported(tmp_path: Path) -> None:
    mixed = make_aligned_face_folder(tmp_path / "mixed", count=3, odd_files=False)
    write_face_video(mixed / "clip.avi", real_faces()[:2], frames=4)
    cv2.imwrite(str(mixed / "photo.jpg"), background(400, 300))
    told: list[str] = []
    _, summary = build_calibration_set(mixed, count=3, warn=told.append)
    assert summary["sources"][0]["decisions"] == {"aligned": 3, "skipped": 2} and summary["distinct_faces"] == 3
    assert "2 video(s) or scene image(s) skipped: they need a face detector" in told[0]
    assert told == summary["warnings"] and len(told) == 2  # the skip and the few-faces warning


# --------------------------------------------------------------------------------------------- bad inputs


def _raises_naming(path: Path | str, call: object, *args: object, **kwargs: object) -> None:
    with pytest.raises(InputError) as info:
        call(*args, **kwargs)  # type: ignore[operator]
    message = str(info.value)
    assert str(path) in message and "\n" not in message, message


def test_bad_inputs_name_the_path(tmp_path: Path, detector: FaceDetector) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    _raises_naming(empty, build_calibration_set, empty)
    _raises_naming(tmp_path / "missing", build_calibration_set, tmp_path / "missing")

    broken_folder = make_aligned_face_folder(tmp_path / "broken", count=3, odd_files=False)
    broken = broken_folder / "zz_broken.jpg"
    broken.write_bytes(b"\xff\xd8 this is not really a jpeg")
    _raises_naming(broken, build_calibration_set, broken_folder, count=4)
    empty_file = tmp_path / "empty.png"
    empty_file.write_bytes(b"")
    _raises_naming(empty_file, build_calibration_set, empty_file)

    text = tmp_path / "list.txt"
    text.write_text("faces")
    _raises_naming(text, build_calibration_set, text)

    video = write_face_video(tmp_path / "clip.avi", real_faces()[:2], frames=4)
    _raises_naming(video, build_calibration_set, video)  # a video needs a detector
    empty_video = write_face_video(tmp_path / "empty.avi", [background(112, 112)], frames=4)
    _raises_naming(empty_video, build_calibration_set, empty_video, detector=detector)  # no faces found
    scene = tmp_path / "scene.png"
    cv2.imwrite(str(scene), background(320, 200))
    _raises_naming(scene, build_calibration_set, scene)  # a scene image needs a detector

    not_video = tmp_path / "fake.mp4"
    not_video.write_bytes(b"not a video")
    _raises_naming(not_video, build_calibration_set, not_video, detector=detector)

    bad_stack = tmp_path / "stack.npy"
    np.save(bad_stack, np.zeros((4, 25, 25), np.float32))
    _raises_naming(bad_stack, build_calibration_set, bad_stack)
    np.save(bad_stack, np.zeros((4, 25), np.uint8))
    _raises_naming(bad_stack, build_calibration_set, bad_stack)


# -------------------------------------------------------------------------------------------------- cache


def test_cache_roundtrip_and_invalidation(tmp_path: Path) -> None:
    cache = CalibrationCache(tmp_path / "cache")
    key = cache.key("model-a", "data-a", "percentile", {"percentile": 99.99})
    assert cache.load(key) is None and cache.misses == 1
    cache.save(key, {"t/1": 1.5, "t:2": 0.25})
    assert cache.load(key, ["t/1"]) == {"t/1": 1.5, "t:2": 0.25} and cache.hits == 1
    assert cache.load(key, ["t/1", "t/3"]) is None  # a tensor it never saw: recalibrate
    entry = cache.entries()[0]
    assert entry["model_hash"] == "model-a" and entry["method"] == "percentile" and entry["tensors"] == ["t/1", "t:2"]

    keys = {
        key,
        cache.key("model-b", "data-a", "percentile", {"percentile": 99.99}),
        cache.key("model-a", "data-b", "percentile", {"percentile": 99.99}),
        cache.key("model-a", "data-a", "entropy", {"percentile": 99.99}),
        cache.key("model-a", "data-a", "percentile", {"percentile": 99.9}),
    }
    assert len(keys) == 5

    # A damaged npz is a miss, never wrong ranges.
    (tmp_path / "cache" / f"{key}.npz").write_bytes(b"garbage")
    assert cache.load(key) is None
    assert not list((tmp_path / "cache").glob(".*.tmp"))
