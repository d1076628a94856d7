"""A real Triton Inference Server on the demo bundle's serve repository, and facemoe as its client.

No mock server: the ``tritonserver`` the nvidia-pytriton wheel carries (or one on PATH) serves the generated
repository on 127.0.0.1. Without a server, tritonclient or the stub's numpy<2 the tests skip with the reason,
except under CI (``CI=true``), where the server is part of the job (.ci/run installs it) and they fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from facemoe.bundle import Bundle
from facemoe.errors import FaceMoEError
from facemoe.runtime.backends import open_backend
from facemoe.runtime.face_encoder import FaceEncoder

from runtime_fixtures import REPO, SAMPLE_VIDEO, read_events

DEMO = REPO / "src" / "facemoe" / "data" / "demo-bundle"


def _require_client() -> None:
    """Skip (fail under CI) unless tritonclient is installed."""
    try:
        import tritonclient.grpc  # noqa: F401
    except ImportError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI installs the serve extra: {exc}")
        pytest.skip(f"tritonclient is not installed: {exc}")


def _require_server() -> None:
    """Skip (fail under CI) unless a server, tritonclient and the stub's numpy are all here."""
    try:
        import tritonclient.grpc  # noqa: F401

        from facemoe.triton.server import find_server, stub_python_path

        find_server()
        stub_python_path()
    except (ImportError, FaceMoEError) as exc:
        reason = f"no Triton server setup here: {exc}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI runs the real-server tests: {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    _require_server()
    from facemoe.triton.repository import default_python_path
    from facemoe.triton.serve import write_serve_repository
    from facemoe.triton.server import TritonServer, stub_python_path

    root = tmp_path_factory.mktemp("triton") / "repository"
    write_serve_repository(DEMO, root, python_path=stub_python_path() + default_python_path())
    with TritonServer(root, ready_timeout=120) as running:
        yield running


@pytest.fixture(scope="module")
def local() -> Iterator[object]:
    with open_backend(DEMO, "onnxruntime", "fp32", max_batch=32) as backend:
        yield backend


def _faces(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (count, 3, 120, 120)).astype(np.float32)


@pytest.mark.parametrize("scheme", ["grpc", "http"])
def test_served_embeddings_equal_local_onnxruntime(server, local, scheme: str) -> None:
    url = server.grpc_url if scheme == "grpc" else server.http_url
    faces = _faces(37)  # more than the served max batch (32): split in two requests
    with open_backend(DEMO, "triton", url=url) as remote:
        assert remote.name == "triton" and remote.max_batch == 32 and remote.embedding_size == 512
        served = remote.embed(faces)
    assert served.shape == (37, 512)
    assert np.abs(served - local.embed(faces)).max() <= 1e-5


def _metric(server, name: str, model: str) -> float:
    with urllib.request.urlopen(server.metrics_url, timeout=5) as response:
        text = response.read().decode()
    found = re.search(rf'^{name}{{model="{model}",version="1"}} ([0-9.e+]+)$', text, re.M)
    assert found, f"{name} for {model} missing from {server.metrics_url}"
    return float(found.group(1))


def test_concurrent_requests_are_batched_by_triton(server) -> None:
    before = {
        k: _metric(server, k, "facemoe_embedder") for k in ("nv_inference_request_success", "nv_inference_exec_count")
    }
    errors: list[BaseException] = []

    def client(seed: int) -> None:
        try:
            with open_backend(DEMO, "triton", url=server.grpc_url) as remote:
                for round_ in range(3):
                    remote.embed(_faces(1, seed * 10 + round_))
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    # Triton refreshes its metrics every couple of seconds: wait until all 36 requests are counted.
    deadline = time.monotonic() + 10
    while True:
        now = {k: _metric(server, k, "facemoe_embedder") - v for k, v in before.items()}
        if now["nv_inference_request_success"] >= 36 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    requests, executions = now["nv_inference_request_success"], now["nv_inference_exec_count"]
    assert requests == 36
    assert executions < requests, f"{requests:g} requests ran as {executions:g} executions: nothing was batched"


