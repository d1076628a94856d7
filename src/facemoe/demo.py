"""The demo bundle that ships in the package, so ``facemoe-run --demo`` needs no PyTorch.

It is the tiny preset with random weights, exported (and parity-checked) once by
``scripts/make_demo_bundle.py``. ``--demo`` copies it into the user cache and runs it from there: the
package directory may be read-only, and a bundle directory is where engines for this GPU are stored
(``facemoe build-engine``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

from facemoe import userdirs
from facemoe.bundle import MANIFEST_NAME, Bundle
from facemoe.errors import FaceMoEError

DEMO_BUNDLE = "demo-bundle"


def cache_dir() -> Path:
    """User cache directory for FaceMoE (``$FACEMOE_CACHE``, else the XDG cache, else ~/.cache)."""
    return userdirs.cache_dir()


def packaged_demo_bundle() -> Path:
    """The demo bundle inside the installed package."""
    ref = resources.files("facemoe") / "data" / DEMO_BUNDLE
    path = Path(str(ref))
    if not (path / MANIFEST_NAME).is_file():
        raise FaceMoEError(
            f"the packaged demo bundle is missing from this installation ({path}); reinstall facemoe-edge, "
            "or pass --bundle DIR"
        )
    return path


def _is_current(target: Path, packaged: Path) -> bool:
    manifest = target / MANIFEST_NAME
    if not manifest.is_file() or manifest.read_bytes() != (packaged / MANIFEST_NAME).read_bytes():
        return False
    try:
        Bundle(target).artifact_path("fp32", verify=True)
    except FaceMoEError:
        return False
    return True


def ensure_demo_bundle(root: Path | None = None) -> Path:
    """The demo bundle in the cache (``root`` or :func:`cache_dir`), copied from the package when stale."""
    packaged = packaged_demo_bundle()
    parent = root or cache_dir()
    target = parent / DEMO_BUNDLE
    if _is_current(target, packaged):
        return target
    parent.mkdir(parents=True, exist_ok=True)
    # Copy next to the target and swap it in, so an interrupted copy never leaves a half bundle behind.
    staging = Path(tempfile.mkdtemp(prefix=".demo-bundle-", dir=parent))
    try:
        fresh = staging / DEMO_BUNDLE
        fresh.mkdir()
        # copyfile, not copytree: the package's permission bits (read-only in some installs) stay behind.
        for item in packaged.iterdir():
            if item.is_file():
                shutil.copyfile(item, fresh / item.name)
        if target.exists():
            shutil.rmtree(target)
        os.replace(fresh, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
