"""Still photos, folders of photos and one-frame videos: one ``face`` event per face (real decode, real ORT)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from facemoe.cli.run_cmd import app as run_app
from facemoe.runtime.image_source import list_images, read_image

from runtime_fixtures import (
    face_patch,
    gallery_file,
    invoke,
    padded_tom,
    read_events,
    read_video,
    sample_frames,
    write_video,
)

__all__ = ["gallery_file"]  # fixture used by name

# Where group_photo() puts its six faces (tile left, top), and whose they are.
TILES = [(20, 20), (155, 20), (290, 20), (20, 140), (155, 140), (290, 140)]
PEOPLE = ["carphone", "carphone", "carphone", "tom", "tom", "carphone"]


def group_photo() -> np.ndarray:
    """Six real faces on one canvas: the sample video's person (frames 0, 60, 110, one mirrored) and Tom."""
    canvas = np.full((260, 420, 3), 110, np.uint8)
    tiles = [
        cv2.resize(face_patch(sample_frames()[i], (60, 30, 115, 97), margin=0.5), (100, 100)) for i in (0, 60, 110)
    ]
    tiles += [cv2.resize(padded_tom(pad), (100, 100), interpolation=cv2.INTER_AREA) for pad in (20, 30)]
    tiles.append(cv2.flip(tiles[1], 1))
    for (x, y), tile in zip(TILES, tiles, strict=True):
        canvas[y : y + 100, x : x + 100] = tile
    return canvas


def _run(args: list[object], out: Path) -> tuple[list[dict], str]:
    result = invoke(run_app, [*args, "--backend", "onnxruntime", "--out", out])
    assert result.exit_code == 0, result.output
    return read_events(out), result.stderr


def _faces(events: list[dict]) -> list[dict]:
    return [e for e in events if e["event"] == "face"]


def _person_at(face: dict) -> str:
    cx, cy = (face["box"][0] + face["box"][2]) / 2, (face["box"][1] + face["box"][3]) / 2
    for (x, y), person in zip(TILES, PEOPLE, strict=True):
        if x <= cx < x + 100 and y <= cy < y + 100:
            return person
    raise AssertionError(f"face at {cx:.0f},{cy:.0f} is on no tile")


def test_group_photo_gives_one_event_per_face(tmp_path: Path, tiny_bundle: Path, gallery_file: Path) -> None:
    photo = tmp_path / "group.jpg"
    cv2.imwrite(str(photo), group_photo())
    video = tmp_path / "annotated.avi"
    args = ["--video", photo, "--bundle", tiny_bundle, "--gallery", gallery_file, "--save-video", video]
    events, _ = _run(args, tmp_path / "e.jsonl")
    kinds = [e["event"] for e in events]
    assert kinds == ["run_started", "source_started", "image"] + ["face"] * 6 + ["source_ended", "run_ended"], kinds
    assert events[0]["sources"][0]["kind"] == "image" and (
        events[0]["sources"][0]["width"],
        events[0]["sources"][0]["height"],
    ) == (420, 260)
    image = events[2]
    assert image["faces"] == 6 and image["embedded"] == 6 and image["image"] == str(photo)
    faces = _faces(events)
    assert [f["face"] for f in faces] == list(range(6))
    assert [f["box"][0] for f in faces] == sorted(f["box"][0] for f in faces), "numbered left to right"
    for face in faces:
        assert face["image"] == str(photo) and face["frame"] == 0 and face["embedded"] is True
        assert len(face["box"]) == 4 and len(face["landmarks"]) == 5 and face["score"] >= 0.5
        assert -1.0 <= face["similarity"] <= 1.0 and face["best"] in ("carphone", "tom")
        assert face["identity"] == (face["best"] if face["similarity"] >= 0.4 else "unknown")
        assert face["best"] == _person_at(face), face
    assert {_person_at(f) for f in faces if f["identity"] != "unknown"} == {"carphone", "tom"}
    summary = events[-1]
    assert summary["frames"] == 1 and summary["faces"] == 6 and summary["faces_embedded"] == 6
    assert summary["tracks"] == 0
    # The annotated image carries a label for each face (a filled box above it).
    (drawn,) = read_video(video)
    plain = cv2.imread(str(photo))
    for face in faces:
        x1, y1 = int(face["box"][0]), int(face["box"][1])
        band = np.abs(drawn.astype(int) - plain.astype(int))[max(0, y1 - 8) : y1 - 2, x1 + 2 : x1 + 30]
        assert band.mean() > 40, face


