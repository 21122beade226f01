"""Decoding: attention of a few query rows over a long key/value cache, contiguous or paged, split over keys.

The forward kernel (forward.py) gives each (batch, query head) a tile of 128 query rows. A decode step has
one query row per head: that tile is 1/128 full, each query head of a grouped-query group reads the same
K/V again, and a batch of one launches a handful of programs on a GPU of 132 SMs. The kernels here are
shaped for it instead:

- **Grouped query heads share a tile.** One program owns ``BLOCK_M`` rows of the ``group_size * Sq``
  query rows of a (batch, K/V head), row ``r`` being query ``r // group_size`` of query head
  ``head_kv * group_size + r % group_size``: each K/V tile is loaded once for the whole group.
- **Split-KV (flash-decoding).** The keys a row block sees are cut into ``num_splits`` consecutive chunks,
  one program each (grid ``(row blocks * B * Hkv, num_splits)``). Each writes its chunk's normalised output
  and base-2 logsumexp to a float32 workspace, and ``_attn_decode_combine_kernel`` merges the chunks in
  split order: ``lse = log2 sum_s 2**lse_s``, ``out = sum_s 2**(lse_s - lse) * out_s``. The order is
  fixed, so results are deterministic; they differ from one split count to another only by float32
  rounding.
- **Caches read in place.** A contiguous cache ``(B, Hkv, Smax, D)`` or a paged one
  ``(num_pages, Hkv, page_size, D)`` through ``block_table (B, pages_per_seq)``, any strides with a
  contiguous last dim. A paged tile gathers its rows page by page (one ``block_table`` entry per key), so
  any page size works. Keys past a sequence's length ``L_b`` are never read.
- **Appending.** ``_kvcache_append_kernel`` writes the new keys and values ``(B, Hkv, Sn, D)`` at positions
  ``cache_seqlens[b] ...`` of the cache (through the block table), before attention reads them.

Lengths are bottom-right aligned as everywhere (docs/semantics.md, 'KV cache (decoding)'): with
``L_b = cache_seqlens[b] + Sn`` keys, query ``i`` sees key ``j`` iff ``j <= i + L_b - Sq`` (causal). Nothing
here reads a value on the host: the split count and the workspace depend on shapes only, so a step can
be captured in a CUDA graph.

``flash_attention`` takes this path on its own for decode shapes (``takes_decode_path``): few query rows
and many keys, without a bias or dropout.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from flash_softmax._backend import INTERPRETED
from flash_softmax._triton_helpers import dot_operand, round_to_dtype
from flash_softmax.attention import configs
from flash_softmax.attention.common import (
    LOG2E_CONSTEXPR,
    alibi_slope,
    finish_rows,
    merge_sink,
    online_softmax_step,
    score_tile,
)
from flash_softmax.attention.layout import empty_in_layout_of
from flash_softmax.attention.options import KernelOptions

#: ``flash_attention`` calls with at most this many query rows and at least ``DECODE_MIN_KEYS`` keys take
#: the decode kernels (``takes_decode_path``): below 16 rows the forward's 64- or 128-row tiles are mostly
#: empty, and the decode kernel also shares each K/V tile among a group's query heads.
DECODE_MAX_QUERIES = 16
DECODE_MIN_KEYS = 128

#: Most splits of one row block's keys: past this the combine's reads outweigh what more programs gain.
MAX_SPLITS = 128
#: Fewest key blocks a split is given: a split of one block spends as long on its prologue and epilogue
#: (loading Q, writing the workspace) as on its keys.
MIN_BLOCKS_PER_SPLIT = 2
#: Rows per program of the combine kernel.
COMBINE_BLOCK_ROWS = 16 if INTERPRETED else 32


@dataclass(frozen=True)
class DecodeShape:
    """The sizes of one decode launch, fixed on the host (no device value is read).

    ``batch``, ``heads_q``, ``heads_kv``, ``seqlen_q``; ``capacity``: the most keys a sequence can hold
    (``Smax``, or ``pages_per_seq * page_size``)."""

    batch: int
    heads_q: int
    heads_kv: int
    seqlen_q: int
    capacity: int

    @property
    def group_size(self) -> int:
        return self.heads_q // self.heads_kv

    @property
    def rows(self) -> int:
        """Query rows of one (batch, K/V head): the group's heads times the queries."""
        return self.group_size * self.seqlen_q


