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

from flash_softmax._triton_helpers import round_to_dtype
from flash_softmax.softmax.common import launch_by_rows, program_rows, row_tile, tile_mask
from flash_softmax.softmax.configs import KernelConfig


@triton.jit
def _softmax_backward_kernel(
    y_ptr, dy_ptr, dx_ptr, n_inner, n_cols, y_strides, dy_strides, dx_strides,
    LOG: tl.constexpr, TILED: tl.constexpr, BLOCK_SIZE: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr,
    INTERPRETED_BFLOAT16: tl.constexpr,
):
    """dx of ``ROWS_PER_PROGRAM`` rows. Without ``TILED`` the rows fit one tile (``BLOCK_SIZE >= n_cols``): y and
    dy read once, dx written once. With ``TILED``, rows of any length: a pass for the row sum, then a pass that
    writes dx."""
    y_rows, row_mask = program_rows(n_inner, y_strides, ROWS_PER_PROGRAM)
    dy_rows, _ = program_rows(n_inner, dy_strides, ROWS_PER_PROGRAM)
    dx_rows, _ = program_rows(n_inner, dx_strides, ROWS_PER_PROGRAM)
    cols = tl.arange(0, BLOCK_SIZE).to(tl.int64)
    if TILED:
        # First pass: accumulate lane by lane and reduce once at the end, instead of reducing every tile.
        partial_sums = tl.zeros([ROWS_PER_PROGRAM, BLOCK_SIZE], tl.float32)
        for start in range(0, n_cols, BLOCK_SIZE):
            col = start + cols
            mask = tile_mask(row_mask, col, n_cols)
            dy = tl.load(row_tile(dy_ptr, dy_rows, col, dy_strides), mask=mask, other=0.0).to(tl.float32)
            if LOG:
                partial_sums += dy
            else:
                y = tl.load(row_tile(y_ptr, y_rows, col, y_strides), mask=mask, other=0.0).to(tl.float32)
                partial_sums += dy * y
        row_sum = tl.sum(partial_sums, axis=1)

        for start in range(0, n_cols, BLOCK_SIZE):
            col = start + cols
            mask = tile_mask(row_mask, col, n_cols)
            y = tl.load(row_tile(y_ptr, y_rows, col, y_strides), mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(row_tile(dy_ptr, dy_rows, col, dy_strides), mask=mask, other=0.0).to(tl.float32)
            if LOG:
                dx = dy - tl.exp(y) * row_sum[:, None]
            else:
                dx = y * (dy - row_sum[:, None])
            dx_pointers = row_tile(dx_ptr, dx_rows, col, dx_strides)
            tl.store(dx_pointers, round_to_dtype(dx, dx_ptr.dtype.element_ty, INTERPRETED_BFLOAT16), mask=mask)
    else:
        mask = tile_mask(row_mask, cols, n_cols)

        # Padding lanes read dy = 0, so they add nothing to either sum.
        y = tl.load(row_tile(y_ptr, y_rows, cols, y_strides), mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(row_tile(dy_ptr, dy_rows, cols, dy_strides), mask=mask, other=0.0).to(tl.float32)
        if LOG:
            dx = dy - tl.exp(y) * tl.sum(dy, axis=1)[:, None]
        else:
            dx = y * (dy - tl.sum(dy * y, axis=1)[:, None])
        dx_pointers = row_tile(dx_ptr, dx_rows, cols, dx_strides)
        tl.store(dx_pointers, round_to_dtype(dx, dx_ptr.dtype.element_ty, INTERPRETED_BFLOAT16), mask=mask)


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
    launch_by_rows(_softmax_backward_kernel, (y, dy), dx, dim, log, config)
    return dx
