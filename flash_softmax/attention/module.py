"""``FlashAttention``: the functional as an ``nn.Module`` holding its options."""

from __future__ import annotations

import torch
from torch import nn

from flash_softmax.attention.function import flash_attention


class FlashAttention(nn.Module):
    """Attention over already projected heads: ``q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv)``
    to ``(B, Hq, Sq, Dv)``. See ``flash_softmax.flash_attention`` for the semantics of every option."""

    def __init__(self, causal: bool = False, softmax_scale: float | None = None):
        super().__init__()
        self.causal = causal
        self.softmax_scale = softmax_scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return flash_attention(q, k, v, causal=self.causal, softmax_scale=self.softmax_scale)

    def extra_repr(self) -> str:
        return f"causal={self.causal}, softmax_scale={self.softmax_scale}"
