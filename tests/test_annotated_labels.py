"""The annotated video shows a track's name from the frame the events give it, read back from the written file."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from facemoe.bundle import Bundle
from facemoe.cli.run_cmd import app as run_app
from facemoe.runtime.aggregation import RecognitionBudget
from facemoe.runtime.annotate import VideoAnnotator
from facemoe.runtime.backends import open_backend
from facemoe.runtime.detection import RetinaFaceDetector
from facemoe.runtime.events import EventWriter
from facemoe.runtime.gallery import Gallery
from facemoe.runtime.pipeline import FaceEncoder, Pipeline, PipelineConfig
from facemoe.runtime.video_source import Frame

from runtime_fixtures import SAMPLE_VIDEO, gallery_file, invoke, read_events, read_video, sample_frames

__all__ = ["gallery_file"]  # fixture used by name


@pytest.fixture(scope="module")
def face_tops() -> list[tuple[int, int]]:
    """(x1, y1) of the face box in each sample frame, found as the pipeline finds it."""
    detector = RetinaFaceDetector(score_threshold=0.3)
    tops = []
    for frame in sample_frames():
        best = max(detector.detect(frame), key=lambda d: d.score)
        tops.append((round(float(best.box[0])), round(float(best.box[1]))))
    return tops


def named(written: list[np.ndarray], tops: list[tuple[int, int]]) -> list[bool]:
    """Per frame: does the label above the face go on past its "#1" tag (a name is written there)?

    Compares the written pixels with the plain decode of the sample: where a bare "#1" label ends, a named
    label is still filled with the track colour and text; an unnamed one leaves the picture as it was.
    """
    scale = max(0.3, min(1.2, written[0].shape[0] / 720))
    (tag_width, th), base = cv2.getTextSize("#1", cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    out = []
    for image, plain, (x1, y1) in zip(written, sample_frames(), tops, strict=True):
        top = max(0, y1 - th - base - 2)
        region = (slice(top + 1, top + th + base), slice(x1 + tag_width + 5, x1 + tag_width + 30))
        out.append(float(np.abs(image[region].astype(int) - plain[region].astype(int)).mean()) > 40)
    return out


def test_names_appear_from_the_assigned_frame(
    tmp_path: Path, tiny_bundle: Path, gallery_file: Path, face_tops: list[tuple[int, int]]
) -> None:
    out, video = tmp_path / "e.jsonl", tmp_path / "annotated.avi"
    args = ["--video", SAMPLE_VIDEO, "--bundle", tiny_bundle, "--gallery", gallery_file, "--backend", "onnxruntime"]
    # The default latency bound for files (1 s) is longer than this file takes: one flush, at the end.
    result = invoke(run_app, [*args, "--out", out, "--save-video", video])
    assert result.exit_code == 0, result.output
    assigned = [e for e in read_events(out) if e["event"] == "identity_assigned"]
    assert len(assigned) == 1 and assigned[0]["identity"] == "carphone"
    first = assigned[0]["frame"]
    written = read_video(video)
    assert len(written) == 120
    labels = named(written, face_tops)
    assert not any(labels[:first]), "no name before the events give one"
    assert all(labels[first:]), [i for i, ok in enumerate(labels) if i >= first and not ok]


def test_frame_buffer_bound_forces_smaller_batches(
    tmp_path: Path, tiny_bundle: Path, gallery_file: Path, face_tops: list[tuple[int, int]]
) -> None:
    bundle = Bundle(tiny_bundle)
    encoder = FaceEncoder(open_backend(bundle, "onnxruntime"), bundle.manifest.preprocessing)
    frame_bytes = sample_frames()[0].nbytes
    annotator = VideoAnnotator(tmp_path / "bounded.avi", 30.0, (176, 144))
    every_frame = RecognitionBudget(every=1, confident_after=1000, max_embeddings=1000)
    config = PipelineConfig(
        max_batch=1000, max_latency_s=3600.0, budget=every_frame, annotate_buffer_bytes=10 * frame_bytes
    )
    events = EventWriter(tmp_path / "e.jsonl")
    pipeline = Pipeline(
        RetinaFaceDetector(score_threshold=0.3),
        encoder,
        events,
        gallery=Gallery.load(gallery_file),
        annotator=annotator,
        config=config,
    )
    pipeline.run(Frame(i, i / 30, f) for i, f in enumerate(sample_frames()))
    events.close()
    annotator.close()
    buffer = pipeline.streams[0].frames
    assert buffer is not None and len(buffer) == 0
    assert buffer.peak_frames == 10 and buffer.peak_bytes <= config.annotate_buffer_bytes
    assert pipeline.stats.faces_embedded == 119
    assert pipeline.stats.batches >= 11, "the bound flushed the queue, not the (hour-long) latency bound"
    first = next(e["frame"] for e in read_events(tmp_path / "e.jsonl") if e["event"] == "identity_assigned")
    labels = named(read_video(tmp_path / "bounded.avi"), face_tops)
    assert not any(labels[:first]) and all(labels[first:])
