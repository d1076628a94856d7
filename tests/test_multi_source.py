"""Several sources in one facemoe-run: per-source events, failures, reconnects, fairness, Ctrl-C, metrics, MQTT."""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
from test_integrations import Broker, Subscriber, _cli, _free_port, _scrape, _value, _wait_for, broker  # noqa: F401

from facemoe.cli.run_cmd import app as run_app
from facemoe.errors import InputError
from facemoe.runtime.embed_batcher import EmbedBatcher, PendingFace
from facemoe.runtime.source_spec import SourceSpec, assign_ids, load_sources_file

from runtime_fixtures import SAMPLE_VIDEO, error_lines, invoke, padded_tom, read_events, sample_frames, write_video


def _face(source: str, at: float) -> PendingFace:
    return PendingFace(source, None, np.zeros(1, np.float32), {"frame": 0}, at)


# -- the shared embedding queue --------------------------------------------------------------------
def test_a_busy_source_cannot_starve_a_quiet_one() -> None:
    batcher = EmbedBatcher(max_batch=4, max_latency_s=0.1)
    for k in range(10):  # a busy camera fills the queue well past one batch
        batcher.add(_face("busy", 1.0 + k * 0.001))
    batcher.add(_face("quiet", 1.02))  # the quiet camera's face comes last
    assert batcher.due(1.03)
    first = batcher.take(1.03)
    assert len(first) == 4 and "quiet" in [p.source for p in first], [p.source for p in first]
    # Overdue faces go first (oldest first), whatever their source.
    later = EmbedBatcher(max_batch=2, max_latency_s=0.1)
    for k in range(3):
        later.add(_face("busy", 1.0 + k))
    later.add(_face("quiet", 5.0))
    assert [p.queued_at for p in later.take(3.05)] == [1.0, 2.0]
    assert later.batches == 1 and later.mean_batch == 2.0
    # Overloaded: every face is overdue; the quiet camera's still goes in the first batch.
    loaded = EmbedBatcher(max_batch=4, max_latency_s=0.1)
    for k in range(12):
        loaded.add(_face("busy", 1.0 + k * 0.01))
    loaded.add(_face("quiet", 1.2))
    first = loaded.take(1.5)
    assert [p.source for p in first].count("quiet") == 1 and len(first) == 4, [p.source for p in first]
    assert [p.queued_at for p in first if p.source == "busy"] == [1.0, 1.01, 1.02]  # oldest first within one


# -- the sources file -------------------------------------------------------------------------------
def test_sources_file_yaml_and_json_and_errors(tmp_path: Path) -> None:
    yaml_file = tmp_path / "cams.yaml"
    yaml_file.write_text(
        "sources:\n  - {id: gate, url: 'rtsp://10.0.0.2/live', realtime: true, det_size: 320, roi: [0, 10, 100, 80]}\n"
        "  - /videos/door.mp4\n  - path: /other/door.mp4\n  - 0\n"
    )
    specs = assign_ids(load_sources_file(yaml_file))
    assert [s.id for s in specs] == ["gate", "door", "door-2", "webcam0"]
    assert specs[0].roi == (0, 10, 100, 80) and specs[0].det_size == 320 and specs[0].realtime is True
    json_file = tmp_path / "cams.json"
    json_file.write_text(json.dumps([{"url": "a.mp4", "reconnect_attempts": -1}]))
    assert load_sources_file(json_file)[0].reconnect_attempts == -1
    for text, message in (
        ("[{id: a}]", "entry 1: needs exactly one of 'url' or 'path'"),
        ("- a.mp4\n- {url: b.mp4, roi: [1, 2]}", "entry 2: 'roi' must be"),
        ("- {url: b.mp4, id: 'a/b'}", "entry 1: source id 'a/b' may not"),
        ("- {url: b.mp4, colour: red}", "entry 1: unknown key(s) colour"),
        ("[a, b", "not valid YAML"),
        ("{}", "expected a non-empty list"),
    ):
        yaml_file.write_text(text)
        with pytest.raises(
            InputError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
        ) as err:
            load_sources_file(yaml_file)
        assert str(err.value).startswith(f"{yaml_file}: "), str(err.value)  # the one line names the file
    json_file.write_text("[{")
    with pytest.raises(InputError, match=f"{json_file}: not valid JSON"):
        load_sources_file(json_file)
    assert [s.id for s in assign_ids([SourceSpec("x/a.mp4"), SourceSpec("y/a.mp4")])] == ["a", "a-2"]
    # An explicit id is kept; a derived one steps aside, and never takes a reserved label.
    specs = assign_ids([SourceSpec("x/a.mp4"), SourceSpec("y/b.mp4", id="a"), SourceSpec("v/_run.mp4")])
    assert [s.id for s in specs] == ["a-2", "a", "_run-2"]
    with pytest.raises(InputError, match="source id 'gate' is given to two sources"):
        assign_ids([SourceSpec("a.mp4", id="gate"), SourceSpec("b.mp4", id="gate")])


