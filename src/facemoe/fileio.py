"""Atomic writes: a reader never sees a half-written file or bundle."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from facemoe.errors import OutputError


def check_output(
    path: str | os.PathLike[str], *, overwrite: bool, inputs: tuple[str | os.PathLike[str] | None, ...] = ()
) -> Path:
    """Refuse an output path that would destroy data: an existing file without ``overwrite``, or an input.

    Every command that writes (export, run, enroll, build-engine) calls this before any work starts, so a
    refused run has written nothing. ``inputs`` are the paths the command reads (video, bundle, gallery,
    other outputs of the same run): an output that resolves to one of them is refused even with
    ``overwrite``. Raises ``OutputError`` (a one-line user error).
    """
    target = Path(path)
    resolved = target.expanduser().resolve()
    for source in inputs:
        if source is None or "://" in str(source):  # URLs (streams) are no local file
            continue
        if Path(source).expanduser().resolve() == resolved:
            raise OutputError(f"{target}: output is the same file as the input {source}; choose another path")
    if target.is_dir():
        raise OutputError(f"{target}: is a directory, expected a file path")
    if target.exists() and _is_stream(target):
        return target  # a FIFO or device (a log shipper's pipe, /dev/stdout) holds no data to lose
    if target.exists() and not overwrite:
        raise OutputError(f"{target}: already exists (pass --overwrite to replace it)")
    if not target.parent.exists():
        raise OutputError(f"{target}: directory {target.parent} does not exist")
    _check_writable(target)
    return target


def _is_stream(path: Path) -> bool:
    mode = path.stat().st_mode
    return stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)


def _check_writable(target: Path) -> None:
    """Create and remove a file beside ``target``, so the real cause (read-only file system, permission
    denied) is reported before any work; writers such as OpenCV's only say that they failed."""
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".probe", dir=target.parent)
    except OSError as exc:
        raise OutputError(f"{target}: cannot write in {target.parent}: {exc.strerror or exc}") from None
    os.close(fd)
    os.unlink(probe)


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it over ``target`` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp makes owner-only files; published files get the mode a plain open() would give.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Build a directory under a temporary name and move it into place at the end.

    An interrupted build leaves only a hidden ``.name.partial-*`` directory, never something at
    ``target`` that looks complete. An existing ``target`` is replaced only when ``overwrite`` is set,
    and only after the new one is complete.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target}: already exists (pass --overwrite to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)
    try:
        yield staging
        if target.exists():
            backup = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, backup)
            os.replace(staging, target)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
