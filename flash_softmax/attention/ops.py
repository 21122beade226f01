"""The attention launchers registered as ``torch.library`` custom ops, so ``torch.compile`` traces them.

``torch.ops.flash_softmax.attention_forward(q, k, v, attn_bias, sinks, alibi_slopes, rng_state,
softmax_scale, window_left, window_right, softcap, dropout_p) -> (out, lse)`` and
``torch.ops.flash_softmax.attention_backward(dout, dlse, q, k, v, out, lse, ...same arguments,
bias_requires_grad) -> (dq, dk, dv, dsinks, dbias)`` run the Triton kernels. The forward op carries its own
autograd formula (``setup_context`` and ``backward`` below, the backward op); ``flash_attention`` applies
the same formula through an ``autograd.Function`` of its own (see function.py for why).

A custom op's schema holds tensors and scalars, not a ``KernelOptions``: each op rebuilds the options from
its scalars. ``attn_bias`` is the user's tensor, anything that broadcasts to ``(B, Hq, Sq, Sk)``, already
checked by the caller (``check_attn_bias``); the op only expands it into a stride-0 view. Keeping the
expansion inside means the autograd graph saves the bias at its own size, never a ``(B, Hq, Sq, Sk)``
view whose numel counts as Sq x Sk, and a tracer never sees (or materialises) the broadcast.

The fake implementations describe the results exactly as the launchers allocate them, by the same
calls: ``out`` a fresh ``(B, Hq, Sq, Dv)`` tensor in q's dtype laid out like q (``empty_in_layout_of``:
a ``(B, S, H, D)`` tensor seen as ``.transpose(1, 2)`` gets an output of the same kind), ``lse`` a
contiguous ``(B, Hq, Sq)`` float32 tensor, ``dq, dk, dv`` ``torch.empty_like`` of q, k, v after their
last dim is made contiguous (which keeps their stride order, dense or not), ``dsinks`` float32 ``(Hq,)`` and
``dbias`` float32 with the bias's sizes as four dims (``bias_grad_shape``). A schema cannot return None, so
``dsinks`` and ``dbias`` are empty ``(0,)`` tensors when there is nothing to differentiate.
"""

from __future__ import annotations

import torch

from flash_softmax._backend import backend_for, device_guard, record
from flash_softmax.attention.backward import attention_backward
from flash_softmax.attention.checks import broadcast_attn_bias, pad_to_four_dims
from flash_softmax.attention.decode import attention_decode, kvcache_append
from flash_softmax.attention.forward import attention_forward
from flash_softmax.attention.layout import empty_in_layout_of
from flash_softmax.attention.options import KernelOptions, PackedBatch

__all__ = [
    "attention_backward_op",
    "attention_forward_op",
    "attention_kvcache_op",
    "attention_varlen_backward_op",
    "attention_varlen_forward_op",
    "backward",
    "kvcache_append_op",
    "last_dim_contiguous",
    "setup_context",
    "varlen_backward",
    "varlen_setup_context",
]


def last_dim_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    """The kernels need unit stride along the head dim; any other stride is kept as it is."""
    return tensor if tensor.stride(-1) == 1 or tensor.shape[-1] == 1 else tensor.contiguous()


def _kernel_options(
    q: torch.Tensor, k: torch.Tensor, attn_bias: torch.Tensor | None, sinks: torch.Tensor | None,
    alibi_slopes: torch.Tensor | None, rng_state: torch.Tensor | None,
    softmax_scale: float, window_left: int, window_right: int, softcap: float, dropout_p: float,
) -> KernelOptions:
    """The options of one call, with the bias as a ``(B, Hq, Sq, Sk)`` view (stride 0 where broadcast)."""
    bias = broadcast_attn_bias(attn_bias, q, k)
    return KernelOptions(softmax_scale, window_left, window_right, softcap, bias, sinks, alibi_slopes,
                         dropout_p, rng_state if dropout_p > 0 else None)


