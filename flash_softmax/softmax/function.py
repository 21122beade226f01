"""Public functionals ``softmax`` / ``log_softmax`` and the autograd Function behind them.

Calls go one way: ``softmax`` (checks, defaults) -> ``SoftmaxFunction`` (saves y) -> the custom ops
of ``ops.py`` -> ``softmax_forward`` / ``softmax_backward`` (allocate, layout, grid, config) -> the
Triton kernels.
"""

from __future__ import annotations

import operator

import torch
from torch.autograd.function import once_differentiable

from flash_softmax._backend import backend_for, backend_reason, record_fallback
from flash_softmax.softmax.ops import softmax_backward_op, softmax_forward_op

__all__ = ["softmax", "log_softmax", "SoftmaxFunction"]

#: dtypes the kernels compute (in float32) and return. float64 is refused rather than silently computed
#: in float32; torch.softmax serves it exactly.
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class SoftmaxFunction(torch.autograd.Function):
    """softmax (``log=False``) or log_softmax (``log=True``) along ``dim`` (normalised), saving only y.

    Backward: ``dx = y * (dy - rowsum(dy * y))`` for softmax, ``dx = dy - exp(y) * rowsum(dy)`` for
    log_softmax.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, log: bool) -> torch.Tensor:
        y = softmax_forward_op(x, dim, log)
        ctx.save_for_backward(y)
        ctx.dim = dim
        ctx.log = log
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: torch.Tensor):
        (y,) = ctx.saved_tensors
        return softmax_backward_op(y, dy, ctx.dim, ctx.log), None, None


def _checked_dim(x: object, dim: object, function: str) -> int:
    """Validate the arguments of ``function`` and return ``dim`` normalised to ``0 <= dim < max(ndim, 1)``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{function}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{function}: x must have dtype float16, bfloat16 or float32, got {x.dtype}"
            + (" (use torch.softmax / torch.log_softmax for float64)" if x.dtype == torch.float64 else "")
        )
    if isinstance(dim, bool):
        raise TypeError(f"{function}: dim must be an int, got bool ({dim})")
    try:
        dim = operator.index(dim)
    except TypeError:
        raise TypeError(f"{function}: dim must be an int, got {type(dim).__name__} ({dim!r})") from None
    # Like torch, a 0-d tensor behaves as a 1-d tensor of one element for the range of dim.
    rank = max(x.dim(), 1)
    if not -rank <= dim < rank:
        raise ValueError(
            f"{function}: dim must be in [{-rank}, {rank - 1}] for a tensor of shape {tuple(x.shape)}, got {dim}"
        )
    return dim % rank


def _apply(x: torch.Tensor, dim, dtype, log: bool) -> torch.Tensor:
    """The shared body of ``softmax`` and ``log_softmax``: checks, torch's ``dtype`` cast, dispatch."""
    function = "log_softmax" if log else "softmax"
    if dtype is not None:
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"{function}: dtype must be a torch.dtype or None, got {type(dtype).__name__} ({dtype!r})")
        if dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{function}: dtype must be float16, bfloat16 or float32 (or None), got {dtype}")
        if isinstance(x, torch.Tensor):
            # As torch does: the input is cast first (the cast is differentiable), the op runs in dtype.
            x = x.to(dtype)
    dim = _checked_dim(x, dim, function)
    if backend_for(x.device) == "torch":
        record_fallback("softmax_forward", backend_reason(x.device), stacklevel=4)
        return torch.log_softmax(x, dim) if log else torch.softmax(x, dim)
    return SoftmaxFunction.apply(x, dim, log)


def softmax(x: torch.Tensor, dim: int = -1, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``torch.softmax(x, dim, dtype=dtype)`` by the fused Triton kernels.

    Args:
        x: float16, bfloat16 or float32 tensor of any shape (0-d and empty included) and any strides.
        dim: the dim to normalise over; negative values count from the end.
        dtype: as torch's: when given, x is cast to it before the operation (e.g. ``torch.float32`` for a
            float32 result from half inputs). It must be one of the supported dtypes.

    Returns:
        ``exp(x) / sum(exp(x))`` along ``dim``, x's shape and dtype (``dtype`` when given), computed in
        float32. Special values follow torch: a row that is all ``-inf``, or holds ``+inf`` or NaN, is NaN;
        a ``-inf`` entry in an otherwise finite row gives 0. Differentiable; the backward keeps only the
        output.

    CUDA tensors run the compiled kernels, CPU tensors the same kernels in Triton's interpreter when
    ``TRITON_INTERPRET=1``; anywhere else the result is ``torch.softmax``'s, which warns once
    (``flash_softmax.FallbackWarning``) and is counted in ``flash_softmax.stats()``.
    """
    return _apply(x, dim, dtype, log=False)


def log_softmax(x: torch.Tensor, dim: int = -1, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``torch.log_softmax(x, dim, dtype=dtype)`` by the fused Triton kernels.

    Args:
        x: float16, bfloat16 or float32 tensor of any shape (0-d and empty included) and any strides.
        dim: the dim to normalise over; negative values count from the end.
        dtype: as torch's: when given, x is cast to it before the operation.

    Returns:
        ``x - log(sum(exp(x)))`` along ``dim``, x's shape and dtype (``dtype`` when given), computed in
        float32. Special values follow torch: a row that is all ``-inf``, or holds ``+inf`` or NaN, is NaN;
        a ``-inf`` entry in an otherwise finite row stays ``-inf``. Differentiable; the backward keeps only
        the output.

    Runs where ``softmax`` runs.
    """
    return _apply(x, dim, dtype, log=True)
