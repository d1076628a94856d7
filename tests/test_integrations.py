"""Prometheus metrics scraped from a running pipeline, and events published to a real Mosquitto broker.

The broker is the Debian package ``mosquitto`` started by the tests on a free 127.0.0.1 port (no mock): a
missing binary skips these tests on a developer machine and fails them under CI (.ci/run installs it).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from prometheus_client.parser import text_string_to_metric_families

from facemoe.bundle import Bundle
from facemoe.cli.run_cmd import app as run_app
from facemoe.cli.run_integrations import source_id
from facemoe.runtime.backends import open_backend
from facemoe.runtime.detection import RetinaFaceDetector
from facemoe.runtime.events import EventWriter
from facemoe.runtime.metrics import RunMetrics
from facemoe.runtime.mqtt_sink import parse_mqtt_url
from facemoe.runtime.pipeline import FaceEncoder, Pipeline, PipelineConfig
from facemoe.runtime.video_source import VideoSource

from runtime_fixtures import SAMPLE_VIDEO, error_lines, invoke, read_events, sample_frames, write_video

SRC = Path(__file__).resolve().parents[1] / "src"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _value(scrape: dict, name: str, **labels: str) -> float | None:
    return scrape.get((name, tuple(sorted(labels.items()))))


# -- metrics -------------------------------------------------------------------------------------------
def test_metrics_scraped_during_and_after_a_run_equal_the_events(tmp_path: Path, tiny_bundle: Path) -> None:
    bundle = Bundle(tiny_bundle)
    engine = open_backend(bundle, "onnxruntime", "fp32")
    out = tmp_path / "events.jsonl"
    events = EventWriter(out)
    # max_batch 2 with a long latency bound: batches of 2, so the batch-size histogram has a size to check.
    pipeline = Pipeline(
        RetinaFaceDetector(),
        FaceEncoder(engine, bundle.manifest.preprocessing),
        events,
        config=PipelineConfig(max_batch=2, max_latency_s=10.0),
    )
    source = VideoSource(str(SAMPLE_VIDEO), realtime=True).open()  # 4 s at the file's frame rate
    metrics = RunMetrics(backend=engine.describe(), precision=engine.precision)
    port = metrics.serve(0)
    pipeline.add_stream("carphone", source_stats=source.stats)
    metrics.attach(pipeline)
    during: list[float] = []
    stop = threading.Event()

    def scrape_while_running() -> None:
        while not stop.is_set():
            value = _value(_scrape(port), "facemoe_frames_total", source="carphone")
            during.append(value if value is not None else -1.0)
            time.sleep(0.2)

    scraper = threading.Thread(target=scrape_while_running)
    scraper.start()
    try:
        pipeline.run(source, source_stats=source.stats)
    finally:
        stop.set()
        scraper.join()
        source.close()
    final = _scrape(port)
    metrics.close()
    engine.close()
    events.close()

    assert any(0 < v < 120 for v in during), f"no scrape saw the run in progress: {during}"
    assert during == sorted(during), "a counter went down"
    ended = read_events(out)[-1]
    kinds = Counter(e["event"] for e in read_events(out))
    label = {"source": "carphone"}
    assert _value(final, "facemoe_frames_total", **label) == ended["frames"] == 120
    assert _value(final, "facemoe_faces_total", **label) == ended["faces"] > 0
    assert _value(final, "facemoe_embeddings_total", **label) == ended["faces_embedded"] > 2
    assert _value(final, "facemoe_tracks_total", **label) == ended["tracks"] == kinds["track_started"]
    assert _value(final, "facemoe_dropped_frames_total", **label) == ended["dropped_frames"]
    for kind, count in kinds.items():
        where = "_run" if kind.startswith("run_") else "carphone"  # run-level events: source null
        assert _value(final, "facemoe_events_total", event=kind, source=where) == count, kind
    shared = {"source": "_all"}  # the embedding batches are shared by the sources
    batches = pipeline.stats.batches
    assert _value(final, "facemoe_embedding_batch_size_count", **shared) == batches
    assert _value(final, "facemoe_embedding_batch_size_sum", **shared) == ended["faces_embedded"]
    assert _value(final, "facemoe_embedding_batch_size_bucket", le="1.0", **shared) < batches, "batches of 2"
    embed_count = _value(final, "facemoe_stage_seconds_count", stage="embed", **shared)
    assert embed_count == batches
    embed_sum = _value(final, "facemoe_stage_seconds_sum", stage="embed", **shared)
    assert embed_sum == pytest.approx(ended["stage_seconds"]["embed"], abs=1e-3)
    assert _value(final, "facemoe_stage_seconds_count", stage="detect", **label) == 120
    assert _value(final, "facemoe_embedding_queue_depth", **label) == 0
    info = {"backend": engine.describe(), "precision": "fp32", **shared}
    assert _value(final, "facemoe_backend_info", **info) == 1


def test_metrics_port_in_use_is_a_user_error() -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        with pytest.raises(Exception, match=f"--metrics-port {port}: cannot listen on 127.0.0.1:{port}"):
            RunMetrics(backend="b", precision="fp32").serve(port)
    finally:
        taken.close()


def test_cli_refuses_a_taken_port_and_a_bad_url_before_writing(tmp_path: Path, tiny_bundle: Path) -> None:
    out = tmp_path / "events.jsonl"
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    base = ["--video", SAMPLE_VIDEO, "--bundle", tiny_bundle, "--out", out, "--max-frames", "3"]
    try:
        for extra, message in (
            (["--metrics-port", port], f"cannot listen on 127.0.0.1:{port}"),
            (["--mqtt", "mqtt://127.0.0.1:1883/a/#"], "wildcards"),
        ):
            result = invoke(run_app, [*base, *extra])
            assert result.exit_code == 2, result.output
            assert any(message in line for line in error_lines(result.stderr)), result.stderr
            assert not out.exists(), "no events file for a refused run"
    finally:
        taken.close()


def test_source_ids_and_mqtt_urls() -> None:
    assert source_id("/videos/door cam.mp4") == "door cam"
    assert source_id("rtsp://10.0.0.2:554/live/gate.sdp") == "gate"
    assert source_id("0") == "webcam0"
    target = parse_mqtt_url("mqtt://broker.lan/site/a")
    assert (target.host, target.port, target.prefix, target.tls) == ("broker.lan", 1883, "site/a", False)
    assert parse_mqtt_url("mqtts://b").port == 8883
    for bad in ("http://b/x", "mqtt:///x", "mqtt://b/x/#", "mqtt://b:99999/x"):
        with pytest.raises(Exception, match="--mqtt"):
            parse_mqtt_url(bad)


# -- MQTT ----------------------------------------------------------------------------------------------
class Broker:
    """A real Mosquitto on 127.0.0.1; persistent, so a subscriber's session outlives a restart."""

    def __init__(self, binary: str, directory: Path) -> None:
        self.binary, self.port = binary, _free_port()
        self.config = directory / "mosquitto.conf"
        self.config.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
            f"persistence_location {directory}/\nmax_queued_messages 0\n"
        )
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(self.config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            assert self.proc.poll() is None, self.proc.stderr.read().decode() if self.proc.stderr else ""
            time.sleep(0.05)
        raise AssertionError("mosquitto did not start listening")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: mosquitto saves its persistence file
            self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    binary = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None
    )
    if binary is None:
        # CI installs it (.ci/run): there a missing broker must not turn these checks into silent skips.
        message = "mosquitto is not installed (apt-get install mosquitto): MQTT publishing not checked"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    (tmp_path / "broker").mkdir()
    server = Broker(binary, tmp_path / "broker")
    server.start()
    yield server
    server.stop()