def bias_grad_shape(attn_bias: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[int, int, int, int]:
    """The sizes of a bias's gradient as the kernels compute it: the bias's own sizes as four dims (1 where it
    is broadcast over ``(B, Hq, Sq, Sk)``); reshaping it to the bias's shape copies nothing."""
    target = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    return tuple(1 if size == 1 else want for size, want in zip(pad_to_four_dims(attn_bias.shape), target))


@torch.library.custom_op("flash_softmax::attention_forward", mutates_args=())
def attention_forward_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_bias: torch.Tensor | None,
    sinks: torch.Tensor | None, alibi_slopes: torch.Tensor | None, rng_state: torch.Tensor | None,
    softmax_scale: float, window_left: int, window_right: int, softcap: float, dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``out (B, Hq, Sq, Dv)`` in q's dtype and ``lse (B, Hq, Sq)`` float32 in base 2 (``log2`` of the row
    sums of ``exp2`` of the base-2 scores, the sink included; ``flash_attention`` converts it); see
    ``attention_forward``.

    q ``(B, Hq, Sq, D)``, k ``(B, Hkv, Sk, D)``, v ``(B, Hkv, Sk, Dv)``, the bias, ``sinks (Hq,)`` and float32
    ``alibi_slopes (Hq,)`` / ``(B, Hq)`` must already be validated (``check_attention_inputs`` and friends);
    ``rng_state`` is dropout's int64 ``(seed, offset)`` (``flash_softmax._random``), read when
    ``dropout_p > 0``; ``window_left`` / ``window_right`` are -1 for an unbounded side, with causal folded in
    as ``window_right = 0``; ``softcap`` 0 disables the cap.
    """
    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    options = _kernel_options(q, k, attn_bias, sinks, alibi_slopes, rng_state, softmax_scale, window_left,
                              window_right, softcap, dropout_p)
    record("attention_forward", backend_for(q.device))  # here, so that calls from compiled graphs count too
    with device_guard(q):  # Triton launches on the current device
        return attention_forward(q, k, v, options)


@attention_forward_op.register_fake
def _(q, k, v, attn_bias, sinks, alibi_slopes, rng_state, softmax_scale, window_left, window_right, softcap,
      dropout_p):
    q = last_dim_contiguous(q)  # what the launcher sees, so the output follows the same layout
    batch, heads_q, seqlen_q, _ = q.shape
    out = empty_in_layout_of(q, (batch, heads_q, seqlen_q, v.shape[3]), q.dtype)
    lse = q.new_empty((batch, heads_q, seqlen_q), dtype=KernelOptions.statistics_dtype(q))
    return out, lse


@torch.library.custom_op("flash_softmax::attention_backward", mutates_args=())
def attention_backward_op(
    dout: torch.Tensor, dlse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, attn_bias: torch.Tensor | None, sinks: torch.Tensor | None,
    alibi_slopes: torch.Tensor | None, rng_state: torch.Tensor | None,
    softmax_scale: float, window_left: int, window_right: int, softcap: float, dropout_p: float,
    bias_requires_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``dq, dk, dv, dsinks, dbias`` from ``dout (B, Hq, Sq, Dv)`` (any strides), ``dlse`` (the base-2 lse's
    gradient, or None) and what the forward op saw and returned; see ``attention_backward``. Each of dq, dk,
    dv has its input's shape, dtype and layout; ``dsinks`` is float32 ``(Hq,)`` and ``dbias`` float32
    ``bias_grad_shape`` (when ``bias_requires_grad``), else each an empty ``(0,)`` tensor."""
    dout, q = last_dim_contiguous(dout), last_dim_contiguous(q)
    k, v = last_dim_contiguous(k), last_dim_contiguous(v)
    options = _kernel_options(q, k, attn_bias, sinks, alibi_slopes, rng_state, softmax_scale, window_left,
                              window_right, softcap, dropout_p)
    record("attention_backward", backend_for(q.device))
    grad_shape = bias_grad_shape(attn_bias, q, k) if bias_requires_grad and attn_bias is not None else None
    with device_guard(q):
        dq, dk, dv, dsinks, dbias = attention_backward(dout, q, k, v, out, lse, options, dlse, grad_shape)
    if dsinks is None:
        dsinks = q.new_empty((0,), dtype=torch.float32)
    if dbias is None:  # a tensor of its own: a custom op's outputs must not alias each other
        dbias = q.new_empty((0,), dtype=torch.float32)
    return dq, dk, dv, dsinks, dbias


