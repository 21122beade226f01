"""``flash-softmax verify``: the kernels against the reference over a grid of cases.

Every case runs the kernel, the float64 truth and the reference computed in the input dtype
(``upcast=False``) on the same random inputs, and judges the forward output, the lse and the input
gradients with :func:`flash_softmax.testing.compare`: a low-precision result passes when its max error
is at most 2x (outputs, lse) or 3x (gradients) the input-dtype reference's own error; float32 results
must be within 1e-5 relative of the float64 truth (docs/semantics.md, "Accuracy policy"). The report is
a rich table where rich is installed and plain text otherwise.

The cases are data: :data:`QUICK_ATTENTION` / :data:`FULL_ATTENTION_*` and the softmax lists below. A
case may need an option the kernels gain later (sliding window, softcap, bias, grouped heads, a value
head dim != D, sinks, ALiBi, dropout); such a case runs only where :func:`attention_features` finds the
feature, and the report says which were left out.

The score modifiers (:data:`MODIFIER_ATTENTION`) add gradients to check: ``dsinks`` for attention sinks
and ``dbias`` for a float bias that requires grad; in cases whose loss also uses the lse, every gradient
carries the lse's part too. A dropout case seeds torch's generators before each of the three runs, so the
kernel and both references drop the same elements.

The packed cases (:class:`VarlenCase`, :data:`QUICK_VARLEN`, :func:`full_varlen_grid`; ``--ops varlen``) check
``flash_attention_varlen`` the same way against ``reference.attention_varlen``: several sequences of odd
lengths (one of them empty, queries and keys of different lengths) concatenated along dim 0.

The cache cases (:class:`KVCacheCase`, :data:`QUICK_KVCACHE`, :func:`full_kvcache_grid`; ``--ops kvcache``) check
``flash_attention_with_kvcache`` (inference only: out and lse) against ``reference.attention_kvcache``, on
sequences of different lengths in one contiguous or paged cache (pages shuffled), with new keys appended. Both
write the new keys into caches of the same random content, and each cache is compared whole after the call: the
new positions must hold the new keys and every other entry must be left as it was.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import itertools
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import torch

from flash_softmax import reference
from flash_softmax.bench.attention import DROPOUT_P as BENCH_DROPOUT_P
from flash_softmax.testing import GRADIENT_FACTOR, OUTPUT_FACTOR, Comparison, compare

#: The functions under test, looked up at every call. None means the package's own function
#: (``flash_attention``, ``flash_attention_varlen``, ``flash_attention_with_kvcache``, ``softmax``,
#: ``log_softmax``); tests put a deliberately wrong one here to see ``verify`` fail.
KERNELS: dict[str, Callable | None] = {"attention": None, "attention_varlen": None, "attention_kvcache": None,
                                       "softmax": None, "log_softmax": None}

_PACKAGE_FUNCTIONS = {"attention": "flash_attention", "attention_varlen": "flash_attention_varlen",
                      "attention_kvcache": "flash_attention_with_kvcache", "softmax": "softmax",
                      "log_softmax": "log_softmax"}


def kernel(name: str) -> Callable:
    """The function ``verify`` checks for ``name`` ("attention", "attention_varlen", "attention_kvcache",
    "softmax" or "log_softmax"). Raises ``AttributeError`` where the package does not have it."""
    chosen = KERNELS[name]
    if chosen is not None:
        return chosen
    import flash_softmax

    return getattr(flash_softmax, _PACKAGE_FUNCTIONS[name])


# --------------------------------------------------------------------------------------------- cases


def _option_labels(case, bias: str | None, batch: str) -> list[str]:
    """The label words of the options an attention case (``AttentionCase``, ``VarlenCase`` or ``KVCacheCase``)
    turns on, in one order: causal, window, softcap, ``bias`` (its description, or None), sinks, ALiBi (per-batch
    slopes named ``(<batch>,Hq)``), dropout, and a loss on lse (a kind without dropout or lse loss has neither)."""
    parts = ["causal"] if case.causal else []
    if case.window_size != (-1, -1):
        parts.append(f"window={case.window_size}")
    if case.softcap > 0:
        parts.append(f"softcap={case.softcap:g}")
    if bias is not None:
        parts.append(bias)
    if case.sinks:
        parts.append("sinks")
    if case.alibi is not None:
        parts.append("alibi (Hq,)" if case.alibi == "heads" else f"alibi ({batch},Hq)")
    if getattr(case, "dropout_p", 0.0) > 0:
        parts.append(f"dropout={case.dropout_p:g}")
    if getattr(case, "lse_loss", False):
        parts.append("lse in loss")
    return parts


@dataclass(frozen=True)
class AttentionCase:
    """One attention problem. Optional fields left at their defaults are not passed to the kernel."""

    seqlen_q: int
    seqlen_k: int
    head_dim: int
    causal: bool
    dtype: str
    batch: int = 1
    heads: int = 2
    heads_kv: int | None = None  # fewer K/V heads than query heads: grouped-query attention
    head_dim_v: int | None = None  # value head dim, when it differs from head_dim
    window_size: tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    bias: str | None = None  # "float" (added to the scores) or "bool" (True = keep), shape (B, 1, Sq, Sk)
    bias_grad: bool = False  # the float bias requires grad: its gradient dbias (B, 1, Sq, Sk) is checked
    sinks: bool = False  # a sink logit per query head, (Hq,) in the input dtype; its gradient dsinks is checked
    alibi: str | None = None  # ALiBi slopes: "heads" of shape (Hq,), "batch" of shape (B, Hq)
    dropout_p: float = 0.0
    lse_loss: bool = False  # the loss is sum(out * dout) + sum(lse * dlse): gradients also flow through lse

    def __post_init__(self):
        if self.bias_grad and self.bias != "float":
            raise ValueError(f"bias_grad: only a float bias has a gradient; the case has bias={self.bias!r}")
        if self.alibi not in (None, "heads", "batch"):
            raise ValueError(f"alibi: expected None, 'heads' or 'batch', got {self.alibi!r}")
        if not 0.0 <= self.dropout_p < 1.0:
            raise ValueError(f"dropout_p: expected a probability in [0, 1), got {self.dropout_p}")

    def requires(self) -> set[str]:
        """Features beyond plain (causal) attention this case needs from the kernel."""
        needed = set()
        if self.window_size != (-1, -1):
            needed.add("window_size")
        if self.softcap > 0:
            needed.add("softcap")
        if self.bias is not None:
            needed.add("attn_bias")
        if self.heads_kv is not None and self.heads_kv != self.heads:
            needed.add("gqa")
        if self.head_dim_v is not None and self.head_dim_v != self.head_dim:
            needed.add("head_dim_v")
        if self.sinks:
            needed.add("sinks")
        if self.alibi is not None:
            needed.add("alibi_slopes")
        if self.dropout_p > 0:
            needed.add("dropout_p")
        return needed

    @property
    def label(self) -> str:
        heads = f"H{self.heads}" + (f"/{self.heads_kv}" if "gqa" in self.requires() else "")
        dims = f"D{self.head_dim}" + (f"/{self.head_dim_v}" if "head_dim_v" in self.requires() else "")
        parts = [f"attention {self.dtype}", f"B{self.batch} {heads} Sq{self.seqlen_q} Sk{self.seqlen_k} {dims}"]
        bias = None if self.bias is None else f"{self.bias} bias" + (" with grad" if self.bias_grad else "")
        return " ".join(parts + _option_labels(self, bias, "B"))


@dataclass(frozen=True)
class VarlenCase:
    """One packed attention problem for ``flash_attention_varlen``: sequence ``n`` has ``seqlens_q[n]`` queries
    and ``seqlens_k[n]`` keys, all sequences concatenated along dim 0 (q ``(sum(seqlens_q), Hq, D)``). Optional
    fields left at their defaults are not passed to the kernel; the fields mean what they mean in
    :class:`AttentionCase`, except that per-sequence ALiBi slopes are ``alibi="sequences"``, ``(N, Hq)``."""

    seqlens_q: tuple[int, ...]
    seqlens_k: tuple[int, ...]
    head_dim: int
    causal: bool
    dtype: str
    heads: int = 2
    heads_kv: int | None = None
    head_dim_v: int | None = None
    window_size: tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    sinks: bool = False
    alibi: str | None = None  # ALiBi slopes: "heads" of shape (Hq,), "sequences" of shape (N, Hq)
    dropout_p: float = 0.0
    lse_loss: bool = False

    def __post_init__(self):
        if len(self.seqlens_q) != len(self.seqlens_k):
            raise ValueError(f"seqlens_q and seqlens_k: expected one length each per sequence, got "
                             f"{len(self.seqlens_q)} and {len(self.seqlens_k)}")
        if any(length < 0 for length in self.seqlens_q + self.seqlens_k):
            raise ValueError(f"seqlens_q, seqlens_k: expected lengths >= 0, got {self.seqlens_q} and {self.seqlens_k}")
        if self.alibi not in (None, "heads", "sequences"):
            raise ValueError(f"alibi: expected None, 'heads' or 'sequences', got {self.alibi!r}")
        if not 0.0 <= self.dropout_p < 1.0:
            raise ValueError(f"dropout_p: expected a probability in [0, 1), got {self.dropout_p}")

    def requires(self) -> set[str]:
        """``"varlen"`` (the package has ``flash_attention_varlen``) and ``"varlen <keyword>"`` for each keyword
        option the case passes (grouped heads and ``Dv != D`` are part of the function's contract)."""
        needed = {"varlen"}
        if self.window_size != (-1, -1):
            needed.add("varlen window_size")
        if self.softcap > 0:
            needed.add("varlen softcap")
        if self.sinks:
            needed.add("varlen sinks")
        if self.alibi is not None:
            needed.add("varlen alibi_slopes")
        if self.dropout_p > 0:
            needed.add("varlen dropout_p")
        return needed

    @property
    def label(self) -> str:
        heads_kv = self.heads_kv or self.heads
        head_dim_v = self.head_dim_v or self.head_dim
        heads = f"H{self.heads}" + (f"/{heads_kv}" if heads_kv != self.heads else "")
        dims = f"D{self.head_dim}" + (f"/{head_dim_v}" if head_dim_v != self.head_dim else "")
        lengths = ",".join(map(str, self.seqlens_q))
        if self.seqlens_k != self.seqlens_q:
            lengths = f"q=({lengths}) k=({','.join(map(str, self.seqlens_k))})"
        else:
            lengths = f"q=k=({lengths})"
        parts = [f"attention_varlen {self.dtype}", f"N{len(self.seqlens_q)} {heads} Tq{sum(self.seqlens_q)} "
                 f"Tk{sum(self.seqlens_k)} {dims}", lengths]
        return " ".join(parts + _option_labels(self, None, "N"))


@dataclass(frozen=True)
class KVCacheCase:
    """One problem for ``flash_attention_with_kvcache``: sequence ``b`` has ``cache_seqlens[b]`` tokens in its cache
    before the call and appends ``seqlen_new`` new ones (``Sn``), then its ``seqlen_q`` queries (the last ``Sq``
    positions) attend its ``L_b = cache_seqlens[b] + Sn`` keys.

    The caches hold ``capacity`` tokens per sequence: ``(B, Hkv, capacity, D)``, or with ``page_size`` a pool of
    ``(num_pages, Hkv, page_size, D)`` pages, ``capacity / page_size`` of them per sequence in a shuffled order
    (``block_table (B, capacity / page_size)``) and a few owned by none. Optional fields left at their defaults are
    not passed to the kernel; the others mean what they mean in :class:`AttentionCase` (per-sequence ALiBi slopes
    are ``alibi="batch"``, ``(B, Hq)``). ``num_splits`` is the kernel's split-KV count: 0 lets it choose."""

    cache_seqlens: tuple[int, ...]
    seqlen_q: int
    seqlen_new: int
    capacity: int
    head_dim: int
    causal: bool
    dtype: str
    heads: int = 2
    heads_kv: int | None = None
    page_size: int | None = None  # None: a contiguous cache
    window_size: tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    sinks: bool = False
    alibi: str | None = None  # ALiBi slopes: "heads" of shape (Hq,), "batch" of shape (B, Hq)
    num_splits: int = 0

    def __post_init__(self):
        if not self.cache_seqlens:
            raise ValueError("cache_seqlens: expected one length per sequence, got none")
        if self.seqlen_q < 1 or self.seqlen_new < 0:
            raise ValueError(f"seqlen_q, seqlen_new: expected >= 1 and >= 0, got {self.seqlen_q} and "
                             f"{self.seqlen_new}")
        if any(not 0 <= length <= self.capacity - self.seqlen_new for length in self.cache_seqlens):
            raise ValueError(f"cache_seqlens: expected lengths in [0, capacity - seqlen_new] = [0, "
                             f"{self.capacity - self.seqlen_new}], got {self.cache_seqlens}")
        if self.page_size is not None and (self.page_size < 1 or self.capacity % self.page_size):
            raise ValueError(f"page_size: expected a divisor of the capacity {self.capacity}, got {self.page_size}")
        if self.alibi not in (None, "heads", "batch"):
            raise ValueError(f"alibi: expected None, 'heads' or 'batch', got {self.alibi!r}")
        if self.num_splits < 0:
            raise ValueError(f"num_splits: expected an integer >= 0, got {self.num_splits}")

    @property
    def batch(self) -> int:
        return len(self.cache_seqlens)

    def requires(self) -> set[str]:
        """``"kvcache"`` (the package has ``flash_attention_with_kvcache``) and ``"kvcache <keyword>"`` for each
        keyword option the case passes (grouped heads and paged caches are part of the function's contract)."""
        needed = {"kvcache"}
        if self.window_size != (-1, -1):
            needed.add("kvcache window_size")
        if self.softcap > 0:
            needed.add("kvcache softcap")
        if self.sinks:
            needed.add("kvcache sinks")
        if self.alibi is not None:
            needed.add("kvcache alibi_slopes")
        if self.num_splits:
            needed.add("kvcache num_splits")
        return needed

    @property
    def label(self) -> str:
        heads_kv = self.heads_kv or self.heads
        heads = f"H{self.heads}" + (f"/{heads_kv}" if heads_kv != self.heads else "")
        # A contiguous cache has no word of its own: it keeps the quick cases' labels to one line of the report.
        layout = [] if self.page_size is None else [f"pages={self.page_size}"]
        parts = [f"attention_kvcache {self.dtype}", f"B{self.batch} {heads} Sq{self.seqlen_q} Sn{self.seqlen_new} "
                 f"D{self.head_dim}", f"cached=({','.join(map(str, self.cache_seqlens))})/{self.capacity}", *layout]
        splits = f"splits={self.num_splits or 'auto'}"
        return " ".join(parts + _option_labels(self, None, "B") + [splits])


@dataclass(frozen=True)
class SoftmaxCase:
    """One softmax or log_softmax problem; ``masked`` sets about a tenth of the inputs to -inf."""

    op: str
    shape: tuple[int, ...]
    dim: int
    dtype: str
    masked: bool = False

    def requires(self) -> set[str]:
        return set()

    @property
    def label(self) -> str:
        shape = "x".join(map(str, self.shape))
        return f"{self.op} {self.dtype} {shape} dim={self.dim}" + (" with -inf" if self.masked else "")


# (seqlen_q, seqlen_k, head_dim, causal, dtype): odd lengths on both sides of Sq == Sk and head dims that
# are not powers of two, spread over the dtypes so that each dtype meets several of them. Small enough
# for the interpreter (one to three seconds each).
QUICK_ATTENTION = [
    AttentionCase(1, 1, 16, False, "float16"),
    AttentionCase(1, 239, 40, True, "bfloat16"),  # one query, bottom-right causal: it sees every key
    AttentionCase(113, 203, 59, False, "float16"),
    AttentionCase(113, 203, 64, True, "float32"),
    AttentionCase(203, 113, 96, True, "bfloat16"),  # Sq > Sk: the first 90 rows see no key
    AttentionCase(127, 513, 128, False, "bfloat16"),
    AttentionCase(127, 513, 80, True, "float16"),
    AttentionCase(64, 64, 256, True, "float32"),
    AttentionCase(203, 113, 40, False, "float32"),
    AttentionCase(127, 513, 16, True, "bfloat16"),
    AttentionCase(113, 203, 256, False, "float16"),
    AttentionCase(1, 239, 128, False, "float16"),
    AttentionCase(65, 97, 80, False, "bfloat16", batch=2),
    AttentionCase(2, 1, 64, True, "float16"),  # the first query sees no key: output 0, lse -inf, no NaN
    AttentionCase(1, 1, 59, True, "float32"),
]

#: Cases that need features beyond plain attention; each runs only where the kernel has the feature.
OPTION_ATTENTION = [
    AttentionCase(113, 203, 64, False, "float16", window_size=(32, 8)),
    AttentionCase(203, 113, 64, False, "bfloat16", window_size=(16, -1)),
    AttentionCase(113, 203, 64, True, "float16", softcap=2.0),
    AttentionCase(113, 203, 64, True, "bfloat16", bias="float"),
    AttentionCase(113, 203, 40, False, "float16", bias="bool"),
    AttentionCase(113, 203, 64, True, "float16", heads=4, heads_kv=2),
    AttentionCase(113, 203, 64, False, "bfloat16", head_dim_v=40),
]

#: The score modifiers, each with something else: their gradients (dsinks, dbias) and the gradient through lse
#: are checked too. Sq > Sk causal rows see no key: with sinks their output is 0 and their lse the sink.
MODIFIER_ATTENTION = [
    AttentionCase(65, 97, 64, True, "float16", heads=4, heads_kv=2, sinks=True),
    AttentionCase(97, 65, 64, True, "bfloat16", sinks=True, lse_loss=True),
    AttentionCase(113, 203, 40, False, "float32", window_size=(32, 8), softcap=2.0, sinks=True),
    AttentionCase(113, 203, 40, True, "bfloat16", alibi="heads"),
    AttentionCase(65, 97, 64, False, "float16", batch=2, heads=4, heads_kv=1, window_size=(16, 16), alibi="batch"),
    AttentionCase(65, 203, 64, False, "float16", head_dim_v=40, dropout_p=0.17),
    AttentionCase(97, 65, 64, True, "float32", sinks=True, alibi="heads", dropout_p=0.1),
    AttentionCase(65, 97, 64, True, "bfloat16", heads=4, heads_kv=2, bias="float", bias_grad=True),
    AttentionCase(113, 203, 40, False, "float32", window_size=(32, -1), softcap=2.0, bias="float", bias_grad=True),
    AttentionCase(65, 97, 64, False, "float16", head_dim_v=96, lse_loss=True),
    AttentionCase(203, 113, 64, True, "float16", bias="float", bias_grad=True, sinks=True, lse_loss=True),
]

#: The GPU grid: every length pair x head dim x causal x dtype.
FULL_ATTENTION_LENGTHS = [(1, 1), (1, 239), (113, 203), (203, 113), (127, 513), (1023, 1023), (2048, 1000)]
FULL_ATTENTION_HEAD_DIMS = [16, 40, 59, 64, 80, 96, 128, 256]
ALL_DTYPES = ["float16", "bfloat16", "float32"]
#: The GPU grid's score modifiers, each alone (as ``AttentionCase`` fields) at lengths of many tiles, where the
#: blocks a mask skips and the split backward's partial sums come into play.
FULL_MODIFIERS = [dict(sinks=True), dict(alibi="heads"), dict(alibi="batch", batch=2), dict(dropout_p=0.1),
                  dict(bias="float", bias_grad=True), dict(lse_loss=True)]
FULL_MODIFIER_LENGTHS = [(1023, 1023), (2048, 1000)]
FULL_MODIFIER_HEAD_DIMS = [64, 128]

#: ``--modifiers`` (shared with ``bench``) as ``AttentionCase`` fields: the modifier the benchmark times.
SWEEP_MODIFIERS = {"sinks": dict(sinks=True), "alibi": dict(alibi="heads"), "dropout": dict(dropout_p=BENCH_DROPOUT_P),
                   "bias": dict(bias="float", bias_grad=True)}

#: Packed batches for the interpreter (a few hundred tokens each): odd lengths, an empty sequence (first, in the
#: middle or last), a sequence of one token, queries and keys of different lengths per sequence (causal rows
#: that see no key; a sequence with queries and no keys, one with keys and no queries), and each option.
QUICK_VARLEN = [
    VarlenCase((37, 0, 64, 1, 90), (37, 0, 64, 1, 90), 64, True, "float16"),
    VarlenCase((17, 40, 0, 65), (33, 25, 12, 65), 40, False, "bfloat16", heads=4, heads_kv=2),
    VarlenCase((30, 1, 50, 7), (20, 0, 80, 7), 64, True, "float32", sinks=True, lse_loss=True),
    VarlenCase((60, 3, 45, 0), (70, 9, 45, 0), 59, False, "float16", window_size=(16, 4), alibi="sequences"),
    VarlenCase((0, 33, 71), (20, 65, 71), 64, True, "bfloat16", head_dim_v=40, alibi="heads", dropout_p=0.17),
    VarlenCase((45, 20, 64), (45, 20, 64), 128, True, "float16", heads=4, heads_kv=1, softcap=2.0, sinks=True),
]

#: The GPU grid's packed batches, lengths 1 to 2048 and several thousand tokens in all: self-attention (equal
#: lengths) and Sq != Sk per sequence, each with an empty sequence and a sequence of one token.
FULL_VARLEN_BATCHES = [
    ((1, 2048, 0, 777, 1500, 129, 63, 1024), (1, 2048, 0, 777, 1500, 129, 63, 1024)),
    ((300, 2048, 5, 0, 1023, 640, 1, 1999), (1200, 700, 2048, 33, 0, 1999, 1, 640)),
]
FULL_VARLEN_HEAD_DIMS = [64, 128]
#: Each option alone (as ``VarlenCase`` fields) on the second batch, head dim 128.
FULL_VARLEN_MODIFIERS = [dict(sinks=True), dict(alibi="heads"), dict(alibi="sequences"), dict(dropout_p=0.1),
                         dict(window_size=(256, 64)), dict(softcap=20.0), dict(heads=8, heads_kv=2),
                         dict(head_dim_v=96), dict(lse_loss=True)]


def full_varlen_grid() -> list[VarlenCase]:
    """The packed cases of the GPU grid: each batch x head dim x causal x dtype, then each option alone."""
    cases = [
        VarlenCase(seqlens_q, seqlens_k, head_dim, causal, dtype)
        for (seqlens_q, seqlens_k), head_dim, causal, dtype in itertools.product(
            FULL_VARLEN_BATCHES, FULL_VARLEN_HEAD_DIMS, (False, True), ALL_DTYPES)
    ]
    seqlens_q, seqlens_k = FULL_VARLEN_BATCHES[1]
    cases += [
        VarlenCase(seqlens_q, seqlens_k, 128, causal, dtype, **modifier)
        for modifier, causal, dtype in itertools.product(FULL_VARLEN_MODIFIERS, (False, True), ALL_DTYPES)
    ]
    return cases


#: Cache cases for the interpreter (caches of about a hundred tokens): sequences of different lengths, one with
#: nothing cached before its new key; a contiguous cache and paged ones (pages of 16, shuffled); grouped and
#: multi-query heads; one new token, several (Sq = Sn > 1, causal) and none (the cache alone, a sequence with no key
#: at all: out 0, lse -inf); no split, forced splits and the kernel's choice; window with sinks, ALiBi with softcap.
QUICK_KVCACHE = [
    KVCacheCase((0, 37, 90), 1, 1, 96, 64, False, "float16", heads=4, heads_kv=2, num_splits=1),
    KVCacheCase((5, 33, 70), 3, 3, 80, 64, True, "bfloat16", heads=4, heads_kv=1, page_size=16, num_splits=3),
    KVCacheCase((20, 61), 2, 2, 96, 40, False, "float32", page_size=16, window_size=(24, 0), sinks=True),
    KVCacheCase((0, 50, 100), 4, 0, 112, 64, False, "bfloat16", heads=4, heads_kv=2, softcap=2.0, alibi="batch",
                num_splits=2),
]

#: The GPU grid's cache batches, ``(cache_seqlens, capacity)``: one long sequence, and eight of lengths 0 to 4000
#: (across page and key-block boundaries) in caches of 4096 tokens.
FULL_KVCACHE_BATCHES = [((3000,), 4096), ((0, 1, 17, 255, 256, 1000, 2047, 4000), 4096)]
FULL_KVCACHE_PAGE_SIZES = [None, 16, 256]  # None: contiguous
FULL_KVCACHE_SPLITS = [0, 1, 64]  # the kernel's choice, none, and many (clamped to the key blocks there are)
FULL_KVCACHE_HEADS = [(32, 8), (16, 1)]  # grouped-query and multi-query
FULL_KVCACHE_HEAD_DIMS = [64, 128]
FULL_KVCACHE_DTYPES = ["bfloat16", "float16"]
#: Beyond a decode step (Sq = Sn = 1), as ``KVCacheCase`` fields, each on the batch of eight at head dim 128:
#: speculative decoding, chunked prefill, the cache alone, a window with sinks, ALiBi per sequence with softcap.
FULL_KVCACHE_VARIANTS = [dict(seqlen_q=4, seqlen_new=4, causal=True), dict(seqlen_q=64, seqlen_new=64, causal=True),
                         dict(seqlen_new=0), dict(seqlen_q=4, seqlen_new=4, causal=True, window_size=(256, 0),
                                                  sinks=True),
                         dict(alibi="batch", softcap=20.0)]


def full_kvcache_grid() -> list[KVCacheCase]:
    """The cache cases of the GPU grid: decode steps for each batch x layout x split count x heads x head dim x
    dtype, then each variant for each layout x split count (the kernel's, many) x dtype."""
    cases = [
        KVCacheCase(lengths, 1, 1, capacity, head_dim, False, dtype, heads=heads, heads_kv=heads_kv,
                    page_size=page_size, num_splits=splits)
        for (lengths, capacity), page_size, splits, (heads, heads_kv), head_dim, dtype in itertools.product(
            FULL_KVCACHE_BATCHES, FULL_KVCACHE_PAGE_SIZES, FULL_KVCACHE_SPLITS, FULL_KVCACHE_HEADS,
            FULL_KVCACHE_HEAD_DIMS, FULL_KVCACHE_DTYPES)
    ]
    lengths, capacity = FULL_KVCACHE_BATCHES[1]
    heads, heads_kv = FULL_KVCACHE_HEADS[0]
    for variant, page_size, splits, dtype in itertools.product(
            FULL_KVCACHE_VARIANTS, FULL_KVCACHE_PAGE_SIZES, (FULL_KVCACHE_SPLITS[0], FULL_KVCACHE_SPLITS[-1]),
            FULL_KVCACHE_DTYPES):
        fields = {"seqlen_q": 1, "seqlen_new": 1, "causal": False, **variant}
        cases.append(KVCacheCase(lengths, fields.pop("seqlen_q"), fields.pop("seqlen_new"), capacity, 128,
                                 fields.pop("causal"), dtype, heads=heads, heads_kv=heads_kv, page_size=page_size,
                                 num_splits=splits, **fields))
    return cases


def _softmax_cases(op: str, specs: Iterable[tuple]) -> list[SoftmaxCase]:
    return [SoftmaxCase(op, *spec) for spec in specs]


# (shape, dim, dtype[, masked]): a single element, one block per row, a dim that is not the last, and
# rows longer than one block (the interpreter's single-block limit is 4096 columns, a GPU's 16384).
QUICK_SOFTMAX = [
    *_softmax_cases("softmax", [((1, 1), -1, "float16"), ((4, 1000), -1, "bfloat16"), ((3, 5, 7), 1, "float32"),
                                ((2, 4099), -1, "float32"), ((8, 257), -1, "float16", True)]),
    *_softmax_cases("log_softmax", [((4, 1000), -1, "float16"), ((2, 3, 130), 0, "bfloat16"),
                                    ((3, 4099), -1, "float16"), ((8, 257), -1, "bfloat16", True)]),
]
FULL_SOFTMAX_SHAPES = [((1, 1), -1), ((4, 1000), -1), ((3, 5, 7), 1), ((2, 3, 130), 0), ((2, 4099), -1),
                       ((2, 16385), -1), ((2, 70000), -1), ((1, 262145), -1)]


def full_grids() -> tuple[list[AttentionCase], list[SoftmaxCase]]:
    """The large grid, meant for a GPU."""
    attention = [
        AttentionCase(seqlen_q, seqlen_k, head_dim, causal, dtype)
        for (seqlen_q, seqlen_k), head_dim, causal, dtype in itertools.product(
            FULL_ATTENTION_LENGTHS, FULL_ATTENTION_HEAD_DIMS, (False, True), ALL_DTYPES)
    ]
    attention += [replace(case, dtype=dtype) for case in OPTION_ATTENTION + MODIFIER_ATTENTION for dtype in ALL_DTYPES]
    attention += [
        AttentionCase(seqlen_q, seqlen_k, head_dim, causal, dtype, **modifier)
        for modifier, (seqlen_q, seqlen_k), head_dim, causal, dtype in itertools.product(
            FULL_MODIFIERS, FULL_MODIFIER_LENGTHS, FULL_MODIFIER_HEAD_DIMS, (False, True), ALL_DTYPES)
    ]
    softmax = [
        SoftmaxCase(op, shape, dim, dtype, masked)
        for op, (shape, dim), dtype, masked in itertools.product(
            ("softmax", "log_softmax"), FULL_SOFTMAX_SHAPES, ALL_DTYPES, (False,))
    ]
    softmax += [SoftmaxCase(op, (8, 20000), -1, dtype, True) for op in ("softmax", "log_softmax") for dtype in ALL_DTYPES]
    return attention, softmax


def sweep_grids(seqlens: list[int], head_dims: list[int], causal: list[bool], dtypes: list[str],
                batch: int, heads: int, modifiers: Iterable[str] = ()) -> tuple[list[AttentionCase], list[SoftmaxCase]]:
    """The benchmark's square shapes, each plain and with each of ``modifiers`` (names of
    :data:`SWEEP_MODIFIERS`, as ``bench --modifiers`` times them); softmax over rows of the same lengths.

    The float64 truth materialises ``batch * heads`` score matrices of ``seqlen**2`` doubles (and their
    gradients), so batch and heads default to small values here rather than the benchmark's token budget.
    """
    variants = [{}, *(SWEEP_MODIFIERS[name] for name in dict.fromkeys(modifiers))]
    attention = [
        AttentionCase(seqlen, seqlen, head_dim, is_causal, dtype, batch=batch, heads=heads, **variant)
        for dtype, head_dim, is_causal, seqlen, variant in itertools.product(dtypes, head_dims, causal, seqlens,
                                                                             variants)
    ]
    softmax = [
        SoftmaxCase(op, (batch * heads, seqlen), -1, dtype)
        for op, dtype, seqlen in itertools.product(("softmax", "log_softmax"), dtypes, seqlens)
    ]
    return attention, softmax


# ------------------------------------------------------------------------------------------ features

_KEYWORD_FEATURES = ("window_size", "softcap", "attn_bias", "sinks", "alibi_slopes", "dropout_p")


def _accepts_keyword(function: Callable, name: str) -> bool:
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return True
    return name in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def _accepts_shapes(function: Callable, heads: tuple[int, int], head_dims: tuple[int, int], device) -> bool:
    """Whether the kernel takes inputs of these shapes, judged by the validation errors it raises.

    Only the exceptions input validation raises (ValueError, TypeError, NotImplementedError) mean "not
    supported"; any other failure means the feature is there, and its cases will report the failure.
    """
    (heads_q, heads_kv), (head_dim, head_dim_v) = heads, head_dims
    q = torch.randn(1, heads_q, 2, head_dim, device=device)
    k = torch.randn(1, heads_kv, 3, head_dim, device=device)
    v = torch.randn(1, heads_kv, 3, head_dim_v, device=device)
    try:
        function(q, k, v)
    except (ValueError, TypeError, NotImplementedError):
        return False
    except Exception:  # noqa: BLE001 - a crash is a failure for the cases to report, not a missing feature
        return True
    return True


def attention_features(function: Callable, device: torch.device) -> set[str]:
    """The optional features ``function`` offers: keyword options from its signature, shapes by a probe."""
    features = {name for name in _KEYWORD_FEATURES if _accepts_keyword(function, name)}
    if _accepts_shapes(function, (2, 1), (8, 8), device):
        features.add("gqa")
    if _accepts_shapes(function, (1, 1), (8, 4), device):
        features.add("head_dim_v")
    return features


def varlen_features() -> set[str]:
    """What :class:`VarlenCase` may require: ``"varlen"`` where the package has ``flash_attention_varlen`` (or a
    kernel is put in :data:`KERNELS`), and ``"varlen <keyword>"`` for each keyword option its signature takes."""
    try:
        function = kernel("attention_varlen")
    except AttributeError:
        return set()
    keywords = (name for name in _KEYWORD_FEATURES if name != "attn_bias" and _accepts_keyword(function, name))
    return {"varlen", *(f"varlen {name}" for name in keywords)}


def kvcache_features() -> set[str]:
    """What :class:`KVCacheCase` may require: ``"kvcache"`` where the package has ``flash_attention_with_kvcache``
    (or a kernel is put in :data:`KERNELS`), and ``"kvcache <keyword>"`` for each keyword option its signature
    takes."""
    try:
        function = kernel("attention_kvcache")
    except AttributeError:
        return set()
    keywords = ("window_size", "softcap", "sinks", "alibi_slopes", "num_splits")
    return {"kvcache", *(f"kvcache {name}" for name in keywords if _accepts_keyword(function, name))}


# ------------------------------------------------------------------------------------------ checking


@dataclass
class CaseResult:
    """The verdict on one case: every comparison made, or the error that stopped it."""

    label: str
    comparisons: list[Comparison] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.error is None and bool(self.comparisons) and all(c.passed for c in self.comparisons)

    def worst(self) -> Comparison | None:
        """The comparison closest to (or furthest past) its bound."""
        if not self.comparisons:
            return None
        return max(self.comparisons, key=lambda c: (not c.passed, c.ratio))


def _randn(shape, generator: torch.Generator, dtype: torch.dtype, device) -> torch.Tensor:
    # Drawn in float32 on the CPU and then converted, so a seed gives the same inputs on every device.
    return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)


