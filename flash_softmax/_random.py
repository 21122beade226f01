"""The random state of attention dropout, drawn in one place for the kernels and the reference.

Dropout's keep/drop decisions come from Philox-4x32-10, a counter-based generator: each (query row, key)
pair of each (batch, head) gets its own counter, so the mask does not depend on tile sizes, head dims or
the number of programs, and the backward regenerates it instead of saving it. A call draws its key from
torch's default generator of the tensors' device (``dropout_rng_state``), so ``torch.manual_seed``
reproduces a call bitwise, and two calls in a row draw different masks.

Element ``(b, h, i, j)`` of a ``(B, H, Sq, Sk)`` attention is kept iff ``(philox(key=seed,
counter=(j, i, b * H + h, offset))[0] >> 1) >= dropout_threshold(p)``: the first 32-bit output of the
generator, its top 31 bits compared with ``round(p * 2**31)``. The kernels compute this with Triton's
``tl.philox``; ``flash_softmax.reference.dropout_keep_mask`` computes it in plain PyTorch.
"""

from __future__ import annotations

import torch

__all__ = ["dropout_rng_state", "dropout_threshold", "DROPOUT_BITS"]

#: The random bits a decision compares: the top 31 of the generator's 32, so the comparison is a signed one.
DROPOUT_BITS = 31


def dropout_rng_state(device: torch.device) -> torch.Tensor:
    """``(2,)`` int64 ``(seed, offset)`` on ``device``, drawn from torch's default generator of that device.

    Drawn on the device itself (a CUDA generator for CUDA tensors), so nothing is read back to the host: the
    kernels load the pair, which keeps the call free of synchronisation and traceable by ``torch.compile``.
    ``seed`` is the 64-bit Philox key, ``offset`` (its low 32 bits) the last word of every counter.
    """
    return torch.randint(0, 2**62, (2,), dtype=torch.int64, device=device)


def dropout_threshold(dropout_p: float) -> int:
    """The integer a decision's 31 random bits must reach to keep an element: ``round(p * 2**31)``, so an
    element is kept with probability ``1 - p`` up to ``2**-31``."""
    return min(int(round(dropout_p * 2**DROPOUT_BITS)), 2**DROPOUT_BITS - 1)
