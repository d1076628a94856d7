"""End to end on real video with the tiny preset through ONNX Runtime: tracking, batching, recognition."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from facemoe.bundle import Bundle
from facemoe.cli.run_cmd import app as run_app
from facemoe.errors import InputError
from facemoe.runtime.aggregation import RecognitionBudget
from facemoe.runtime.backends import open_backend
from facemoe.runtime.detection import RetinaFaceDetector
from facemoe.runtime.events import EventWriter
from facemoe.runtime.gallery import Gallery
from facemoe.runtime.pipeline import STAGES, FaceEncoder, Pipeline, PipelineConfig
from facemoe.runtime.tracking import Track
from facemoe.runtime.video_source import Frame, VideoSource

from runtime_fixtures import (
    SAMPLE_VIDEO,
    crossing_scene,
    gallery_file,
    invoke,
    read_events,
    read_video,
    sample_frames,
    second_half_video,
    write_video,
)

__all__ = ["gallery_file"]  # fixture used by name


@pytest.fixture(scope="module")
def parts(tiny_bundle: Path) -> tuple[RetinaFaceDetector, FaceEncoder]:
    bundle = Bundle(tiny_bundle)
    return RetinaFaceDetector(), FaceEncoder(open_backend(bundle, "onnxruntime"), bundle.manifest.preprocessing)


def _by_type(events: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for e in events:
        out.setdefault(e["event"], []).append(e)
    return out


def test_sample_video_end_to_end(tmp_path: Path, tiny_bundle: Path) -> None:
    out, video = tmp_path / "events.jsonl", tmp_path / "annotated.mp4"
    args = ["--video", SAMPLE_VIDEO, "--bundle", tiny_bundle, "--out", out, "--save-video", video]
    result = invoke(run_app, [*args, "--backend", "onnxruntime"])
    assert result.exit_code == 0, result.output
    events = read_events(out)
    kinds = _by_type(events)
    assert events[0]["event"] == "run_started" and events[-1]["event"] == "run_ended"
    assert len(kinds["track_started"]) == 1 and len(kinds["track_ended"]) == 1
    ended, summary = kinds["track_ended"][0], events[-1]
    assert summary["frames"] == 120 and summary["faces"] == 120, "a face in every frame"
    assert ended["detections"] == 120 and ended["first_frame"] == 0 and ended["last_frame"] == 119
    assert ended["reason"] == "end_of_stream" and ended["embeddings"] >= 5
    assert set(summary["stage_seconds"]) == set(STAGES)
    for e in kinds["track_started"] + kinds["track_ended"]:
        assert len(e["box"]) == 4 and len(e["landmarks"]) == 5 and 0 < e["score"] <= 1
        assert e["time"] == pytest.approx(e["frame"] / 29.97, abs=1e-3)
    frames = read_video(video)
    assert len(frames) == 120 and frames[0].shape == (144, 176, 3)
    # The annotation is drawn: the output differs from the source inside the face box.
    x1, y1, x2, y2 = (int(v) for v in kinds["track_ended"][0]["box"])
    assert np.abs(frames[-1].astype(int) - sample_frames()[-1].astype(int))[y1 : y2 + 1, x1 : x2 + 1].max() > 100
    assert not list(tmp_path.glob(".*partial*")), "temporary video left behind"
    assert "detect" in result.stderr and "faces" in result.stderr


def test_recognises_the_enrolled_person_in_another_part(tmp_path: Path, tiny_bundle: Path, gallery_file: Path) -> None:
    """Enrolled from frames 0-39, recognised in frames 60-119; an unenrolled person stays unknown."""
    out = tmp_path / "events.jsonl"
    result = invoke(
        run_app, ["--video", second_half_video(), "--bundle", tiny_bundle, "--gallery", gallery_file, "--out", out]
    )
    assert result.exit_code == 0, result.output
    kinds = _by_type(read_events(out))
    assigned = kinds["identity_assigned"]
    assert [e["identity"] for e in assigned] == ["carphone"]
    assert assigned[0]["similarity"] > 0.7 and assigned[0]["second"] == "tom"
    assert "identity_changed" not in kinds
    final = kinds["track_ended"][0]
    assert final["identity"] == "carphone" and final["similarity"] > 0.8

    full = Gallery.load(gallery_file)
    only_tom = tmp_path / "tom.npz"
    Gallery(["tom"], full.embeddings[1:], [full.counts[1]], full.meta).save(only_tom)
    out2 = tmp_path / "events2.jsonl"
    result = invoke(
        run_app, ["--video", second_half_video(), "--bundle", tiny_bundle, "--gallery", only_tom, "--out", out2]
    )
    assert result.exit_code == 0, result.output
    kinds = _by_type(read_events(out2))
    assert [e["identity"] for e in kinds["identity_assigned"]] == ["unknown"]
    assert kinds["identity_assigned"][0]["best"] == "tom" and kinds["identity_assigned"][0]["similarity"] < 0.4
    assert kinds["track_ended"][0]["identity"] == "unknown"


def test_two_crossing_faces_keep_ids_and_identities(tmp_path: Path, tiny_bundle: Path, gallery_file: Path) -> None:
    frames, _ = crossing_scene()
    video = write_video(tmp_path / "crossing.mp4", frames, fps=25)
    out = tmp_path / "events.jsonl"
    args = ["--video", video, "--bundle", tiny_bundle, "--gallery", gallery_file, "--out", out, "--embed-every", "1"]
    result = invoke(run_app, [*args, "--max-latency-ms", "0"])
    assert result.exit_code == 0, result.output
    kinds = _by_type(read_events(out))
    assert sorted(e["track_id"] for e in kinds["track_started"]) == [1, 2]
    assert "identity_changed" not in kinds
    by_id = {e["track_id"]: e for e in kinds["track_ended"]}
    starts = {e["track_id"]: e for e in kinds["track_started"]}
    assert len(by_id) == 2
    for track_id, end in by_id.items():
        start_x, end_x = starts[track_id]["box"][0], end["box"][0]
        # Face A (the sample video's person) goes left to right, Tom right to left: no swap at the crossing.
        expected = "carphone" if start_x < end_x else "tom"
        assert end["identity"] == expected, (track_id, start_x, end_x, end["identity"])
        assert abs(end_x - start_x) > 150
        assert end["last_frame"] == 59 and end["reason"] == "end_of_stream"


def test_odd_frames_are_counted_not_fatal(parts: tuple[RetinaFaceDetector, FaceEncoder]) -> None:
    detector, encoder = parts
    face = sample_frames()[0]
    odd = [
        face[:, :, 0].copy(),  # grey
        np.dstack([face, np.full(face.shape[:2], 255, np.uint8)]),  # BGRA
        face.astype(np.uint16) * 257,  # 16-bit
        np.zeros((8, 8, 3), np.uint8),  # too small
        np.zeros((4, 4, 2), np.uint8),  # unusable channel count
        face,
    ]
    events = EventWriter(None)
    pipeline = Pipeline(detector, encoder, events)
    stats = pipeline.run(Frame(i, i / 30, image) for i, image in enumerate(odd))
    assert stats.frames == 4 and stats.faces == 4
    assert dict(stats.skipped_frames) == {"too_small": 1, "unreadable": 1}
    assert events.counts["track_started"] == 1


class _SpyEncoder(FaceEncoder):
    def __init__(self, inner: FaceEncoder) -> None:
        self.__dict__.update(inner.__dict__)
        self.batch_sizes: list[int] = []

    def embed(self, tensors):  # type: ignore[no-untyped-def, override]
        self.batch_sizes.append(len(tensors))
        return super().embed(tensors)


def _run_sample(parts: tuple[RetinaFaceDetector, FaceEncoder], **config: object) -> tuple[Pipeline, _SpyEncoder]:
    detector, encoder = parts
    spy = _SpyEncoder(encoder)
    pipeline = Pipeline(detector, spy, EventWriter(None), config=PipelineConfig(**config))  # type: ignore[arg-type]
    pipeline.run(Frame(i, i / 30, f) for i, f in enumerate(sample_frames()[:40]))
    return pipeline, spy


def test_batches_span_frames_and_respect_the_bounds(parts: tuple[RetinaFaceDetector, FaceEncoder]) -> None:
    every_frame = RecognitionBudget(every=1, max_embeddings=1000)
    batched, spy = _run_sample(parts, max_batch=8, max_latency_s=3600.0, budget=every_frame)
    assert spy.batch_sizes == [8] * 4 + [7], "batches of 8 faces from 8 frames, then the rest at the end"
    single, spy1 = _run_sample(parts, max_batch=8, max_latency_s=0.0, budget=every_frame)
    assert spy1.batch_sizes == [1] * 39, "a zero latency bound flushes every face at once"
    assert batched.stats.faces_embedded == single.stats.faces_embedded == 39
    assert (batched.stats.batches, single.stats.batches) == (5, 39)


def test_batched_and_unbatched_identity_vectors_agree(parts: tuple[RetinaFaceDetector, FaceEncoder]) -> None:
    detector, encoder = parts
    vectors: list[np.ndarray] = []
    for max_batch, latency in ((16, 3600.0), (1, 0.0)):
        events = EventWriter(None)
        cfg = PipelineConfig(max_batch=max_batch, max_latency_s=latency, include_embeddings=True)
        pipeline = Pipeline(detector, encoder, events, config=cfg)
        ended: list[Track] = []
        stream = pipeline.add_stream("source")
        stream.end_track = lambda track, reason, ended=ended: ended.append(track)  # type: ignore[method-assign]
        pipeline.run(Frame(i, i / 30, f) for i, f in enumerate(sample_frames()[:30]))
        assert len(ended) == 1
        vector = ended[0].aggregate.vector
        assert vector is not None
        vectors.append(vector)
    assert float(vectors[0] @ vectors[1]) > 0.9999


def test_budget_limits_embeddings(parts: tuple[RetinaFaceDetector, FaceEncoder]) -> None:
    pipeline, _ = _run_sample(parts, budget=RecognitionBudget(every=10, max_embeddings=1000))
    # Track confirmed at frame 1: embedded at frames 1, 11, 21, 31.
    assert pipeline.stats.faces_embedded == 4


class _FakeCapture:
    """A camera that delivers ``frames`` frames quickly, then fails (a dropped connection)."""

    def __init__(self, frames: int, opened: bool = True, delay: float = 0.001) -> None:
        self.left, self.opened, self.delay = frames, opened, delay

    def isOpened(self) -> bool:  # noqa: N802 - OpenCV's name
        return self.opened

    def read(self) -> tuple[bool, np.ndarray | None]:
        time.sleep(self.delay)
        if self.left <= 0:
            return False, None
        self.left -= 1
        return True, np.zeros((48, 64, 3), np.uint8)

    def get(self, prop: int) -> float:
        return 0.0

    def release(self) -> None:
        pass


def test_live_source_drops_frames_reconnects_and_gives_up() -> None:
    opened: list[int] = []

    def opener() -> _FakeCapture:
        opened.append(1)
        # First connection: 50 frames; one reconnect succeeds with 50 more; then the camera is gone.
        return _FakeCapture(50) if len(opened) <= 2 else _FakeCapture(0, opened=False)

    source = VideoSource("rtsp://camera.invalid/stream", opener=opener, reconnect_attempts=2, backoff_initial=0.01)
    source.open()
    seen = []
    with pytest.raises(InputError, match="gave up after 2 reconnect attempts"):
        for frame in source:
            seen.append(frame.index)
            time.sleep(0.01)  # processing slower than the camera
    source.close()
    assert source.stats.reconnects == 1
    assert source.stats.dropped > 0 and len(seen) + source.stats.dropped == source.stats.decoded
    assert seen == sorted(seen) and len(set(seen)) == len(seen)
    assert seen[-1] > len(seen), "dropped frames leave gaps in the indices"


def test_live_source_stops_promptly_on_close() -> None:
    source = VideoSource("rtsp://camera.invalid/s", opener=lambda: _FakeCapture(10**9, delay=0.002))
    source.open()
    iterator = iter(source)
    next(iterator)
    closer = threading.Timer(0.1, source.close)
    start = time.monotonic()
    closer.start()
    for _ in iterator:
        pass
    assert time.monotonic() - start < 3


def test_realtime_file_is_paced_and_drops_when_slow() -> None:
    source = VideoSource(str(SAMPLE_VIDEO), realtime=True).open()
    assert source.live
    start = time.monotonic()
    got = 0
    for frame in source:
        got += 1
        time.sleep(0.08)  # ~12 fps of processing against a 30 fps file
        if frame.index >= 60:
            break
    source.close()
    elapsed = time.monotonic() - start
    assert elapsed > 1.5, "a realtime file must not be read faster than its frame rate"
    assert source.stats.dropped > 10 and got < 40