def test_folder_of_images(tmp_path: Path, tiny_bundle: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    cv2.imwrite(str(folder / "img10.jpg"), group_photo())
    cv2.imwrite(str(folder / "img2.png"), padded_tom(40))
    cv2.imwrite(str(folder / "img3.png"), np.full((80, 90, 3), 200, np.uint8))  # no face
    (folder / "img4.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (folder / "notes.txt").write_text("not an image\n")
    (folder / "sub").mkdir()
    assert [p.name for p in list_images(folder)[0]] == ["img2.png", "img3.png", "img4.jpg", "img10.jpg"]

    video = tmp_path / "annotated.avi"
    events, stderr = _run(["--video", folder, "--bundle", tiny_bundle, "--save-video", video], tmp_path / "e.jsonl")
    assert "1 file that is not an image" in stderr and "img4.jpg: cannot be decoded" in stderr
    assert events[0]["sources"][0]["kind"] == "images" and events[0]["sources"][0]["frame_count"] == 4
    images = [e for e in events if e["event"] == "image"]
    assert [Path(e["image"]).name for e in images] == ["img2.png", "img3.png", "img10.jpg"]
    assert [e["faces"] for e in images] == [1, 0, 6]
    assert [e["frame"] for e in images] == [0, 1, 3], "frame: the position in the sorted folder"
    faces = _faces(events)
    assert [Path(f["image"]).name for f in faces] == ["img2.png"] + ["img10.jpg"] * 6
    for face in faces:  # without a gallery: embedded, but no identity
        assert face["identity"] == "unknown" and face["similarity"] is None and face["embedded"]
    summary = events[-1]
    assert summary["frames"] == 3 and summary["corrupt_frames"] == 1 and summary["faces"] == 7
    # One frame per image, in the first image's size (192 x 192): the wide group photo keeps its aspect.
    written = read_video(video)
    assert len(written) == 3 and all(f.shape == (192, 192, 3) for f in written)
    bar = (192 - round(260 * 192 / 420)) // 2
    assert written[2][: bar - 2].max() < 30 and written[2][bar + 2 : 192 - bar - 2].mean() > 60


def test_one_frame_video_is_reported_like_a_photo(tmp_path: Path, tiny_bundle: Path, gallery_file: Path) -> None:
    video = write_video(tmp_path / "one.avi", [group_photo()], fourcc="MJPG")
    annotated = tmp_path / "annotated.avi"
    args = ["--video", video, "--bundle", tiny_bundle, "--gallery", gallery_file, "--save-video", annotated]
    events, _ = _run(args, tmp_path / "e.jsonl")
    assert events[0]["sources"][0]["kind"] == "file"
    faces = _faces(events)
    assert len(faces) == 6 and all(f["image"] == str(video) and f["frame"] == 0 for f in faces)
    assert all(f["best"] == _person_at(f) for f in faces)
    (drawn,) = read_video(annotated)
    assert np.abs(drawn.astype(int) - read_video(video)[0].astype(int)).max() > 100, "faces drawn"


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    image_module = pytest.importorskip("PIL.Image")
    upright = padded_tom(40)
    stored = np.ascontiguousarray(np.rot90(upright, k=1))  # as a camera held sideways stores it
    photo = image_module.fromarray(cv2.cvtColor(stored, cv2.COLOR_BGR2RGB))
    exif = photo.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    photo.save(tmp_path / "sideways.jpg", exif=exif, quality=95)
    decoded = read_image(tmp_path / "sideways.jpg")
    assert decoded is not None and decoded.shape == upright.shape
    assert np.abs(decoded.astype(int) - upright.astype(int)).mean() < 8, "decoded as displayed, upright"


def test_unusable_image_sources(tmp_path: Path, tiny_bundle: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("x")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG broken")
    for path, message in ((empty, "is a directory with no images (1 other files)"), (bad, "could not be decoded")):
        result = invoke(run_app, ["--video", path, "--bundle", tiny_bundle])
        assert result.exit_code == 2 and message in result.stderr, result.output
