"""The markers pyproject.toml registers are the markers the tests use (``--strict-markers`` checks the reverse:
a test cannot use a marker that is not registered)."""

from __future__ import annotations

import re
from pathlib import Path

TESTS = Path(__file__).parent


def registered_markers() -> set[str]:
    text = (TESTS.parent / "pyproject.toml").read_text()
    block = re.search(r"^markers = \[(.*?)^\]", text, re.S | re.M)
    assert block, "no markers list in pyproject.toml"
    return set(re.findall(r'^\s*"(\w+):', block.group(1), re.M))


def test_every_registered_marker_is_used() -> None:
    registered = registered_markers()
    source = "\n".join(p.read_text() for p in TESTS.glob("*.py") if p.name != Path(__file__).name)
    used = set(re.findall(r"pytest\.mark\.(\w+)", source))
    assert registered >= {"gpu", "install"}, registered
    assert registered <= used, f"registered but used by no test: {sorted(registered - used)}"
