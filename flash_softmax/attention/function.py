"""The attention autograd Function and the public functional ``flash_attention``."""

from __future__ import annotations

import torch

from flash_softmax import reference
from flash_softmax._backend import backend_for
from flash_softmax.attention.backward import attention_backward
from flash_softmax.attention.checks import check_attention_inputs, check_flag, resolve_softmax_scale
from flash_softmax.attention.forward import attention_forward


def _last_dim_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    """The kernels need unit stride along the head dim; any other stride is passed through as is."""
    return tensor if tensor.stride(-1) == 1 or tensor.shape[-1] == 1 else tensor.contiguous()


class FlashAttentionFunction(torch.autograd.Function):
    """Tiled attention: saves q, k, v, out and the float32 lse (nothing of size Sq x Sk) for backward."""

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, softmax_scale: float):
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        out, lse = attention_forward(q, k, v, causal, softmax_scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal = causal
        ctx.softmax_scale = softmax_scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = attention_backward(
            _last_dim_contiguous(dout), q, k, v, out, lse, ctx.causal, ctx.softmax_scale
        )
        return dq, dk, dv, None, None


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    return_lse: bool = False,
):
    """Fused scaled dot-product attention, forward and backward, without an Sq x Sk matrix in memory.

    Args:
        q: ``(B, Hq, Sq, D)`` float16, bfloat16 or float32 (SDPA's layout). Any strides with a contiguous
            last dim are used in place, e.g. a ``(B, S, H, D)`` tensor passed as ``.transpose(1, 2)``.
        k: ``(B, Hkv, Sk, D)``, same dtype and device; ``Hq % Hkv == 0`` (grouped-query attention reads
            each group's K/V head in place, never a repeated copy).
        v: ``(B, Hkv, Sk, Dv)``. ``D`` and ``Dv`` may be anything from 1 to 256.
        causal: mask aligned to the bottom-right corner, as FlashAttention 2.1+: query ``i`` sees key ``j``
            iff ``j <= i + Sk - Sq``. With Sq = 2, Sk = 5 and Sq = 5, Sk = 2 (1 = kept)::

                1 1 1 1 0        0 0
                1 1 1 1 1        0 0
                                 0 0
                                 1 0
                                 1 1

            A row that sees no key (the first rows when Sq > Sk) gives output 0, lse -inf, zero gradients.
        softmax_scale: multiplies ``q @ k.T``; defaults to ``1 / sqrt(D)``.
        return_lse: also return the logsumexp of the scaled scores.

    Returns:
        ``out (B, Hq, Sq, Dv)`` in the input dtype (float32 accumulation throughout), and with
        ``return_lse`` also ``lse (B, Hq, Sq)`` float32, natural log. lse carries no gradient.

    CUDA tensors run the compiled Triton kernels; CPU tensors run the same kernels in Triton's interpreter
    when ``TRITON_INTERPRET=1``, and otherwise ``flash_softmax.reference.attention`` (same semantics).
    """
    check_attention_inputs(q, k, v)
    check_flag("causal", causal)
    check_flag("return_lse", return_lse)
    scale = resolve_softmax_scale(softmax_scale, q.shape[-1])
    if backend_for(q.device) == "torch":
        out, lse = reference.attention(q, k, v, causal=causal, softmax_scale=scale, return_lse=True)
        lse = lse.detach()
    else:
        out, lse = FlashAttentionFunction.apply(q, k, v, causal, scale)
    return (out, lse) if return_lse else out
