"""The weights' fingerprint a bundle records as ``model.weights_sha256`` (docs/BUNDLE.md#manifest)."""

from __future__ import annotations

import hashlib

import torch


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over every state-dict tensor (name, dtype, shape, bytes): identifies the weights."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