# -- whole runs -------------------------------------------------------------------------------------
def _three_videos(tmp_path: Path) -> list[Path]:
    photo = cv2.resize(padded_tom(60), (240, 232))
    still = write_video(tmp_path / "photo.avi", [photo] * 20, fourcc="MJPG")
    moving = write_video(tmp_path / "moving.avi", list(sample_frames()[:30]), fourcc="MJPG")
    small = [cv2.resize(f, (88, 72), interpolation=cv2.INTER_AREA) for f in sample_frames()[30:60]]
    low = write_video(tmp_path / "low.avi", small, fourcc="MJPG")
    return [still, moving, low]


def _by_source(events: list[dict]) -> dict[str, Counter]:
    counts: dict[str, Counter] = {}
    for e in events:
        counts.setdefault(str(e["source"]), Counter())[e["event"]] += 1
    return counts


def test_three_sources_give_what_each_gives_alone(tmp_path: Path, tiny_bundle: Path) -> None:
    videos = _three_videos(tmp_path)
    out = tmp_path / "all.jsonl"
    args = ["--bundle", tiny_bundle, "-q", "--max-batch", "8"]
    result = invoke(run_app, [*(a for v in videos for a in ("--video", v)), *args, "--out", out])
    assert result.exit_code == 0, result.output
    events = read_events(out)
    assert events[0]["event"] == "run_started" and events[-1]["event"] == "run_ended"
    assert [s["id"] for s in events[0]["sources"]] == ["photo", "moving", "low"]
    together = _by_source(events)
    for video in videos:
        alone_out = tmp_path / f"{video.stem}.jsonl"
        assert invoke(run_app, ["--video", video, *args, "--out", alone_out]).exit_code == 0
        alone = _by_source(read_events(alone_out))[video.stem]
        assert together[video.stem]["track_started"] == alone["track_started"], video.stem
        assert together[video.stem]["source_ended"] == 1
    assert together["photo"]["track_started"] == 1 and together["moving"]["track_started"] >= 1
    ended = events[-1]
    assert {s["id"]: s["frames"] for s in ended["sources"]} == {"photo": 20, "moving": 30, "low": 30}
    assert ended["frames"] == 80 and ended["mean_batch"] > 1.0
    # Track ids are per source, from 1.
    for sid in ("photo", "moving"):
        ids = [e["track_id"] for e in events if e["event"] == "track_started" and e["source"] == sid]
        assert ids[0] == 1


def test_a_source_that_fails_to_open_is_reported_and_the_others_run(tmp_path: Path, tiny_bundle: Path) -> None:
    out = tmp_path / "e.jsonl"
    missing = tmp_path / "gone.mp4"
    args = ["--video", SAMPLE_VIDEO, "--video", missing, "--bundle", tiny_bundle, "--max-frames", "10", "-q"]
    result = invoke(run_app, [*args, "--out", out])
    assert result.exit_code == 2, result.output
    assert any(f"{missing}: no such file" in line for line in error_lines(result.stderr)), result.stderr
    events = read_events(out)
    entry = next(s for s in events[0]["sources"] if s["id"] == "gone")
    assert "no such file" in entry["error"]
    failed = [e for e in events if e["event"] == "source_ended" and e["source"] == "gone"]
    assert failed[0]["reason"] == "open_failed"
    assert events[-1]["sources"][0]["frames"] == 10
    # All sources failing: one line, no events file.
    nothing = tmp_path / "none.jsonl"
    result = invoke(
        run_app, ["--video", missing, "--video", tmp_path / "b.mp4", "--bundle", tiny_bundle, "--out", nothing]
    )
    assert result.exit_code == 2 and len(error_lines(result.stderr)) == 1, result.stderr
    assert "no source could be opened" in result.stderr and not nothing.exists()


