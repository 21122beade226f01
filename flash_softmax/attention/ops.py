"""The attention launchers registered as ``torch.library`` custom ops, so ``torch.compile`` traces them.

``torch.ops.flash_softmax.attention_forward(q, k, v, attn_bias, softmax_scale, window_left, window_right,
softcap) -> (out, lse)`` and ``torch.ops.flash_softmax.attention_backward(dout, q, k, v, out, lse,
attn_bias, ...same scalars) -> (dq, dk, dv)`` run the Triton kernels. The forward op carries its own
autograd formula (the backward op), so calling it is all ``flash_attention`` does after validating.

A custom op's schema holds tensors and scalars, not a ``KernelOptions``: each op rebuilds the options from
its scalars. ``attn_bias`` is the user's tensor, anything that broadcasts to ``(B, Hq, Sq, Sk)``; the op
expands it into a stride-0 view itself. Keeping the expansion inside means the autograd graph saves the
bias at its own size, never a ``(B, Hq, Sq, Sk)`` view whose numel counts as Sq x Sk, and a tracer never
sees (or materialises) the broadcast.

The fake implementations describe the results exactly as the launchers allocate them: ``out`` a fresh
contiguous ``(B, Hq, Sq, Dv)`` tensor in q's dtype, ``lse`` a contiguous ``(B, Hq, Sq)`` float32 tensor,
and ``dq, dk, dv`` ``torch.empty_like`` of q, k, v after their last dim is made contiguous.
"""

from __future__ import annotations

import torch

from flash_softmax._backend import device_guard
from flash_softmax.attention.backward import attention_backward
from flash_softmax.attention.checks import expand_attn_bias
from flash_softmax.attention.forward import attention_forward
from flash_softmax.attention.options import KernelOptions

__all__ = ["attention_forward_op", "attention_backward_op", "last_dim_contiguous"]


def last_dim_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    """The kernels need unit stride along the head dim; any other stride is kept as it is."""
    return tensor if tensor.stride(-1) == 1 or tensor.shape[-1] == 1 else tensor.contiguous()


def _kernel_options(
    q: torch.Tensor, k: torch.Tensor, attn_bias: torch.Tensor | None,
    softmax_scale: float, window_left: int, window_right: int, softcap: float,
) -> KernelOptions:
    """The options of one call, with the bias as a ``(B, Hq, Sq, Sk)`` view (stride 0 where broadcast)."""
    bias = expand_attn_bias(attn_bias, q, k)
    return KernelOptions(softmax_scale, window_left, window_right, softcap, bias)


@torch.library.custom_op("flash_softmax::attention_forward", mutates_args=())
def attention_forward_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_bias: torch.Tensor | None,
    softmax_scale: float, window_left: int, window_right: int, softcap: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``out (B, Hq, Sq, Dv)`` in q's dtype and ``lse (B, Hq, Sq)`` float32 in base 2 (``log2`` of the row
    sums of ``exp2`` of the base-2 scores; ``flash_attention`` converts it); see ``attention_forward``.

    q ``(B, Hq, Sq, D)``, k ``(B, Hkv, Sk, D)``, v ``(B, Hkv, Sk, Dv)`` must already be validated
    (``check_attention_inputs``); ``window_left`` / ``window_right`` are -1 for an unbounded side, with
    causal folded in as ``window_right = 0``; ``softcap`` 0 disables the cap.
    """
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    options = _kernel_options(q, k, attn_bias, softmax_scale, window_left, window_right, softcap)
    with device_guard(q):  # Triton launches on the current device
        return attention_forward(q, k, v, options)


@attention_forward_op.register_fake
def _(q, k, v, attn_bias, softmax_scale, window_left, window_right, softcap):
    batch, heads_q, seqlen_q, _ = q.shape
    out = q.new_empty((batch, heads_q, seqlen_q, v.shape[3]))
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
    dout, q, k, v = (last_dim_contiguous(t) for t in (dout, q, k, v))
    options = _kernel_options(q, k, attn_bias, softmax_scale, window_left, window_right, softcap)
    with device_guard(q):
        return attention_backward(dout, q, k, v, out, lse, options)


@attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, attn_bias, softmax_scale, window_left, window_right, softcap):
    return tuple(torch.empty_like(last_dim_contiguous(t)) for t in (q, k, v))


def _setup_context(ctx, inputs, output) -> None:
    """Save q, k, v, out, lse and the bias at its own size: nothing of size Sq x Sk."""
    q, k, v, attn_bias, softmax_scale, window_left, window_right, softcap = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, attn_bias)
    ctx.scalars = (softmax_scale, window_left, window_right, softcap)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, attn_bias = ctx.saved_tensors
    dq, dk, dv = attention_backward_op(dout, q, k, v, out, lse, attn_bias, *ctx.scalars)
    # The bias and the scalars receive no gradient.
    return dq, dk, dv, None, None, None, None, None


attention_forward_op.register_autograd(_backward, setup_context=_setup_context)
