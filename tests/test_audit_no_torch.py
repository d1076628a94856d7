"""The audit imports torch only for the torch reference: ``facemoe-run`` in a subprocess, torch blocked or watched.

``sys.modules[name] = None`` is what an absent package looks like to ``import`` and ``find_spec``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from runtime_fixtures import read_events

RUN = """
import sys
if {block}:
    sys.modules["torch"] = None
from facemoe.cli.run_cmd import app
try:
    app(sys.argv[1:])
except SystemExit as exit:
    code = exit.code or 0
print("TORCH_LOADED" if sys.modules.get("torch") is not None else "TORCH_ABSENT")
sys.exit(code)
"""


def run(tmp_path: Path, *args: object, block: bool) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, FACEMOE_CACHE=str(tmp_path / "cache"), COLUMNS="200")
    cmd = [sys.executable, "-c", RUN.format(block=block), *(str(a) for a in args)]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_auto_without_torch_audits_against_the_fp32_onnx(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    done = run(tmp_path, "--demo", "--audit-rate", "1", "-q", "-o", events, block=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("TORCH_ABSENT")
    header = read_events(events)[0]["audit"]
    assert header["reference"] == "onnx" and header["reference_choice"] == "auto: PyTorch is not installed"
    [final] = [e for e in read_events(events) if e["event"] == "accuracy_check"]
    assert final["faces"] >= 10 and final["cosine_min"] > 0.9999 and final["routing_agreement_min"] == 1.0
    refused = run(tmp_path, "--demo", "--audit-reference", "torch", "-o", tmp_path / "x.jsonl", block=True)
    assert refused.returncode == 2 and "--audit-reference torch needs PyTorch" in refused.stderr + refused.stdout
    assert not (tmp_path / "x.jsonl").exists()


def test_onnx_reference_never_imports_torch_even_when_installed(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    done = run(tmp_path, "--demo", "--audit-rate", "1", "--audit-reference", "onnx", "-q", "-o", events, block=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("TORCH_ABSENT")
    assert read_events(events)[0]["audit"]["reference"] == "onnx"
    off = run(tmp_path, "--demo", "--audit-rate", "0", "-q", "-o", tmp_path / "off.jsonl", block=False)
    assert off.returncode == 0 and off.stdout.strip().endswith("TORCH_ABSENT")
    assert read_events(tmp_path / "off.jsonl")[0]["audit"] is None
