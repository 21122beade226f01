"""Forward kernels of softmax and log_softmax, and their launcher.

Both kernels compute, for each row x (a 1-D slice along the reduced dim), in float32::

    m = max(x)          s = sum(exp(x - m))
    softmax:     y = exp(x - m) / s
    log_softmax: y = (x - m) - log(s)

and store y in the input's dtype. Subtracting the row max keeps every exponent <= 0, so nothing
overflows; the special values then come out as torch has them without any special case: an all ``-inf``
row has m = -inf and x - m = NaN (NaN row), a ``+inf`` entry makes inf - inf = NaN (NaN row), a NaN
entry makes s NaN (NaN row), and a ``-inf`` entry next to finite ones gives exp(-inf) = 0
(log_softmax: -inf).

A program handles ``ROWS_PER_PROGRAM`` rows side by side: row ``(outer, inner)`` for ``inner`` in
``inner_start .. inner_start + ROWS_PER_PROGRAM``; see ``layout.py`` for how rows are addressed.
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
def _softmax_forward_single_block_kernel(
    x_ptr,
    y_ptr,
    n_inner,
    n_cols,
    stride_x_outer,
    stride_x_col,
    stride_x_inner,
    stride_y_outer,
    stride_y_col,
    stride_y_inner,
    LOG: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    ROWS_PER_PROGRAM: tl.constexpr,
    ROUND_BFLOAT16_BY_BITS: tl.constexpr,
):
    """Rows that fit one tile: one read of x, one write of y. ``BLOCK_SIZE >= n_cols``."""
    x_rows, row_mask = _row_block_offsets(n_inner, stride_x_outer, stride_x_inner, ROWS_PER_PROGRAM)
    y_rows, _ = _row_block_offsets(n_inner, stride_y_outer, stride_y_inner, ROWS_PER_PROGRAM)
    cols = tl.arange(0, BLOCK_SIZE).to(tl.int64)
    mask = row_mask[:, None] & (cols < n_cols)[None, :]

    # Padding lanes read -inf: they add exp(-inf) = 0 to the sum and never win the max.
    x = tl.load(
        x_ptr + x_rows[:, None] + cols[None, :] * stride_x_col, mask=mask, other=-float("inf")
    ).to(tl.float32)
    row_max = tl.max(x, axis=1)
    shifted = x - row_max[:, None]
    exponentials = tl.exp(shifted)
    row_sum = tl.sum(exponentials, axis=1)
    if LOG:
        y = shifted - tl.log(row_sum)[:, None]
    else:
        y = exponentials * (1.0 / row_sum)[:, None]
    y_pointers = y_ptr + y_rows[:, None] + cols[None, :] * stride_y_col
    tl.store(y_pointers, _to_stored_dtype(y, y_ptr, ROUND_BFLOAT16_BY_BITS), mask=mask)


@triton.jit
def _softmax_forward_tiled_kernel(
    x_ptr,
    y_ptr,
    n_inner,
    n_cols,
    stride_x_outer,
    stride_x_col,
    stride_x_inner,
    stride_y_outer,
    stride_y_col,
    stride_y_inner,
    LOG: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    ROWS_PER_PROGRAM: tl.constexpr,
    ROUND_BFLOAT16_BY_BITS: tl.constexpr,
):
    """Rows of any length: an online pass for max and sum, then a pass that writes y."""
    x_rows, row_mask = _row_block_offsets(n_inner, stride_x_outer, stride_x_inner, ROWS_PER_PROGRAM)
    y_rows, _ = _row_block_offsets(n_inner, stride_y_outer, stride_y_inner, ROWS_PER_PROGRAM)
    cols = tl.arange(0, BLOCK_SIZE).to(tl.int64)

    # First pass. After each tile, row_sum = sum(exp(x_seen - row_max)) over the columns seen so far,
    # and it is rescaled by exp(old_max - new_max) whenever the max grows.
    row_max = tl.full([ROWS_PER_PROGRAM], -float("inf"), tl.float32)
    row_sum = tl.zeros([ROWS_PER_PROGRAM], tl.float32)
    for start in range(0, n_cols, BLOCK_SIZE):
        col = start + cols
        mask = row_mask[:, None] & (col < n_cols)[None, :]
        x = tl.load(
            x_ptr + x_rows[:, None] + col[None, :] * stride_x_col, mask=mask, other=-float("inf")
        ).to(tl.float32)
        new_max = tl.maximum(row_max, tl.max(x, axis=1))
        # While every column seen is -inf, new_max is -inf and exp(-inf - -inf) would be NaN, poisoning
        # a row that later turns out finite. Shifting by 0 instead keeps the sum at exactly 0 until a
        # finite value arrives; a row that stays all -inf is still made NaN by the second pass.
        shift = tl.where(new_max == -float("inf"), 0.0, new_max)
        row_sum = row_sum * tl.exp(row_max - shift) + tl.sum(tl.exp(x - shift[:, None]), axis=1)
        row_max = new_max

    # Second pass: the same x - row_max as the single-block kernel, so both regimes agree.
    if LOG:
        row_offset = tl.log(row_sum)
    else:
        row_scale = 1.0 / row_sum
    for start in range(0, n_cols, BLOCK_SIZE):
        col = start + cols
        mask = row_mask[:, None] & (col < n_cols)[None, :]
        x = tl.load(
            x_ptr + x_rows[:, None] + col[None, :] * stride_x_col, mask=mask, other=-float("inf")
        ).to(tl.float32)
        shifted = x - row_max[:, None]
        if LOG:
            y = shifted - row_offset[:, None]
        else:
            y = tl.exp(shifted) * row_scale[:, None]
        y_pointers = y_ptr + y_rows[:, None] + col[None, :] * stride_y_col
        tl.store(y_pointers, _to_stored_dtype(y, y_ptr, ROUND_BFLOAT16_BY_BITS), mask=mask)


def softmax_forward(
    x: torch.Tensor,
    dim: int,
    *,
    log: bool,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """softmax (``log=False``) or log_softmax (``log=True``) of ``x`` along ``dim``.

    Args:
        x: float16, bfloat16 or float32 tensor of any shape and strides, on a device the Triton kernels
            run on (CUDA, or CPU under the interpreter). Inputs are checked by the public functions.
        dim: the reduced dim, already normalised to ``0 <= dim < x.ndim`` (0 for a 0-d tensor).
        log: compute log_softmax instead of softmax.
        config: the launch configuration; chosen by ``configs.choose_config`` when None.

    Returns:
        y with x's shape and dtype, laid out as ``torch.empty_like(x)``: x's strides when x is dense,
        contiguous otherwise.
    """
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    layout = row_layout((x, y), dim)
    if layout is not None:
        _launch_forward(x, y, layout, log, config)
        return y
    # The row dims of x cannot be written as two strided groups (a view that is both permuted and sliced,
    # say): the only case in which the input is copied. y keeps the strides ``empty_like`` gave it, which
    # are the ones the op's fake implementation promises, so a non-contiguous y is filled by a copy.
    x_contiguous = x.contiguous()
    y_contiguous = y if y.is_contiguous() else torch.empty_like(x_contiguous)
    _launch_forward(x_contiguous, y_contiguous, row_layout((x_contiguous, y_contiguous), dim), log, config)
    if y_contiguous is not y:
        y.copy_(y_contiguous)
    return y


def _launch_forward(
    x: torch.Tensor, y: torch.Tensor, layout: RowLayout, log: bool, config: KernelConfig | None
) -> None:
    """Launch the forward kernel that ``config`` (or the heuristic) picks, writing y."""
    if config is None:
        config = choose_config(layout.n_cols, layout.n_inner, columns_contiguous=layout.strides[0][1] == 1)
    kernel = _softmax_forward_tiled_kernel if config.tiled else _softmax_forward_single_block_kernel
    grid = (layout.n_outer * triton.cdiv(layout.n_inner, config.rows_per_program),)
    with device_guard(x):
        kernel[grid](
            x,
            y,
            layout.n_inner,
            layout.n_cols,
            *layout.strides[0],
            *layout.strides[1],
            LOG=log,
            BLOCK_SIZE=config.block_size,
            ROWS_PER_PROGRAM=config.rows_per_program,
            ROUND_BFLOAT16_BY_BITS=round_bfloat16_by_bits(y.dtype),
            num_warps=config.num_warps,
        )
