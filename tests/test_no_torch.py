"""The runtime without PyTorch or any extra, fast: this environment with those modules made unimportable.

``sys.modules[name] = None`` is what an absent package looks like to both ``import`` (ModuleNotFoundError)
and ``importlib.util.find_spec`` (None). tests/test_fresh_install.py checks the same in a real venv.
"""

from __future__ import annotations

import os
import subprocess
import sys
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

# The console scripts of pyproject.toml, started as their entry points.
ENTRY_POINTS = {
    "facemoe": "facemoe.cli.main",
    "facemoe-export": "facemoe.cli.export_cmd",
    "facemoe-run": "facemoe.cli.run_cmd",
    "facemoe-bench": "facemoe.cli.bench_cmd",
}
PRELUDE = f"""
import importlib, sys
for name in {EXTRA_MODULES!r}:
    sys.modules[name] = None
command, sys.argv = sys.argv[1], sys.argv[1:]
importlib.import_module({ENTRY_POINTS!r}[command]).main()
missing = [name for name in {EXTRA_MODULES!r} if sys.modules.get(name) is not None]
assert not missing, missing
"""


@pytest.fixture
def run_blocked(tmp_path: Path):
    env = dict(os.environ, FACEMOE_CACHE=str(tmp_path / "cache"), COLUMNS="200")

    def run(command: str, args: Sequence[object], cwd: Path) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-c", PRELUDE, command, *(str(a) for a in args)]
        return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)

    run.env = env  # type: ignore[attr-defined]
    return run


def test_demo_and_torch_hints_without_torch(tmp_path: Path, run_blocked) -> None:
    check_demo(run_blocked, tmp_path)
    check_torch_hints(run_blocked, tmp_path, tmp_path / "cache" / "demo-bundle")


def test_help_lists_every_command_without_torch(tmp_path: Path, run_blocked) -> None:
    check_help_lists_commands(run_blocked, tmp_path)


def test_download_without_torch_or_huggingface_hub(tmp_path: Path, run_blocked) -> None:
    payload = os.urandom(300_000)
    hub_file(tmp_path / "hub", "swin4m_exp_3_k_2_tinyface_full/model.pt", payload)
    with fake_hub(tmp_path / "hub") as endpoint:
        run_blocked.env["HF_ENDPOINT"] = endpoint
        check_download(run_blocked, tmp_path, payload)
