"""Five-point similarity alignment, checked against an ArcFace-aligned reference crop."""

from __future__ import annotations

import math

import numpy as np
import pytest

from facemoe.runtime.alignment import align_face, estimate_similarity, eye_distance, template_array, transform_points
from facemoe.runtime.detection import RetinaFaceDetector

from runtime_fixtures import padded_tom, tom_hanks


def _similarity(scale: float, angle: float, tx: float, ty: float) -> np.ndarray:
    c, s = scale * math.cos(angle), scale * math.sin(angle)
    return np.array([[c, -s, tx], [s, c, ty]])


def _lstsq_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Independent reference: solve x' = a x - b y + tx, y' = b x + a y + ty by linear least squares."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src, dst, strict=True):
        rows += [[x, -y, 1, 0], [y, x, 0, 1]]
        rhs += [u, v]
    a, b, tx, ty = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)[0]
    return np.array([[a, -b, tx], [b, a, ty]])


def test_recovers_an_exact_similarity() -> None:
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 200, (5, 2))
    for _ in range(10):
        truth = _similarity(rng.uniform(0.2, 3), rng.uniform(-math.pi, math.pi), *rng.uniform(-100, 100, 2))
        dst = transform_points(truth, src)
        np.testing.assert_allclose(estimate_similarity(src, dst), truth, atol=1e-9)


def test_matches_linear_least_squares_on_noisy_points() -> None:
    rng = np.random.default_rng(1)
    template = template_array()
    for _ in range(10):
        src = template * rng.uniform(0.3, 4) + rng.uniform(0, 300, 2) + rng.normal(0, 2, (5, 2))
        np.testing.assert_allclose(estimate_similarity(src, template), _lstsq_similarity(src, template), atol=1e-8)


def test_never_reflects() -> None:
    template = template_array()
    mirrored = template * np.array([-1.0, 1.0])
    matrix = estimate_similarity(mirrored, template)
    assert np.linalg.det(matrix[:, :2]) > 0


def test_degenerate_landmarks_raise() -> None:
    with pytest.raises(ValueError):
        estimate_similarity(np.ones((5, 2)), template_array())


def test_aligning_template_points_is_identity_and_border_is_black() -> None:
    crop = tom_hanks()
    np.testing.assert_array_equal(align_face(crop, template_array()), crop)
    # Half the face outside the frame: the missing side is black, not smeared edge pixels.
    shifted = align_face(crop, template_array() + np.array([50.0, 0.0]))
    assert shifted.shape == (112, 112, 3) and shifted.dtype == np.uint8
    assert shifted[:, 70:].max() == 0


@pytest.mark.parametrize(("pad", "scale"), [(40, 1.0), (60, 2.0), (30, 0.5), (100, 3.0), (56, 1.5)])
def test_realigned_reference_crop_matches(pad: int, scale: float) -> None:
    """Detect on a padded / scaled copy of an ArcFace-aligned crop and re-align: we get the crop back."""
    reference = tom_hanks()
    image = padded_tom(pad, scale)
    faces = [f for f in RetinaFaceDetector().detect(image) if f.score >= 0.5]
    assert len(faces) == 1
    face = faces[0]
    template = template_array()
    # Landmarks mapped back into the reference crop sit on the template: eyes within 3 px; the nose and
    # mouth within 8 px (detectors disagree most on the nose tip).
    back = face.landmarks / scale - pad
    assert np.abs(back[:2] - template[:2]).max() < 3.0
    assert np.abs(back - template).max() < 8.0
    # The composite reference -> image -> crop transform is close to the identity.
    composite = estimate_similarity(back, template)
    assert abs(math.hypot(*composite[:, 0]) - 1) < 0.1
    assert abs(math.degrees(math.atan2(composite[1, 0], composite[0, 0]))) < 5
    assert np.abs(composite[:, 2]).max() < 8
    assert eye_distance(face.landmarks) == pytest.approx(scale * eye_distance(template), rel=0.1)

    crop = align_face(image, face.landmarks).astype(np.float64)
    ref = reference.astype(np.float64)
    inner = (slice(20, 100), slice(20, 92))  # the face, away from the padding colour
    mad = np.abs(crop - ref)[inner].mean()
    a, b = crop[inner] - crop[inner].mean(), ref[inner] - ref[inner].mean()
    ncc = float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))
    # A 6 px misalignment of the reference against itself, for scale.
    baseline = np.abs(np.roll(ref, 6, axis=1) - ref)[inner].mean()
    assert mad < 18 and mad < 0.75 * baseline, (mad, baseline)
    assert ncc > 0.85, ncc
