"""Triton helpers shared by the forward and backward kernels."""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from flash_softmax._backend import INTERPRETED
from flash_softmax._triton_helpers import round_to_bfloat16


@triton.jit
def _row_block_offsets(
    n_inner,
    stride_outer,
    stride_inner,
    ROWS_PER_PROGRAM: tl.constexpr,
):
    """Offsets (in elements, int64) of column 0 of this program's rows, and which of them exist.

    Program ``p`` handles rows ``(outer, inner)`` with ``outer = p // ceil(n_inner / ROWS_PER_PROGRAM)``
    and ``ROWS_PER_PROGRAM`` consecutive values of ``inner`` (see ``layout.py``).
    """
    inner_blocks = tl.cdiv(n_inner, ROWS_PER_PROGRAM)
    program = tl.program_id(0)
    outer = (program // inner_blocks).to(tl.int64)
    inner = (program % inner_blocks).to(tl.int64) * ROWS_PER_PROGRAM + tl.arange(0, ROWS_PER_PROGRAM)
    return outer * stride_outer + inner * stride_inner, inner < n_inner


@triton.jit
def _to_stored_dtype(value, pointer, ROUND_BFLOAT16_BY_BITS: tl.constexpr):
    """``value`` (float32) converted, rounding to nearest even, to the element type of ``pointer``.

    Compiled kernels convert with the hardware instruction. Triton's interpreter (3.6) truncates float32
    to bfloat16 instead of rounding, which would make results up to one bfloat16 ulp worse than on a GPU;
    with ``ROUND_BFLOAT16_BY_BITS`` the rounding is done on the bit pattern, giving what the GPU gives.
    """
    if ROUND_BFLOAT16_BY_BITS:
        return round_to_bfloat16(value)
    else:
        return value.to(pointer.dtype.element_ty)


def round_bfloat16_by_bits(dtype: torch.dtype) -> bool:
    """Whether the kernels must round to ``dtype`` themselves (bfloat16 in the interpreter)."""
    return INTERPRETED and dtype == torch.bfloat16
