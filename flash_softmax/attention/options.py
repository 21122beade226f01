"""The validated options of one attention call, turned into kernel arguments in one place."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton.language as tl

from flash_softmax._random import dropout_threshold
from flash_softmax._triton_helpers import interpreted_bfloat16
from flash_softmax.attention import configs
from flash_softmax.attention.common import LOG2E

# How the kernels treat ``attn_bias`` (the BIAS_KIND constexpr).
NO_BIAS, ADDITIVE_BIAS, KEEP_MASK = 0, 1, 2


_DTYPE_NAMES = {dtype: str(dtype).removeprefix("torch.")
                for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}


@dataclass(frozen=True)
class PackedBatch:
    """The sequences of a packed (variable-length) batch, already validated.

    ``cu_seqlens_q`` / ``cu_seqlens_k``: int32 or int64 ``(N + 1,)`` cumulative lengths on the inputs'
    device (sequence ``n`` is rows ``cu[n]:cu[n + 1]``); ``max_seqlen_q`` / ``max_seqlen_k``: bounds of the
    lengths, which choose the tile configuration (they never bound what a kernel reads). The launchers take
    the packed ``(T, H, D)`` tensors as ``(1, H, T, D)`` views.
    """

    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int

    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens_q.shape[0] - 1

    @property
    def max_lengths(self) -> tuple[int, int]:
        return self.max_seqlen_q, self.max_seqlen_k

    @staticmethod
    def as_batch(packed_tensor: torch.Tensor) -> torch.Tensor:
        """The launchers' ``(1, H, T, D)`` view of a packed ``(T, H, D)`` tensor (no copy)."""
        return packed_tensor.unsqueeze(0).transpose(1, 2)

    @staticmethod
    def as_packed(batch_view: torch.Tensor) -> torch.Tensor:
        """The packed ``(T, H, D)`` tensor seen by ``as_batch``'s ``(1, H, T, D)`` view."""
        return batch_view[0].transpose(0, 1)


def packed_operands(packed: PackedBatch | None, q: torch.Tensor, k: torch.Tensor) -> tuple:
    """``(CuSeqlensQ, CuSeqlensK)`` and ``(num_seqs, total_q, total_k)`` of the kernels: for a fixed-length
    call any valid pointers (never read, ``VARLEN`` is off) and zeros."""
    if packed is None:
        return (q, q), (0, 0, 0)
    return (packed.cu_seqlens_q, packed.cu_seqlens_k), (packed.num_seqs, q.shape[2], k.shape[2])


def batch_stride(tensor: torch.Tensor, packed: PackedBatch | None) -> int:
    """The stride a kernel multiplies its batch index by: the batch's, or for a packed batch (whose index
    is a sequence's first row) the rows'."""
    return tensor.stride(0) if packed is None else tensor.stride(2)