def test_save_video_needs_one_source(tmp_path: Path, tiny_bundle: Path) -> None:
    args = ["--video", SAMPLE_VIDEO, "--video", SAMPLE_VIDEO, "--bundle", tiny_bundle, "--out", tmp_path / "e"]
    result = invoke(run_app, [*args, "--save-video", tmp_path / "v.mp4"])
    assert result.exit_code == 2 and "--save-video needs a single source" in result.stderr
    assert not (tmp_path / "e").exists()


def test_ctrl_c_ends_every_source_cleanly(tmp_path: Path, tiny_bundle: Path) -> None:
    out = tmp_path / "e.jsonl"
    args = ["--video", SAMPLE_VIDEO, "--video", SAMPLE_VIDEO, "--bundle", tiny_bundle, "--realtime", "-q"]
    proc = _cli([*args, "--out", out])
    try:
        _wait_for(lambda: out.exists() and "track_started" in out.read_text(), proc, "a track")
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill() if proc.poll() is None else None
    assert proc.returncode == 130, stderr
    events = read_events(out)
    assert events[-1]["event"] == "run_ended" and events[-1]["reason"] == "interrupted"
    ended = [e for e in events if e["event"] == "source_ended"]
    assert sorted(e["source"] for e in ended) == ["carphone_pristine", "carphone_pristine-2"]
    assert all(e["reason"] == "interrupted" for e in ended)
    started = {(e["source"], e["track_id"]) for e in events if e["event"] == "track_started"}
    closed = {(e["source"], e["track_id"]) for e in events if e["event"] == "track_ended"}
    assert started == closed and all(e["reason"] == "interrupted" for e in events if e["event"] == "track_ended")


def test_two_sources_metrics_and_mqtt(tmp_path: Path, tiny_bundle: Path, broker: Broker) -> None:  # noqa: F811
    out, port = tmp_path / "e.jsonl", _free_port()
    second = write_video(tmp_path / "gate.avi", list(sample_frames()[:60]), fourcc="MJPG")
    subscriber = Subscriber(broker.port, "fm/#")
    args = ["--video", SAMPLE_VIDEO, "--video", second, "--bundle", tiny_bundle, "--realtime", "-q", "--out", out]
    proc = _cli([*args, "--metrics-port", port, "--mqtt", f"mqtt://127.0.0.1:{broker.port}/fm"])
    seen: set[str] = set()
    try:

        def both_labelled() -> bool:
            try:
                scrape = _scrape(port)
            except OSError:
                return False
            for sid in ("carphone_pristine", "gate"):
                if (_value(scrape, "facemoe_frames_total", source=sid) or 0) > 0:
                    seen.add(sid)
            return len(seen) == 2

        _wait_for(both_labelled, proc, "frames of both sources in a scrape")
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill() if proc.poll() is None else None
    assert proc.returncode == 0, stderr
    events = read_events(out)
    deadline = time.monotonic() + 5
    while len(subscriber.messages) < len(events) and time.monotonic() < deadline:
        time.sleep(0.05)
    subscriber.close()
    sent = sorted(json.dumps(m, sort_keys=True) for _, m in subscriber.messages)
    assert sent == sorted(json.dumps(e, sort_keys=True) for e in events)
    for topic, message in subscriber.messages:
        assert topic == f"fm/{message['source'] or '_run'}/{message['event']}"
    assert {m["source"] for _, m in subscriber.messages} == {None, "carphone_pristine", "gate"}


