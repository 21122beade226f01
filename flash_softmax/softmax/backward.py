"""Backward kernels of softmax and log_softmax, and their launcher.

Only the forward output y is needed (README.md in this folder derives both formulas); per row, in
float32::

    softmax:     dx = y * (dy - sum(dy * y))
    log_softmax: dx = dy - exp(y) * sum(dy)

The Jacobian is never formed: each row costs one dot product (or sum) and one elementwise pass. Rows that
fit one tile are read once; longer rows are streamed twice (the sum, then the write of dx).
Rows are addressed as in the forward kernels (see ``layout.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flash_softmax._backend import device_guard
from flash_softmax.softmax.common import (
    _row_block_offsets,
    _to_stored_dtype,
    round_bfloat16_by_bits,
)
from flash_softmax.softmax.configs import KernelConfig, choose_config
from flash_softmax.softmax.layout import RowLayout, row_layout


@triton.jit
def _softmax_backward_single_block_kernel(
    y_ptr,
    dy_ptr,
    dx_ptr,
    n_inner,
    n_cols,
    stride_y_outer,
    stride_y_col,
    stride_y_inner,
    stride_dy_outer,
    stride_dy_col,
    stride_dy_inner,
    stride_dx_outer,
    stride_dx_col,
    stride_dx_inner,
    LOG: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    ROWS_PER_PROGRAM: tl.constexpr,
    ROUND_BFLOAT16_BY_BITS: tl.constexpr,
):
    """Rows that fit one tile: y and dy read once, dx written once. ``BLOCK_SIZE >= n_cols``."""
    y_rows, row_mask = _row_block_offsets(n_inner, stride_y_outer, stride_y_inner, ROWS_PER_PROGRAM)
    dy_rows, _ = _row_block_offsets(n_inner, stride_dy_outer, stride_dy_inner, ROWS_PER_PROGRAM)
    dx_rows, _ = _row_block_offsets(n_inner, stride_dx_outer, stride_dx_inner, ROWS_PER_PROGRAM)
    cols = tl.arange(0, BLOCK_SIZE).to(tl.int64)
    mask = row_mask[:, None] & (cols < n_cols)[None, :]

    # Padding lanes read dy = 0, so they add nothing to either sum.
    y = tl.load(y_ptr + y_rows[:, None] + cols[None, :] * stride_y_col, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + dy_rows[:, None] + cols[None, :] * stride_dy_col, mask=mask, other=0.0).to(tl.float32)
    if LOG:
        dx = dy - tl.exp(y) * tl.sum(dy, axis=1)[:, None]
    else:
        dx = y * (dy - tl.sum(dy * y, axis=1)[:, None])
    dx_pointers = dx_ptr + dx_rows[:, None] + cols[None, :] * stride_dx_col
    tl.store(dx_pointers, _to_stored_dtype(dx, dx_ptr, ROUND_BFLOAT16_BY_BITS), mask=mask)


@triton.jit
def _softmax_backward_tiled_kernel(
    y_ptr,
    dy_ptr,
    dx_ptr,
    n_inner,
    n_cols,
    stride_y_outer,
    stride_y_col,
    stride_y_inner,
    stride_dy_outer,
    stride_dy_col,
    stride_dy_inner,
    stride_dx_outer,
    stride_dx_col,
    stride_dx_inner,
    LOG: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    ROWS_PER_PROGRAM: tl.constexpr,
    ROUND_BFLOAT16_BY_BITS: tl.constexpr,
):
    """Rows of any length: a pass for the row sum, then a pass that writes dx."""
    y_rows, row_mask = _row_block_offsets(n_inner, stride_y_outer, stride_y_inner, ROWS_PER_PROGRAM)
    dy_rows, _ = _row_block_offsets(n_inner, stride_dy_outer, stride_dy_inner, ROWS_PER_PROGRAM)
    dx_rows, _ = _row_block_offsets(n_inner, stride_dx_outer, stride_dx_inner, ROWS_PER_PROGRAM)
    cols = tl.arange(0, BLOCK_SIZE).to(tl.int64)

    # First pass: accumulate lane by lane and reduce once at the end, instead of reducing every tile.
    partial_sums = tl.zeros([ROWS_PER_PROGRAM, BLOCK_SIZE], tl.float32)
    for start in range(0, n_cols, BLOCK_SIZE):
        col = start + cols
        mask = row_mask[:, None] & (col < n_cols)[None, :]
        dy = tl.load(dy_ptr + dy_rows[:, None] + col[None, :] * stride_dy_col, mask=mask, other=0.0).to(tl.float32)
        if LOG:
            partial_sums += dy
        else:
            y = tl.load(y_ptr + y_rows[:, None] + col[None, :] * stride_y_col, mask=mask, other=0.0).to(tl.float32)
            partial_sums += dy * y
    row_sum = tl.sum(partial_sums, axis=1)

    for start in range(0, n_cols, BLOCK_SIZE):
        col = start + cols
        mask = row_mask[:, None] & (col < n_cols)[None, :]
        y = tl.load(y_ptr + y_rows[:, None] + col[None, :] * stride_y_col, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + dy_rows[:, None] + col[None, :] * stride_dy_col, mask=mask, other=0.0).to(tl.float32)
        if LOG:
            dx = dy - tl.exp(y) * row_sum[:, None]
        else:
            dx = y * (dy - row_sum[:, None])
        dx_pointers = dx_ptr + dx_rows[:, None] + col[None, :] * stride_dx_col
        tl.store(dx_pointers, _to_stored_dtype(dx, dx_ptr, ROUND_BFLOAT16_BY_BITS), mask=mask)


def softmax_backward(
    y: torch.Tensor,
    dy: torch.Tensor,
    dim: int,
    *,
    log: bool,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """The gradient dx of softmax (``log=False``) or log_softmax (``log=True``) from its output.

    Args:
        y: the forward's output, float16, bfloat16 or float32, any shape and strides.
        dy: the gradient of the loss with respect to y: y's shape, any dtype and strides (an expanded
            gradient with stride 0, as from ``y.sum().backward()``, is read in place). It is read in
            float32 whatever its dtype.
        dim: the reduced dim, normalised to ``0 <= dim < y.ndim`` (0 for a 0-d tensor).
        log: y is a log_softmax output.
        config: the launch configuration; chosen by ``configs.choose_config`` when None.

    Returns:
        dx with y's shape and dtype, laid out as ``torch.empty_like(y)``.
    """
    dx = torch.empty_like(y)
    if y.numel() == 0:
        return dx
    layout = row_layout((y, dy, dx), dim)
    if layout is not None:
        _launch_backward(y, dy, dx, layout, log, config)
        return dx
    # dy's row dims are laid out differently from y's and the three cannot share one row enumeration:
    # compute on contiguous copies, and keep dx in the layout ``empty_like(y)`` promises.
    y_contiguous, dy_contiguous = y.contiguous(), dy.contiguous()
    dx_contiguous = dx if dx.is_contiguous() else torch.empty_like(y_contiguous)
    layout = row_layout((y_contiguous, dy_contiguous, dx_contiguous), dim)
    _launch_backward(y_contiguous, dy_contiguous, dx_contiguous, layout, log, config)
    if dx_contiguous is not dx:
        dx.copy_(dx_contiguous)
    return dx


def _launch_backward(
    y: torch.Tensor,
    dy: torch.Tensor,
    dx: torch.Tensor,
    layout: RowLayout,
    log: bool,
    config: KernelConfig | None,
) -> None:
    """Launch the backward kernel that ``config`` (or the heuristic) picks, writing dx."""
    if config is None:
        config = choose_config(layout.n_cols, layout.n_inner, columns_contiguous=layout.strides[0][1] == 1)
    kernel = _softmax_backward_tiled_kernel if config.tiled else _softmax_backward_single_block_kernel
    grid = (layout.n_outer * triton.cdiv(layout.n_inner, config.rows_per_program),)
    with device_guard(y):
        kernel[grid](
            y,
            dy,
            dx,
            layout.n_inner,
            layout.n_cols,
            *layout.strides[0],
            *layout.strides[1],
            *layout.strides[2],
            LOG=log,
            BLOCK_SIZE=config.block_size,
            ROWS_PER_PROGRAM=config.rows_per_program,
            ROUND_BFLOAT16_BY_BITS=round_bfloat16_by_bits(dx.dtype),
            num_warps=config.num_warps,
        )
