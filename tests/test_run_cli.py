"""``facemoe-run`` on bad and unusual input: one-line errors with exit code 2, or counted skips."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from facemoe.cli.run_cmd import app as run_app
from facemoe.runtime.gallery import Gallery

from runtime_fixtures import (
    SAMPLE_VIDEO,
    error_lines,
    gallery_file,
    invoke,
    padded_tom,
    read_events,
    read_video,
    sample_frames,
    write_video,
)

__all__ = ["gallery_file"]  # fixture used by name


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Runs without --out write events-<time>.jsonl into the current directory: keep them out of the repo.
    monkeypatch.chdir(tmp_path)


def _fails(args: list[object], message: str) -> None:
    result = invoke(run_app, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1, f"more than the error line: {result.stderr}"


def _succeeds(args: list[object], out: Path) -> list[dict]:
    result = invoke(run_app, [*(str(a) for a in args), "--out", str(out)])
    assert result.exit_code == 0, result.output
    events = read_events(out)
    assert events[-1]["event"] == "run_ended"
    return events


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    data = SAMPLE_VIDEO.read_bytes()
    files = {"dir": root / "a_directory.mp4", "empty": root / "empty.mp4", "text": root / "notes.mp4"}
    files["dir"].mkdir()
    files["empty"].write_bytes(b"")
    files["text"].write_text("this is not a video\n" * 50)
    # The sample keeps its index (moov) at the end: cut, it cannot be opened at all.
    files["truncated_mp4"] = root / "truncated.mp4"
    files["truncated_mp4"].write_bytes(data[: len(data) * 6 // 10])
    # An AVI whose codec tag nobody decodes.
    mjpg = write_video(root / "mjpg.avi", sample_frames()[:30], fourcc="MJPG")
    files["codec"] = root / "unknown_codec.avi"
    files["codec"].write_bytes(mjpg.read_bytes().replace(b"MJPG", b"QQQQ"))
    # An AVI readable up to where it was cut (a recording interrupted mid-way).
    full = write_video(root / "full.avi", sample_frames(), fourcc="MJPG")
    files["truncated_avi"] = root / "truncated.avi"
    files["truncated_avi"].write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    # Damaged packets in the middle of the H.264 stream.
    damaged = bytearray(data)
    rng = np.random.default_rng(0)
    for offset in range(200_000, 400_000, 20_000):
        damaged[offset : offset + 2000] = rng.integers(0, 256, 2000, dtype=np.uint8).tobytes()
    files["corrupt"] = root / "corrupt.mp4"
    files["corrupt"].write_bytes(bytes(damaged))
    return files


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("dir", "is a directory"),
        ("empty", "file is empty"),
        ("text", "cannot open as a video"),
        ("truncated_mp4", "truncated"),
        ("codec", "unsupported container or codec"),
    ],
)
def test_unusable_video_files(bad_files: dict[str, Path], tiny_bundle: Path, name: str, message: str) -> None:
    _fails(["--video", bad_files[name], "--bundle", tiny_bundle], message)


def test_missing_and_unreadable_video(tmp_path: Path, tiny_bundle: Path) -> None:
    _fails(["--video", tmp_path / "nope.mp4", "--bundle", tiny_bundle], "no such file")
    if os.geteuid() != 0:  # root reads anything
        locked = tmp_path / "locked.mp4"
        shutil.copy(SAMPLE_VIDEO, locked)
        locked.chmod(0)
        _fails(["--video", locked, "--bundle", tiny_bundle], "permission denied")


def test_unreachable_stream_and_missing_webcam(tiny_bundle: Path) -> None:
    _fails(["--video", "rtsp://127.0.0.1:9/none", "--bundle", tiny_bundle], "cannot open the stream")
    _fails(["--video", "7", "--bundle", tiny_bundle], "webcam 7: cannot open the camera")


def test_truncated_avi_is_processed_up_to_the_cut(
    bad_files: dict[str, Path], tiny_bundle: Path, tmp_path: Path
) -> None:
    result = invoke(run_app, ["--video", bad_files["truncated_avi"], "--bundle", tiny_bundle, "--out", tmp_path / "e"])
    assert result.exit_code == 0, result.output
    assert "ended after" in result.stderr and "of 120 frames" in result.stderr
    summary = read_events(tmp_path / "e")[-1]
    assert 20 < summary["frames"] < 120 and summary["faces"] == summary["frames"]


def test_corrupt_frames_mid_stream_are_skipped(bad_files: dict[str, Path], tiny_bundle: Path, tmp_path: Path) -> None:
    events = _succeeds(["--video", bad_files["corrupt"], "--bundle", tiny_bundle], tmp_path / "e")
    summary = events[-1]
    assert summary["frames"] >= 60 and summary["frames"] + summary["corrupt_frames"] <= 120
    assert summary["faces"] >= 60
    assert any(e["event"] == "track_started" for e in events)


def test_grey_video_rgba_image_huge_and_tiny_frames(tmp_path: Path, tiny_bundle: Path) -> None:
    grey = write_video(tmp_path / "grey.avi", [f[:, :, 1].copy() for f in sample_frames()[:20]], fourcc="MJPG")
    summary = _succeeds(["--video", grey, "--bundle", tiny_bundle], tmp_path / "grey.jsonl")[-1]
    assert summary["frames"] == 20 and summary["faces"] == 20

    rgba = tmp_path / "face.png"
    cv2.imwrite(str(rgba), cv2.cvtColor(padded_tom(40), cv2.COLOR_BGR2BGRA))
    summary = _succeeds(["--video", rgba, "--bundle", tiny_bundle], tmp_path / "rgba.jsonl")[-1]
    assert summary["frames"] == 1 and summary["faces"] == 1

    huge = np.full((3000, 4000, 3), 127, np.uint8)
    huge[1000:1576, 1500:2076] = padded_tom(40, scale=3.0)
    path = tmp_path / "huge.png"
    cv2.imwrite(str(path), huge)
    summary = _succeeds(["--video", path, "--bundle", tiny_bundle], tmp_path / "huge.jsonl")[-1]
    assert summary["faces"] == 1

    tiny = write_video(tmp_path / "tiny.avi", [np.full((10, 12, 3), 99, np.uint8)] * 5, fourcc="MJPG")
    result = invoke(run_app, ["--video", tiny, "--bundle", tiny_bundle, "--out", tmp_path / "tiny.jsonl"])
    assert result.exit_code == 0, result.output
    assert "skipped 5 frames: too small" in result.stderr
    assert read_events(tmp_path / "tiny.jsonl")[-1]["skipped_frames"] == {"too_small": 5}


def test_no_faces_is_a_warning(tmp_path: Path, tiny_bundle: Path) -> None:
    rng = np.random.default_rng(0)
    frames = [cv2.GaussianBlur(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8), (9, 9), 3) for _ in range(10)]
    video = write_video(tmp_path / "noface.avi", frames, fourcc="MJPG")
    result = invoke(run_app, ["--video", video, "--bundle", tiny_bundle, "--out", tmp_path / "e"])
    assert result.exit_code == 0
    assert "no faces detected in 10 frames" in result.stderr
    kinds = [e["event"] for e in read_events(tmp_path / "e")]
    assert kinds == ["run_started", "source_started", "source_ended", "run_ended"]


def test_small_faces_are_skipped_and_counted(tmp_path: Path, tiny_bundle: Path) -> None:
    result = invoke(
        run_app,
        ["--video", SAMPLE_VIDEO, "--bundle", tiny_bundle, "--min-eye-distance", "40", "--out", tmp_path / "e"],
    )
    assert result.exit_code == 0
    summary = read_events(tmp_path / "e")[-1]
    assert summary["faces_embedded"] == 0 and summary["faces_too_small"] >= 100
    assert "below 40 px eye distance" in result.stderr


def test_bundle_problems(tmp_path: Path, tiny_bundle: Path) -> None:
    video = ["--video", SAMPLE_VIDEO]
    _fails([*video, "--bundle", tmp_path / "none"], "bundle directory does not exist")
    (tmp_path / "empty").mkdir()
    _fails([*video, "--bundle", tmp_path / "empty"], "not a bundle")
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(tiny_bundle / "manifest.json", broken / "manifest.json")
    _fails([*video, "--bundle", broken, "--backend", "onnxruntime"], "artifact listed in the manifest is missing")
    _fails([*video, "--bundle", tiny_bundle, "--precision", "int8"], "bundle has no int8 model")
    tampered = tmp_path / "tampered"
    shutil.copytree(tiny_bundle, tampered)
    with open(tampered / "model.fp32.onnx", "ab") as handle:
        handle.write(b"\0")
    _fails([*video, "--bundle", tampered, "--backend", "onnxruntime"], "does not match the manifest")


def test_gallery_problems(tmp_path: Path, tiny_bundle: Path, gallery_file: Path) -> None:
    video = ["--video", SAMPLE_VIDEO, "--bundle", tiny_bundle]
    _fails([*video, "--gallery", tmp_path / "none.npz"], "gallery file not found")
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    _fails([*video, "--gallery", tmp_path / "bad.npz"], "not a FaceMoE gallery file")
    other = Gallery.load(gallery_file)
    other.meta["model_fingerprint"] = "f" * 64
    other.save(tmp_path / "other.npz")
    _fails([*video, "--gallery", tmp_path / "other.npz"], "enrolled with another model")


def test_option_problems(tmp_path: Path, tiny_bundle: Path) -> None:
    _fails(["--video", SAMPLE_VIDEO], "pass --bundle")
    _fails(["--bundle", tiny_bundle], "pass --video")
    bundle = ["--video", SAMPLE_VIDEO, "--bundle", tiny_bundle]
    _fails([*bundle, "--save-video", tmp_path / "out.gif"], "unsupported video extension")
    for bad, message in ((["--max-batch", "0"], "'--max-batch'"), (["--backend", "cuda"], "'cuda' is not one of")):
        result = invoke(run_app, [*bundle, *bad])
        assert result.exit_code == 2 and message in result.stderr and "Traceback" not in result.output
    out = tmp_path / "events.jsonl"
    out.write_text("precious\n")
    _fails([*bundle, "--out", out, "--save-video", tmp_path / "x.gif"], "unsupported video extension")
    assert out.read_text() == "precious\n", "a failed start must not truncate an existing events file"


def test_events_to_stdout(tiny_bundle: Path) -> None:
    result = invoke(run_app, ["--video", SAMPLE_VIDEO, "--bundle", tiny_bundle, "--out", "-", "--max-frames", "10"])
    assert result.exit_code == 0
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines[0]["event"] == "run_started" and lines[-1]["event"] == "run_ended"
    assert lines[-1]["frames"] == 10


def test_demo_builds_caches_and_warns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch")
    monkeypatch.setenv("FACEMOE_CACHE", str(tmp_path / "cache"))
    result = invoke(run_app, ["--demo", "--max-frames", "15", "--out", tmp_path / "e"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.stderr.split())
    assert "RANDOM weights" in text and "meaningless" in text
    assert "facemoe download" in text and "facemoe-export --checkpoint" in text
    assert "carphone_pristine.mp4" in text, "the packaged sample video is used"
    manifest = tmp_path / "cache" / "demo-bundle" / "manifest.json"
    assert json.loads(manifest.read_text())["model"]["random_weights"] is True
    stamp = manifest.stat().st_mtime_ns
    assert read_events(tmp_path / "e")[-1]["frames"] == 15
    result = invoke(run_app, ["--demo", "--max-frames", "5", "--video", SAMPLE_VIDEO])
    assert result.exit_code == 0
    assert manifest.stat().st_mtime_ns == stamp, "the cached demo bundle is reused"


def _cli(args: list[object]) -> list[str]:
    return [sys.executable, "-m", "facemoe.cli.run_cmd", *(str(a) for a in args)]


def test_ctrl_c_finalises_events_and_video(tmp_path: Path, tiny_bundle: Path) -> None:
    out, video = tmp_path / "events.jsonl", tmp_path / "annotated.mp4"
    # 20 s of real-time video: on a loaded machine the 4 s sample could end on its own before the signal.
    stream = write_video(tmp_path / "long.avi", read_video(Path(SAMPLE_VIDEO)) * 5, fourcc="MJPG")
    args = ["--video", stream, "--bundle", tiny_bundle, "--realtime", "--out", out, "--save-video", video, "-q"]
    # A test run started in the background by a non-interactive shell inherits SIGINT as ignored, and Python
    # then (rightly) installs no KeyboardInterrupt handler: give the child the default disposition.
    proc = subprocess.Popen(
        _cli(args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if out.exists() and "track_started" in out.read_text():
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "interrupted" in stderr
    events = read_events(out)
    assert events[-1]["event"] == "run_ended" and events[-1]["reason"] == "interrupted"
    ended = [e for e in events if e["event"] == "track_ended"]
    assert len(ended) == 1 and ended[0]["reason"] == "interrupted"
    frames = read_video(video)
    assert 0 < len(frames) < 600, "the annotated video is finalised and playable"


def test_runtime_works_without_torch(tmp_path: Path, tiny_bundle: Path) -> None:
    """Simulate an edge box: any import of torch fails; enrol and run must still work."""
    out, gallery = tmp_path / "events.jsonl", tmp_path / "g.npz"
    code = f"""
import importlib.abc, importlib.machinery, sys

class Refuse(importlib.abc.Loader):
    def create_module(self, spec):
        return None

    def exec_module(self, module):
        raise ImportError("torch is not installed on this edge box")

class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            return importlib.machinery.ModuleSpec(name, Refuse())
        return None

sys.meta_path.insert(0, NoTorch())
from facemoe.cli.run_cmd import app
from facemoe.cli.enroll_cmd import app as enroll
enroll(["--images", {str(tmp_path / "people")!r}, "--bundle", {str(tiny_bundle)!r}, "--out", {str(gallery)!r}],
       standalone_mode=False)
app(["--video", {str(SAMPLE_VIDEO)!r}, "--bundle", {str(tiny_bundle)!r}, "--gallery", {str(gallery)!r},
     "--out", {str(out)!r}, "--max-frames", "20"], standalone_mode=False)
assert "torch" not in sys.modules
print("OK")
"""
    (tmp_path / "people" / "someone").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "people" / "someone" / "a.png"), sample_frames()[3])
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("OK")
    assert read_events(out)[-1]["frames"] == 20
    assert Gallery.load(gallery).names == ["someone"]