def decode_config(shape: DecodeShape, head_dim: int, head_dim_v: int, element_size: int = 2,
                  arch: str | None = None, shared_limit: int | None = None,
                  device_index: int = 0) -> configs.KernelConfig:
    """The decode kernel's tile on ``arch`` (default: that of device ``device_index``, the current one):
    ``block_m`` query rows (the next power of two of the group's rows, from 16, which ``tl.dot`` needs) and
    ``block_n`` keys, or the one forced by ``configs.override(decode=...)``.

    Decoding streams the cache once, so what counts is bytes in flight: three stages of 64-key tiles on
    sm_90a for heads up to 128 wide, 32 keys for wider ones (their rows are twice as long), rows up to 64,
    where a tile takes 8 warps (with 4 it spills at D = 256). sm_80 has fewer registers for the same tiles:
    rows up to 32 over 32 keys, the largest that compile without spills there with every score modifier on
    (notes/perf.md, 'Decoding'); float32 takes 16-row tiles. A tile whose buffers exceed ``shared_limit``
    bytes (default: the device's) drops stages, then halves its key tile, until they fit."""
    forced = configs.forced_config("decode")
    if forced is not None:
        return forced
    rows = max(16, configs.next_power_of_2(shape.rows))
    return _decode_tile(rows, head_dim, head_dim_v, element_size, arch, shared_limit, device_index)