@attention_backward_op.register_fake
def _(dout, dlse, q, k, v, out, lse, attn_bias, sinks, alibi_slopes, rng_state, softmax_scale, window_left,
      window_right, softcap, dropout_p, bias_requires_grad):
    dq, dk, dv = (torch.empty_like(last_dim_contiguous(t)) for t in (q, k, v))
    dsinks = q.new_empty((q.shape[1],) if sinks is not None else (0,), dtype=torch.float32)
    grad_shape = bias_grad_shape(attn_bias, q, k) if bias_requires_grad and attn_bias is not None else (0,)
    return dq, dk, dv, dsinks, q.new_empty(grad_shape, dtype=torch.float32)


def setup_context(ctx, inputs, output) -> None:
    """The forward op's autograd context: save q, k, v, out, lse, the bias at its own size (nothing of size
    Sq x Sk), the sinks, the slopes and dropout's random state, and the scalars. Gradients that were not
    used arrive as None (no zero tensors are made for an unused lse)."""
    q, k, v, attn_bias, sinks, alibi_slopes, rng_state, *scalars = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, attn_bias, sinks, alibi_slopes, rng_state)
    ctx.scalars = tuple(scalars)
    ctx.set_materialize_grads(False)


def backward(ctx, dout, dlse):
    """The forward op's derivative: the backward op on what ``setup_context`` saved. ``dlse`` is None unless
    a loss used the lse; the bias gets its gradient when it requires one, reduced to its own shape."""
    q, k, v, out, lse, attn_bias, sinks, alibi_slopes, rng_state = ctx.saved_tensors
    if dout is None:  # only the lse reached the loss
        dout = torch.zeros_like(out)
    bias_requires_grad = attn_bias is not None and ctx.needs_input_grad[3]
    dq, dk, dv, dsinks, dbias = attention_backward_op(
        dout, dlse, q, k, v, out, lse, attn_bias, sinks, alibi_slopes, rng_state, *ctx.scalars, bias_requires_grad)
    dsinks = dsinks.to(sinks.dtype) if sinks is not None and ctx.needs_input_grad[4] else None
    dbias = dbias.to(attn_bias.dtype).view(attn_bias.shape) if bias_requires_grad else None
    # The slopes, the random state and the scalars receive no gradient.
    return dq, dk, dv, dbias, dsinks, None, None, None, None, None, None, None


attention_forward_op.register_autograd(backward, setup_context=setup_context)


# --- packed (variable-length) batches -------------------------------------------------------------------
# ``torch.ops.flash_softmax.attention_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, sinks, alibi_slopes,
# rng_state, max_seqlen_q, max_seqlen_k, softmax_scale, window_left, window_right, softcap, dropout_p)
# -> (out, lse)`` and its backward op: the same launchers on ``(1, H, T, D)`` views of the packed tensors
# (``PackedBatch.as_batch``), with no bias.


