"""Outputs allocated in the caller's memory layout.

A model that keeps activations as ``(B, S, H, D)`` passes them to attention as ``.transpose(1, 2)`` views.
The kernels take any strides, so the output can be written in the same ``(B, S, H, Dv)`` order and handed
back as the same kind of view: the caller's next ``.transpose(1, 2).reshape(B, S, H * Dv)`` is then free,
where a ``(B, H, S, Dv)``-contiguous output would cost a copy there.
"""

from __future__ import annotations

import torch


def dim_order(like: torch.Tensor) -> tuple[int, int, int]:
    """The order, outermost first, in which ``like``'s first three dims ``(B, H, S)`` lie in memory.

    Equal strides keep the logical order, so a contiguous tensor gives ``(0, 1, 2)`` and a ``(B, S, H, D)``
    tensor viewed as ``.transpose(1, 2)`` gives ``(0, 2, 1)``.
    """
    strides, sizes = like.stride(), like.shape
    # A dim of size 1 does not change where anything lies in memory, so where it goes is free: innermost.
    return tuple(sorted(range(3), key=lambda d: (-strides[d] if sizes[d] > 1 else 1, d)))


def empty_in_layout_of(like: torch.Tensor, shape: tuple[int, int, int, int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised ``shape = (B, H, S, last)`` tensor whose first three dims are laid out in memory in
    the order of ``like``'s (see ``dim_order``), last dim contiguous.

    The strides are those of a contiguous tensor of the permuted shape, permuted back; the tensor is
    allocated with them directly rather than as a permuted view, so that it is not a view: autograd
    forbids in-place changes to a view made inside a custom function, which a caller may well do to an
    attention output.
    """
    order = dim_order(like)
    if order == (0, 1, 2):
        return torch.empty(shape, dtype=dtype, device=like.device)
    strides = [0, 0, 0, 1]
    step = max(shape[3], 1)  # as contiguous strides are computed: an empty dim counts as 1
    for d in reversed(order):
        strides[d] = step
        step *= max(shape[d], 1)
    return torch.empty_strided(shape, strides, dtype=dtype, device=like.device)