def test_ensemble_takes_uint8_crops_like_local_preprocessing(server, local) -> None:
    crops = np.random.default_rng(3).integers(0, 256, (5, 112, 112, 3), dtype=np.uint8)
    encoder = FaceEncoder(local, Bundle(DEMO).manifest.preprocessing)
    expected = local.embed(np.stack([encoder.prepare(crop) for crop in crops]))
    with open_backend(DEMO, "triton", url=server.grpc_url, model="facemoe") as remote:
        assert remote.takes_crops
        served = remote.embed_crops(crops)
        with pytest.raises(FaceMoEError, match="takes aligned uint8 crops"):
            remote.embed(_faces(1))
    assert np.abs(served - expected).max() <= 1e-5


def test_server_down_is_one_line() -> None:
    from facemoe.triton.server import free_port

    url = f"grpc://127.0.0.1:{free_port()}"  # nothing listens there
    _require_client()
    started = time.monotonic()
    with pytest.raises(FaceMoEError) as caught:
        open_backend(DEMO, "triton", url=url, timeout=1.0)
    message = str(caught.value)
    assert message.startswith(f"triton server at {url} is not reachable (") and "\n" not in message
    assert time.monotonic() - started < 15, "the bounded retries took too long"


def test_unknown_model_and_other_bundle_are_refused(server, tmp_path: Path) -> None:
    with pytest.raises(FaceMoEError, match=f"model nothing not ready on {re.escape(server.grpc_url)}"):
        open_backend(DEMO, "triton", url=server.grpc_url, model="nothing")
    other = tmp_path / "other-bundle"
    shutil.copytree(DEMO, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["created"] = "2026-01-01T00:00:00+00:00"  # another export of the same files
    (other / "manifest.json").write_text(json.dumps(manifest, indent=1))
    with pytest.raises(FaceMoEError) as caught:
        open_backend(other, "triton", url=server.http_url)
    message = str(caught.value)
    assert message.startswith(f"{server.http_url} serves a different model (manifest sha256 ")
    assert str(other) in message and "\n" not in message


def _run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-c", "from facemoe.cli.run_cmd import main; main()", *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_facemoe_run_through_triton_tracks_like_local(server, tmp_path: Path) -> None:
    common = ["--bundle", DEMO, "--video", SAMPLE_VIDEO, "--max-frames", "40", "-q", "--audit-rate", "0"]
    results = {}
    for name, extra in (("local", ["--backend", "onnxruntime"]), ("triton", ["--backend", "triton"])):
        if name == "triton":
            extra += ["--triton-url", server.grpc_url]
        out = tmp_path / f"{name}.jsonl"
        done = _run_cli([*map(str, common), *extra, "--out", str(out)], tmp_path)
        assert done.returncode == 0, done.stderr
        results[name] = read_events(out)
    assert "triton (facemoe_embedder at grpc://" in results["triton"][0]["backend"]
    counts = {name: sum(e["event"] == "track_started" for e in events) for name, events in results.items()}
    assert counts["local"] > 0 and counts["triton"] == counts["local"]
    ended = {name: events[-1] for name, events in results.items()}
    assert ended["triton"]["faces_embedded"] == ended["local"]["faces_embedded"] > 0


def test_facemoe_run_refuses_a_down_server_in_one_line(tmp_path: Path) -> None:
    _require_client()
    from facemoe.triton.server import free_port

    url = f"http://127.0.0.1:{free_port()}"
    args = ["--bundle", DEMO, "--video", SAMPLE_VIDEO, "--backend", "triton", "--triton-url", url]
    done = _run_cli([*map(str, args), "--triton-timeout", "1", "--out", str(tmp_path / "e.jsonl")], tmp_path)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors and f"triton server at {url} is not reachable" in errors[0], done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "e.jsonl").exists()


def test_facemoe_serve_stops_cleanly_on_sigint(tmp_path: Path) -> None:
    _require_server()
    args = ["serve", str(DEMO), "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0"]
    command = [sys.executable, "-c", "from facemoe.cli.main import main; main()", *args]
    log = tmp_path / "serve.out"
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 120
            while "ready" not in log.read_text() and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            text = log.read_text()
            assert "ready" in text, text
            url = re.search(r"HTTP +(http://\S+)", text)
            assert url, text
            with urllib.request.urlopen(f"{url.group(1)}/v2/health/ready", timeout=5) as response:
                assert response.status == 200
            process.send_signal(signal.SIGINT)
            started = time.monotonic()
            code = process.wait(30)
            assert time.monotonic() - started < 12
        finally:
            if process.poll() is None:
                process.kill()
    assert code == 0, log.read_text()
    assert "stopped" in log.read_text()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{url.group(1)}/v2/health/ready", timeout=2)
