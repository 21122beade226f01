"""Device helpers shared by every op's kernels, and the interpreter's bfloat16 workaround they apply."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flash_softmax._backend import INTERPRETED


def interpreted_bfloat16(dtype: torch.dtype) -> bool:
    """Whether kernels on ``dtype`` inputs run with ``INTERPRETED_BFLOAT16``: bfloat16 under Triton's
    interpreter, every kernel's compile-time switch of that name.

    Triton's interpreter (3.6) gets two things wrong for bfloat16 that compiled kernels get right, and the
    switch makes the kernels work around both, so that CPU runs give what the GPU gives:

    1. Converting float32 to bfloat16 truncates, where the hardware rounds to nearest even; truncation
       would make results up to one bfloat16 ulp worse. ``round_to_dtype`` rounds on the bit pattern
       instead (``round_to_bfloat16``).
    2. ``tl.dot`` on bfloat16 operands multiplies their raw bit patterns. ``dot_operand`` rounds an
       operand to bfloat16 as the tensor cores will see it, then widens it back to float32: the same
       values, and a product the interpreter computes right.

    Compiled kernels take ``False`` and neither workaround costs them anything.
    """
    return INTERPRETED and dtype == torch.bfloat16


@triton.jit
def round_to_bfloat16(value):
    """float32 ``value`` to bfloat16, rounding to nearest even on the bit pattern (see
    ``interpreted_bfloat16``: the interpreter's own conversion truncates)."""
    bits = value.to(tl.uint32, bitcast=True)
    # Adding 0x7FFF plus the lowest kept bit carries into the kept bits exactly when the dropped half is
    # above one half ulp, or equal to it with an odd kept part: round to nearest, ties to even.
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.uint16)
    # NaN payloads near 0xFFFFFFFF would wrap around; give every NaN the canonical quiet NaN.
    rounded = tl.where(value != value, 0x7FC0, rounded).to(tl.uint16)
    return rounded.to(tl.bfloat16, bitcast=True)


@triton.jit
def round_to_dtype(x, DTYPE: tl.constexpr, INTERPRETED_BFLOAT16: tl.constexpr):
    """``x`` (a float32 or float64 accumulator) rounded to nearest even to ``DTYPE``: by the hardware's
    conversion, or on the bit pattern with ``INTERPRETED_BFLOAT16`` (``DTYPE`` is then bfloat16)."""
    if INTERPRETED_BFLOAT16:
        return round_to_bfloat16(x.to(tl.float32))
    return x.to(DTYPE)


@triton.jit
def dot_operand(x, DTYPE: tl.constexpr, INTERPRETED_BFLOAT16: tl.constexpr):
    """``x`` rounded to ``DTYPE`` as the tensor cores will see it, for ``tl.dot``; with
    ``INTERPRETED_BFLOAT16`` widened back to float32 after rounding, since the interpreter's bfloat16
    ``tl.dot`` is wrong."""
    x = round_to_dtype(x, DTYPE, INTERPRETED_BFLOAT16)
    if INTERPRETED_BFLOAT16:
        x = x.to(tl.float32)
    return x
