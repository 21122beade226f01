"""Device helpers shared by every op's kernels."""

import triton
import triton.language as tl


@triton.jit
def round_to_bfloat16(value):
    """float32 ``value`` to bfloat16, rounding to nearest even on the bit pattern.

    Compiled kernels convert with the hardware instruction, which rounds. Triton's interpreter (3.6)
    truncates instead, which would make results up to one bfloat16 ulp worse than on a GPU; kernels call
    this under the interpreter so that CPU runs give what the GPU gives.
    """
    bits = value.to(tl.uint32, bitcast=True)
    # Adding 0x7FFF plus the lowest kept bit carries into the kept bits exactly when the dropped half is
    # above one half ulp, or equal to it with an odd kept part: round to nearest, ties to even.
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.uint16)
    # NaN payloads near 0xFFFFFFFF would wrap around; give every NaN the canonical quiet NaN.
    rounded = tl.where(value != value, 0x7FC0, rounded).to(tl.uint16)
    return rounded.to(tl.bfloat16, bitcast=True)
