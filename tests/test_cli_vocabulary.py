"""One CLI vocabulary: --version everywhere, --config naming the architecture (old --preset kept as an alias)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

import facemoe
from facemoe.cli import bench_cmd, export_cmd, main, run_cmd

runner = CliRunner()


@pytest.mark.parametrize("app", [main.app, export_cmd.app, run_cmd.app, bench_cmd.app])
def test_every_entry_point_answers_version(app) -> None:  # type: ignore[no-untyped-def]
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"facemoe-edge {facemoe.__version__}"


def test_old_preset_flag_is_a_hidden_alias_of_config(tmp_path) -> None:  # type: ignore[no-untyped-def]
    help_text = runner.invoke(export_cmd.app, ["--help"]).output
    assert "--config" in help_text and "--preset" not in help_text
    # Both spelled at once must agree; checked before anything is built or written.
    result = runner.invoke(
        export_cmd.app, ["--random-weights", "--preset", "small", "--config", "tiny", "--out", str(tmp_path / "b")]
    )
    assert result.exit_code == 2
    assert "--preset small and --config tiny disagree" in result.output
    assert not (tmp_path / "b").exists()