@torch.library.custom_op("flash_softmax::attention_varlen_forward", mutates_args=())
def attention_varlen_forward_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    sinks: torch.Tensor | None, alibi_slopes: torch.Tensor | None, rng_state: torch.Tensor | None,
    max_seqlen_q: int, max_seqlen_k: int,
    softmax_scale: float, window_left: int, window_right: int, softcap: float, dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``out (Tq, Hq, Dv)`` contiguous in q's dtype and ``lse (Hq, Tq)`` float32 in base 2 of a packed batch:
    q ``(Tq, Hq, D)``, k ``(Tk, Hkv, D)``, v ``(Tk, Hkv, Dv)``, sequence ``n`` being rows
    ``cu_seqlens_q[n]:cu_seqlens_q[n + 1]`` of q and ``cu_seqlens_k[n]:cu_seqlens_k[n + 1]`` of k and v.
    Everything already validated (``check_varlen_inputs``); the other arguments as for
    ``attention_forward_op``, with ``alibi_slopes`` ``(Hq,)`` or ``(N, Hq)``."""
    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    options = _kernel_options(q, k, None, sinks, alibi_slopes, rng_state, softmax_scale, window_left, window_right,
                              softcap, dropout_p)
    packed = PackedBatch(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    record("attention_varlen_forward", backend_for(q.device))
    with device_guard(q):
        return attention_forward(*(PackedBatch.as_batch(t) for t in (q, k, v)), options, packed)


@attention_varlen_forward_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, sinks, alibi_slopes, rng_state, max_seqlen_q, max_seqlen_k,
      softmax_scale, window_left, window_right, softcap, dropout_p):
    out = q.new_empty((q.shape[0], q.shape[1], v.shape[2]))
    lse = q.new_empty((q.shape[1], q.shape[0]), dtype=KernelOptions.statistics_dtype(q))
    return out, lse


@torch.library.custom_op("flash_softmax::attention_varlen_backward", mutates_args=())
def attention_varlen_backward_op(
    dout: torch.Tensor, dlse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    sinks: torch.Tensor | None, alibi_slopes: torch.Tensor | None, rng_state: torch.Tensor | None,
    max_seqlen_q: int, max_seqlen_k: int,
    softmax_scale: float, window_left: int, window_right: int, softcap: float, dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``dq, dk, dv, dsinks`` of a packed batch from ``dout (Tq, Hq, Dv)`` (any strides), ``dlse (Hq, Tq)`` (the
    base-2 lse's gradient, or None) and what the forward op saw and returned. dq, dk, dv are
    ``torch.empty_like`` of q, k, v (their last dim made contiguous) filled; ``dsinks`` float32 ``(Hq,)``, or an
    empty ``(0,)`` tensor without sinks."""
    dout, q = last_dim_contiguous(dout), last_dim_contiguous(q)
    k, v = last_dim_contiguous(k), last_dim_contiguous(v)
    options = _kernel_options(q, k, None, sinks, alibi_slopes, rng_state, softmax_scale, window_left, window_right,
                              softcap, dropout_p)
    packed = PackedBatch(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    record("attention_varlen_backward", backend_for(q.device))
    batch_views = (PackedBatch.as_batch(t) for t in (dout, q, k, v, out))
    with device_guard(q):
        dq, dk, dv, dsinks, _ = attention_backward(
            *batch_views, lse.unsqueeze(0), options, None if dlse is None else dlse.unsqueeze(0), None, packed)
    if dsinks is None:
        dsinks = q.new_empty((0,), dtype=torch.float32)
    return dq, dk, dv, dsinks


@attention_varlen_backward_op.register_fake
def _(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, sinks, alibi_slopes, rng_state, max_seqlen_q,
      max_seqlen_k, softmax_scale, window_left, window_right, softcap, dropout_p):
    dq, dk, dv = (torch.empty_like(last_dim_contiguous(t)) for t in (q, k, v))
    return dq, dk, dv, q.new_empty((q.shape[1],) if sinks is not None else (0,), dtype=torch.float32)


def varlen_setup_context(ctx, inputs, output) -> None:
    """The varlen forward op's autograd context, as ``setup_context``: the packed tensors, the cumulative
    lengths, the sinks, slopes and random state, and the scalars."""
    q, k, v, cu_seqlens_q, cu_seqlens_k, sinks, alibi_slopes, rng_state, *scalars = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, sinks, alibi_slopes, rng_state)
    ctx.scalars = tuple(scalars)
    ctx.set_materialize_grads(False)


