"""The attention launchers registered as ``torch.library`` custom ops, so ``torch.compile`` traces them.

``torch.ops.flash_softmax.attention_forward(q, k, v, attn_bias, softmax_scale, window_left, window_right,
softcap) -> (out, lse)`` and ``torch.ops.flash_softmax.attention_backward(dout, q, k, v, out, lse,
attn_bias, ...same scalars) -> (dq, dk, dv)`` run the Triton kernels. The forward op carries its own
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
contiguous ``(B, Hq, Sq)`` float32 tensor, and ``dq, dk, dv`` ``torch.empty_like`` of q, k, v after their
last dim is made contiguous (which keeps their stride order, dense or not).
"""

from __future__ import annotations

import torch

from flash_softmax._backend import backend_for, device_guard, record
from flash_softmax.attention.backward import attention_backward
from flash_softmax.attention.checks import broadcast_attn_bias
from flash_softmax.attention.forward import attention_forward
from flash_softmax.attention.layout import empty_in_layout_of
from flash_softmax.attention.options import KernelOptions

__all__ = ["attention_forward_op", "attention_backward_op", "backward", "last_dim_contiguous", "setup_context"]


def last_dim_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    """The kernels need unit stride along the head dim; any other stride is kept as it is."""
    return tensor if tensor.stride(-1) == 1 or tensor.shape[-1] == 1 else tensor.contiguous()


def _kernel_options(
    q: torch.Tensor, k: torch.Tensor, attn_bias: torch.Tensor | None,
    softmax_scale: float, window_left: int, window_right: int, softcap: float,
) -> KernelOptions:
    """The options of one call, with the bias as a ``(B, Hq, Sq, Sk)`` view (stride 0 where broadcast)."""
    bias = broadcast_attn_bias(attn_bias, q, k)
    return KernelOptions(softmax_scale, window_left, window_right, softcap, bias)


@torch.library.custom_op("flash_softmax::attention_forward", mutates_args=())
def attention_forward_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_bias: torch.Tensor | None,
    softmax_scale: float, window_left: int, window_right: int, softcap: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``out (B, Hq, Sq, Dv)`` in q's dtype and ``lse (B, Hq, Sq)`` float32 in base 2 (``log2`` of the row
    sums of ``exp2`` of the base-2 scores; ``flash_attention`` converts it); see ``attention_forward``.

    q ``(B, Hq, Sq, D)``, k ``(B, Hkv, Sk, D)``, v ``(B, Hkv, Sk, Dv)`` and the bias must already be
    validated (``check_attention_inputs``, ``check_attn_bias``); ``window_left`` / ``window_right`` are -1
    for an unbounded side, with causal folded in as ``window_right = 0``; ``softcap`` 0 disables the cap.
    """
    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    options = _kernel_options(q, k, attn_bias, softmax_scale, window_left, window_right, softcap)
    record("attention_forward", backend_for(q.device))  # here, so that calls from compiled graphs count too
    with device_guard(q):  # Triton launches on the current device
        return attention_forward(q, k, v, options)


@attention_forward_op.register_fake
def _(q, k, v, attn_bias, softmax_scale, window_left, window_right, softcap):
    q = last_dim_contiguous(q)  # what the launcher sees, so the output follows the same layout
    batch, heads_q, seqlen_q, _ = q.shape
    out = empty_in_layout_of(q, (batch, heads_q, seqlen_q, v.shape[3]), q.dtype)
    lse = q.new_empty((batch, heads_q, seqlen_q), dtype=KernelOptions.statistics_dtype(q))
    return out, lse


@torch.library.custom_op("flash_softmax::attention_backward", mutates_args=())
def attention_backward_op(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, attn_bias: torch.Tensor | None,
    softmax_scale: float, window_left: int, window_right: int, softcap: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``dq, dk, dv`` from ``dout (B, Hq, Sq, Dv)`` (any strides) and what the forward op saw and returned;
    see ``attention_backward``. Each gradient has its input's shape, dtype and layout."""
    dout, q = last_dim_contiguous(dout), last_dim_contiguous(q)
    k, v = last_dim_contiguous(k), last_dim_contiguous(v)
    options = _kernel_options(q, k, attn_bias, softmax_scale, window_left, window_right, softcap)
    record("attention_backward", backend_for(q.device))
    with device_guard(q):
        return attention_backward(dout, q, k, v, out, lse, options)


@attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, attn_bias, softmax_scale, window_left, window_right, softcap):
    return tuple(torch.empty_like(last_dim_contiguous(t)) for t in (q, k, v))


def setup_context(ctx, inputs, output) -> None:
    """The forward op's autograd context: save q, k, v, out, lse and the bias at its own size (nothing of
    size Sq x Sk) and the scalars; lse is not differentiable."""
    q, k, v, attn_bias, softmax_scale, window_left, window_right, softcap = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, attn_bias)
    ctx.scalars = (softmax_scale, window_left, window_right, softcap)
    ctx.mark_non_differentiable(lse)


def backward(ctx, dout, _dlse):
    """The forward op's derivative: the backward op on what ``setup_context`` saved."""
    q, k, v, out, lse, attn_bias = ctx.saved_tensors
    dq, dk, dv = attention_backward_op(dout, q, k, v, out, lse, attn_bias, *ctx.scalars)
    # The bias and the scalars receive no gradient.
    return dq, dk, dv, None, None, None, None, None


attention_forward_op.register_autograd(backward, setup_context=setup_context)
