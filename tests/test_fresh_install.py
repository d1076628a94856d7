"""The README's quick start in a fresh virtual environment: the project alone, no extras, no PyTorch.

Marked ``install`` (pip-installs into a new venv, ~15-30 s with a warm pip cache): not part of the default
``pytest`` run, .ci/run runs it with ``-m install``. tests/test_no_torch.py is the fast stand-in.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from runtime_only import (
    EXTRA_MODULES,
    check_demo,
    check_download,
    check_help_lists_commands,
    check_torch_hints,
    fake_hub,
    hub_file,
)

REPO = Path(__file__).resolve().parent.parent
CONSTRAINTS = REPO / "constraints" / "ci.txt"


@pytest.mark.install
def test_runtime_only_install_runs_the_demo(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    bin_dir = venv / "bin"
    # The venv's own facemoe, not this checkout's src/ (the test command may set PYTHONPATH).
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(FACEMOE_CACHE=str(tmp_path / "cache"), COLUMNS="200")
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=300)
    # A regular (not editable) install: the wheel must carry the demo bundle and the sample video.
    pip = [bin_dir / "python", "-m", "pip", "install", "-q", "-c", CONSTRAINTS, REPO]
    subprocess.run([str(a) for a in pip], check=True, env=env, cwd=tmp_path, timeout=1200)
    installed = time.monotonic()

    probe = "import importlib.util as u, sys; print([m for m in sys.argv[1:] if u.find_spec(m)])"
    found = subprocess.run(
        [bin_dir / "python", "-c", probe, *EXTRA_MODULES], env=env, capture_output=True, text=True, check=True
    )
    assert found.stdout.strip() == "[]", f"the runtime install pulled in extras: {found.stdout}"

    def run(command: str, args: Sequence[object], cwd: Path) -> subprocess.CompletedProcess[str]:
        cmd = [str(bin_dir / command), *(str(a) for a in args)]
        return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)

    check_demo(run, tmp_path)
    demo_done = time.monotonic()
    check_torch_hints(run, tmp_path, tmp_path / "cache" / "demo-bundle")
    check_help_lists_commands(run, tmp_path)
    payload = os.urandom(300_000)
    hub_file(tmp_path / "hub", "swin4m_exp_3_k_2_tinyface_full/model.pt", payload)
    with fake_hub(tmp_path / "hub") as endpoint:
        env["HF_ENDPOINT"] = endpoint
        check_download(run, tmp_path, payload)
    print(f"venv + install {installed - started:.1f} s, facemoe-run --demo {demo_done - installed:.1f} s")