def _attention_bias(case: AttentionCase, generator: torch.Generator, dtype: torch.dtype, device):
    """A (B, 1, Sq, Sk) bias broadcast over heads: normal floats, or a bool keep-mask keeping ~80%."""
    shape = (case.batch, 1, case.seqlen_q, case.seqlen_k)
    if case.bias == "float":
        return _randn(shape, generator, dtype, device)
    return (torch.rand(shape, generator=generator) < 0.8).to(device)


def _sinks(heads: int, seqlen_k: float, generator: torch.Generator, dtype: torch.dtype, device) -> torch.Tensor:
    """(Hq,) sink logits in the input dtype (a model's parameter), around log(Sk): the sink then takes a share
    of each row comparable with the keys', where a standard normal one would be lost beside a hundred keys."""
    return _randn((heads,), generator, torch.float32, "cpu").add_(math.log(max(seqlen_k, 1))).to(device, dtype)


def _alibi_slopes(shape: tuple[int, ...], generator: torch.Generator, device) -> torch.Tensor:
    """float32 slopes in [0, 0.5) of ``shape`` ((Hq,), or one row per batch or sequence); at the larger ones a
    query hardly sees keys a few dozen positions away, at the smaller ones it sees them all."""
    return (0.5 * torch.rand(shape, generator=generator)).to(device)


