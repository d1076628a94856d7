"""``facemoe-run`` never loses data: outputs checked before work, complete events lines, no broken video.

The full-disk tests use a real tiny tmpfs where this machine lets the tests mount one (root in a container
that allows it); the file-layer variant, a write that fails with ENOSPC part-way, runs everywhere.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from facemoe.cli.run_cmd import app as run_app
from facemoe.errors import OutputError
from facemoe.runtime import events as events_module
from facemoe.runtime.events import EventWriter, default_events_path
from facemoe.runtime.video_output import partial_name, video_problem

from runtime_fixtures import SAMPLE_VIDEO, error_lines, invoke, read_events, read_video, write_video


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


def _mount_tmpfs(where: Path, options: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    return done.returncode == 0


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 16 KiB file system: the sample's annotated video (~55 KB for 20 frames) cannot fit."""
    where = tmp_path / "small"
    if not _mount_tmpfs(where, "size=16k"):
        pytest.skip("cannot mount a tmpfs here (needs root and mount rights)")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    where = tmp_path / "ro"
    if os.geteuid() != 0:
        where.mkdir()
        where.chmod(0o555)
        yield where
        where.chmod(0o755)
        return
    if not _mount_tmpfs(where, "ro,size=4k"):
        pytest.skip("root ignores permissions and no read-only tmpfs can be mounted here")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def _run(args: list[object]) -> tuple[int, str]:
    result = invoke(run_app, [str(a) for a in args])
    assert "Traceback" not in result.output
    return result.exit_code, result.stderr


def _refused(args: list[object], message: str) -> None:
    code, stderr = _run(args)
    lines = error_lines(stderr)
    assert code == 2 and len(lines) == 1 and message in lines[0], stderr


# -- outputs checked before work ----------------------------------------------------------------------


def test_outputs_never_replace_inputs_or_each_other(tmp_path: Path, tiny_bundle: Path) -> None:
    video = tmp_path / "input.mp4"
    shutil.copy(SAMPLE_VIDEO, video)
    before = video.read_bytes()
    base = ["--video", video, "--bundle", tiny_bundle, "--max-frames", "3"]
    # Even with --overwrite, an output that is the input is refused.
    _refused([*base, "--save-video", video, "--overwrite"], "same file as the input")
    _refused([*base, "--out", video, "--overwrite"], "same file as the input")
    _refused([*base, "--out", tmp_path / "x.mp4", "--save-video", tmp_path / "x.mp4"], "name the same file")
    _refused([*base, "--out", tiny_bundle / "manifest.json", "--overwrite"], "same file as the input")
    assert video.read_bytes() == before
    assert not list(tmp_path.glob("events-*")) and not (tmp_path / "x.mp4").exists(), "nothing written"


def test_existing_outputs_need_overwrite(tmp_path: Path, tiny_bundle: Path) -> None:
    out, video = tmp_path / "events.jsonl", tmp_path / "annotated.avi"
    out.write_text("precious events\n")
    video.write_bytes(b"precious video")
    base = ["--video", SAMPLE_VIDEO, "--bundle", tiny_bundle, "--max-frames", "5"]
    _refused([*base, "--out", out], "already exists (pass --overwrite")
    _refused([*base, "--out", tmp_path / "new.jsonl", "--save-video", video], "already exists (pass --overwrite")
    assert out.read_text() == "precious events\n" and video.read_bytes() == b"precious video"
    assert not (tmp_path / "new.jsonl").exists(), "the video check comes before the events file is created"
    code, stderr = _run([*base, "--out", out, "--save-video", video, "--overwrite"])
    assert code == 0, stderr
    assert read_events(out)[-1]["frames"] == 5 and len(read_video(video)) == 5


def test_default_events_file_is_new_and_announced(tmp_path: Path, tiny_bundle: Path) -> None:
    taken = default_events_path(tmp_path, now=0.0)
    taken.write_text("older run\n")
    second = default_events_path(tmp_path, now=0.0)
    assert second != taken and second.name.endswith("-2.jsonl") and second.parent == tmp_path
    args = ["--video", SAMPLE_VIDEO, "--bundle", tiny_bundle, "--max-frames", "4"]
    code, stderr = _run(args)
    assert code == 0, stderr
    made = sorted(set(tmp_path.glob("events-*.jsonl")) - {taken})
    assert len(made) == 1 and f"events: {made[0]}" in " ".join(stderr.split())
    assert read_events(made[0])[-1]["frames"] == 4
    assert taken.read_text() == "older run\n"


