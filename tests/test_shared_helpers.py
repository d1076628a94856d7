"""One image decoder, one cache directory, and the manifest's flip fusion honoured where embeddings are made."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from facemoe.bundle import MANIFEST_NAME, Bundle
from facemoe.errors import InputError
from facemoe.fileio import write_json_atomic
from facemoe.imagefile import decode_image, read_image, to_bgr8
from facemoe.preprocess import fuse_flip, l2_normalize


def test_16_bit_images_round_to_the_nearest_8_bit_value(tmp_path: Path) -> None:
    eight = np.arange(256, dtype=np.uint8).reshape(16, 16)
    sixteen = eight.astype(np.uint16) * 257  # the exact 16-bit value of every 8-bit level
    sixteen[0, 1] = 257 + 200  # nearer to 2 than to 1: floor (>> 8) would say 1
    cv2.imwrite(str(tmp_path / "deep.png"), sixteen)
    got = read_image(tmp_path / "deep.png")
    expected = eight.copy()
    expected[0, 1] = 2
    assert got.shape == (16, 16, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got[:, :, 0], expected)
    # Every entry point gives the same pixels: calibration, runtime frames and enrolment.
    from facemoe.calibration.sources import read_image as calibration_read
    from facemoe.cli.enroll_cmd import read_image as enroll_read
    from facemoe.runtime.detection import to_bgr
    from facemoe.runtime.image_source import read_image as still_read

    for other in (calibration_read(tmp_path / "deep.png"), enroll_read(tmp_path / "deep.png"), to_bgr(sixteen)):
        np.testing.assert_array_equal(other, got)
    still = still_read(tmp_path / "deep.png")
    assert still is not None
    np.testing.assert_array_equal(still, got)


def test_calibration_images_are_decoded_upright(tmp_path: Path) -> None:
    """The calibration reader applies the EXIF orientation too (it used to decode them unrotated)."""
    image_module = pytest.importorskip("PIL.Image")
    stored = np.zeros((40, 80, 3), np.uint8)
    stored[:, :20] = 255
    exif = image_module.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    image_module.fromarray(stored).save(tmp_path / "phone.jpg", "JPEG", quality=95, exif=exif.tobytes())
    from facemoe.calibration.sources import read_image as calibration_read

    upright = calibration_read(tmp_path / "phone.jpg")
    assert upright.shape == (80, 40, 3)
    assert upright[:20].mean() > 200 and upright[40:].mean() < 30  # the bright band is now at the top


def test_decode_errors_name_the_source(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"^x\.png: not a readable image"):
        decode_image(b"not an image", "x.png")
    with pytest.raises(InputError, match=r"gone\.png: cannot read file"):
        read_image(tmp_path / "gone.png")
    with pytest.raises(InputError, match=r"^f: unsupported pixel type int32"):
        to_bgr8(np.zeros((2, 2), np.int32), "f")
    np.testing.assert_array_equal(to_bgr8(np.full((2, 2), 0.5, np.float32))[0, 0], [128, 128, 128])


def test_every_cache_honours_facemoe_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from facemoe.calibration.cache import default_directory
    from facemoe.demo import cache_dir
    from facemoe.userdirs import cache_dir as user_cache

    monkeypatch.setenv("FACEMOE_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"
    assert default_directory() == tmp_path / "mine" / "calibration"
    monkeypatch.delenv("FACEMOE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_directory() == tmp_path / "xdg" / "facemoe" / "calibration"
    assert user_cache("a", "b") == tmp_path / "xdg" / "facemoe" / "a" / "b"


class _Linear:
    """A real linear embedder (fixed random projection) so flip fusion can be checked exactly."""

    input_size = 120
    embedding_size = 8

    def __init__(self) -> None:
        self.weights = np.random.default_rng(0).standard_normal((3 * 120 * 120, 8)).astype(np.float32)

    def embed(self, batch: np.ndarray) -> np.ndarray:
        return batch.reshape(len(batch), -1) @ self.weights


@pytest.mark.parametrize("fusion", ["pre_norm_vector_add", "norm_add"])
def test_face_encoder_fuses_flips_as_the_manifest_says(fusion: str) -> None:
    from facemoe.bundle import Preprocessing
    from facemoe.preprocess import flip_batch
    from facemoe.runtime.pipeline import FaceEncoder

    backend = _Linear()
    batch = np.random.default_rng(1).standard_normal((3, 3, 120, 120)).astype(np.float32)
    encoder = FaceEncoder(backend, Preprocessing(flip_fusion=fusion), flip=True)  # type: ignore[arg-type]
    expected = fuse_flip(backend.embed(batch), backend.embed(flip_batch(batch)), fusion)
    np.testing.assert_allclose(l2_normalize(encoder.embed(batch)), expected, atol=1e-5)
    with pytest.raises(ValueError, match="unknown flip fusion 'max'"):
        FaceEncoder(backend, {"flip_fusion": "max"})  # type: ignore[arg-type]


def test_torch_backend_reads_older_source_key_names(tiny_bundle: Path, tmp_path: Path) -> None:
    """``random_seed`` (an older name of ``seed``) rebuilds the same weights: the fingerprint check passes."""
    pytest.importorskip("torch")
    from facemoe.runtime.backends.torch_backend import TorchBackend

    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    data = json.loads((copy / MANIFEST_NAME).read_text())
    data["model"]["source"] = {"random_weights": True, "random_seed": data["model"]["source"]["seed"]}
    write_json_atomic(copy / MANIFEST_NAME, data)
    backend = TorchBackend.from_bundle(Bundle(copy), "fp32", device="cpu")
    assert backend.embed(np.zeros((1, 3, 120, 120), np.float32)).shape == (1, 512)
