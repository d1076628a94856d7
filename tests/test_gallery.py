"""Gallery file format, open-set matching, and ``facemoe enroll``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from facemoe.bundle import Bundle
from facemoe.cli.enroll_cmd import app as enroll_app
from facemoe.errors import InputError
from facemoe.runtime.gallery import UNKNOWN, Gallery, model_fingerprint

from runtime_fixtures import error_lines, gallery_file, invoke, padded_tom, people_dir, sample_frames

__all__ = ["gallery_file", "people_dir"]  # fixtures used by name


def _unit(rng: np.random.Generator, n: int, d: int = 8) -> np.ndarray:
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_round_trip_is_pickle_free_and_atomic(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    gallery = Gallery(["Zoë", "José", "李"], _unit(rng, 3), [2, 1, 5], {"model_fingerprint": "abc"})
    path = tmp_path / "g.npz"
    gallery.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.npz"], "temporary file left behind"
    with np.load(path, allow_pickle=False) as data:
        assert data["names"].dtype.kind == "U"
        assert json.loads(str(data["meta"]))["format"] == "facemoe-gallery"
    loaded = Gallery.load(path)
    assert loaded.names == gallery.names and loaded.counts == [2, 1, 5]
    np.testing.assert_allclose(loaded.embeddings, gallery.embeddings, atol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(loaded.embeddings, axis=1), 1.0, atol=1e-6)


def test_open_set_matching() -> None:
    emb = np.eye(4, dtype=np.float32)[:3]
    gallery = Gallery(["a", "b", "c"], emb, [1, 1, 1])
    probe = np.array([0.8, 0.6, 0, 0], np.float32)
    match = gallery.match(probe, threshold=0.5)
    assert (match.identity, match.best, match.second) == ("a", "a", "b")
    assert match.similarity == pytest.approx(0.8) and match.second_similarity == pytest.approx(0.6)
    far = gallery.match(np.array([0, 0, 0, 1], np.float32), threshold=0.5)
    assert far.identity == UNKNOWN and far.best is not None
    assert gallery.match(probe, threshold=0.81).identity == UNKNOWN


def test_compatibility_checks() -> None:
    gallery = Gallery(["a"], np.ones((1, 4), np.float32) / 2, [1], {"model_fingerprint": "x" * 64})
    gallery.check_compatible("x" * 64, 4)
    with pytest.raises(InputError, match="another model"):
        gallery.check_compatible("y" * 64, 4)
    with pytest.raises(InputError, match="dimensions"):
        gallery.check_compatible("x" * 64, 512)


def test_bad_gallery_files_are_input_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        Gallery.load(tmp_path / "missing.npz")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"\x00" * 100)
    with pytest.raises(InputError, match="not a FaceMoE gallery file"):
        Gallery.load(garbage)
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, something=np.zeros(3))
    with pytest.raises(InputError, match="missing"):
        Gallery.load(wrong)
    pickled = tmp_path / "pickled.npz"
    meta = np.array(json.dumps({"format": "facemoe-gallery", "version": 1}))
    np.savez(pickled, names=np.array(["a", None], dtype=object), embeddings=np.ones((2, 4)), meta=meta)
    with pytest.raises(InputError, match="not a FaceMoE gallery file"):
        Gallery.load(pickled)
    empty = tmp_path / "empty.npz"
    np.savez(empty, names=np.array([], dtype=np.str_), embeddings=np.zeros((0, 4)), meta=meta)
    with pytest.raises(InputError, match="no identities"):
        Gallery.load(empty)


def test_enroll_cli_builds_a_gallery(tiny_bundle: Path, gallery_file: Path) -> None:
    gallery = Gallery.load(gallery_file)
    assert gallery.names == ["carphone", "tom"]
    assert gallery.counts == [5, 2]
    assert gallery.meta["model_fingerprint"] == model_fingerprint(Bundle(tiny_bundle))
    assert gallery.meta["images"]["tom"] == ["padded.png", "scaled.jpg"]
    # The two people are apart even with random weights.
    assert float(gallery.embeddings[0] @ gallery.embeddings[1]) < 0.5


def test_enroll_warns_about_bad_images_and_keeps_the_good(tmp_path: Path, tiny_bundle: Path, people_dir: Path) -> None:
    root = tmp_path / "people"
    shutil.copytree(people_dir, root)
    cv2.imwrite(str(root / "tom" / "blank.png"), np.full((120, 160, 3), 200, np.uint8))
    two = np.full((192, 400, 3), 127, np.uint8)
    two[:, :192] = padded_tom(40)
    two[:, 200:392] = padded_tom(40)
    cv2.imwrite(str(root / "tom" / "two.png"), two)
    (root / "tom" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "stray.png").write_bytes((root / "tom" / "padded.png").read_bytes())
    (root / "nobody").mkdir()
    grey_alpha = cv2.cvtColor(padded_tom(40), cv2.COLOR_BGR2BGRA)
    cv2.imwrite(str(root / "tom" / "alpha.png"), grey_alpha)
    out = tmp_path / "g.npz"
    result = invoke(enroll_app, ["--images", root, "--bundle", tiny_bundle, "--out", out])
    assert result.exit_code == 0, result.output
    text = result.stderr
    assert "blank.png: no face found" in text
    assert "two.png: 2 faces found" in text
    assert "broken.jpg: not a readable image" in text
    assert "stray.png: ignored" in text
    assert "nobody: no images" in text
    gallery = Gallery.load(out)
    assert gallery.names == ["carphone", "tom"]
    assert gallery.counts == [5, 3]  # padded, scaled, alpha

    result = invoke(enroll_app, ["--images", root, "--bundle", tiny_bundle, "--out", out, "--largest", "--overwrite"])
    assert result.exit_code == 0
    assert Gallery.load(out).counts == [5, 4]


def test_enroll_aligned_crops(tmp_path: Path, tiny_bundle: Path, gallery_file: Path) -> None:
    root = tmp_path / "aligned"
    (root / "tom").mkdir(parents=True)
    shutil.copy(Path(__file__).parent / "data" / "Tom_Hanks_54745.png", root / "tom" / "crop.png")
    out = tmp_path / "aligned.npz"
    result = invoke(enroll_app, ["--images", root, "--bundle", tiny_bundle, "--out", out, "--aligned"])
    assert result.exit_code == 0, result.output
    aligned = Gallery.load(out)
    detected = Gallery.load(gallery_file)
    # The same person through detection + alignment and from the aligned crop: far closer than another person.
    same, other = (float(aligned.embeddings[0] @ detected.embeddings[i]) for i in (1, 0))
    assert same > 0.6 and same > other + 0.3, (same, other)


def test_enroll_errors_are_one_line(tmp_path: Path, tiny_bundle: Path, people_dir: Path) -> None:
    cases = [
        (["--images", tmp_path / "missing", "--bundle", tiny_bundle], "no such directory"),
        (["--images", tmp_path / "empty", "--bundle", tiny_bundle], "no person folders"),
        (["--images", people_dir, "--bundle", tmp_path / "nobundle"], "bundle directory does not exist"),
    ]
    (tmp_path / "empty").mkdir()
    blank = tmp_path / "blank" / "x"
    blank.mkdir(parents=True)
    cv2.imwrite(str(blank / "a.png"), np.zeros((64, 64, 3), np.uint8))
    cases.append((["--images", blank.parent, "--bundle", tiny_bundle], "no face could be enrolled"))
    for args, message in cases:
        result = invoke(enroll_app, [*args, "--out", tmp_path / "g.npz"])
        assert result.exit_code == 2, (args, result.output)
        lines = error_lines(result.stderr)
        assert len(lines) == 1 and message in lines[0], result.stderr
        assert "Traceback" not in result.output
    assert not (tmp_path / "g.npz").exists()


def test_enrolled_from_video_frames_recognises_later_frames(tiny_bundle: Path, gallery_file: Path) -> None:
    """Same person, frames 0-39 enrolled vs frames 60-119 probed: high cosine even with random weights."""
    from facemoe.runtime.backends import open_backend
    from facemoe.runtime.detection import RetinaFaceDetector
    from facemoe.runtime.pipeline import FaceEncoder

    bundle = Bundle(tiny_bundle)
    encoder = FaceEncoder(open_backend(bundle, "onnxruntime"), bundle.manifest.preprocessing)
    detector = RetinaFaceDetector()
    frames = sample_frames()[60::6]
    tensors = [encoder.prepare(encoder.align(f, detector.detect(f)[0].landmarks)) for f in frames]
    probes = encoder.embed(tensors)
    probes /= np.linalg.norm(probes, axis=1, keepdims=True)
    gallery = Gallery.load(gallery_file)
    sims = probes @ gallery.embeddings.T
    assert sims[:, 0].min() > 0.7, sims[:, 0]  # per frame, against the 'carphone' template
    assert sims[:, 1].max() < 0.4, sims[:, 1]  # against 'tom'