def test_a_named_pipe_is_written_without_overwrite(tmp_path: Path, tiny_bundle: Path) -> None:
    """A log shipper's FIFO holds no data to lose: it needs no --overwrite."""
    fifo = tmp_path / "events.fifo"
    os.mkfifo(fifo)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(fifo.open(encoding="utf-8").read().splitlines()))
    reader.start()
    code, stderr = _run(["--video", SAMPLE_VIDEO, "--bundle", tiny_bundle, "--max-frames", "3", "--out", fifo])
    reader.join(timeout=30)
    assert code == 0, stderr
    assert json.loads(lines[0])["event"] == "run_started" and json.loads(lines[-1])["frames"] == 3


def test_read_only_output_directory_names_the_real_cause(read_only_dir: Path, tiny_bundle: Path) -> None:
    base = ["--video", SAMPLE_VIDEO, "--bundle", tiny_bundle]
    cause = "Read-only file system" if os.geteuid() == 0 else "Permission denied"
    _refused([*base, "--save-video", read_only_dir / "a.mp4"], f"cannot write in {read_only_dir}: {cause}")
    _refused([*base, "--out", read_only_dir / "e.jsonl"], cause)


def test_read_only_working_directory_without_out(read_only_dir: Path, tiny_bundle: Path, monkeypatch) -> None:
    monkeypatch.chdir(read_only_dir)
    _refused(["--video", SAMPLE_VIDEO, "--bundle", tiny_bundle], "pass --out FILE or --out -")


# -- a full disk ------------------------------------------------------------------------------------------


def test_full_disk_keeps_complete_lines_and_no_broken_video(small_disk: Path, tiny_bundle: Path) -> None:
    out, video = small_disk / "events.jsonl", small_disk / "annotated.mp4"
    args = ["--video", SAMPLE_VIDEO, "--bundle", tiny_bundle, "--embeddings", "--out", out, "--save-video", video]
    code, stderr = _run(args)
    lines = error_lines(stderr)
    assert code == 2 and len(lines) == 1, stderr
    assert "No space left on device" in lines[0] and str(video) in lines[0], lines[0]
    events = read_events(out)  # strict: every line a complete JSON object, newline-terminated
    assert events[0]["event"] == "run_started"
    # Removing the unplayable video frees the space the last line needs.
    assert events[-1]["event"] == "run_ended" and events[-1]["reason"] == "output_error"
    assert "No space left" in events[-1]["error"]
    assert sorted(p.name for p in small_disk.iterdir()) == ["events.jsonl"], "no video, no partial file"


def test_full_disk_for_the_video_only(small_disk: Path, tiny_bundle: Path, tmp_path: Path) -> None:
    out, video = tmp_path / "events.jsonl", small_disk / "annotated.avi"
    code, stderr = _run(["--video", SAMPLE_VIDEO, "--bundle", tiny_bundle, "--out", out, "--save-video", video])
    assert code == 2 and f"{video}: not written" in error_lines(stderr)[0], stderr
    summary = read_events(out)[-1]
    assert summary["event"] == "run_ended" and summary["reason"] == "output_error" and summary["frames"] == 120
    assert list(small_disk.iterdir()) == []


