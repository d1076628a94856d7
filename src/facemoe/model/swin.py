"""FaceMoE Swin backbone, written from the official architecture (docs/ARCHITECTURE.md).

Export-minded choices: every reshape that involves the batch uses -1 (never a traced batch size), window
and grid sizes are Python ints fixed by the config, and the shifted-window mask is a buffer, so the traced
graph works for any batch size.

Modes are chosen at construction (``routing``, ``kernel``) or changed through the model's own methods and
context managers, which apply to every MoE block (:class:`facemoe.model.moe.MoE`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from facemoe.model.attention import ATTENTION_MODES, AttentionMode, WindowAttention
from facemoe.model.config import FaceMoEConfig
from facemoe.model.moe import PACKED_MAX_TOKENS, GatingMode, MoE, MoEKernel, RoutingMode


def shifted_window_mask(side: int, window: int, shift: int) -> torch.Tensor:
    """(nW, w*w, w*w) mask: 0 within a region, -100 across regions (docs/ARCHITECTURE.md)."""
    labels = torch.zeros(side, side)
    bounds = (slice(0, side - window), slice(side - window, side - shift), slice(side - shift, side))
    region = 0
    for rows in bounds:
        for cols in bounds:
            labels[rows, cols] = region
            region += 1
    windows = window_partition(labels[None, :, :, None], window, side).squeeze(-1)
    diff = windows[:, None, :] - windows[:, :, None]
    return torch.where(diff != 0, torch.tensor(-100.0), torch.tensor(0.0))


def window_partition(x: torch.Tensor, window: int, side: int) -> torch.Tensor:
    """(B, side, side, C) -> (B * nW, window*window, C), windows batch-major then row-major."""
    channels = x.shape[-1]
    n = side // window
    x = x.reshape(-1, n, window, n, window, channels).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, channels)


def window_reverse(windows: torch.Tensor, window: int, side: int) -> torch.Tensor:
    """(B * nW, window*window, C) -> (B, side, side, C); the batch is inferred, never baked in."""
    channels = windows.shape[-1]
    n = side // window
    x = windows.reshape(-1, n, n, window, window, channels).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, side, side, channels)


class SwinMoEBlock(nn.Module):
    def __init__(
        self,
        dim: int,
        side: int,
        heads: int,
        window: int,
        shift: int,
        cfg: FaceMoEConfig,
        routing: RoutingMode,
        kernel: MoEKernel = "torch",
    ) -> None:
        super().__init__()
        if side <= window:  # the whole grid is one window: plain global attention, no shift
            window, shift = side, 0
        self.side, self.window, self.shift = side, window, shift
        if shift > 0:
            self.register_buffer("attn_mask", shifted_window_mask(side, window, shift))
        else:
            self.attn_mask = None
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, heads, cfg.qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MoE(dim, int(dim * cfg.mlp_ratio), cfg.num_experts, cfg.k, routing, kernel=kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[-1]
        y = self.norm1(x).reshape(-1, self.side, self.side, channels)
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        y = window_reverse(
            self.attn(window_partition(y, self.window, self.side), self.attn_mask), self.window, self.side
        )
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + y.reshape(-1, self.side * self.side, channels)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    def __init__(self, dim: int, side: int) -> None:
        super().__init__()
        self.side = side
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[-1]
        x = x.reshape(-1, self.side, self.side, channels)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        x = x.reshape(-1, (self.side // 2) ** 2, 4 * channels)
        return self.reduction(self.norm(x))


class Stage(nn.Module):
    def __init__(self, cfg: FaceMoEConfig, index: int, routing: RoutingMode, kernel: MoEKernel = "torch") -> None:
        super().__init__()
        dim, side = cfg.stage_dim(index), cfg.stage_resolution(index)
        heads, window = cfg.num_heads[index], cfg.window_size
        self.blocks = nn.ModuleList(
            SwinMoEBlock(dim, side, heads, window, 0 if i % 2 == 0 else window // 2, cfg, routing, kernel)
            for i in range(cfg.depths[index])
        )
        self.downsample = PatchMerging(dim, side) if index < cfg.num_stages - 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x) if self.downsample is not None else x


class PatchEmbed(nn.Module):
    def __init__(self, cfg: FaceMoEConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.norm = nn.LayerNorm(cfg.embed_dim) if cfg.patch_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class FaceMoE(nn.Module):
    """FaceMoE backbone: (B, 3, 120, 120) in [-1, 1] -> (B, 512) raw (un-normalised) embedding."""

    def __init__(self, cfg: FaceMoEConfig, routing: RoutingMode = "static", *, kernel: MoEKernel = "torch") -> None:
        super().__init__()
        self.config = cfg
        tokens = cfg.grid**2
        self.absolute_pos_embed: nn.Parameter | None
        if cfg.ape:
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, tokens, cfg.embed_dim))
        else:
            self.absolute_pos_embed = None
        self.patch_embed = PatchEmbed(cfg)
        self.layers = nn.ModuleList(Stage(cfg, i, routing, kernel) for i in range(cfg.num_stages))
        self.norm = nn.LayerNorm(cfg.num_features)
        flat = cfg.num_features * cfg.final_tokens
        self.feature_layer = nn.Sequential(
            nn.BatchNorm1d(flat),
            nn.Dropout(0.25),
            nn.Linear(flat, cfg.embedding_size),
            nn.BatchNorm1d(cfg.embedding_size),
        )
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02, a=-2.0, b=2.0)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for module in self.modules():
            if isinstance(module, WindowAttention):
                nn.init.trunc_normal_(module.relative_position_bias_table, std=0.02, a=-2.0, b=2.0)
        if self.absolute_pos_embed is not None:
            nn.init.trunc_normal_(self.absolute_pos_embed, std=0.02, a=-2.0, b=2.0)

    @property
    def routing(self) -> str:
        return self.moe_layers()[0][1].routing

    @property
    def kernel(self) -> str:
        return self.moe_layers()[0][1].kernel

    def moe_layers(self) -> list[tuple[str, MoE]]:
        """(state-dict prefix, module) of every MoE block, in forward order."""
        return [(name, m) for name, m in self.named_modules() if isinstance(m, MoE)]

    def set_routing(self, routing: RoutingMode) -> FaceMoE:
        if routing not in ("sparse", "static"):
            raise ValueError(f"routing must be 'sparse' or 'static', not {routing!r}")
        for _, moe in self.moe_layers():
            moe.set_routing(routing)
        return self

    def attention_modules(self) -> list[WindowAttention]:
        return [m for m in self.modules() if isinstance(m, WindowAttention)]

    @property
    def attention(self) -> str:
        return self.attention_modules()[0].mode

    def set_attention(self, mode: AttentionMode) -> FaceMoE:
        """Compute every window attention as ``mode`` (docs/ARCHITECTURE.md#window-attention); same function."""
        if mode not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, not {mode!r}")
        for module in self.attention_modules():
            module.set_mode(mode)
        return self

    @contextlib.contextmanager
    def using_attention(self, mode: AttentionMode) -> Iterator[FaceMoE]:
        """Run window attention as ``mode`` inside the block; the previous modes come back at the exit."""
        saved = [(m, m.mode) for m in self.attention_modules()]
        self.set_attention(mode)
        try:
            yield self
        finally:
            for module, previous in saved:
                module.set_mode(previous)

    def set_k(self, k: int) -> FaceMoE:
        if not 1 <= k <= self.config.num_experts:
            raise ValueError(f"k={k} must be between 1 and num_experts={self.config.num_experts}")
        for _, moe in self.moe_layers():
            moe.k = k
        return self

    def pack_experts(self, max_tokens: int = PACKED_MAX_TOKENS) -> FaceMoE:
        """:meth:`MoE.pack_experts` on every block (after the final ``.to()``/``.half()``)."""
        for _, moe in self.moe_layers():
            moe.pack_experts(max_tokens)
        return self

    def _each_block(self, enter: str, *args: object) -> contextlib.ExitStack:
        """One ExitStack holding ``moe.<enter>(*args)`` of every block; a block that refuses undoes the others."""
        stack = contextlib.ExitStack()
        try:
            for _, moe in self.moe_layers():
                stack.enter_context(getattr(moe, enter)(*args))
        except BaseException:
            stack.close()
            raise
        return stack

    @contextlib.contextmanager
    def using_routing(self, routing: RoutingMode) -> Iterator[FaceMoE]:
        """Run in ``routing`` inside the block; the previous routing comes back at the exit."""
        saved = [(moe, moe.routing) for _, moe in self.moe_layers()]
        self.set_routing(routing)
        try:
            yield self
        finally:
            for moe, previous in saved:
                moe.set_routing(previous)

    @contextlib.contextmanager
    def using_kernel(self, kernel: MoEKernel) -> Iterator[FaceMoE]:
        """Compute every MoE block with ``kernel`` (``"triton"``: the sparse GPU kernels, inference only)."""
        with self._each_block("using_kernel", kernel):
            yield self

    @contextlib.contextmanager
    def recording_routing(self) -> Iterator[dict[str, list[torch.Tensor]]]:
        """Per MoE block (state-dict prefix, forward order), the (tokens, k) expert indices of every forward."""
        with contextlib.ExitStack() as stack:
            yield {name: stack.enter_context(moe.recording_routing()) for name, moe in self.moe_layers()}

    @contextlib.contextmanager
    def tracking_aux_loss(self) -> Iterator[list[torch.Tensor]]:
        """The official auxiliary loss of every block and forward inside the block; sum them for training."""
        losses: list[torch.Tensor] = []
        with self._each_block("tracking_aux_loss", losses):
            yield losses

    @contextlib.contextmanager
    def tracing(self, gating: GatingMode = "onnx") -> Iterator[FaceMoE]:
        """The configuration the ONNX export traces: eval, static routing, fused fc1, torch ops, no records;
        ``gating="plugin"`` makes every MoE block one ``facemoe::SparseMoE`` node (docs/GATING_OP.md)."""
        was_training = self.training
        self.eval()
        try:
            # The exported graph is always the explicit matmul attention (docs/COMPILED.md#attention-modes).
            with self.using_attention("matmul"), self._each_block("tracing", gating):
                yield self
        finally:
            self.train(was_training)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        if self.absolute_pos_embed is not None:
            x = x + self.absolute_pos_embed.to(x.dtype)
        for stage in self.layers:
            x = stage(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x).flatten(1)
        return self.feature_layer(x)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["FaceMoE", "count_parameters"]
