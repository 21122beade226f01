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

from flash_softmax._triton_helpers import round_to_dtype
from flash_softmax.softmax.common import launch_by_rows, program_rows, row_tile, tile_mask
from flash_softmax.softmax.configs import KernelConfig


@triton.jit
def _softmax_forward_kernel(
    x_ptr, y_ptr, n_inner, n_cols, x_strides, y_strides,
    LOG: tl.constexpr, TILED: tl.constexpr, BLOCK_SIZE: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr,
    INTERPRETED_BFLOAT16: tl.constexpr,
):
    """y of ``ROWS_PER_PROGRAM`` rows. Without ``TILED`` the rows fit one tile (``BLOCK_SIZE >= n_cols``): one
    read of x, one write of y. With ``TILED``, rows of any length: an online pass for max and sum, then a pass
    that writes y."""
    x_rows, row_mask = program_rows(n_inner, x_strides, ROWS_PER_PROGRAM)
    y_rows, _ = program_rows(n_inner, y_strides, ROWS_PER_PROGRAM)
    cols = tl.arange(0, BLOCK_SIZE).to(tl.int64)
    if TILED:
        # First pass. After each tile, row_sum = sum(exp(x_seen - row_max)) over the columns seen so far,
        # and it is rescaled by exp(old_max - new_max) whenever the max grows.
        row_max = tl.full([ROWS_PER_PROGRAM], -float("inf"), tl.float32)
        row_sum = tl.zeros([ROWS_PER_PROGRAM], tl.float32)
        for start in range(0, n_cols, BLOCK_SIZE):
            col = start + cols
            mask = tile_mask(row_mask, col, n_cols)
            x = tl.load(row_tile(x_ptr, x_rows, col, x_strides), mask=mask, other=-float("inf")).to(tl.float32)
            new_max = tl.maximum(row_max, tl.max(x, axis=1))
            # While every column seen is -inf, new_max is -inf and exp(-inf - -inf) would be NaN, poisoning
            # a row that later turns out finite. Shifting by 0 instead keeps the sum at exactly 0 until a
            # finite value arrives; a row that stays all -inf is still made NaN by the second pass.
            shift = tl.where(new_max == -float("inf"), 0.0, new_max)
            row_sum = row_sum * tl.exp(row_max - shift) + tl.sum(tl.exp(x - shift[:, None]), axis=1)
            row_max = new_max

        # Second pass: the same x - row_max as the single-tile branch, so both regimes agree.
        if LOG:
            row_offset = tl.log(row_sum)
        else:
            row_scale = 1.0 / row_sum
        for start in range(0, n_cols, BLOCK_SIZE):
            col = start + cols
            mask = tile_mask(row_mask, col, n_cols)
            x = tl.load(row_tile(x_ptr, x_rows, col, x_strides), mask=mask, other=-float("inf")).to(tl.float32)
            shifted = x - row_max[:, None]
            if LOG:
                y = shifted - row_offset[:, None]
            else:
                y = tl.exp(shifted) * row_scale[:, None]
            y_pointers = row_tile(y_ptr, y_rows, col, y_strides)
            tl.store(y_pointers, round_to_dtype(y, y_ptr.dtype.element_ty, INTERPRETED_BFLOAT16), mask=mask)
    else:
        mask = tile_mask(row_mask, cols, n_cols)

        # Padding lanes read -inf: they add exp(-inf) = 0 to the sum and never win the max.
        x = tl.load(row_tile(x_ptr, x_rows, cols, x_strides), mask=mask, other=-float("inf")).to(tl.float32)
        row_max = tl.max(x, axis=1)
        shifted = x - row_max[:, None]
        exponentials = tl.exp(shifted)
        row_sum = tl.sum(exponentials, axis=1)
        if LOG:
            y = shifted - tl.log(row_sum)[:, None]
        else:
            y = exponentials * (1.0 / row_sum)[:, None]
        y_pointers = row_tile(y_ptr, y_rows, cols, y_strides)
        tl.store(y_pointers, round_to_dtype(y, y_ptr.dtype.element_ty, INTERPRETED_BFLOAT16), mask=mask)


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
    launch_by_rows(_softmax_forward_kernel, (x,), y, dim, log, config)
    return y
