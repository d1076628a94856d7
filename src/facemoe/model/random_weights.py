"""Random weights with realistic statistics, for demos and tests (official weights are hub-only).

The official initialisation (weights N(0, 0.02), zero biases, identity norms) makes every block nearly
an identity map, so it hides numerical problems. ``randomize`` draws every tensor instead, so that each
one influences the output: variance-preserving weights (N(0, 1/fan_in), as trained networks roughly
are), small random biases and norm affines, non-trivial BatchNorm statistics. ``strength`` scales the
non-weight perturbations; ``strength=5`` approaches the harsh recipe of the golden reference data.
"""

from __future__ import annotations

import torch
from torch import nn

from facemoe.model.swin import FaceMoE, WindowAttention


@torch.no_grad()
def randomize(model: FaceMoE, seed: int = 0, strength: float = 1.0) -> FaceMoE:
    gen = torch.Generator().manual_seed(seed)

    def normal(shape: torch.Size, std: float) -> torch.Tensor:
        return torch.randn(shape, generator=gen) * std

    for module in model.modules():
        if isinstance(module, nn.Linear | nn.Conv2d):
            fan_in = module.weight[0].numel()
            module.weight.copy_(normal(module.weight.shape, fan_in**-0.5))
            if module.bias is not None:
                module.bias.copy_(normal(module.bias.shape, 0.02 * strength))
        elif isinstance(module, nn.LayerNorm):
            module.weight.copy_(1.0 + normal(module.weight.shape, 0.04 * strength))
            module.bias.copy_(normal(module.bias.shape, 0.02 * strength))
        elif isinstance(module, nn.BatchNorm1d):
            assert module.running_mean is not None and module.running_var is not None
            module.weight.copy_(1.0 + normal(module.weight.shape, 0.04 * strength))
            module.bias.copy_(normal(module.bias.shape, 0.02 * strength))
            module.running_mean.copy_(normal(module.running_mean.shape, 0.04 * strength))
            module.running_var.copy_(1.0 + 0.1 * strength * torch.rand(module.running_var.shape, generator=gen))
        elif isinstance(module, WindowAttention):
            table = module.relative_position_bias_table
            table.copy_(normal(table.shape, 0.1 * strength))
    if model.absolute_pos_embed is not None:
        model.absolute_pos_embed.copy_(normal(model.absolute_pos_embed.shape, 0.1 * strength))
    return model.eval()
