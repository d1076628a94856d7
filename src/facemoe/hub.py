"""Downloading the official FaceMoE weights from the Hugging Face hub (explicit opt-in only).

Nothing in the package downloads implicitly: this runs only from ``facemoe download`` or a direct call.
It needs neither PyTorch nor huggingface_hub (it lives outside ``facemoe.model``, whose package imports
PyTorch): with huggingface_hub installed (the export extra) that is used (its cache, resumption and
transfer backends); without it the file comes over plain HTTPS from the hub's ``resolve`` URL. Both
honour ``HF_ENDPOINT`` (a mirror) and ``HF_TOKEN``.
"""

from __future__ import annotations

import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

from facemoe.errors import FaceMoEError

HUB_REPO = "kartiknarayan/FaceMoE"
# Fine-tuned releases (paper's model card): N = 3 experts, k = 2, Swin backbone pre-trained on WebFace4M.
OFFICIAL_FILES = {
    "tinyface": "swin4m_exp_3_k_2_tinyface_full/model.pt",
    "briar": "swin4m_exp_3_k_2_briar_full/model.pt",
}


Progress = Callable[[int, int | None], None]


def download_official(
    variant: str = "tinyface",
    dest: str | Path = "weights",
    revision: str | None = None,
    progress: Progress | None = None,
) -> Path:
    """Fetch an official ``model.pt`` into ``dest`` and return its path (k = 2 for these files).

    ``progress(bytes_done, bytes_total)`` is called while the plain-HTTPS path downloads.
    """
    if variant not in OFFICIAL_FILES:
        raise FaceMoEError(f"unknown variant {variant!r}; choose one of {', '.join(OFFICIAL_FILES)}")
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import HfHubHTTPError
    except ImportError:
        return _download_https(OFFICIAL_FILES[variant], Path(dest), revision, progress)
    try:
        path = hf_hub_download(
            repo_id=HUB_REPO, filename=OFFICIAL_FILES[variant], local_dir=str(dest), revision=revision
        )
    except HfHubHTTPError as exc:
        raise FaceMoEError(f"{HUB_REPO}/{OFFICIAL_FILES[variant]}: download failed: {exc}") from exc
    except (OSError, ValueError) as exc:
        raise _offline(OFFICIAL_FILES[variant], exc) from exc
    return Path(path)


def _offline(filename: str, exc: BaseException) -> FaceMoEError:
    return FaceMoEError(
        f"{HUB_REPO}/{filename}: cannot reach the Hugging Face hub ({type(exc).__name__}: "
        f"{exc}). If this machine is offline, download the file elsewhere and pass it with --checkpoint"
    )


def _download_https(filename: str, dest: Path, revision: str | None, progress: Progress | None) -> Path:
    """``dest/filename`` from the hub's resolve URL; written to a temporary file and renamed when complete."""
    target = dest / filename
    if target.is_file():
        return target  # the hub's files are immutable per revision; a completed download is never partial
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    url = f"{endpoint}/{HUB_REPO}/resolve/{urllib.parse.quote(revision or 'main', safe='')}/{filename}"
    headers = {"User-Agent": "facemoe-edge"}
    token = os.environ.get("HF_TOKEN")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", delete=False) as tmp:
                try:
                    done = 0
                    while chunk := response.read(1 << 20):
                        tmp.write(chunk)
                        done += len(chunk)
                        if progress is not None:
                            progress(done, total)
                    if total is not None and done != total:
                        raise FaceMoEError(f"{url}: connection closed after {done} of {total} bytes; try again")
                except BaseException:
                    tmp.close()
                    os.unlink(tmp.name)
                    raise
        # NamedTemporaryFile creates the file 0600; give it the mode any other new file would get.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp.name, 0o666 & ~umask)
        os.replace(tmp.name, target)
    except urllib.error.HTTPError as exc:
        raise FaceMoEError(f"{HUB_REPO}/{filename}: download failed: HTTP {exc.code} {exc.reason} ({url})") from exc
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise _offline(filename, exc) from exc
    return target
