"""The numpy pre-processing against a direct PIL + torch implementation of the official evaluation."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from facemoe.preprocess import fuse_flip, preprocess_batch, preprocess_face, resize_pil_bicubic

Image = pytest.importorskip("PIL.Image")
torch = pytest.importorskip("torch")


def _official(face_bgr: np.ndarray) -> np.ndarray:
    """cv2 BGR -> RGB -> PIL -> Resize((120,120), BICUBIC) -> ToTensor -> Normalize(0.5, 0.5)."""
    pil = Image.fromarray(cv2.cvtColor(face_bgr, cv2.COLOR_BGR2RGB)).resize((120, 120), Image.BICUBIC)
    tensor = torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).float().div(255)
    return ((tensor - 0.5) / 0.5).numpy()


@pytest.fixture
def faces():
    rng = np.random.default_rng(0)
    smooth = [cv2.GaussianBlur(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8), (0, 0), s) for s in (0.5, 2)]
    return [rng.integers(0, 256, (112, 112, 3), dtype=np.uint8), *smooth]


def test_matches_official_pipeline_exactly(faces):
    for face in faces:
        ours = preprocess_face(face)
        assert ours.shape == (3, 120, 120) and ours.dtype == np.float32
        np.testing.assert_array_equal(ours, _official(face))


@pytest.mark.parametrize("size", [(112, 112, 120), (120, 120, 112), (64, 64, 120), (200, 200, 120)])
def test_pil_bicubic_square_resizes_bit_exact(size):
    h, w, out = size
    image = np.random.default_rng(1).integers(0, 256, (h, w, 3), dtype=np.uint8)
    reference = np.asarray(Image.fromarray(image).resize((out, out), Image.BICUBIC))
    np.testing.assert_array_equal(resize_pil_bicubic(image, (out, out)), reference)


def test_other_interpolations_follow_opencv(faces):
    face = faces[1]
    rgb = face[:, :, ::-1]
    for name, flag in (("cv2-bicubic", cv2.INTER_CUBIC), ("bilinear", cv2.INTER_LINEAR)):
        expected = (cv2.resize(np.ascontiguousarray(rgb), (120, 120), interpolation=flag) / 255.0 - 0.5) / 0.5
        got = preprocess_face(face, interpolation=name)
        np.testing.assert_allclose(got, expected.transpose(2, 0, 1), atol=1e-6)


def test_batch_and_bad_input(faces):
    batch = preprocess_batch(faces)
    assert batch.shape == (3, 3, 120, 120)
    assert preprocess_batch([]).shape == (0, 3, 120, 120)
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        preprocess_face(faces[0][:, :, 0])


def test_flip_fusion_matches_torch_reference():
    rng = np.random.default_rng(2)
    emb, emb_flip = rng.standard_normal((2, 4, 512)).astype(np.float32)
    a, b = torch.from_numpy(emb), torch.from_numpy(emb_flip)
    pre_norm = torch.nn.functional.normalize(a + b).numpy()
    norm_add = torch.nn.functional.normalize(
        torch.nn.functional.normalize(a) + torch.nn.functional.normalize(b)
    ).numpy()
    np.testing.assert_allclose(fuse_flip(emb, emb_flip), pre_norm, atol=1e-6)
    np.testing.assert_allclose(fuse_flip(emb, emb_flip, "norm_add"), norm_add, atol=1e-6)
    with pytest.raises(ValueError):
        fuse_flip(emb, emb_flip, "mean")