#: The gradient's name of each differentiated input.
_GRADIENT_NAMES = {"q": "dq", "k": "dk", "v": "dv", "attn_bias": "dbias", "sinks": "dsinks"}


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device, dropout_p: float):
    """With dropout, torch's default generators seeded with ``seed`` (``torch.manual_seed``) for the block,
    and the caller's random state given back after: the kernel and the references draw their dropout state
    from the device's default generator, so each run then drops the same elements."""
    if dropout_p == 0:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type):
        torch.manual_seed(seed)
        yield


def _attention_run(function: Callable, leaves: dict[str, torch.Tensor], dout: torch.Tensor,
                   dlse: torch.Tensor | None, options: dict, seed: int, arguments: tuple = (), **extra):
    """Output, lse and the gradient of every leaf, by name (dq, dk, dv, and dbias / dsinks where
    ``leaves`` has ``attn_bias`` / ``sinks``), of ``function(q, k, v, *arguments, ...)`` on fresh copies of
    ``leaves`` (``arguments``: the varlen offsets).

    The loss is ``sum(out * dout)``, plus ``sum(lse * dlse)`` when ``dlse`` (lse's shape) is given. With dropout
    the default generators are seeded with ``seed`` for the call (see :func:`_seeded`).
    """
    fresh = {name: tensor.detach().clone().requires_grad_() for name, tensor in leaves.items()}
    q, k, v = fresh["q"], fresh["k"], fresh["v"]
    keywords = {name: tensor for name, tensor in fresh.items() if name not in ("q", "k", "v")}
    with _seeded(seed, q.device, options.get("dropout_p", 0.0)):
        out, lse = function(q, k, v, *arguments, return_lse=True, **options, **keywords, **extra)
    outputs, cotangents = ((out, lse), (dout, dlse)) if dlse is not None else ((out,), (dout,))
    grads = torch.autograd.grad(outputs, list(fresh.values()), cotangents)
    return out.detach(), lse.detach(), {_GRADIENT_NAMES[name]: grad for name, grad in zip(fresh, grads)}


