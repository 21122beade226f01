"""The attention autograd Function and the public functional ``flash_attention``."""

from __future__ import annotations

import torch

from flash_softmax import reference
from flash_softmax._backend import backend_for, device_guard
from flash_softmax.attention.backward import attention_backward
from flash_softmax.attention.checks import (
    check_attention_inputs,
    check_flag,
    expand_attn_bias,
    resolve_softcap,
    resolve_softmax_scale,
    resolve_window,
)
from flash_softmax.attention.forward import attention_forward
from flash_softmax.attention.options import KernelOptions


def _last_dim_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    """The kernels need unit stride along the head dim; any other stride is passed through as is."""
    return tensor if tensor.stride(-1) == 1 or tensor.shape[-1] == 1 else tensor.contiguous()


class FlashAttentionFunction(torch.autograd.Function):
    """Tiled attention: saves q, k, v, out and the float32 lse (nothing of size Sq x Sk) for backward.
    The bias is an input without gradient; its view is kept to recompute the scores."""

    @staticmethod
    def forward(ctx, q, k, v, options: KernelOptions):
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        with device_guard(q):  # Triton launches on the current device
            out, lse = attention_forward(q, k, v, options)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.options = options
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        with device_guard(q):
            dq, dk, dv = attention_backward(_last_dim_contiguous(dout), q, k, v, out, lse, ctx.options)
        return dq, dk, dv, None


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    attn_bias: torch.Tensor | None = None,
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

        softmax_scale: multiplies ``q @ k.T``; defaults to ``1 / sqrt(D)``.
        window_size: ``(left, right)`` sliding window, -1 meaning unbounded, aligned like causal: query
            ``i`` sees key ``j`` iff ``i + Sk - Sq - left <= j <= i + Sk - Sq + right``. Blocks outside the
            band are skipped, so a window of w costs O(Sq * w). ``causal=True`` means ``(left, 0)``.
        softcap: when > 0, scores become ``softcap * tanh(s / softcap)`` before the softmax (Gemma 2).
        attn_bias: float tensor added to the (capped) scaled scores, or bool tensor (True = keep),
            broadcastable to ``(B, Hq, Sq, Sk)``; broadcast dims are read with stride 0, never expanded
            in memory. It receives no gradient.
        return_lse: also return the logsumexp of the final scores.

    Returns:
        ``out (B, Hq, Sq, Dv)`` in the input dtype (float32 accumulation throughout), and with
        ``return_lse`` also ``lse (B, Hq, Sq)`` float32, natural log. lse carries no gradient.
        A row that sees no key gives output 0, lse -inf and zero gradients.

    CUDA tensors run the compiled Triton kernels; CPU tensors run the same kernels in Triton's interpreter
    when ``TRITON_INTERPRET=1``, and otherwise ``flash_softmax.reference.attention`` (same semantics).
    """
    check_attention_inputs(q, k, v)
    check_flag("causal", causal)
    check_flag("return_lse", return_lse)
    scale = resolve_softmax_scale(softmax_scale, q.shape[-1])
    left, right = resolve_window(window_size, causal)
    softcap = resolve_softcap(softcap)
    bias = expand_attn_bias(attn_bias, q, k)
    if backend_for(q.device) == "torch":
        out, lse = reference.attention(
            q, k, v, softmax_scale=scale, window_size=(left, right), softcap=softcap,
            attn_bias=None if bias is None else bias.detach(), return_lse=True,
        )
        lse = lse.detach()
    else:
        options = KernelOptions(scale, left, right, softcap, None if bias is None else bias.detach())
        out, lse = FlashAttentionFunction.apply(q, k, v, options)
    return (out, lse) if return_lse else out
