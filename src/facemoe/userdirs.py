"""Where FaceMoE keeps per-user files: one cache directory for every cache (demo bundle, calibration ranges)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """``$FACEMOE_CACHE``, else ``$XDG_CACHE_HOME/facemoe``, else ``~/.cache/facemoe``; ``parts`` below it."""
    if os.environ.get("FACEMOE_CACHE"):
        root = Path(os.environ["FACEMOE_CACHE"]).expanduser()
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "facemoe"
    return root.joinpath(*parts)