def check_attention(case: AttentionCase, device: torch.device, seed: int) -> list[Comparison]:
    """Run one attention case and compare out, lse, dq, dk, dv (and dbias, dsinks where the case has a bias
    that requires grad, sinks) with the float64 truth."""
    generator = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, case.dtype)
    heads_kv = case.heads_kv or case.heads
    head_dim_v = case.head_dim_v or case.head_dim
    leaves = {
        "q": _randn((case.batch, case.heads, case.seqlen_q, case.head_dim), generator, dtype, device),
        "k": _randn((case.batch, heads_kv, case.seqlen_k, case.head_dim), generator, dtype, device),
        "v": _randn((case.batch, heads_kv, case.seqlen_k, head_dim_v), generator, dtype, device),
    }
    dout = _randn((case.batch, case.heads, case.seqlen_q, head_dim_v), generator, dtype, device)
    options: dict[str, object] = {"causal": case.causal}
    if "window_size" in case.requires():
        options["window_size"] = case.window_size
    if case.softcap > 0:
        options["softcap"] = case.softcap
    if case.bias is not None:
        bias = _attention_bias(case, generator, dtype, device)
        if case.bias_grad:
            leaves["attn_bias"] = bias
        else:
            options["attn_bias"] = bias
    if case.sinks:
        leaves["sinks"] = _sinks(case.heads, case.seqlen_k, generator, dtype, device)
    if case.alibi is not None:
        shape = (case.heads,) if case.alibi == "heads" else (case.batch, case.heads)
        options["alibi_slopes"] = _alibi_slopes(shape, generator, device)
    if case.dropout_p > 0:
        options["dropout_p"] = case.dropout_p
    # lse is float32 whatever the input dtype, and so is its gradient.
    dlse = _randn((case.batch, case.heads, case.seqlen_q), generator, torch.float32, device) if case.lse_loss else None

    out, lse, grads = _attention_run(kernel("attention"), leaves, dout, dlse, options, seed)
    truth_out, truth_lse, truth_grads = _attention_run(
        reference.attention, {name: tensor.double() for name, tensor in leaves.items()}, dout.double(),
        None if dlse is None else dlse.double(), options, seed,
    )
    if dtype == torch.float32:
        # float32 results are held to a relative bound against the truth; no low-precision reference needed.
        lowp_out, lowp_lse, lowp_grads = None, None, dict.fromkeys(grads)
    else:
        lowp_out, lowp_lse, lowp_grads = _attention_run(reference.attention, leaves, dout, dlse, options, seed,
                                                        upcast=False)

    return _judge((out, lse, grads), (truth_out, truth_lse, truth_grads), (lowp_out, lowp_lse, lowp_grads))


