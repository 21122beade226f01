"""Fused attention: tiled Triton forward and backward kernels, registered as torch.library custom ops."""

from flash_softmax.attention.function import flash_attention
from flash_softmax.attention.kvcache import flash_attention_with_kvcache
from flash_softmax.attention.module import FlashAttention
from flash_softmax.attention.ops import (
    attention_backward_op,
    attention_forward_op,
    attention_kvcache_op,
    attention_varlen_backward_op,
    attention_varlen_forward_op,
    kvcache_append_op,
)
from flash_softmax.attention.varlen import flash_attention_varlen

__all__ = [
    "FlashAttention",
    "attention_backward_op",
    "attention_forward_op",
    "attention_kvcache_op",
    "attention_varlen_backward_op",
    "attention_varlen_forward_op",
    "flash_attention",
    "flash_attention_varlen",
    "flash_attention_with_kvcache",
    "kvcache_append_op",
]
