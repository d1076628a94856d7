"""Checks of the runtime-only install (no PyTorch, no extras), shared by the fast and the fresh-venv tests.

Each check takes ``run(command, args, cwd)``: how the console script ``command`` is started in that setting.
"""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from subprocess import CompletedProcess

# What the extras add and the runtime must do without.
EXTRA_MODULES = ("torch", "huggingface_hub", "matplotlib", "onnxslim", "onnxruntime_extensions", "triton")
COMMANDS = ("download", "parity", "info", "export", "run", "enroll", "bench", "build-engine")
EXPORT_HINT = "pip install 'facemoe-edge[export]'"

Run = Callable[[str, Sequence[object], Path], CompletedProcess[str]]


def check_demo(run: Run, tmp: Path) -> list[dict]:
    """The README's first command: ``facemoe-run --demo`` writes events and an annotated video."""
    events, video = tmp / "events.jsonl", tmp / "annotated.mp4"
    result = run("facemoe-run", ["--demo", "--out", events, "--save-video", video, "-q"], tmp)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "RANDOM weights" in " ".join(result.stderr.split())
    records = [json.loads(line) for line in events.read_text().splitlines()]
    assert records[0]["event"] == "run_started" and records[0]["random_weights"] is True
    assert "onnxruntime" in records[0]["backend"]
    assert records[-1]["event"] == "run_ended" and records[-1]["frames"] == 120
    assert records[-1]["faces_embedded"] > 0, "the demo model embedded no face"
    assert any(r["event"] == "track_started" for r in records)
    assert video.stat().st_size > 10_000
    return records


def check_torch_hints(run: Run, tmp: Path, demo_bundle: Path) -> None:
    """Commands that need PyTorch say so in one line, name the extra, exit 2, and write nothing."""
    out = tmp / "never"
    cases = {
        ("facemoe-export", "--random-weights", "--out", out): "facemoe-export needs PyTorch",
        ("facemoe", "export", "--random-weights", "--out", out): "facemoe-export needs PyTorch",
        ("facemoe", "parity", demo_bundle): "facemoe parity needs PyTorch",
        ("facemoe", "bench", "--random-weights"): "facemoe bench --random-weights needs PyTorch",
        ("facemoe-bench", "--random-weights"): "facemoe bench --random-weights needs PyTorch",
        ("facemoe-bench", "--bundle", demo_bundle, "--backend", "torch"): "facemoe bench --backend torch needs PyTorch",
    }
    for (command, *args), expected in cases.items():
        result = run(command, args, tmp)
        lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
        assert lines == [f"error: {expected}: {EXPORT_HINT}"], (command, args, result.stdout + result.stderr)
        assert result.returncode == 2, (command, args)
    assert not out.exists()


def check_help_lists_commands(run: Run, tmp: Path) -> None:
    result = run("facemoe", ["--help"], tmp)
    assert result.returncode == 0, result.stderr
    listed = {line.split()[1] for line in result.stdout.splitlines() if line.startswith("│ ") and len(line.split()) > 1}
    assert set(COMMANDS) <= listed, f"missing from facemoe --help: {set(COMMANDS) - listed}"
    assert "unavailable" not in result.stdout


@contextmanager
def fake_hub(root: Path) -> Iterator[str]:
    """A local HTTP server laid out like the hub's resolve URLs; yields its endpoint (for HF_ENDPOINT)."""

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(root), **kwargs)  # type: ignore[arg-type]

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def hub_file(root: Path, variant_path: str, payload: bytes) -> None:
    path = root / "kartiknarayan" / "FaceMoE" / "resolve" / "main" / variant_path
    path.parent.mkdir(parents=True)
    path.write_bytes(payload)


def check_download(run: Run, tmp: Path, payload: bytes) -> None:
    """``facemoe download`` fetches the official file from the hub endpoint (HF_ENDPOINT of ``run``)."""
    result = run("facemoe", ["download", "--dest", tmp / "weights"], tmp)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp / "weights" / "swin4m_exp_3_k_2_tinyface_full" / "model.pt").read_bytes() == payload
    result = run("facemoe", ["download", "--variant", "briar", "--dest", tmp / "weights"], tmp)
    assert result.returncode == 2 and "HTTP 404" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp / "weights" / "swin4m_exp_3_k_2_briar_full").exists()