def _judge(kernel_run: tuple, truth_run: tuple, lowp_run: tuple) -> list[Comparison]:
    """Compare out, lse and each gradient of the kernel's run with the truth's, by the accuracy policy."""
    (out, lse, grads), (truth_out, truth_lse, truth_grads), (lowp_out, lowp_lse, lowp_grads) = (
        kernel_run, truth_run, lowp_run)
    comparisons = [
        compare("out", out, truth_out, lowp_out, factor=OUTPUT_FACTOR),
        compare("lse", lse, truth_lse, lowp_lse, factor=OUTPUT_FACTOR),
    ]
    for name, grad in grads.items():
        comparisons.append(compare(name, grad, truth_grads[name], lowp_grads[name], factor=GRADIENT_FACTOR))
    return comparisons


def _offsets(lengths: tuple[int, ...], device) -> torch.Tensor:
    """int32 ``(N + 1,)`` offsets of the sequences of ``lengths`` packed one after another, from 0."""
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)


def check_varlen(case: VarlenCase, device: torch.device, seed: int) -> list[Comparison]:
    """Run one packed case through ``flash_attention_varlen`` and compare out, lse, dq, dk, dv (and dsinks) with
    the float64 ``reference.attention_varlen``. The kernel also gets ``max_seqlen_q`` and ``max_seqlen_k``."""
    generator = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, case.dtype)
    heads_kv = case.heads_kv or case.heads
    head_dim_v = case.head_dim_v or case.head_dim
    total_q, total_k = sum(case.seqlens_q), sum(case.seqlens_k)
    leaves = {
        "q": _randn((total_q, case.heads, case.head_dim), generator, dtype, device),
        "k": _randn((total_k, heads_kv, case.head_dim), generator, dtype, device),
        "v": _randn((total_k, heads_kv, head_dim_v), generator, dtype, device),
    }
    dout = _randn((total_q, case.heads, head_dim_v), generator, dtype, device)
    offsets = (_offsets(case.seqlens_q, device), _offsets(case.seqlens_k, device))
    options: dict[str, object] = {"causal": case.causal}
    if case.window_size != (-1, -1):
        options["window_size"] = case.window_size
    if case.softcap > 0:
        options["softcap"] = case.softcap
    if case.sinks:
        mean_keys = total_k / max(len(case.seqlens_k), 1)
        leaves["sinks"] = _sinks(case.heads, mean_keys, generator, dtype, device)
    if case.alibi is not None:
        shape = (case.heads,) if case.alibi == "heads" else (len(case.seqlens_q), case.heads)
        options["alibi_slopes"] = _alibi_slopes(shape, generator, device)
    if case.dropout_p > 0:
        options["dropout_p"] = case.dropout_p
    dlse = _randn((case.heads, total_q), generator, torch.float32, device) if case.lse_loss else None
    longest = {"max_seqlen_q": max(case.seqlens_q, default=0), "max_seqlen_k": max(case.seqlens_k, default=0)}

    kernel_run = _attention_run(kernel("attention_varlen"), leaves, dout, dlse, options, seed, offsets, **longest)
    truth_run = _attention_run(reference.attention_varlen, {name: tensor.double() for name, tensor in leaves.items()},
                               dout.double(), None if dlse is None else dlse.double(), options, seed, offsets)
    if dtype == torch.float32:
        lowp_run = (None, None, dict.fromkeys(kernel_run[2]))
    else:
        lowp_run = _attention_run(reference.attention_varlen, leaves, dout, dlse, options, seed, offsets, upcast=False)
    return _judge(kernel_run, truth_run, lowp_run)