class _FullAfter:
    """``os.write`` for the events module that accepts ``budget`` bytes, then fails with ENOSPC part-way."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.real = os.write

    def __call__(self, fd: int, data: bytes | memoryview) -> int:
        if self.budget <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        chunk = bytes(data[: self.budget])
        self.budget -= len(chunk)
        return self.real(fd, chunk)


def test_event_writer_cuts_a_partial_line_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "e.jsonl"
    writer = EventWriter(path)
    full = _FullAfter(budget=250)
    monkeypatch.setattr(events_module, "_os_write", full)
    writer.emit("run_started", note="x" * 100)
    with pytest.raises(OutputError, match="No space left on device"):
        for i in range(10):
            writer.emit("track_started", track_id=i, note="y" * 60)
    assert full.budget == 0, "the disk filled in the middle of a line"
    writer.emit("track_ended", track_id=1)  # counted, not written, no second error
    writer.emit("run_ended", reason="output_error")  # tried, fails again, still no partial line
    full.budget = 10_000  # space freed (the video removed): run_ended gets through
    writer.emit("run_ended", reason="output_error")
    writer.close()
    kinds = [e["event"] for e in read_events(path)]
    assert kinds[0] == "run_started" and kinds[-1] == "run_ended" and "track_ended" not in kinds
    assert writer.counts["track_started"] == kinds.count("track_started") + 1 and writer.lost == 3


def test_full_disk_at_the_file_layer_through_the_cli(
    tmp_path: Path, tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "events.jsonl"
    monkeypatch.setattr(events_module, "_os_write", _FullAfter(budget=1600))  # run_started and source_started fit
    code, stderr = _run(["--video", SAMPLE_VIDEO, "--bundle", tiny_bundle, "--embeddings", "--out", out])
    assert code == 2 and "No space left on device" in error_lines(stderr)[0], stderr
    kinds = [e["event"] for e in read_events(out)]
    assert kinds[0] == "run_started" and "track_ended" not in kinds and "run_ended" not in kinds, kinds


# -- killed and failing runs --------------------------------------------------------------------------


def _cli(args: list[object]) -> list[str]:
    return [sys.executable, "-m", "facemoe.cli.run_cmd", *(str(a) for a in args)]


def test_killed_run_leaves_complete_lines_and_its_partial_is_removed_next_time(
    tmp_path: Path, tiny_bundle: Path
) -> None:
    out, video = tmp_path / "events.jsonl", tmp_path / "annotated.mp4"
    stream = write_video(tmp_path / "long.avi", read_video(Path(SAMPLE_VIDEO)) * 5, fourcc="MJPG")
    args = ["--video", stream, "--bundle", tiny_bundle, "--realtime", "--out", out, "--save-video", video, "-q"]
    proc = subprocess.Popen(_cli(args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    partial = partial_name(video, proc.pid)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (out.exists() and "track_started" in out.read_text()):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert partial.exists() and not video.exists()
    assert read_events(out)[0]["event"] == "run_started", "lines written before the kill are complete"

    again = ["--video", SAMPLE_VIDEO, "--bundle", tiny_bundle, "--out", tmp_path / "e2.jsonl", "--save-video", video]
    code, stderr = _run([*again, "--max-frames", "5"])
    assert code == 0, stderr
    assert "left by a run that was killed" in stderr and not partial.exists()
    assert len(read_video(video)) == 5


def test_a_run_that_dies_still_ends_its_events(tmp_path: Path, tiny_bundle: Path) -> None:
    from facemoe.bundle import Bundle
    from facemoe.runtime.backends import open_backend
    from facemoe.runtime.detection import RetinaFaceDetector
    from facemoe.runtime.pipeline import FaceEncoder, Pipeline
    from facemoe.runtime.video_source import VideoSource

    def failing_source() -> Iterator:
        source = VideoSource(str(SAMPLE_VIDEO)).open()
        for frame in source:
            if frame.index == 10:
                raise RuntimeError("decoder crashed")
            yield frame

    bundle = Bundle(tiny_bundle)
    encoder = FaceEncoder(open_backend(bundle, "onnxruntime"), bundle.manifest.preprocessing)
    path = tmp_path / "events.jsonl"
    with EventWriter(path) as writer:
        pipeline = Pipeline(RetinaFaceDetector(), encoder, writer)
        with pytest.raises(RuntimeError, match="decoder crashed"):
            pipeline.run(failing_source())
    events = read_events(path)
    assert events[-1]["event"] == "run_ended" and events[-1]["reason"] == "error"
    assert events[-1]["error"] == "RuntimeError: decoder crashed" and events[-1]["frames"] == 10
    ended = [e for e in events if e["event"] == "track_ended"]
    assert len(ended) == 1 and ended[0]["reason"] == "error"


@pytest.mark.parametrize(("suffix", "fourcc"), [(".mp4", "mp4v"), (".avi", "MJPG"), (".mkv", "MJPG")])
def test_video_check_finds_files_cut_short(tmp_path: Path, suffix: str, fourcc: str) -> None:
    frames = read_video(Path(SAMPLE_VIDEO))[:30]
    whole = write_video(tmp_path / f"whole{suffix}", frames, fourcc=fourcc)
    assert video_problem(whole, 30) is None
    assert video_problem(whole, 29) is None, "one frame more than counted (Ctrl-C inside a write) is whole"
    assert video_problem(whole, 40) is not None
    data = whole.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) * 8 // 10])
    assert video_problem(cut, 30) is not None
    (tmp_path / f"empty{suffix}").write_bytes(b"")
    assert video_problem(tmp_path / f"empty{suffix}", 30) == "the video file is empty"
