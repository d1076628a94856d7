"""Loading official FaceMoE checkpoints strictly and safely.

Accepted files: ``model.pt`` (a plain state dict) and ``checkpoint_gpu_*.pt`` (a dict whose
``state_dict_backbone`` holds it), with or without a DDP ``module.`` prefix. Files are read with
``weights_only=True``: a checkpoint can never run code on load.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from facemoe.errors import CheckpointError
from facemoe.model.config import FaceMoEConfig

_BLOCK_KEY = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.")
_EXPERT_KEY = re.compile(r"^layers\.0\.blocks\.0\.mlp\.experts\.(\d+)\.fc1\.weight$")


def read_state_dict(source: str | os.PathLike[str] | Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], str]:
    """Read a checkpoint (path or mapping) -> (backbone state dict, description of where it came from)."""
    if isinstance(source, Mapping):
        raw: Any = source
        origin = "state dict"
    else:
        path = Path(source)
        origin = str(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: checkpoint file not found")
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(
                f"{path}: not a readable PyTorch checkpoint (or it holds objects other than tensors): {first}"
            ) from exc
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{origin}: expected a state dict, found a {type(raw).__name__}")
    if "state_dict_backbone" in raw:
        raw = raw["state_dict_backbone"]
        if not isinstance(raw, Mapping):
            raise CheckpointError(f"{origin}: 'state_dict_backbone' is not a state dict")
    state: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{origin}: entry {key!r} is a {type(value).__name__}, not a tensor")
        state[key.removeprefix("module.")] = value
    if not state:
        raise CheckpointError(f"{origin}: the checkpoint is empty")
    return state, origin


def check_finite(state: Mapping[str, torch.Tensor], origin: str) -> None:
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise CheckpointError(f"{origin}: checkpoint holds NaN or Inf values in {shown}; refusing to load it")


def infer_config(state: Mapping[str, torch.Tensor], k: int = 2) -> FaceMoEConfig:
    """Derive the architecture from tensor shapes (k is not stored in checkpoints and must be given)."""
    try:
        proj = state["patch_embed.proj.weight"]
        embed_dim, in_chans, patch, _ = proj.shape
        depth_of: dict[int, int] = {}
        for key in state:
            if m := _BLOCK_KEY.match(key):
                stage, block = int(m.group(1)), int(m.group(2))
                depth_of[stage] = max(depth_of.get(stage, 0), block + 1)
        stages = len(depth_of)
        depths = tuple(depth_of[i] for i in range(stages))
        heads = tuple(
            int(state[f"layers.{i}.blocks.0.attn.relative_position_bias_table"].shape[1]) for i in range(stages)
        )
        table_rows = int(state["layers.0.blocks.0.attn.relative_position_bias_table"].shape[0])
        window = (math.isqrt(table_rows) + 1) // 2
        experts = sum(1 for key in state if _EXPERT_KEY.match(key))
        hidden = int(state["layers.0.blocks.0.mlp.experts.0.fc1.weight"].shape[0])
        if "absolute_pos_embed" in state:
            tokens = int(state["absolute_pos_embed"].shape[1])
            img_size = math.isqrt(tokens) * int(patch)
            ape = True
        else:
            flat = int(state["feature_layer.0.weight"].shape[0])
            final_tokens = flat // (int(embed_dim) * 2 ** (stages - 1))
            img_size = math.isqrt(final_tokens) * 2 ** (stages - 1) * int(patch)
            ape = False
        embedding = int(state["feature_layer.2.weight"].shape[0])
        qkv_bias = "layers.0.blocks.0.attn.qkv.bias" in state
        patch_norm = "patch_embed.norm.weight" in state
    except (KeyError, IndexError, ValueError) as exc:
        raise CheckpointError(f"checkpoint does not look like a FaceMoE backbone (missing {exc})") from exc
    return FaceMoEConfig(
        img_size=img_size,
        patch_size=int(patch),
        in_chans=int(in_chans),
        embed_dim=int(embed_dim),
        depths=depths,
        num_heads=heads,
        window_size=window,
        mlp_ratio=hidden / int(embed_dim),
        qkv_bias=qkv_bias,
        ape=ape,
        patch_norm=patch_norm,
        num_experts=experts,
        k=k,
        embedding_size=embedding,
    )


def describe_mismatch(found: FaceMoEConfig, expected: FaceMoEConfig) -> list[str]:
    """Human phrases for each architectural difference, e.g. 'checkpoint has 3 experts per block, config says 2'."""
    phrases = {
        "num_experts": "{} experts per block",
        "embed_dim": "embed dim {}",
        "depths": "depths {}",
        "num_heads": "heads {}",
        "window_size": "window {}",
        "img_size": "input size {}",
        "patch_size": "patch size {}",
        "mlp_ratio": "mlp ratio {}",
        "embedding_size": "embedding size {}",
        "in_chans": "{} input channels",
    }
    out = []
    for field_name, phrase in phrases.items():
        a, b = getattr(found, field_name), getattr(expected, field_name)
        if a != b:
            fa = list(a) if isinstance(a, tuple) else a
            fb = list(b) if isinstance(b, tuple) else b
            out.append(f"checkpoint has {phrase.format(fa)}, config says {phrase.format(fb)}")
    return out


def _short(keys: list[str], limit: int = 4) -> str:
    return ", ".join(keys[:limit]) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def check_keys(model: torch.nn.Module, state: Mapping[str, torch.Tensor], origin: str, cause: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_short(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_short(unexpected)}")
    if misshaped:
        problems.append(f"{len(misshaped)} keys with the wrong shape: {_short(misshaped, 2)}")
    if problems:
        hint = cause or (
            "the file may be truncated, from another model, or saved with renamed modules"
            if missing or unexpected
            else "the checkpoint was made with a different configuration"
        )
        raise CheckpointError(
            f"{origin}: checkpoint does not match the model: {'; '.join(problems)}. Likely cause: {hint}"
        )