#: Pages of a paged cache case's pool that no sequence owns: a kernel that reads a page the block table does not
#: give it may land there.
SPARE_PAGES = 3


def _kvcache_inputs(case: KVCacheCase, generator: torch.Generator, device) -> dict[str, object]:
    """The random inputs of a cache case: q ``(B, Hq, Sq, D)``; caches ``(B, Hkv, capacity, D)`` or a pool of
    ``(B * capacity / page_size + SPARE_PAGES, Hkv, page_size, D)`` pages with ``block_table`` int32 (a random
    permutation of the pool, cut to ``(B, capacity / page_size)``); k, v ``(B, Hkv, Sn, D)`` (absent when Sn = 0);
    ``cache_seqlens`` int32 ``(B,)``; sinks and ALiBi slopes where the case has them. Every cache entry is random,
    those past each sequence's length and those of the spare pages too: reading or writing there shows."""
    dtype = getattr(torch, case.dtype)
    heads_kv = case.heads_kv or case.heads
    inputs: dict[str, object] = {"q": _randn((case.batch, case.heads, case.seqlen_q, case.head_dim), generator, dtype,
                                             device)}
    if case.page_size is None:
        cache_shape = (case.batch, heads_kv, case.capacity, case.head_dim)
    else:
        pages_per_sequence = case.capacity // case.page_size
        pool = case.batch * pages_per_sequence + SPARE_PAGES
        order = torch.randperm(pool, generator=generator)[:case.batch * pages_per_sequence]
        inputs["block_table"] = order.view(case.batch, pages_per_sequence).to(device=device, dtype=torch.int32)
        cache_shape = (pool, heads_kv, case.page_size, case.head_dim)
    inputs["k_cache"] = _randn(cache_shape, generator, dtype, device)
    inputs["v_cache"] = _randn(cache_shape, generator, dtype, device)
    if case.seqlen_new:
        inputs["k"] = _randn((case.batch, heads_kv, case.seqlen_new, case.head_dim), generator, dtype, device)
        inputs["v"] = _randn((case.batch, heads_kv, case.seqlen_new, case.head_dim), generator, dtype, device)
    inputs["cache_seqlens"] = torch.tensor(case.cache_seqlens, dtype=torch.int32, device=device)
    if case.sinks:
        mean_keys = sum(case.cache_seqlens) / case.batch + case.seqlen_new
        inputs["sinks"] = _sinks(case.heads, mean_keys, generator, dtype, device)
    if case.alibi is not None:
        shape = (case.heads,) if case.alibi == "heads" else (case.batch, case.heads)
        inputs["alibi_slopes"] = _alibi_slopes(shape, generator, device)
    return inputs


