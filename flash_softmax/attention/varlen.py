"""The public functional ``flash_attention_varlen``: attention over a packed batch of sequences of different
lengths, concatenated along the first dim with no padding.

Calls go one way, as for ``flash_attention`` (function.py): checks and defaults here -> the custom op
``torch.ops.flash_softmax.attention_varlen_forward`` of ``ops.py`` (its backward op through the same
autograd formula) -> the launchers of ``forward.py`` / ``backward.py`` with a ``PackedBatch`` -> the same
Triton kernels, compiled with ``VARLEN``: each program finds its own tile among the sequences' blocks, so
the work is that of the sequences' own ``sq x sk`` scores, never ``N x max_seqlen**2``.
"""

from __future__ import annotations

import torch

from flash_softmax import reference
from flash_softmax._backend import backend_for, backend_reason, record_fallback
from flash_softmax._random import dropout_rng_state
from flash_softmax.attention import ops
from flash_softmax.attention.checks import check_varlen_inputs, resolve_score_options
from flash_softmax.attention.common import LN2
from flash_softmax.attention.ops import attention_varlen_forward_op, last_dim_contiguous


class _AttentionVarlen(torch.autograd.Function):
    """``attention_varlen_forward_op`` with the op's own autograd formula (see function.py's ``_Attention``
    for why not through the op's registration)."""

    @staticmethod
    def forward(ctx, *inputs):
        output = attention_varlen_forward_op(*inputs)
        ops.varlen_setup_context(ctx, inputs, output)
        return output

    backward = staticmethod(ops.varlen_backward)


def _longest(cu_seqlens: torch.Tensor) -> int:
    """The longest length in ``cu_seqlens``: one read of the device (a host synchronisation)."""
    if cu_seqlens.shape[0] < 2:
        return 0
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max())


def flash_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    return_lse: bool = False,
):
    """Fused attention over a packed batch of variable-length sequences, forward and backward.

    Sequence ``n`` is rows ``cu_seqlens_q[n]:cu_seqlens_q[n + 1]`` of q and ``cu_seqlens_k[n]:cu_seqlens_k[n + 1]``
    of k and v, and its queries attend its own keys only: the result equals ``flash_attention`` run on each
    sequence alone (batch 1), without padding and without a mask in memory. For example three sequences of
    query lengths 3, 0 and 2 with key lengths 4, 2 and 2::

        q rows:   0 1 2 | 3 4               cu_seqlens_q = [0, 3, 3, 5]
        k rows:   0 1 2 3 | 4 5 | 6 7       cu_seqlens_k = [0, 4, 6, 8]

    Args:
        q: ``(Tq, Hq, D)`` float16, bfloat16 or float32: the sequences' queries, concatenated. Any strides with
            a contiguous last dim are read in place, e.g. ``qkv[:, 0]`` of a packed ``qkv (T, 3, H, D)``.
        k: ``(Tk, Hkv, D)``, same dtype and device, ``Hq % Hkv == 0`` (grouped-query heads read in place).
        v: ``(Tk, Hkv, Dv)``.
        cu_seqlens_q, cu_seqlens_k: int32 (int64 accepted) ``(N + 1,)`` on q's device: 0, then the running
            total of the lengths, ending at ``Tq`` / ``Tk``; equal entries make an empty sequence, anywhere.
            Their values are not checked on the device (that would synchronise): a wrong one gives wrong
            results, not an error.
        max_seqlen_q, max_seqlen_k: bounds of the sequences' lengths, which choose the kernels' tiles (as the
            lengths of ``flash_attention`` do; they never limit what is read). When None, each is read from
            its ``cu_seqlens``: one device-to-host synchronisation. Pass them to avoid it, and under
            ``torch.compile(fullgraph=True)``.
        causal, window_size: aligned to the bottom-right corner of each sequence's own ``sq x sk`` scores, as
            in ``flash_attention``: query ``i`` of sequence ``n`` sees its key ``j`` iff
            ``j <= i + sk - sq`` (causal), within ``[i + sk - sq - left, i + sk - sq + right]`` for a window.
        softmax_scale, softcap, sinks: as in ``flash_attention`` (``sinks (Hq,)``).
        alibi_slopes: ``(Hq,)`` or ``(N, Hq)`` float32, per sequence and head, bottom-right aligned per sequence.
        dropout_p: as in ``flash_attention``; the keep decision of query ``i``, key ``j``, head ``h`` of sequence
            ``n`` is that of batch ``n`` of ``flash_attention`` (positions counted within the sequence).
        return_lse: also return the logsumexp, differentiable.

    Returns:
        ``out (Tq, Hq, Dv)`` contiguous, in q's dtype; with ``return_lse`` also ``lse (Hq, Tq)`` float32, natural
        log (FlashAttention's packed layout). A query whose sequence has no key gives output 0 and lse -inf
        (the sink with ``sinks``).

    The backward gives dq, dk, dv and dsinks, deterministically (no atomics). CPU tensors run the kernels in
    Triton's interpreter under ``TRITON_INTERPRET=1``, and otherwise ``flash_softmax.reference.attention_varlen``,
    which warns once (``flash_softmax.FallbackWarning``).
    """
    check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    scale, left, right, softcap, alibi_slopes, dropout_p = resolve_score_options(
        q, causal, return_lse, softmax_scale, window_size, softcap, sinks, alibi_slopes, dropout_p,
        num_seqs=cu_seqlens_q.shape[0] - 1)
    rng_state = dropout_rng_state(q.device) if dropout_p > 0 else None
    if backend_for(q.device) == "torch":
        record_fallback("attention_varlen_forward", backend_reason(q.device))
        out, lse = reference.attention_varlen(
            q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale=scale, window_size=(left, right), softcap=softcap,
            sinks=sinks, alibi_slopes=alibi_slopes, dropout_p=dropout_p, rng_state=rng_state, return_lse=True,
        )
        return (out, lse) if return_lse else out
    if max_seqlen_q is None:
        max_seqlen_q = _longest(cu_seqlens_q)
    if max_seqlen_k is None:
        max_seqlen_k = _longest(cu_seqlens_k)
    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    inputs = (q, k, v, cu_seqlens_q, cu_seqlens_k, sinks, alibi_slopes, rng_state, max_seqlen_q, max_seqlen_k,
              scale, left, right, softcap, dropout_p)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, sinks)):
        out, lse = _AttentionVarlen.apply(*inputs)
    else:
        out, lse = attention_varlen_forward_op(*inputs)
    if return_lse:
        return out, lse * LN2  # the kernels keep lse in base 2, as their scores are
    return out