def varlen_backward(ctx, dout, dlse):
    """The varlen forward op's derivative: gradients for q, k, v and the sinks."""
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, sinks, alibi_slopes, rng_state = ctx.saved_tensors
    if dout is None:  # only the lse reached the loss
        dout = torch.zeros_like(out)
    dq, dk, dv, dsinks = attention_varlen_backward_op(
        dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, sinks, alibi_slopes, rng_state, *ctx.scalars)
    dsinks = dsinks.to(sinks.dtype) if sinks is not None and ctx.needs_input_grad[5] else None
    return (dq, dk, dv, None, None, dsinks) + (None,) * 9


attention_varlen_forward_op.register_autograd(varlen_backward, setup_context=varlen_setup_context)


# --- KV cache (decoding) -------------------------------------------------------------------------------
# ``torch.ops.flash_softmax.kvcache_append(k_cache, v_cache, k, v, cache_seqlens, block_table, cache_length)``
# writes new keys and values into the caches in place; ``torch.ops.flash_softmax.attention_kvcache(...)
# -> (out, lse)`` then reads them. Two ops, so that the one that mutates returns nothing and the one that
# returns never mutates: torch.compile orders them by the caches they share.


@torch.library.custom_op("flash_softmax::kvcache_append", mutates_args=("k_cache", "v_cache"))
def kvcache_append_op(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    cache_seqlens: torch.Tensor | None, block_table: torch.Tensor | None, cache_length: int,
) -> None:
    """Write ``k (B, Hkv, Sn, D)`` and ``v`` into the caches at positions ``cache_seqlens[b] + j`` (or
    ``cache_length + j`` when ``cache_seqlens`` is None), through ``block_table`` for a paged cache. Everything
    already validated (``check_kvcache_inputs``)."""
    record("kvcache_append", backend_for(k.device))
    with device_guard(k):
        kvcache_append(k_cache, v_cache, last_dim_contiguous(k), last_dim_contiguous(v), cache_seqlens,
                       cache_length, block_table)


@kvcache_append_op.register_fake
def _(k_cache, v_cache, k, v, cache_seqlens, block_table, cache_length):
    return None


@torch.library.custom_op("flash_softmax::attention_kvcache", mutates_args=())
def attention_kvcache_op(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor | None,
    block_table: torch.Tensor | None, sinks: torch.Tensor | None, alibi_slopes: torch.Tensor | None,
    cache_length: int, new_keys: int, softmax_scale: float, window_left: int, window_right: int, softcap: float,
    num_splits: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``out (B, Hq, Sq, Dv)`` laid out like q and ``lse (B, Hq, Sq)`` float32 in base 2 of attention over the
    caches (``decode.attention_decode``): sequence ``b`` covers ``L_b = cache_seqlens[b] + new_keys`` keys (or
    ``cache_length + new_keys``). Everything already validated; the others as for ``attention_forward_op``."""
    q = last_dim_contiguous(q)
    options = KernelOptions(softmax_scale, window_left, window_right, softcap, None, sinks, alibi_slopes)
    record("attention_kvcache", backend_for(q.device))
    with device_guard(q):
        return attention_decode(q, k_cache, v_cache, options, cache_seqlens=cache_seqlens, cache_length=cache_length,
                                new_keys=new_keys, block_table=block_table, num_splits=num_splits)


@attention_kvcache_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, block_table, sinks, alibi_slopes, cache_length, new_keys, softmax_scale,
      window_left, window_right, softcap, num_splits):
    q = last_dim_contiguous(q)
    batch, heads_q, seqlen_q, _ = q.shape
    out = empty_in_layout_of(q, (batch, heads_q, seqlen_q, v_cache.shape[3]), q.dtype)
    return out, q.new_empty((batch, heads_q, seqlen_q), dtype=KernelOptions.statistics_dtype(q))
