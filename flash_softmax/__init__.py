"""flash_softmax: fused attention and softmax kernels in Triton for PyTorch.

>>> import flash_softmax as fs
>>> out = fs.flash_attention(q, k, v, causal=True)   # q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D)
>>> y = fs.softmax(x, dim=-1)
"""

from flash_softmax import reference, testing
from flash_softmax._backend import FallbackWarning, reset_stats, stats
from flash_softmax.attention import (
    FlashAttention,
    flash_attention,
    flash_attention_varlen,
    flash_attention_with_kvcache,
)
from flash_softmax.mha import MultiheadAttention
from flash_softmax.sdpa import patch_sdpa, scaled_dot_product_attention
from flash_softmax.softmax import LogSoftmax, Softmax, log_softmax, softmax

__version__ = "0.1.0"
