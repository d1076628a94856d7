"""Downloading the official FaceMoE weights from the Hugging Face hub (explicit opt-in only).

Nothing in the package downloads implicitly: this runs only from ``facemoe download`` or a direct call.
"""

from __future__ import annotations

from pathlib import Path

from facemoe.errors import FaceMoEError

HUB_REPO = "kartiknarayan/FaceMoE"
# Fine-tuned releases (paper's model card): N = 3 experts, k = 2, Swin backbone pre-trained on WebFace4M.
OFFICIAL_FILES = {
    "tinyface": "swin4m_exp_3_k_2_tinyface_full/model.pt",
    "briar": "swin4m_exp_3_k_2_briar_full/model.pt",
}


def download_official(variant: str = "tinyface", dest: str | Path = "weights", revision: str | None = None) -> Path:
    """Fetch an official ``model.pt`` into ``dest`` and return its path (k = 2 for these files)."""
    if variant not in OFFICIAL_FILES:
        raise FaceMoEError(f"unknown variant {variant!r}; choose one of {', '.join(OFFICIAL_FILES)}")
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import HfHubHTTPError
    except ImportError as exc:
        raise FaceMoEError(
            "downloading needs huggingface_hub: pip install 'facemoe-edge[export]' (or huggingface_hub)"
        ) from exc
    try:
        path = hf_hub_download(
            repo_id=HUB_REPO, filename=OFFICIAL_FILES[variant], local_dir=str(dest), revision=revision
        )
    except HfHubHTTPError as exc:
        raise FaceMoEError(f"{HUB_REPO}/{OFFICIAL_FILES[variant]}: download failed: {exc}") from exc
    except (OSError, ValueError) as exc:
        raise FaceMoEError(
            f"{HUB_REPO}/{OFFICIAL_FILES[variant]}: cannot reach the Hugging Face hub ({type(exc).__name__}: "
            f"{exc}). If this machine is offline, download the file elsewhere and pass it with --checkpoint"
        ) from exc
    return Path(path)
