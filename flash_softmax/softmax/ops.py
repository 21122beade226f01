"""The launchers registered as ``torch.library`` custom ops, so ``torch.compile`` traces through them.

``torch.ops.flash_softmax.softmax_forward(x, dim, log)`` and
``torch.ops.flash_softmax.softmax_backward(y, dy, dim, log)`` run the Triton kernels. Their fake
implementations only describe the result (shape, dtype, strides of ``torch.empty_like``), which is all a
tracer needs; the launchers promise exactly that layout.
"""

from __future__ import annotations

import torch

from flash_softmax._backend import backend_for, record
from flash_softmax.softmax.backward import softmax_backward
from flash_softmax.softmax.forward import softmax_forward


@torch.library.custom_op("flash_softmax::softmax_forward", mutates_args=())
def softmax_forward_op(x: torch.Tensor, dim: int, log: bool) -> torch.Tensor:
    """softmax (or log_softmax when ``log``) of x along the normalised ``dim``; see ``softmax_forward``."""
    record("softmax_forward", backend_for(x.device))  # here, so that calls from compiled graphs count too
    return softmax_forward(x, dim, log=log)


@softmax_forward_op.register_fake
def _(x: torch.Tensor, dim: int, log: bool) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("flash_softmax::softmax_backward", mutates_args=())
def softmax_backward_op(y: torch.Tensor, dy: torch.Tensor, dim: int, log: bool) -> torch.Tensor:
    """dx from the forward's output y and the gradient dy; see ``softmax_backward``."""
    record("softmax_backward", backend_for(y.device))
    return softmax_backward(y, dy, dim, log=log)


@softmax_backward_op.register_fake
def _(y: torch.Tensor, dy: torch.Tensor, dim: int, log: bool) -> torch.Tensor:
    return torch.empty_like(y)