def test_a_dropped_live_source_reconnects_while_another_keeps_producing(tmp_path: Path, tiny_bundle: Path) -> None:
    from test_pipeline_e2e import _FakeCapture

    from facemoe.bundle import Bundle
    from facemoe.runtime.backends import open_backend
    from facemoe.runtime.detection import RetinaFaceDetector
    from facemoe.runtime.events import EventWriter
    from facemoe.runtime.face_encoder import FaceEncoder
    from facemoe.runtime.pipeline import Pipeline
    from facemoe.runtime.source_mux import SourceMux
    from facemoe.runtime.video_source import VideoSource

    opened: list[int] = []

    def camera() -> _FakeCapture:  # 30 frames, the connection drops, a reconnect gives 30 more
        opened.append(1)
        return _FakeCapture(30, delay=0.01) if len(opened) <= 2 else _FakeCapture(0, opened=False)

    bundle = Bundle(tiny_bundle)
    engine = open_backend(bundle, "onnxruntime", "fp32")
    out = tmp_path / "e.jsonl"
    live = VideoSource("rtsp://cam.invalid/a", opener=camera, reconnect_attempts=1, backoff_initial=0.05).open()
    video = VideoSource(str(SAMPLE_VIDEO)).open()
    pipeline = Pipeline(RetinaFaceDetector(), FaceEncoder(engine, bundle.manifest.preprocessing), EventWriter(out))
    for sid, source in (("cam", live), ("file", video)):
        pipeline.add_stream(sid, source_stats=source.stats)
    mux = SourceMux({"cam": live, "file": video}).start()
    try:
        with pytest.raises(InputError, match="gave up after 1 reconnect"):
            pipeline.run_rounds(mux.rounds(), stop=mux.stop)
    finally:
        mux.close()
        engine.close()
    events = read_events(out)
    cam_end = next(e for e in events if e["event"] == "source_ended" and e["source"] == "cam")
    assert cam_end["reason"] == "source_error" and cam_end["reconnects"] == 1
    file_end = next(e for e in events if e["event"] == "source_ended" and e["source"] == "file")
    assert file_end["reason"] == "end_of_stream" and file_end["frames"] == 120 and file_end["tracks"] >= 1
    assert events[-1]["reason"] == "source_error" and events[-1]["event"] == "run_ended"


def test_detect_every_runs_the_detector_on_every_nth_frame(tmp_path: Path, tiny_bundle: Path) -> None:
    counts = {}
    for every in (1, 3):
        out = tmp_path / f"e{every}.jsonl"
        args = ["--video", SAMPLE_VIDEO, "--bundle", tiny_bundle, "--detect-every", every, "--out", out, "-q"]
        result = invoke(run_app, args)
        assert result.exit_code == 0, result.output
        events = read_events(out)
        assert events[0]["detect_every"] == every
        counts[every] = events[-1]
    assert counts[1]["frames"] == counts[3]["frames"] == 120
    # Faces are counted (and embedded) only on detected frames: 40 of 120 with N = 3.
    assert counts[3]["faces"] == 40 and counts[1]["faces"] == 120
    assert counts[3]["tracks"] == counts[1]["tracks"] == 1


def test_sources_file_roi_in_full_frame_pixels(tmp_path: Path, tiny_bundle: Path) -> None:
    cams = tmp_path / "cams.yaml"
    cams.write_text(
        f"- {{id: face, path: '{SAMPLE_VIDEO}', roi: [40, 10, 110, 120], det_size: 320}}\n"
        f"- {{id: empty, path: '{SAMPLE_VIDEO}', roi: [0, 0, 40, 144]}}\n"
    )
    out = tmp_path / "e.jsonl"
    args = ["--sources", cams, "--video", SAMPLE_VIDEO, "--bundle", tiny_bundle, "--max-frames", "20", "-q"]
    result = invoke(run_app, [*args, "--out", out])
    assert result.exit_code == 0, result.output
    events = read_events(out)
    totals = {s["id"]: s for s in events[-1]["sources"]}
    assert totals["empty"]["faces"] == 0 and totals["face"]["faces"] == totals["carphone_pristine"]["faces"] == 20
    boxes = {
        e["source"]: np.array(e["box"]) for e in events if e["event"] == "track_started" and e["source"] != "empty"
    }
    assert np.abs(boxes["face"] - boxes["carphone_pristine"]).max() < 4.0, boxes  # offset back to the full frame
    cams.write_text(f"- {{id: x, path: '{SAMPLE_VIDEO}', roi: [170, 0, 40, 40]}}\n")
    result = invoke(run_app, ["--sources", cams, "--bundle", tiny_bundle, "--out", tmp_path / "bad.jsonl"])
    assert result.exit_code == 2 and "lies outside its 176x144 frame" in result.stderr
    assert not (tmp_path / "bad.jsonl").exists()
