"""Fused attention: tiled Triton forward and backward kernels, registered as torch.library custom ops."""

from flash_softmax.attention.function import flash_attention
from flash_softmax.attention.module import FlashAttention
from flash_softmax.attention.ops import attention_backward_op, attention_forward_op

__all__ = ["FlashAttention", "attention_backward_op", "attention_forward_op", "flash_attention"]