@functools.lru_cache(maxsize=None)
def _decode_tile(rows: int, head_dim: int, head_dim_v: int, element_size: int, arch: str | None,
                 shared_limit: int | None, device_index: int) -> configs.KernelConfig:
    """``decode_config``'s choice for a power-of-two row count, cached: a decode step pays one lookup, and the
    device's architecture and shared memory are asked for once."""
    if INTERPRETED:
        return configs.KernelConfig(min(64, rows), 32, 4, 1)
    if element_size >= 4:
        # float32 products run on FMA units, not tensor cores, and Triton's register allocation for them is
        # erratic: 32- and 64-row tiles, and 16-row ones over 32 keys at D = 256, spill on sm_90a or sm_80. These
        # 16-row tiles compile spill-free on both.
        widest = max(head_dim, head_dim_v)
        config = (configs.KernelConfig(16, 32, 4, 2) if widest <= 64 else configs.KernelConfig(16, 32, 8, 2)
                  if widest <= 128 else configs.KernelConfig(16, 16, 8, 1))
    elif (arch or configs.device_arch()) == "sm_80":
        config = configs.KernelConfig(min(32, rows), 32, 4, 3)
    else:
        block_m = min(64, rows)
        wide = max(head_dim, head_dim_v) > 128
        config = configs.KernelConfig(block_m, 32 if wide else 64, 8 if block_m == 64 else 4, 3)
    limit = configs.shared_memory_limit() if shared_limit is None else shared_limit
    # The decode kernel holds what the forward's does: a Q and an output tile, and stages of K and V tiles.
    while not configs.fits("forward", config, head_dim, head_dim_v, element_size, limit):
        if config.num_stages > 1:
            config = dataclasses.replace(config, num_stages=config.num_stages - 1)
        elif config.block_n > configs.MIN_DOT_SIZE:
            config = dataclasses.replace(config, block_n=config.block_n // 2)
        else:
            break
    return config


def row_blocks(shape: DecodeShape, block_m: int) -> int:
    """Tiles of ``block_m`` rows over the ``group_size * Sq`` query rows of one (batch, K/V head)."""
    return configs.cdiv(shape.rows, block_m)


def choose_num_splits(shape: DecodeShape, block_m: int, block_n: int, device_index: int = 0) -> int:
    """How many chunks each row block's keys are cut into when the caller passes ``num_splits=0``.

    Enough programs to give every SM two (``row blocks * B * Hkv`` of them without a split), never more
    splits than the longest possible sequence has pairs of key blocks (``MIN_BLOCKS_PER_SPLIT``), at most
    ``MAX_SPLITS``. From shapes and the device's SM count only: the same shapes always split alike."""
    programs = row_blocks(shape, block_m) * shape.batch * shape.heads_kv
    target = 2 * configs.sm_count(device_index)
    if programs >= target:
        return 1
    key_blocks = configs.cdiv(shape.capacity, block_n)
    return max(1, min(configs.cdiv(target, programs), key_blocks // MIN_BLOCKS_PER_SPLIT, MAX_SPLITS))


def takes_decode_path(q: torch.Tensor, k: torch.Tensor, options: KernelOptions) -> bool:
    """Whether ``flash_attention``'s forward runs the decode kernels: ``Sq <= DECODE_MAX_QUERIES`` query rows
    over ``Sk >= DECODE_MIN_KEYS`` keys, with no bias or dropout (which the decode kernel does not take),
    unless a test or ``flash-softmax tune`` forces the forward kernel's configuration."""
    return (q.shape[2] <= DECODE_MAX_QUERIES and k.shape[2] >= DECODE_MIN_KEYS and options.attn_bias is None
            and options.dropout_p == 0 and configs.forced_config("forward") is None)


# --- kernels --------------------------------------------------------------------------------------------

@triton.jit
def cache_slots(BlockTable, batch, positions, valid, page_size, stride_tb, PAGED: tl.constexpr):
    """``(outer, slot)`` of the cache rows holding key ``positions`` of sequence ``batch``: the row is
    ``outer * stride_b + slot * stride_n`` from the start of a head's slice. A contiguous cache has
    ``(batch, position)``; a paged one ``(page, position % page_size)`` with ``page`` read from
    ``block_table[batch, position // page_size]`` where ``valid`` (0 elsewhere, never dereferenced)."""
    if PAGED:
        page = tl.load(BlockTable + batch.to(tl.int64) * stride_tb + positions // page_size, mask=valid, other=0)
        return page.to(tl.int64), (positions % page_size).to(tl.int64)
    # ``outer`` as a tile like the paged branch's: Triton compiles both returns, which must agree in type.
    return batch.to(tl.int64) + positions.to(tl.int64) * 0, positions.to(tl.int64)


@triton.jit
def sequence_keys(CacheSeqlens, batch, cache_length, new_keys, capacity, HAS_SEQLENS: tl.constexpr):
    """``(cached, keys)``: the tokens of sequence ``batch`` already in the cache (``cache_seqlens[batch]``, or
    the call's ``cache_length``) and ``L_b``, the keys attention covers once the ``new_keys`` are appended,
    clipped to the cache's ``capacity`` so that nothing outside it is ever read or written."""
    if HAS_SEQLENS:
        cached = tl.load(CacheSeqlens + batch).to(tl.int32)
    else:
        cached = cache_length + batch * 0
    return cached, tl.minimum(cached + new_keys, capacity)


@triton.jit(do_not_specialize=["new_keys", "cache_length", "capacity", "page_size", "num_heads_kv"])
def _kvcache_append_kernel(
    KCache, VCache, KNew, VNew, CacheSeqlens, BlockTable,
    stride_kcb, stride_kch, stride_kcn,
    stride_vcb, stride_vch, stride_vcn,
    stride_knb, stride_knh, stride_knn,
    stride_vnb, stride_vnh, stride_vnn,
    stride_tb, num_heads_kv, new_keys, cache_length, capacity, page_size,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_SEQLENS: tl.constexpr, PAGED: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Copy ``BLOCK_N`` new keys and values of one (batch, K/V head) into the cache: new row ``j`` goes to
    position ``cache_seqlens[b] + j`` (through ``block_table`` when ``PAGED``). Positions at or past the
    cache's ``capacity`` are not written. Grid ``(cdiv(Sn, BLOCK_N), B * Hkv)``."""
    batch_head = tl.program_id(1)
    batch = batch_head // num_heads_kv
    head = batch_head % num_heads_kv
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cached, _ = sequence_keys(CacheSeqlens, batch, cache_length, new_keys, capacity, HAS_SEQLENS)
    positions = cached + rows
    valid = (rows < new_keys) & (positions < capacity)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_k = valid[:, None] & (offs_d < HEAD_DIM)[None, :]
    mask_v = valid[:, None] & (offs_dv < HEAD_DIM_V)[None, :]

    source = batch.to(tl.int64) * stride_knb + head.to(tl.int64) * stride_knh + rows[:, None].to(tl.int64) * stride_knn
    k = tl.load(KNew + source + offs_d[None, :], mask=mask_k)
    outer, slot = cache_slots(BlockTable, batch, positions, valid, page_size, stride_tb, PAGED)
    target = outer * stride_kcb + slot * stride_kcn
    tl.store(KCache + head.to(tl.int64) * stride_kch + target[:, None] + offs_d[None, :], k, mask=mask_k)

    source = batch.to(tl.int64) * stride_vnb + head.to(tl.int64) * stride_vnh + rows[:, None].to(tl.int64) * stride_vnn
    v = tl.load(VNew + source + offs_dv[None, :], mask=mask_v)
    target = outer * stride_vcb + slot * stride_vcn
    tl.store(VCache + head.to(tl.int64) * stride_vch + target[:, None] + offs_dv[None, :], v, mask=mask_v)


@triton.jit(do_not_specialize=["num_heads_q", "num_heads_kv", "group_size", "seqlen_q", "cache_length", "new_keys",
                               "capacity", "page_size", "num_splits", "num_row_blocks",
                               "num_stats_rows"])
def _attn_decode_kernel(
    Q, KCache, VCache, CacheSeqlens, BlockTable, Sinks, Alibi, Out, LSE, OutPartial, LSEPartial,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_tb, stride_ab, stride_ah,
    stride_ob, stride_oh, stride_om,
    num_heads_q, num_heads_kv, group_size, seqlen_q, cache_length, new_keys, capacity, page_size,
    window_left, window_right, qk_scale, softcap_scale, softcap_log2, num_splits, num_row_blocks, num_stats_rows,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_SEQLENS: tl.constexpr, PAGED: tl.constexpr, SPLIT: tl.constexpr,
    ACC_DTYPE: tl.constexpr, INTERPRETED_BFLOAT16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One chunk of the keys of ``BLOCK_M`` query rows of one (batch, K/V head).

    Grid ``(num_row_blocks * B * Hkv, num_splits)``; row ``r`` of the (batch, K/V head) is query
    ``r // group_size`` of query head ``head_kv * group_size + r % group_size``. Q ``(B, Hq, Sq, D)``, Out
    ``(B, Hq, Sq, Dv)``; the caches as ``cache_slots`` finds their rows. Without ``SPLIT`` (one chunk) the program
    writes Out and the base-2 ``LSE (B, Hq, Sq)`` itself, sinks included; with it, its chunk's normalised
    output and base-2 logsumexp go to ``OutPartial (num_splits, B * Hq * Sq, Dv)`` and
    ``LSEPartial (num_splits, B * Hq * Sq)`` float32 (-inf for a chunk with no visible key), for the combine.
    """
    DOT_DTYPE: tl.constexpr = Q.dtype.element_ty
    program = tl.program_id(0)
    split = tl.program_id(1)
    row_block = program % num_row_blocks
    batch_head_kv = program // num_row_blocks
    batch = batch_head_kv // num_heads_kv
    head_kv = batch_head_kv % num_heads_kv

    keys = sequence_keys(CacheSeqlens, batch, cache_length, new_keys, capacity, HAS_SEQLENS)[1]
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    total_rows = group_size * seqlen_q
    row_ok = rows < total_rows
    query = rows // group_size  # >= seqlen_q past the last row, which masks those rows out of every score
    head = head_kv * group_size + rows % group_size
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_d = offs_d < HEAD_DIM
    mask_dv = offs_dv < HEAD_DIM_V

    q_rows = batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh + query.to(tl.int64) * stride_qm
    q = tl.load(Q + q_rows[:, None] + offs_d[None, :], mask=row_ok[:, None] & mask_d[None, :], other=0.0)
    q = dot_operand(q, DOT_DTYPE, INTERPRETED_BFLOAT16)
    slope = alibi_slope(Alibi, batch, head, stride_ab, stride_ah, HAS_ALIBI)

    # The keys the block's queries see (bottom-right aligned: diagonal = L_b - Sq), cut into num_splits
    # chunks of whole blocks; ``first_query`` has the lowest bounds, ``last_query`` the highest.
    first_query = (row_block * BLOCK_M) // group_size
    last_query = tl.minimum(row_block * BLOCK_M + BLOCK_M, total_rows) // group_size
    last_query = tl.maximum(last_query - 1, first_query)
    diagonal = keys - seqlen_q
    begin = keys * 0
    end = keys
    if HAS_RIGHT:
        end = tl.minimum(end, tl.maximum(last_query + diagonal + window_right + 1, 0))
    if HAS_LEFT:
        begin = tl.maximum(first_query + diagonal - window_left, 0) // BLOCK_N * BLOCK_N
    chunk = tl.cdiv(tl.cdiv(tl.maximum(end - begin, 0), BLOCK_N), num_splits) * BLOCK_N
    chunk_begin = begin + split * chunk
    chunk_end = tl.minimum(chunk_begin + chunk, end)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC_DTYPE)
    l_i = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=ACC_DTYPE)
    k_head = KCache + head_kv.to(tl.int64) * stride_kh
    v_head = VCache + head_kv.to(tl.int64) * stride_vh
    for block_start in range(chunk_begin, chunk_end, BLOCK_N):
        cols = block_start + offs_n
        key_ok = cols < chunk_end
        outer, slot = cache_slots(BlockTable, batch, cols, key_ok, page_size, stride_tb, PAGED)
        k_rows = outer * stride_kb + slot * stride_kn
        v_rows = outer * stride_vb + slot * stride_vn
        k = tl.load(k_head + k_rows[None, :] + offs_d[:, None], mask=key_ok[None, :] & mask_d[:, None], other=0.0)
        v = tl.load(v_head + v_rows[:, None] + offs_dv[None, :], mask=key_ok[:, None] & mask_dv[None, :], other=0.0)
        scores, _, _ = score_tile(
            q, dot_operand(k, DOT_DTYPE, INTERPRETED_BFLOAT16), query[:, None], cols[None, :], Q, 0, 0,
            seqlen_q, keys, window_left, window_right, qk_scale, softcap_scale, softcap_log2, slope[:, None],
            ACC_DTYPE, True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, 0, HAS_ALIBI)
        p, acc, m_i, l_i = online_softmax_step(scores, m_i, l_i, acc)
        acc = tl.dot(dot_operand(p, DOT_DTYPE, INTERPRETED_BFLOAT16), dot_operand(v, DOT_DTYPE, INTERPRETED_BFLOAT16),
                     acc, input_precision="ieee", out_dtype=ACC_DTYPE)

    stats_rows = (batch * num_heads_q + head).to(tl.int64) * seqlen_q + query
    if SPLIT:
        # The chunk's own softmax: normalised output and logsumexp; the combine adds the sinks.
        out, lse = finish_rows(acc, m_i, l_i)
        partial_rows = split.to(tl.int64) * num_stats_rows + stats_rows
        tl.store(OutPartial + partial_rows[:, None] * HEAD_DIM_V + offs_dv[None, :], out,
                 mask=row_ok[:, None] & mask_dv[None, :])
        tl.store(LSEPartial + partial_rows, lse, mask=row_ok)
    else:
        if HAS_SINKS:
            sink = tl.load(Sinks + head, mask=row_ok, other=0.0).to(ACC_DTYPE) * LOG2E_CONSTEXPR
            acc, m_i, l_i = merge_sink(acc, m_i, l_i, sink)
        out, lse = finish_rows(acc, m_i, l_i)
        out = round_to_dtype(out, DOT_DTYPE, INTERPRETED_BFLOAT16)
        out_rows = batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh + query.to(tl.int64) * stride_om
        tl.store(Out + out_rows[:, None] + offs_dv[None, :], out, mask=row_ok[:, None] & mask_dv[None, :])
        tl.store(LSE + stats_rows, lse, mask=row_ok)


@triton.jit(do_not_specialize=["num_rows", "num_splits", "num_heads_q", "seqlen_q"])
def _attn_decode_combine_kernel(
    OutPartial, LSEPartial, Sinks, Out, LSE,
    stride_ob, stride_oh, stride_om,
    num_rows, num_splits, num_heads_q, seqlen_q,
    HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_SINKS: tl.constexpr, ACC_DTYPE: tl.constexpr,
    INTERPRETED_BFLOAT16: tl.constexpr, BLOCK_ROWS: tl.constexpr,
):
    """Merge the ``num_splits`` chunks of ``BLOCK_ROWS`` of the ``num_rows = B * Hq * Sq`` rows, in split order:
    ``lse = m + log2 sum_s 2**(lse_s - m)`` with ``m = max_s lse_s`` (the sink joining as one more term),
    ``out = sum_s 2**(lse_s - lse) * out_s``. Flat row ``(b * Hq + h) * Sq + i`` is query ``i`` of head ``h`` of
    batch ``b``: Out ``(B, Hq, Sq, Dv)`` by its strides, ``LSE (B, Hq, Sq)`` contiguous, base 2. A row no
    chunk saw a key for gives 0 and -inf (the sink's logit with sinks). Grid ``(cdiv(num_rows, BLOCK_ROWS),)``."""
    DTYPE: tl.constexpr = Out.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < num_rows
    offs_dv = tl.arange(0, BLOCK_DV)
    mask = row_ok[:, None] & (offs_dv < HEAD_DIM_V)[None, :]
    rows64 = rows.to(tl.int64)

    m = tl.full([BLOCK_ROWS], float("-inf"), dtype=ACC_DTYPE)
    for split in range(0, num_splits):
        lse_split = tl.load(LSEPartial + split * num_rows + rows64, mask=row_ok, other=float("-inf"))
        m = tl.maximum(m, lse_split.to(ACC_DTYPE))
    head = (rows // seqlen_q) % num_heads_q
    if HAS_SINKS:
        sink = tl.load(Sinks + head, mask=row_ok, other=0.0).to(ACC_DTYPE) * LOG2E_CONSTEXPR
        m = tl.maximum(m, sink)
    m_shift = tl.where(m == float("-inf"), 0.0, m)
    total = tl.zeros([BLOCK_ROWS], dtype=ACC_DTYPE)
    acc = tl.zeros([BLOCK_ROWS, BLOCK_DV], dtype=ACC_DTYPE)
    for split in range(0, num_splits):
        lse_split = tl.load(LSEPartial + split * num_rows + rows64, mask=row_ok, other=float("-inf")).to(ACC_DTYPE)
        weight = tl.math.exp2(lse_split - m_shift)
        out_split = tl.load(OutPartial + (split * num_rows + rows64)[:, None] * HEAD_DIM_V + offs_dv[None, :],
                            mask=mask, other=0.0).to(ACC_DTYPE)
        total += weight
        acc += weight[:, None] * out_split
    if HAS_SINKS:
        total += tl.math.exp2(sink - m_shift)
    out, lse = finish_rows(acc, m, total)
    out = round_to_dtype(out, DTYPE, INTERPRETED_BFLOAT16)
    query = rows % seqlen_q
    batch = rows // seqlen_q // num_heads_q
    out_rows = batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh + query.to(tl.int64) * stride_om
    tl.store(Out + out_rows[:, None] + offs_dv[None, :], out, mask=mask)
    tl.store(LSE + rows64, lse, mask=row_ok)


# --- launchers ------------------------------------------------------------------------------------------

def _length_arguments(cache_seqlens: torch.Tensor | None, cache_length: int, q: torch.Tensor) -> tuple:
    """``(CacheSeqlens, cache_length, HAS_SEQLENS)``: the per-sequence lengths when given, else any valid
    pointer (never read) and the call's single length."""
    if cache_seqlens is None:
        return q, cache_length, False
    return cache_seqlens, 0, True


def _table_arguments(block_table: torch.Tensor | None, q: torch.Tensor) -> tuple:
    """``(BlockTable, stride_tb, PAGED)``."""
    if block_table is None:
        return q, 0, False
    return block_table, block_table.stride(0), True


def cache_capacity(k_cache: torch.Tensor, block_table: torch.Tensor | None) -> int:
    """The most tokens one sequence's cache holds: ``Smax``, or ``pages_per_seq * page_size``."""
    if block_table is None:
        return k_cache.shape[2]
    return block_table.shape[1] * k_cache.shape[2]


def kvcache_append(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   cache_seqlens: torch.Tensor | None, cache_length: int, block_table: torch.Tensor | None) -> None:
    """Write ``k (B, Hkv, Sn, D)`` and ``v (B, Hkv, Sn, Dv)`` into the caches in place, at positions
    ``cache_seqlens[b] + j`` (or ``cache_length + j``), through ``block_table`` for a paged cache; positions
    past the capacity are dropped. Caches and new rows need a contiguous last dim (checked by the caller)."""
    batch, heads_kv, new_keys, head_dim = k.shape
    if k.numel() == 0 and v.numel() == 0:
        return
    block_n = 16 if INTERPRETED else 64
    lengths, length, has_seqlens = _length_arguments(cache_seqlens, cache_length, k)
    table, stride_tb, paged = _table_arguments(block_table, k)
    grid = (configs.cdiv(new_keys, block_n), batch * heads_kv)
    _kvcache_append_kernel[grid](
        k_cache, v_cache, k, v, lengths, table,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        stride_tb, heads_kv, new_keys, length, cache_capacity(k_cache, block_table), k_cache.shape[2],
        HEAD_DIM=head_dim, HEAD_DIM_V=v.shape[3], BLOCK_D=configs.padded_head_dim(head_dim),
        BLOCK_DV=configs.padded_head_dim(v.shape[3]), HAS_SEQLENS=has_seqlens, PAGED=paged, BLOCK_N=block_n,
        num_warps=4,
    )


def attention_decode(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, options: KernelOptions, *,
    cache_seqlens: torch.Tensor | None = None, cache_length: int = 0, new_keys: int = 0,
    block_table: torch.Tensor | None = None, num_splits: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the decode kernel (and the combine when the keys are split).

    Args:
        q: ``(B, Hq, Sq, D)``; k_cache ``(B, Hkv, Smax, D)`` or, with ``block_table (B, pages_per_seq)``,
            ``(num_pages, Hkv, page_size, D)``; v_cache likewise with ``Dv``. Contiguous last dims.
        options: scale, band, softcap, sinks and ALiBi, validated (no bias, no dropout).
        cache_seqlens: int32/int64 ``(B,)`` tokens cached before this call, or None for ``cache_length``
            for every sequence. Attention covers ``L_b = cached + new_keys`` keys (at most the capacity).
        num_splits: chunks per row block's keys; 0 picks them (``choose_num_splits``), 1 never splits.

    Returns:
        ``out (B, Hq, Sq, Dv)`` in q's dtype, laid out like q, and ``lse (B, Hq, Sq)`` base 2 (float32, or
        float64 for float64 inputs), -inf for a row that sees no key (the sink with sinks).
    """
    batch, heads_q, seqlen_q, head_dim = q.shape
    head_dim_v = v_cache.shape[3]
    statistics_dtype = options.statistics_dtype(q)
    out = empty_in_layout_of(q, (batch, heads_q, seqlen_q, head_dim_v), q.dtype)
    lse = torch.empty((batch, heads_q, seqlen_q), dtype=statistics_dtype, device=q.device)
    if out.numel() == 0:  # no query row (Dv >= 1 is checked)
        return out, lse
    shape = DecodeShape(batch, heads_q, k_cache.shape[1], seqlen_q, cache_capacity(k_cache, block_table))
    device_index = q.device.index or 0
    config = decode_config(shape, head_dim, head_dim_v, q.element_size(), device_index=device_index)
    blocks = row_blocks(shape, config.block_m)
    splits = num_splits or choose_num_splits(shape, config.block_m, config.block_n, device_index)
    splits = max(1, min(splits, configs.cdiv(shape.capacity, config.block_n)))
    stats_rows = batch * heads_q * seqlen_q
    if splits > 1:
        out_partial = torch.empty((splits, stats_rows, head_dim_v), dtype=statistics_dtype, device=q.device)
        lse_partial = torch.empty((splits, stats_rows), dtype=statistics_dtype, device=q.device)
    else:
        out_partial, lse_partial = out, lse  # never written (SPLIT is off)

    lengths, length, has_seqlens = _length_arguments(cache_seqlens, cache_length, q)
    table, stride_tb, paged = _table_arguments(block_table, q)
    sinks, alibi, _, *alibi_strides = options.modifier_operands(q)
    constexprs = options.constexprs(q, v_cache)
    _attn_decode_kernel[(blocks * batch * shape.heads_kv, splits)](
        q, k_cache, v_cache, lengths, table, sinks, alibi, out, lse, out_partial, lse_partial,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        stride_tb, *alibi_strides,
        out.stride(0), out.stride(1), out.stride(2),
        heads_q, shape.heads_kv, shape.group_size, seqlen_q, length, new_keys, shape.capacity, k_cache.shape[2],
        *options.window_bounds(seqlen_q + shape.capacity), *options.score_scales(), splits, blocks, stats_rows,
        HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v, BLOCK_D=constexprs["BLOCK_D"], BLOCK_DV=constexprs["BLOCK_DV"],
        HAS_LEFT=constexprs["HAS_LEFT"], HAS_RIGHT=constexprs["HAS_RIGHT"], HAS_SOFTCAP=constexprs["HAS_SOFTCAP"],
        HAS_SINKS=constexprs["HAS_SINKS"], HAS_ALIBI=constexprs["HAS_ALIBI"], HAS_SEQLENS=has_seqlens, PAGED=paged,
        SPLIT=splits > 1, ACC_DTYPE=constexprs["ACC_DTYPE"], INTERPRETED_BFLOAT16=constexprs["INTERPRETED_BFLOAT16"],
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if splits > 1:
        _attn_decode_combine_kernel[(configs.cdiv(stats_rows, COMBINE_BLOCK_ROWS),)](
            out_partial, lse_partial, sinks, out, lse,
            out.stride(0), out.stride(1), out.stride(2),
            stats_rows, splits, heads_q, seqlen_q,
            HEAD_DIM_V=head_dim_v, BLOCK_DV=constexprs["BLOCK_DV"], HAS_SINKS=constexprs["HAS_SINKS"],
            ACC_DTYPE=constexprs["ACC_DTYPE"], INTERPRETED_BFLOAT16=constexprs["INTERPRETED_BFLOAT16"],
            BLOCK_ROWS=COMBINE_BLOCK_ROWS, num_warps=4,
        )
    return out, lse