@dataclass(frozen=True)
class KernelOptions:
    """Everything but the tensors q, k, v that the kernels need.

    ``window_left`` / ``window_right`` are -1 for an unbounded side; causal has already been folded in
    as ``window_right = 0``. ``attn_bias`` is None or a ``(B, Hq, Sq, Sk)`` view with stride 0 along the
    broadcast dims. ``sinks`` is None or ``(Hq,)`` in any float dtype; ``alibi_slopes`` None or float32
    ``(Hq,)`` / ``(B, Hq)``; ``rng_state`` the int64 ``(seed, offset)`` pair of dropout (None without it).
    """

    softmax_scale: float
    window_left: int = -1
    window_right: int = -1
    softcap: float = 0.0
    attn_bias: torch.Tensor | None = None
    sinks: torch.Tensor | None = None
    alibi_slopes: torch.Tensor | None = None
    dropout_p: float = 0.0
    rng_state: torch.Tensor | None = None

    @property
    def modified(self) -> bool:
        """Whether a score modifier is on (a float bias, sinks, ALiBi or dropout): see
        ``configs.select_config``."""
        return (self.bias_kind == ADDITIVE_BIAS or self.sinks is not None or self.alibi_slopes is not None
                or self.dropout_p > 0)

    @property
    def bias_kind(self) -> int:
        if self.attn_bias is None:
            return NO_BIAS
        return KEEP_MASK if self.attn_bias.dtype == torch.bool else ADDITIVE_BIAS

    def bias_operand(self, q: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
        """The bias tensor and its four strides; without a bias, any valid pointer (never read) and zeros."""
        if self.attn_bias is None:
            return q, (0, 0, 0, 0)
        return self.attn_bias, tuple(self.attn_bias.stride())

    def modifier_operands(self, q: torch.Tensor) -> tuple:
        """``(Sinks, Alibi, Rng, stride_ab, stride_ah)``: the sinks, the ALiBi slopes with their batch and
        head strides (batch stride 0 for ``(Hq,)`` slopes) and dropout's ``(seed, offset)``. An absent one is
        any valid pointer, never read (its constexpr switch is off)."""
        sinks = q if self.sinks is None else self.sinks
        rng = q if self.rng_state is None else self.rng_state
        slopes = self.alibi_slopes
        if slopes is None:
            return sinks, q, rng, 0, 0
        if slopes.dim() == 1:
            return sinks, slopes, rng, 0, slopes.stride(0)
        return sinks, slopes, rng, slopes.stride(0), slopes.stride(1)

    def runtime_arguments(self, q: torch.Tensor, k: torch.Tensor, packed: PackedBatch | None = None) -> tuple:
        """Sizes, band, scales and dropout's threshold and rescale, in the order every attention kernel
        declares them. A packed batch (``q (1, Hq, Tq, D)``) passes its longest lengths as the lengths,
        which only key the tuning (each program reads its sequence's own)."""
        heads_q, heads_kv = q.shape[1], k.shape[1]
        seqlen_q, seqlen_k = (q.shape[2], k.shape[2]) if packed is None else packed.max_lengths
        # (All the rows of a packed batch bound any sequence's lengths, whatever its stated maxima.)
        return (
            heads_q, heads_q // heads_kv, seqlen_q, seqlen_k, *self.window_bounds(q.shape[2] + k.shape[2]),
            self.softmax_scale, *self.score_scales(),
            dropout_threshold(self.dropout_p), 1.0 / (1.0 - self.dropout_p),
            configs.length_bucket(seqlen_q), configs.length_bucket(seqlen_k),
        )

    def window_bounds(self, reach: int) -> tuple[int, int]:
        """``(window_left, window_right)`` as the kernels take them: 0 for an unbounded side (its ``HAS_*`` switch
        is off), and at most ``reach``. A bound of ``reach`` = Sq + Sk or more already reaches every key;
        clamping keeps the kernels' int32 index arithmetic (start + block + diagonal + bound) from wrapping
        around for huge bounds."""
        return min(max(self.window_left, 0), reach), min(max(self.window_right, 0), reach)

    def score_scales(self) -> tuple[float, float, float]:
        """``(qk_scale, softcap_scale, softcap_log2)``: the base-2 scale of ``q @ k.T``, and with a softcap the
        scale of its argument and its base-2 factor (0.0 without one)."""
        softcap = self.softcap
        return (self.softmax_scale * LOG2E, self.softmax_scale / softcap if softcap > 0 else 0.0,
                softcap * LOG2E)

    def selection_arguments(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            packed: PackedBatch | None = None) -> tuple:
        """What ``configs.launch`` chooses a configuration by: dtype name and size, head dims, whether the
        band is causal-like (bounded on the right), the lengths (a packed batch's longest), and the device
        index."""
        seqlen_q, seqlen_k = (q.shape[2], k.shape[2]) if packed is None else packed.max_lengths
        return (
            _DTYPE_NAMES.get(q.dtype) or str(q.dtype).removeprefix("torch."), q.element_size(),
            q.shape[3], v.shape[3],
            self.window_right >= 0, seqlen_q, seqlen_k, q.device.index or 0,
        )

    @staticmethod
    def statistics_dtype(q: torch.Tensor) -> torch.dtype:
        """dtype of lse and delta: float32, or float64 for the float64 inputs the launchers also take
        (the public functions accept 16- and 32-bit inputs; float64 serves gradient checks)."""
        return torch.float64 if q.dtype == torch.float64 else torch.float32

    def constexprs(self, q: torch.Tensor, v: torch.Tensor) -> dict:
        """Compile-time switches: head dims and their padded tiles, which masks and transforms apply."""
        head_dim, head_dim_v = q.shape[3], v.shape[3]
        return dict(
            HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v,
            BLOCK_D=configs.padded_head_dim(head_dim), BLOCK_DV=configs.padded_head_dim(head_dim_v),
            HAS_LEFT=self.window_left >= 0, HAS_RIGHT=self.window_right >= 0,
            HAS_SOFTCAP=self.softcap > 0, BIAS_KIND=self.bias_kind,
            HAS_SINKS=self.sinks is not None, HAS_ALIBI=self.alibi_slopes is not None,
            HAS_DROPOUT=self.dropout_p > 0,
            # Accumulate (and keep lse) in float32, or float64 for float64 inputs.
            ACC_DTYPE=tl.float64 if q.dtype == torch.float64 else tl.float32,
            INTERPRETED_BFLOAT16=interpreted_bfloat16(q.dtype),
        )
