"""Window attention of the Swin blocks, in three interchangeable forms (docs/ARCHITECTURE.md#window-attention).

All three compute the same function: per 25-token window, q scaled by d^-0.5, logits q·kᵀ plus the relative
position bias plus, in shifted blocks, the -100 shift mask (docs/ARCHITECTURE.md#shifted-window-mask), softmax,
then ``attn @ v``. They differ in how many passes over the (windows, heads, 25, 25) logits they make:

* ``matmul`` (the default, and the only form the ONNX export traces): explicit matmul, two adds, softmax,
  matmul; each step reads and writes the logits.
* ``sdpa``: ``scaled_dot_product_attention`` with bias and mask folded into one additive float mask, so a
  fused kernel never writes the logits. Unshifted blocks pass the (heads, 25, 25) bias, broadcast over
  windows; shifted blocks need a per-window mask, which a 4-D attention call can only take materialised
  per window (windows are the fast part of the batch index), so that mask is expanded over the batch.
* ``flex``: FlexAttention with a score modifier that adds ``table[window, head, q, k]``, the bias and mask
  folded into one small table read inside the kernel: nothing is materialised per batch. It needs
  ``torch.compile`` to be fused (eager runs a reference implementation).

The mode is a property of the module, changed through ``FaceMoE.set_attention`` / ``using_attention``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

AttentionMode = Literal["matmul", "sdpa", "flex"]
ATTENTION_MODES: tuple[str, ...] = ("matmul", "sdpa", "flex")


def relative_position_index(window: int) -> torch.Tensor:
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :]
    return (rel[0] + window - 1) * (2 * window - 1) + (rel[1] + window - 1)


def _flex_attention() -> Any:
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError as exc:  # older torch
        raise RuntimeError(f"attention mode 'flex' needs torch.nn.attention.flex_attention: {exc}") from exc
    return flex_attention


class WindowAttention(nn.Module):
    def __init__(self, dim: int, window: int, heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.dim = dim
        self.window = window
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim**-0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        self.register_buffer("relative_position_index", relative_position_index(window))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self._mode: AttentionMode = "matmul"

    relative_position_index: torch.Tensor

    @property
    def mode(self) -> AttentionMode:
        return self._mode

    def set_mode(self, mode: AttentionMode) -> WindowAttention:
        if mode not in ATTENTION_MODES:
            raise ValueError(f"attention mode must be one of {ATTENTION_MODES}, not {mode!r}")
        self._mode = mode
        return self

    def position_bias(self) -> torch.Tensor:
        """(heads, 25, 25) relative position bias."""
        tokens = self.window * self.window
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        return bias.reshape(tokens, tokens, self.heads).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        tokens = self.window * self.window
        qkv = self.qkv(x).reshape(-1, tokens, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if self._mode == "sdpa":
            out = self._sdpa(q, k, v, mask)
        elif self._mode == "flex":
            out = self._flex(q, k, v, mask)
        else:
            out = self._matmul(q, k, v, mask)
        return self.proj(out.transpose(1, 2).reshape(-1, tokens, self.dim))

    def _matmul(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        tokens = self.window * self.window
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = attn + self.position_bias().unsqueeze(0).to(attn.dtype)
        if mask is not None:
            n_windows = mask.shape[0]
            attn = attn.reshape(-1, n_windows, self.heads, tokens, tokens) + mask[None, :, None].to(attn.dtype)
            attn = attn.reshape(-1, self.heads, tokens, tokens)
        return attn.softmax(dim=-1) @ v

    def _additive(self, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """Bias plus shift mask: (heads, 25, 25) without a mask, (windows, heads, 25, 25) with one."""
        bias = self.position_bias()
        if mask is None:
            return bias.to(dtype)
        return (bias.unsqueeze(0) + mask.unsqueeze(1).to(bias.dtype)).to(dtype)

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        additive = self._additive(mask, q.dtype)
        if mask is not None:
            n_windows, tokens = mask.shape[0], self.window * self.window
            additive = additive.unsqueeze(0).expand(q.shape[0] // n_windows, -1, -1, -1, -1)
            additive = additive.reshape(-1, self.heads, tokens, tokens)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=additive, scale=self.scale)

    def _flex(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        flex_attention = _flex_attention()
        table = self._additive(mask, torch.float32)
        if mask is None:

            def score_mod(score: Any, b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
                return score + table[h, q_idx, kv_idx]

        else:
            n_windows = mask.shape[0]

            def score_mod(score: Any, b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
                # Windows are the fast part of the batch index (batch-major partition order).
                return score + table[b % n_windows, h, q_idx, kv_idx]

        return flex_attention(q, k, v, score_mod=score_mod, scale=self.scale)


__all__ = ["ATTENTION_MODES", "AttentionMode", "WindowAttention", "relative_position_index"]
