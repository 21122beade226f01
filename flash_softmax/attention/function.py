"""The public functional ``flash_attention``.

Calls go one way: ``flash_attention`` (checks, defaults) -> the custom op
``torch.ops.flash_softmax.attention_forward`` of ``ops.py``, whose autograd formula calls
``attention_backward`` -> the launchers of ``forward.py`` / ``backward.py`` -> the Triton kernels.

Everything is checked here, once; the ops and launchers below trust their arguments.

When a gradient is needed, the op's autograd formula (``ops.setup_context``, ``ops.backward``) is applied
by ``_Attention``, an ``autograd.Function`` that calls the op with grad mode off, rather than by the op's
own registration. The formula is the same; what differs is torch's wrapper for ``register_autograd``,
which on every call rebuilds the op's arguments from its schema (``fill_defaults``, quadratic in the eight
arguments) and redispatches in Python before reaching an ``autograd.Function`` of its own: about a sixth of
the host time of a forward call. The op is still what runs, and what ``torch.compile`` records: Dynamo
traces ``_Attention`` and puts the forward and backward ops in their graphs.
"""

from __future__ import annotations

import torch

from flash_softmax import reference
from flash_softmax._random import dropout_rng_state
from flash_softmax._backend import backend_for, backend_reason, record_fallback
from flash_softmax.attention import ops
from flash_softmax.attention.checks import (
    broadcast_attn_bias,
    check_attention_inputs,
    check_attn_bias,
    resolve_score_options,
)
from flash_softmax.attention.common import LN2
from flash_softmax.attention.ops import attention_forward_op, last_dim_contiguous


class _Attention(torch.autograd.Function):
    """``attention_forward_op`` with the op's own autograd formula, applied without torch's per-call
    ``register_autograd`` wrapper (see the module docstring)."""

    @staticmethod
    def forward(ctx, q, k, v, attn_bias, sinks, alibi_slopes, rng_state, softmax_scale, window_left, window_right,
                softcap, dropout_p):
        inputs = (q, k, v, attn_bias, sinks, alibi_slopes, rng_state, softmax_scale, window_left, window_right,
                  softcap, dropout_p)
        output = attention_forward_op(*inputs)
        ops.setup_context(ctx, inputs, output)
        return output

    backward = staticmethod(ops.backward)


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
    sinks: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    dropout_p: float = 0.0,
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
            in memory. A float bias that requires grad gets ``dL/dscores`` summed over its broadcast dims,
            computed by a backward kernel into a tensor of the bias's own size.
        sinks: ``(Hq,)``, any float dtype: per head the logit of a virtual key whose value is 0 (gpt-oss's
            attention sinks), ``p_ij = exp(s_ij) / (sum_j exp(s_ij) + exp(sinks[h]))`` with ``s`` the final
            scores; the sink is not scaled. lse includes it; a row that sees no key gives output 0 and lse
            ``sinks[h]``. Receives its gradient when it requires one.
        alibi_slopes: ``(Hq,)`` or ``(B, Hq)`` float32: ALiBi adds ``-slope * |i + Sk - Sq - j|`` to the
            scores after the softcap (FlashAttention 2's definition, bottom-right aligned), computed in the
            kernels from positions. The slopes receive no gradient (requiring one is an error).
        dropout_p: dropout on the normalised probabilities before ``P @ V``, kept ones scaled by
            ``1 / (1 - p)``; lse is that of the undropped probabilities. The keep decisions come from a
            Philox generator in the kernels, keyed by a seed drawn from torch's default generator of the
            device (``torch.manual_seed`` reproduces a call) and each element's (batch, head, query, key):
            they do not depend on tiles or head dims, and the backward regenerates them.
        return_lse: also return the logsumexp of the final scores (differentiable: a loss on it flows into
            q, k, the bias and the sinks).

    Returns:
        ``out (B, Hq, Sq, Dv)`` in the input dtype (float32 accumulation throughout), laid out in memory
        like q on the kernels' paths: for q a ``(B, S, H, D)`` tensor seen as ``.transpose(1, 2)``, out
        is a ``(B, S, H, Dv)``-contiguous tensor seen the same way, so ``out.transpose(1, 2)`` is
        contiguous and reshaping it to ``(B, S, H * Dv)`` copies nothing. With
        ``return_lse`` also ``lse (B, Hq, Sq)`` float32, natural log.
        A row that sees no key gives output 0, lse -inf (the sink with ``sinks``) and zero gradients.

    CUDA tensors run the compiled Triton kernels; CPU tensors run the same kernels in Triton's interpreter
    when ``TRITON_INTERPRET=1``, and otherwise ``flash_softmax.reference.attention`` (same semantics), which
    warns once (``flash_softmax.FallbackWarning``) and is counted in ``flash_softmax.stats()``.
    """
    check_attention_inputs(q, k, v)
    scale, left, right, softcap, alibi_slopes, dropout_p = resolve_score_options(
        q, causal, return_lse, softmax_scale, window_size, softcap, sinks, alibi_slopes, dropout_p)
    if attn_bias is not None:
        check_attn_bias(attn_bias, q, k)
        if attn_bias.dtype == torch.bool:
            attn_bias = attn_bias.detach()  # a keep-mask has no gradient
    rng_state = dropout_rng_state(q.device) if dropout_p > 0 else None
    if backend_for(q.device) == "torch":
        record_fallback("attention_forward", backend_reason(q.device))
        out, lse = reference.attention(
            q, k, v, softmax_scale=scale, window_size=(left, right), softcap=softcap,
            attn_bias=broadcast_attn_bias(attn_bias, q, k), sinks=sinks, alibi_slopes=alibi_slopes,
            dropout_p=dropout_p, rng_state=rng_state, return_lse=True,
        )
    else:
        # The op expands the bias itself (see ops.py); the one it gets is the caller's. A last dim with
        # stride != 1 is copied here, once: the autograd graph then saves the copies the kernels read,
        # and backward needs no second copy.
        q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
        inputs = (q, k, v, attn_bias, sinks, alibi_slopes, rng_state, scale, left, right, softcap, dropout_p)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, attn_bias, sinks)):
            out, lse = _Attention.apply(*inputs)
        else:
            out, lse = attention_forward_op(*inputs)
        if return_lse:
            lse = lse * LN2  # the kernels keep lse in base 2, as their scores are
    return (out, lse) if return_lse else out