def _kvcache_run(function: Callable, inputs: dict[str, object], options: dict, dtype: torch.dtype | None = None,
                 **extra) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Out, lse and both caches after ``function(q, k_cache, v_cache, k, v, ...)`` on fresh copies of ``inputs``
    (the floating ones converted to ``dtype`` where given; ALiBi slopes stay float32, the integer tensors as
    they are): the function writes the new keys into its own caches."""
    fresh = {}
    for name, tensor in inputs.items():
        convert = dtype is not None and tensor.is_floating_point() and name != "alibi_slopes"
        fresh[name] = (tensor.to(dtype) if convert else tensor).clone()
    caches = [fresh.pop("k_cache"), fresh.pop("v_cache")]
    q, k, v = fresh.pop("q"), fresh.pop("k", None), fresh.pop("v", None)
    out, lse = function(q, *caches, k, v, return_lse=True, **options, **fresh, **extra)
    return out, lse, caches


def check_kvcache(case: KVCacheCase, device: torch.device, seed: int) -> list[Comparison]:
    """Run one cache case through ``flash_attention_with_kvcache`` and compare out and lse with the float64
    ``reference.attention_kvcache``, and each cache after the call with the reference's (``k_cache``,
    ``v_cache``): the new keys at positions ``cache_seqlens[b] ...`` and every other entry as it was."""
    generator = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, case.dtype)
    inputs = _kvcache_inputs(case, generator, device)
    options: dict[str, object] = {"causal": case.causal}
    if case.window_size != (-1, -1):
        options["window_size"] = case.window_size
    if case.softcap > 0:
        options["softcap"] = case.softcap
    splits = {"num_splits": case.num_splits} if case.num_splits else {}

    out, lse, caches = _kvcache_run(kernel("attention_kvcache"), inputs, options, **splits)
    truth_out, truth_lse, truth_caches = _kvcache_run(reference.attention_kvcache, inputs, options, torch.float64)
    if dtype == torch.float32:
        lowp_out, lowp_lse, lowp_caches = None, None, [None, None]
    else:
        lowp_out, lowp_lse, lowp_caches = _kvcache_run(reference.attention_kvcache, inputs, options, upcast=False)
    comparisons = [
        compare("out", out, truth_out, lowp_out, factor=OUTPUT_FACTOR),
        compare("lse", lse, truth_lse, lowp_lse, factor=OUTPUT_FACTOR),
    ]
    # Appending copies values, so both references' caches agree exactly: the bound is the rounding floor (float32:
    # 1e-5 relative), far below the error of a value written in the wrong place or overwritten.
    for name, cache, truth_cache, lowp_cache in zip(("k_cache", "v_cache"), caches, truth_caches, lowp_caches):
        comparisons.append(compare(name, cache, truth_cache, lowp_cache, factor=OUTPUT_FACTOR))
    return comparisons


def check_softmax(case: SoftmaxCase, device: torch.device, seed: int) -> list[Comparison]:
    """Run one softmax / log_softmax case and compare y and dx with the float64 truth."""
    generator = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, case.dtype)
    x = _randn(case.shape, generator, dtype, device)
    if case.masked:
        x = x.masked_fill((torch.rand(case.shape, generator=generator) < 0.1).to(device), float("-inf"))
    dy = _randn(case.shape, generator, dtype, device)
    reference_function = getattr(reference, case.op)

    def run(function: Callable, inputs: torch.Tensor, **extra):
        leaf = inputs.detach().clone().requires_grad_()
        y = function(leaf, dim=case.dim, **extra)
        (dx,) = torch.autograd.grad(y, (leaf,), dy.to(inputs.dtype))
        return y.detach(), dx

    y, dx = run(kernel(case.op), x)
    truth_y, truth_dx = run(reference_function, x.double())
    if dtype == torch.float32:
        lowp_y, lowp_dx = None, None
    else:
        lowp_y, lowp_dx = run(reference_function, x, upcast=False)
    return [
        compare("y", y, truth_y, lowp_y, factor=OUTPUT_FACTOR),
        compare("dx", dx, truth_dx, lowp_dx, factor=GRADIENT_FACTOR),
    ]


def _short_error(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:160]


def run_case(case, device: torch.device, seed: int) -> CaseResult:
    """Check one case; an exception anywhere (kernel, shapes, comparison) makes the case fail, not the run."""
    check = {AttentionCase: check_attention, VarlenCase: check_varlen, KVCacheCase: check_kvcache}.get(
        type(case), check_softmax)
    started = time.perf_counter()
    result = CaseResult(case.label)
    try:
        result.comparisons = check(case, device, seed)
    except Exception as error:  # noqa: BLE001 - reported as a failed case
        result.error = _short_error(error)
    result.seconds = time.perf_counter() - started
    return result


# ------------------------------------------------------------------------------------------- command


def select_cases(args: argparse.Namespace, on_gpu: bool) -> tuple[list, str]:
    """The cases the flags ask for, and a one-line description of the grid."""
    if args.seqlens:
        attention, softmax = sweep_grids(
            args.seqlens, args.head_dims or [64, 128], args.causal or [False, True],
            args.dtypes or ["bfloat16", "float16"], args.batch or 1, args.heads or 2, args.modifiers or (),
        )
        varlen, kvcache = [], []  # the sweep's shapes are square batches: nothing packed, no cache
        description = "the benchmark's sweep shapes"
    else:
        for flag, value in (("--batch", args.batch), ("--heads", args.heads), ("--modifiers", args.modifiers)):
            if value is not None:
                raise ValueError(f"{flag} applies to the --seqlens sweep only; it was given {value} without --seqlens")
        grid = args.grid or ("full" if on_gpu else "quick")
        if grid == "full":
            attention, softmax = full_grids()
            varlen = full_varlen_grid()
            kvcache = full_kvcache_grid()
        else:
            attention = QUICK_ATTENTION + OPTION_ATTENTION + MODIFIER_ATTENTION
            softmax = QUICK_SOFTMAX
            varlen = QUICK_VARLEN
            kvcache = QUICK_KVCACHE
        attention, varlen, kvcache = ([
            case for case in cases
            if (args.dtypes is None or case.dtype in args.dtypes)
            and (args.head_dims is None or case.head_dim in args.head_dims)
            and (args.causal is None or case.causal in args.causal)
        ] for cases in (attention, varlen, kvcache))
        softmax = [case for case in softmax if args.dtypes is None or case.dtype in args.dtypes]
        description = f"the {grid} grid"
    cases = ((attention if "attention" in args.ops else []) + (varlen if "varlen" in args.ops else [])
             + (kvcache if "kvcache" in args.ops else []) + (softmax if "softmax" in args.ops else []))
    if not cases:
        raise ValueError("the filters (--ops, --dtypes, --head-dims, --causal) leave no case to run")
    return cases, description


def _format_error(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2e}"


_COLUMNS = ["case", "checked", "worst", "max error", "ref. error", "ratio", "result", "seconds"]
_CAPTION = ("ratio: max error over the bound (2x the reference's own low-precision error for outputs, 3x for "
            "gradients; 1e-5 relative for float32); pass when <= 1")


def _table_row(result: CaseResult) -> list[str]:
    worst = result.worst()
    if result.error is not None or worst is None:
        return [result.label, "", "", "", "", "", f"ERROR {result.error}", f"{result.seconds:.1f}"]
    return [
        result.label, " ".join(c.name for c in result.comparisons), worst.name, _format_error(worst.max_error),
        _format_error(worst.reference_error), f"{worst.ratio:.2f}", "pass" if result.passed else "FAIL",
        f"{result.seconds:.1f}",
    ]


def run(args: argparse.Namespace, *, on_gpu: bool) -> int:
    """Run ``flash-softmax verify``; return 1 if any case fails or raises, else 0."""
    from flash_softmax._backend import backend_for
    from flash_softmax.bench import output

    console = output.make_console()
    device = torch.device("cuda" if on_gpu else "cpu")
    cases, description = select_cases(args, on_gpu)
    with output.quiet_interpreter():  # the probe runs the kernel on tiny inputs
        features = attention_features(kernel("attention"), device) if "attention" in args.ops else set()
    if "varlen" in args.ops:
        features |= varlen_features()
    if "kvcache" in args.ops:
        features |= kvcache_features()
    runnable = [case for case in cases if case.requires() <= features]
    missing = sorted(set().union(*(case.requires() - features for case in cases)))
    console.print(f"verify: {len(runnable)} cases from {description} on {device} ({backend_for(device)})",
                  markup=False)

    results: list[CaseResult] = []
    with output.progress(console, "verify", len(runnable)) as step:
        for index, case in enumerate(runnable):
            results.append(run_case(case, device, seed=args.seed + index))
            step(case.label)

    rows = [_table_row(result) for result in results]
    output.print_table(console, f"flash-softmax verify ({description}, {device})", _COLUMNS, rows,
                       caption=_CAPTION, styles=[None if result.passed else "red" for result in results],
                       left_aligned=("case", "checked", "worst", "result"))

    failures = [result for result in results if not result.passed]
    for result in failures:
        for comparison in result.comparisons:
            if not comparison.passed:
                console.print(f"{result.label}: {comparison}", style="red", markup=False)
    if missing:
        console.print(f"not run, the kernel does not offer: {', '.join(missing)}", markup=False)
    total_seconds = sum(result.seconds for result in results)
    verdict = "FAILED" if failures else "all passed"
    console.print(f"{len(results) - len(failures)}/{len(results)} cases passed in {total_seconds:.1f} s: {verdict}",
                  style="red" if failures else "green", markup=False)
    return 1 if failures else 0
