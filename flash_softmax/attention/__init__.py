"""Fused attention: tiled Triton forward and backward kernels under an autograd Function."""

from flash_softmax.attention.function import FlashAttentionFunction, flash_attention
from flash_softmax.attention.module import FlashAttention

__all__ = ["FlashAttention", "FlashAttentionFunction", "flash_attention"]
