"""``FlashAttention``: the functional as an ``nn.Module`` holding its options."""

from __future__ import annotations

import torch
from torch import nn

from flash_softmax.attention.checks import resolve_dropout_p
from flash_softmax.attention.function import flash_attention


class FlashAttention(nn.Module):
    """Attention over already projected heads: ``q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv)``
    to ``(B, Hq, Sq, Dv)``. See ``flash_softmax.flash_attention`` for the semantics of every option.

    ``dropout_p`` applies in training mode only, as ``nn.Dropout`` does; the per-call tensors (a bias, the
    sinks, ALiBi slopes) are passed to ``forward``.
    """

    def __init__(self, causal: bool = False, softmax_scale: float | None = None,
                 window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0, dropout_p: float = 0.0):
        super().__init__()
        self.causal = causal
        self.softmax_scale = softmax_scale
        self.window_size = window_size
        self.softcap = softcap
        self.dropout_p = resolve_dropout_p(dropout_p)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_bias: torch.Tensor | None = None,
                sinks: torch.Tensor | None = None, alibi_slopes: torch.Tensor | None = None) -> torch.Tensor:
        return flash_attention(q, k, v, causal=self.causal, softmax_scale=self.softmax_scale,
                               window_size=self.window_size, softcap=self.softcap, attn_bias=attn_bias,
                               sinks=sinks, alibi_slopes=alibi_slopes,
                               dropout_p=self.dropout_p if self.training else 0.0)

    def extra_repr(self) -> str:
        return (f"causal={self.causal}, softmax_scale={self.softmax_scale}, window_size={self.window_size}, "
                f"softcap={self.softcap}, dropout_p={self.dropout_p}")