class Subscriber:
    """A paho client with a persistent session (QoS 1): what it missed while the broker was down is queued."""

    def __init__(self, port: int, topic: str) -> None:
        self.messages: list[tuple[str, dict[str, Any]]] = []
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="facemoe-test-sub", clean_session=False)
        self.client.reconnect_delay_set(1, 1)
        self.subscribed = threading.Event()
        self.client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_message = lambda _c, _u, msg: self.messages.append((msg.topic, json.loads(msg.payload)))
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self.subscribed.wait(10), "the test subscriber could not subscribe"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _cli(args: list[object]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "facemoe.cli.run_cmd", *(str(a) for a in args)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for(condition: Any, proc: subprocess.Popen, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended before {what}: {proc.communicate()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _as_sent(events: list[dict]) -> list[str]:
    return sorted(json.dumps(e, sort_keys=True) for e in events)


def test_cli_metrics_and_mqtt_messages_equal_the_events_file(tmp_path: Path, tiny_bundle: Path, broker: Broker) -> None:
    out, metrics_port = tmp_path / "events.jsonl", _free_port()
    subscriber = Subscriber(broker.port, "fm/#")
    args = ["--video", SAMPLE_VIDEO, "--bundle", tiny_bundle, "--realtime", "--out", out, "-q"]
    proc = _cli([*args, "--metrics-port", metrics_port, "--mqtt", f"mqtt://127.0.0.1:{broker.port}/fm"])
    try:

        def scraped() -> bool:
            try:
                return (_value(_scrape(metrics_port), "facemoe_frames_total", source="carphone_pristine") or 0) > 0
            except OSError:
                return False

        _wait_for(scraped, proc, "a scrape that counts frames")
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill() if proc.poll() is None else None
    assert proc.returncode == 0, stderr
    events = read_events(out)
    assert events[-1]["mqtt"] == {
        "published": len(events) - 1,
        "delivered": len(events) - 1,
        "undelivered": 0,
        "dropped": 0,
        "disconnects": 0,
    }
    assert f"mqtt: {len(events)} of {len(events)} events delivered" in " ".join(stderr.split())
    deadline = time.monotonic() + 5
    while len(subscriber.messages) < len(events) and time.monotonic() < deadline:
        time.sleep(0.05)
    subscriber.close()
    assert _as_sent([m for _, m in subscriber.messages]) == _as_sent(events)
    for topic, m in subscriber.messages:
        assert topic == f"fm/{m['source'] or '_run'}/{m['event']}"
        assert m["source"] in (None, "carphone_pristine")


def test_broker_restarted_mid_run_loses_no_event(tmp_path: Path, tiny_bundle: Path, broker: Broker) -> None:
    # 8 s of real-time video where the face comes and goes: a track starts and ends every half second.
    blank = np.full_like(sample_frames()[0], 90)
    frames = [f for i in range(16) for f in (*sample_frames()[i * 7 : i * 7 + 10], *[blank] * 5)]
    video = write_video(tmp_path / "blinking.avi", frames, fourcc="MJPG")
    out = tmp_path / "events.jsonl"
    subscriber = Subscriber(broker.port, "fm/#")
    args = ["--video", video, "--bundle", tiny_bundle, "--realtime", "--max-age", "2", "--out", out, "-q"]
    proc = _cli([*args, "--mqtt", f"mqtt://127.0.0.1:{broker.port}/fm"])
    try:
        _wait_for(lambda: len(subscriber.messages) >= 3, proc, "the first events at the subscriber")
        broker.stop()
        down_at = len(out.read_text().splitlines())
        time.sleep(1.5)
        written_while_down = len(out.read_text().splitlines()) - down_at
        broker.start()
        _, stderr = proc.communicate(timeout=90)
    finally:
        proc.kill() if proc.poll() is None else None
    assert proc.returncode == 0, stderr
    events = read_events(out)
    assert written_while_down > 0, "no event was emitted while the broker was down: the test checks nothing"
    report = events[-1]["mqtt"]
    assert report["disconnects"] >= 1, report
    assert report["undelivered"] == 0 and report["dropped"] == 0, report
    deadline = time.monotonic() + 10
    while len({json.dumps(m, sort_keys=True) for _, m in subscriber.messages}) < len(events):
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    subscriber.close()
    # QoS 1 is at least once: a message in flight when the broker stopped may arrive twice.
    received = sorted({json.dumps(m, sort_keys=True) for _, m in subscriber.messages})
    assert received == _as_sent(events)


def test_unreachable_broker_never_blocks_the_run_and_is_counted(tmp_path: Path, tiny_bundle: Path) -> None:
    out, nobody = tmp_path / "events.jsonl", _free_port()  # nothing listens there
    args = ["--video", SAMPLE_VIDEO, "--bundle", tiny_bundle, "--out", out, "--max-frames", "40", "-q"]
    start = time.monotonic()
    proc = _cli([*args, "--mqtt", f"mqtt://127.0.0.1:{nobody}/fm"])
    _, stderr = proc.communicate(timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, stderr
    events = read_events(out)
    kinds = [e["event"] for e in events]
    assert kinds == ["run_started", "source_started", "track_started", "track_ended", "source_ended", "run_ended"]
    assert events[-1]["mqtt"] == {
        "published": 5,
        "delivered": 0,
        "undelivered": 5,
        "dropped": 0,
        "disconnects": 0,
    }
    assert "mqtt: 0 of 6 events delivered; 6 not delivered" in " ".join(stderr.split())
    # The waits at the end are bounded (10 s for the events, 3 s for run_ended), on top of the run itself.
    assert elapsed < 60
