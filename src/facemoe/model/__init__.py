"""FaceMoE in PyTorch: official-checkpoint compatible, routing modes ``sparse`` and ``static``.

Public API:

* ``build_model(config, routing="static")`` -> ``torch.nn.Module``
* ``load_checkpoint(path_or_state_dict, config="full", k=2, routing="static")`` -> module in eval mode
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from facemoe.errors import CheckpointError
from facemoe.model.checkpoint import (
    check_finite,
    check_keys,
    describe_mismatch,
    infer_config,
    read_state_dict,
)
from facemoe.model.config import PRESETS, FaceMoEConfig, resolve_config
from facemoe.model.moe import ROUTING_MODES, MoE, RoutingMode
from facemoe.model.swin import FaceMoE, count_parameters

log = logging.getLogger(__name__)


def build_model(config: str | dict[str, Any] | FaceMoEConfig = "full", routing: RoutingMode = "static") -> FaceMoE:
    """A freshly initialised FaceMoE (official init) for ``config`` (preset name, kwargs dict or config)."""
    if routing not in ROUTING_MODES:
        raise ValueError(f"routing must be one of {ROUTING_MODES}, not {routing!r}")
    return FaceMoE(resolve_config(config), routing)


def load_checkpoint(
    path_or_state_dict: str | os.PathLike[str] | Mapping[str, Any],
    config: str | dict[str, Any] | FaceMoEConfig | None = "full",
    k: int = 2,
    routing: RoutingMode = "static",
) -> FaceMoE:
    """Load an official checkpoint strictly, in eval mode.

    ``config=None`` (or ``"infer"``) takes the architecture from the tensor shapes. With an explicit config
    any architectural difference fails with a message naming it. ``k`` is not stored in checkpoints: it
    is always taken from the argument (the released model uses 2).
    """
    state, origin = read_state_dict(path_or_state_dict)
    check_finite(state, origin)
    found = infer_config(state, k=k)
    if config is None or config == "infer":
        cfg = found
        log.info("inferred config from %s: %s", origin, found.to_dict())
    else:
        cfg = resolve_config(config).replace(k=k)
        differences = describe_mismatch(found, cfg)
        if differences:
            raise CheckpointError(
                f"{origin}: {'; '.join(differences)} (pass config='infer' to use the checkpoint's architecture)"
            )
    model = FaceMoE(cfg, routing)
    check_keys(model, state, origin, cause="")
    model.load_state_dict(state, strict=True)
    return model.eval()


__all__ = [
    "PRESETS",
    "ROUTING_MODES",
    "FaceMoE",
    "FaceMoEConfig",
    "MoE",
    "build_model",
    "count_parameters",
    "infer_config",
    "load_checkpoint",
    "resolve_config",
]
