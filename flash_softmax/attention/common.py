"""Device helpers shared by the forward and backward attention kernels.

Lengths are aligned bottom-right (docs/semantics.md, 'Masks: causal, sliding window, bias'): query ``i``
sees key ``j`` iff ``j <= i + Sk - Sq`` when causal. Each kernel splits its loop into blocks that need no
mask (every pair in the tile is visible and in bounds) and blocks that do (they cross the diagonal or the
end of a sequence); blocks that nobody sees are never visited.
"""

import triton
import triton.language as tl

from triton.language.extra import libdevice

from flash_softmax._backend import INTERPRETED

LOG2E = 1.4426950408889634  # log2(e): exp(x) == exp2(x * LOG2E)
LN2 = 0.6931471805599453  # ln(2): converts a base-2 logsumexp back to the natural log
# The same constants for use inside kernels (a jitted function may only read constexpr globals).
LOG2E_CONSTEXPR = tl.constexpr(LOG2E)
LN2_CONSTEXPR = tl.constexpr(LN2)
# Compiled kernels take tanh from libdevice (one fast, correctly rounded-to-an-ulp routine); Triton's
# interpreter has no libdevice, so it runs the portable formula of ``tanh`` below.
LIBDEVICE_TANH = tl.constexpr(not INTERPRETED)

# The stages of a block's walk over the band (``stage_bounds``). A query block walks its keys in three:
# the masked blocks at the band's left edge, the mask-free interior, and the masked blocks at its right
# edge and the end of the keys. A key block walks the query blocks that see it in one masked stage, since
# a second copy of the dK/dV loop does not fit the registers.
LEFT_EDGE = tl.constexpr(0)
INTERIOR = tl.constexpr(1)
RIGHT_EDGE = tl.constexpr(2)
WHOLE_BAND = tl.constexpr(3)


@triton.jit
def block_and_head(num_blocks):
    """Split the 1-D program id into ``(block index, batch * head index)``, the block index varying fastest.

    A flat grid has no 65535 limit on the number of heads, and consecutive programs share one head, so
    its K/V tiles stay hot in L2.
    """
    pid = tl.program_id(0)
    return pid % num_blocks, pid // num_blocks


@triton.jit
def heaviest_first(tile, num_blocks, batch_heads, LAST_BLOCK_HEAVIEST: tl.constexpr):
    """``(block index, batch * head index)`` of tile number ``tile`` of a persistent grid.

    Tiles are numbered so that a program walking ``pid, pid + num_programs, ...`` meets the costliest
    first: block-major, each block across all heads at once, starting from the block with the most work.
    Under a bottom-right causal band that is the last query block (``LAST_BLOCK_HEAVIEST``: forward, dQ)
    or the first key block (dK/dV). Unbanded, every block costs the same and the order is harmless.
    """
    block = tile // batch_heads
    if LAST_BLOCK_HEAVIEST:
        block = num_blocks - 1 - block
    return block, tile % batch_heads


@triton.jit
def program_tiles(num_blocks, batch_heads, num_programs, PERSISTENT: tl.constexpr):
    """``(first, stop, step)`` of the tiles this program computes, for ``tile_coordinates``.

    A plain grid has one program per tile (``num_blocks * batch_heads`` of them) and its loop runs once;
    with ``PERSISTENT`` each of ``num_programs`` programs walks tiles ``pid, pid + num_programs, ...``.
    The plain bounds are constants, so the compiler removes that loop altogether.
    """
    if PERSISTENT:
        return tl.program_id(0), num_blocks * batch_heads, num_programs
    return 0, 1, 1


@triton.jit
def tile_coordinates(tile, num_blocks, batch_heads, PERSISTENT: tl.constexpr,
                     LAST_BLOCK_HEAVIEST: tl.constexpr):
    """``(block index, batch * head index)`` of tile number ``tile`` of ``program_tiles``: on a plain grid
    this program's own (``block_and_head``), on a persistent one heaviest first (``heaviest_first``)."""
    if PERSISTENT:
        return heaviest_first(tile, num_blocks, batch_heads, LAST_BLOCK_HEAVIEST)
    return block_and_head(num_blocks)


@triton.jit
def query_block(tile, seqlen_q, batch_heads, num_heads_q, group_size, PERSISTENT: tl.constexpr,
                BLOCK_M: tl.constexpr):
    """The query block of tile number ``tile`` of ``program_tiles`` over ``cdiv(Sq, BLOCK_M)`` blocks per head,
    as ``(batch * Hq index, batch, query head, key/value head, first row, rows)``: grouped-query attention
    reads its group's K/V head in place. Under a bottom-right band the last block is the heaviest."""
    block_m, batch_head = tile_coordinates(tile, tl.cdiv(seqlen_q, BLOCK_M), batch_heads, PERSISTENT, True)
    batch = batch_head // num_heads_q
    head = batch_head % num_heads_q
    start_m = block_m * BLOCK_M
    return batch_head, batch, head, head // group_size, start_m, start_m + tl.arange(0, BLOCK_M)


#: Sequences a program reads at once while it looks for its tile's sequence in a packed batch
#: (``packed_tile``): one vector load and one prefix sum per chunk, about 40 instructions on sm_90a and no
#: register the main loop needs (notes/perf.md, 'Packed batches'). The interpreter takes 16, so that small
#: test batches cross a chunk.
SEQUENCE_CHUNK = tl.constexpr(16 if INTERPRETED else 256)


@triton.jit
def packed_tile_count(total_rows, num_seqs, BLOCK: tl.constexpr):
    """An upper bound of the blocks of ``BLOCK`` rows in a packed batch of ``num_seqs`` sequences with
    ``total_rows`` rows in all: each sequence's ``cdiv(len, BLOCK)`` rounds its ``len / BLOCK`` up by less
    than 1, so the sum is at most ``(total_rows + num_seqs * (BLOCK - 1)) // BLOCK`` (``configs.packed_tiles``
    computes the same on the host)."""
    return (total_rows + num_seqs * (BLOCK - 1)) // BLOCK


@triton.jit
def packed_tile(CuSeqlens, num_seqs, total_rows, BLOCK: tl.constexpr):
    """This program's tile of a packed (variable-length) batch: ``(sequence, block, unit, found)``.

    The grid is ``packed_tile_count(...) * units`` programs: program ``pid`` takes tile ``pid % count`` of
    unit (head) ``pid // count``. Tiles are numbered sequence after sequence, ``cdiv(len, BLOCK)`` for each
    (none for an empty one), from the lengths ``CuSeqlens[n + 1] - CuSeqlens[n]``: the program finds its
    sequence by scanning the cumulative lengths ``SEQUENCE_CHUNK`` at a time with a prefix sum of the tile
    counts, with no table built on the host or in another launch. ``block`` counts from the sequence's first
    row; ``found`` is False for the few tiles past the last one (the count is a bound), whose ``sequence`` is
    then clamped to a valid index and which must do nothing.
    """
    count = packed_tile_count(total_rows, num_seqs, BLOCK)
    pid = tl.program_id(0)
    tile = pid % count
    unit = pid // count
    sequence = pid * 0  # sequences wholly before this tile
    tiles_before = pid * 0  # their tiles
    carry = pid * 0  # tiles of the chunks already scanned
    offs = tl.arange(0, SEQUENCE_CHUNK)
    for chunk in range(0, num_seqs, SEQUENCE_CHUNK):
        index = chunk + offs
        inside = index < num_seqs
        starts = tl.load(CuSeqlens + index, mask=inside, other=0).to(tl.int32)
        ends = tl.load(CuSeqlens + index + 1, mask=inside, other=0).to(tl.int32)
        counts = (ends - starts + BLOCK - 1) // BLOCK
        tiles_end = carry + tl.cumsum(counts, 0)  # the tile number after each sequence's last
        before = inside & (tiles_end <= tile)
        sequence += tl.sum(before.to(tl.int32), 0)
        tiles_before = tl.maximum(tiles_before, tl.max(tl.where(before, tiles_end, 0), 0))
        carry += tl.sum(counts, 0)
    found = sequence < num_seqs
    return tl.minimum(sequence, num_seqs - 1), tile - tiles_before, unit, found


@triton.jit
def sequence_rows(CuSeqlensQ, CuSeqlensK, sequence):
    """``(q_start, seqlen_q, k_start, seqlen_k)``: the first row and length of ``sequence`` among the packed
    queries and keys."""
    q_start = tl.load(CuSeqlensQ + sequence).to(tl.int32)
    q_end = tl.load(CuSeqlensQ + sequence + 1).to(tl.int32)
    k_start = tl.load(CuSeqlensK + sequence).to(tl.int32)
    k_end = tl.load(CuSeqlensK + sequence + 1).to(tl.int32)
    return q_start, q_end - q_start, k_start, k_end - k_start


@triton.jit
def program_work(CuSeqlensQ, CuSeqlensK, num_seqs, total_rows, seqlen_q, seqlen_k, num_blocks, batch_heads,
                 num_programs, PERSISTENT: tl.constexpr, VARLEN: tl.constexpr, KEY_TILES: tl.constexpr,
                 BLOCK: tl.constexpr):
    """``(first, stop, step, seqlen_q, seqlen_k, packed, found)``: the tiles this program computes (as
    ``program_tiles``), the lengths they see, for a packed batch its tile's coordinates, and whether it has a
    tile at all.

    Fixed length: ``program_tiles``, the call's lengths, an unused ``packed`` and ``found = 1``. ``VARLEN``:
    one tile of the packed grid over the query blocks (or, ``KEY_TILES``, the key blocks, for dK/dV) of the
    sequences; the lengths are its sequence's, and ``packed`` is ``(sequence, block, unit, q_start, k_start)``
    (``packed_tile``, ``sequence_rows``). ``found`` is 0 for a program past the last tile, which must return
    at once: an early return, not a loop of zero or one trips over the kernel's body, which costs the forward
    and dK/dV kernels some 40 registers on sm_90a (notes/perf.md, 'Packed batches')."""
    if VARLEN:
        if KEY_TILES:
            sequence, block, unit, found = packed_tile(CuSeqlensK, num_seqs, total_rows, BLOCK)
        else:
            sequence, block, unit, found = packed_tile(CuSeqlensQ, num_seqs, total_rows, BLOCK)
        q_start, seqlen_q, k_start, seqlen_k = sequence_rows(CuSeqlensQ, CuSeqlensK, sequence)
        packed = (sequence, block, unit, q_start, k_start)
        first = 0
        stop = 1
        step = 1
    else:
        packed = (0, 0, 0, 0, 0)
        found = 1
        first, stop, step = program_tiles(num_blocks, batch_heads, num_programs, PERSISTENT)
    return first, stop, step, seqlen_q, seqlen_k, packed, found


@triton.jit
def query_tile(tile, seqlen_q, batch_heads, num_heads_q, group_size, total_q, packed,
               PERSISTENT: tl.constexpr, VARLEN: tl.constexpr, BLOCK_M: tl.constexpr):
    """The query block of tile ``tile`` (forward and dQ): ``(batch * Hq + head, batch, head, key/value head,
    first row, rows, q_index, k_index, stats_start)``.

    Rows are counted from the sequence's start; ``q_index`` / ``k_index`` are what ``head_start`` takes as
    the batch index of the query-side (Q, Out, dO, dQ) and key-side tensors, and ``stats_start`` the offset
    of the sequence's row 0 in lse and delta. A fixed-length batch: ``query_block``'s block, the batch twice,
    and ``(b * Hq + h) * Sq`` (lse is ``(B, Hq, Sq)``). A packed batch (``VARLEN``; ``packed`` is
    ``(sequence, block, head, q_start, k_start)`` from ``packed_tile`` / ``sequence_rows``, ``seqlen_q`` the
    sequence's): the batch is the sequence, the launcher passes row strides as batch strides so the
    indices are the sequence's first rows, and lse is ``(Hq, total_q)``. Its blocks are taken last first,
    as ``query_block`` takes them: under a bottom-right band the last is the heaviest.
    """
    if VARLEN:
        batch, block, head, q_index, k_index = packed
        batch_head = batch * num_heads_q + head
        start_m = (tl.cdiv(seqlen_q, BLOCK_M) - 1 - block) * BLOCK_M
        stats_start = head.to(tl.int64) * total_q + q_index
        head_kv = head // group_size
        offs_m = start_m + tl.arange(0, BLOCK_M)
    else:
        batch_head, batch, head, head_kv, start_m, offs_m = query_block(
            tile, seqlen_q, batch_heads, num_heads_q, group_size, PERSISTENT, BLOCK_M)
        q_index = batch
        k_index = batch
        stats_start = batch_head.to(tl.int64) * seqlen_q
    return batch_head, batch, head, head_kv, start_m, offs_m, q_index, k_index, stats_start


@triton.jit
def head_dim_offsets(HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_DV: tl.constexpr):
    """``(offs_d, offs_dv, mask_d, mask_dv)``: the column indices of the Q/K tiles (``BLOCK_D`` wide) and the
    V/O tiles (``BLOCK_DV`` wide), and which of them lie inside the head dims (the tiles are padded to a
    power of two)."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    return offs_d, offs_dv, offs_d < HEAD_DIM, offs_dv < HEAD_DIM_V


@triton.jit
def head_start(tensor, batch, head, stride_b, stride_h):
    """``tensor`` moved to the ``(rows, cols)`` matrix of one ``(batch, head)`` of a ``(B, H, rows, cols)``
    tensor. 64-bit offsets: ``B * H * S * D`` may exceed 2**31 elements."""
    return tensor + batch.to(tl.int64) * stride_b + head.to(tl.int64) * stride_h


@triton.jit
def tile_pointers(matrix, rows, cols, stride_row):
    """Pointers to the entries (``rows``, ``cols``) (broadcastable index tiles) of a matrix whose rows are
    contiguous and ``stride_row`` apart; the row offset is 64-bit."""
    return matrix + rows.to(tl.int64) * stride_row + cols


@triton.jit
def matrix_descriptor(matrix, rows, stride_row, COLS: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                      BLOCK_COLS: tl.constexpr):
    """Tensor descriptor (TMA on Hopper) of the ``rows x COLS`` matrix at ``matrix`` (contiguous rows,
    ``stride_row`` apart), read and written in ``BLOCK_ROWS x BLOCK_COLS`` tiles. The hardware zero-fills
    what lies past its edges, so its tiles need no bounds masks (the band and the key count are still
    masked on the scores)."""
    return tl.make_tensor_descriptor(matrix, shape=[rows, COLS], strides=[stride_row, 1],
                                     block_shape=[BLOCK_ROWS, BLOCK_COLS])


@triton.jit
def load_tile(ptrs, mask, MASKED: tl.constexpr):
    """Load a tile, masked (zeros outside) only when ``MASKED``: the unmasked load is the fast path."""
    if MASKED:
        return tl.load(ptrs, mask=mask, other=0.0)
    return tl.load(ptrs)


@triton.jit
def key_range(start_m, seqlen_q, seqlen_k, window_left, window_right,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Keys seen by the query block ``[start_m, start_m + BLOCK_M)``: ``(begin, full_begin, full_end, end)``.

    Row ``i`` sees key ``j`` iff ``i + diagonal - left <= j <= i + diagonal + right`` with
    ``diagonal = Sk - Sq`` (a bound is absent without HAS_LEFT / HAS_RIGHT; causal is right = 0). Keys
    outside ``[begin, end)`` are seen by no row and never visited; whole blocks in ``[full_begin, full_end)``
    are seen by every row and in bounds, so they need no mask. ``begin``, ``full_begin`` and ``full_end``
    are multiples of BLOCK_N; ``full_begin > full_end`` means no block is mask-free.
    """
    diagonal = seqlen_k - seqlen_q
    begin = start_m * 0
    end = begin + seqlen_k
    full_begin = begin
    full_end = seqlen_k // BLOCK_N * BLOCK_N
    if HAS_RIGHT:
        end = tl.minimum(end, tl.maximum(start_m + BLOCK_M + diagonal + window_right, 0))
        # The block's first row has the lowest upper bound.
        full_end = tl.minimum(full_end, tl.maximum(start_m + diagonal + window_right + 1, 0) // BLOCK_N * BLOCK_N)
    if HAS_LEFT:
        begin = tl.maximum(start_m + diagonal - window_left, 0) // BLOCK_N * BLOCK_N
        # The block's last row has the highest lower bound.
        full_begin = tl.cdiv(tl.maximum(start_m + BLOCK_M - 1 + diagonal - window_left, 0), BLOCK_N) * BLOCK_N
    return begin, full_begin, full_end, end


@triton.jit
def query_range(start_n, seqlen_q, seqlen_k, window_left, window_right,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Queries that see some key of the block ``[start_n, start_n + BLOCK_N)``: ``(begin, end)``, ``begin``
    a multiple of BLOCK_M. The band of ``key_range`` seen from the keys' side: row ``i`` sees key ``j``
    iff ``j - diagonal - right <= i <= j - diagonal + left``."""
    diagonal = seqlen_k - seqlen_q
    begin = start_n * 0
    end = begin + seqlen_q
    if HAS_RIGHT:
        begin = tl.maximum(start_n - diagonal - window_right, 0) // BLOCK_M * BLOCK_M
    if HAS_LEFT:
        end = tl.minimum(end, tl.maximum(start_n + BLOCK_N - diagonal + window_left, 0))
    return begin, end


@triton.jit
def stage_bounds(band, STAGE: tl.constexpr):
    """``(stage_begin, stage_end)``: the span one stage of a block's walk over its ``band`` visits.

    ``band`` is ``key_range``'s ``(begin, full_begin, full_end, end)`` for a query block, whose walk has
    the stages ``LEFT_EDGE`` and ``RIGHT_EDGE`` (masked) and ``INTERIOR`` (mask-free), or any band
    ``(begin, ..., end)`` walked as one masked ``WHOLE_BAND`` (``query_range``'s ``(begin, end)`` for a key
    block). A stage with no block of its kind has ``stage_begin >= stage_end`` and is skipped. The band is
    computed once by the caller, before its first stage: its loops then share one set of bounds.
    """
    # One return after the branches: Triton compiles the statements that follow a returning branch too,
    # and a two-element band cannot be unpacked into four.
    if STAGE == WHOLE_BAND:
        stage_begin = band[0]
        stage_end = band[len(band) - 1]
    else:
        begin, full_begin, full_end, end = band
        if STAGE == LEFT_EDGE:
            stage_begin = begin
            stage_end = tl.minimum(full_begin, end)
        elif STAGE == INTERIOR:
            stage_begin = full_begin
            stage_end = full_end
        else:
            stage_begin = tl.maximum(full_begin, full_end)
            stage_end = end
    return stage_begin, stage_end


@triton.jit
def visible(rows, cols, seqlen_q, seqlen_k, window_left, window_right,
            HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Bool tile: query ``rows`` and key ``cols`` (broadcastable index tiles) in bounds and inside the band."""
    keep = (rows < seqlen_q) & (cols < seqlen_k)
    diagonal = seqlen_k - seqlen_q
    if HAS_RIGHT:
        keep = keep & (cols <= rows + diagonal + window_right)
    if HAS_LEFT:
        keep = keep & (cols >= rows + diagonal - window_left)
    return keep


@triton.jit
def tanh(x):
    """tanh: libdevice's when compiled; under the interpreter from exp2, accurate in float64 too: the odd
    Taylor polynomial through x**15 below 0.25, where ``(1 - e) / (1 + e)`` would cancel, and that form
    elsewhere."""
    if LIBDEVICE_TANH:
        return libdevice.tanh(x)
    x2 = x * x
    series = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (
        62.0 / 2835.0 + x2 * (-1382.0 / 155925.0 + x2 * (21844.0 / 6081075.0 + x2 * (-929569.0 / 638512875.0))))))))
    e = tl.math.exp2(-2.0 * LOG2E_CONSTEXPR * tl.abs(x))
    closed = (1.0 - e) / (1.0 + e)
    closed = tl.where(x < 0, -closed, closed)
    return tl.where(tl.abs(x) < 0.25, series, closed)


@triton.jit
def logits(qk, bias, qk_scale, softcap_scale, softcap_log2,
           HAS_SOFTCAP: tl.constexpr, BIAS_KIND: tl.constexpr):
    """Base-2 logits of a tile of ``q @ k.T`` products, and the softcap's tanh (for its derivative).

    ``s = scale * qk``, then ``softcap * tanh(s / softcap)`` when HAS_SOFTCAP, then the bias: added
    (BIAS_KIND 1) or a keep-mask (BIAS_KIND 2). Everything is kept in base 2 (times log2 e) for exp2.
    """
    if HAS_SOFTCAP:
        capped = tanh(qk * softcap_scale)
        scores = capped * softcap_log2
    else:
        capped = qk
        scores = qk * qk_scale
    if BIAS_KIND == 1:
        scores = scores + bias.to(scores.dtype) * LOG2E_CONSTEXPR
    if BIAS_KIND == 2:
        scores = tl.where(bias, scores, float("-inf"))
    return scores, capped


@triton.jit
def load_bias(bias_ptr, rows, cols, stride_bm, stride_bn, seqlen_q, seqlen_k):
    """Bias tile at (``rows``, ``cols``) (broadcastable index tiles); broadcast dims have stride 0."""
    in_bounds = (rows < seqlen_q) & (cols < seqlen_k)
    ptrs = bias_ptr + rows.to(tl.int64) * stride_bm + cols.to(tl.int64) * stride_bn
    return tl.load(ptrs, mask=in_bounds, other=0)


@triton.jit
def alibi_slope(Alibi, batch, head, stride_ab, stride_ah, HAS_ALIBI: tl.constexpr):
    """ALiBi's slope of (``batch``, ``head``) as the base-2 factor of the distance, ``-slope * log2(e)``
    (0.0 without ALiBi). ``stride_ab`` is 0 for slopes shared by the batch (``(Hq,)``)."""
    slope = 0.0
    if HAS_ALIBI:
        offset = batch.to(tl.int64) * stride_ab + head.to(tl.int64) * stride_ah
        slope = -tl.load(Alibi + offset).to(tl.float32) * LOG2E_CONSTEXPR
    return slope


@triton.jit
def dropout_keep(seed, offset, batch_head, row_index, col_index, threshold):
    """Bool tile: which pairs of query ``row_index`` and key ``col_index`` (broadcastable index tiles, in either
    orientation) of head ``batch_head`` (``batch * Hq + head``) dropout keeps.

    One Philox-4x32-10 draw per pair, its counter the pair's coordinates ``(key, query, batch * Hq + head,
    offset)`` and its key the 64-bit ``seed``, so the decision depends on nothing but them (not on tiles, head
    dims or programs); the pair is kept when the top 31 bits of the first output word reach ``threshold``
    (see ``flash_softmax._random``).
    """
    zero = (row_index + col_index) * 0
    counter_key = (col_index + zero).to(tl.uint32)
    counter_query = (row_index + zero).to(tl.uint32)
    counter_head = (zero + batch_head).to(tl.uint32)
    counter_offset = (zero.to(tl.int64) + (offset & 0xFFFFFFFF)).to(tl.uint32)
    word, _, _, _ = tl.philox(seed, counter_key, counter_query, counter_head, counter_offset)
    return (word >> 1).to(tl.int32, bitcast=True) >= threshold


@triton.jit
def dropout_state(Rng, HAS_DROPOUT: tl.constexpr):
    """Dropout's ``(seed, offset)``, loaded from the int64 pair ``Rng`` (zeros without dropout)."""
    seed = 0
    offset = 0
    if HAS_DROPOUT:
        seed = tl.load(Rng)
        offset = tl.load(Rng + 1)
    return seed, offset


@triton.jit
def score_tile(a, b, row_index, col_index, bias_ptr, stride_bm, stride_bn, seqlen_q, seqlen_k,
               window_left, window_right, qk_scale, softcap_scale, softcap_log2, slope,
               ACC_DTYPE: tl.constexpr, MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
               HAS_SOFTCAP: tl.constexpr, BIAS_KIND: tl.constexpr, HAS_ALIBI: tl.constexpr):
    """Base-2 logits of the tile ``a @ b``, whose entries pair query ``row_index`` with key ``col_index``
    (broadcastable index tiles, in either orientation): the softcap applied, then the bias and ALiBi's
    ``slope * |i + Sk - Sq - j|`` (``slope`` from ``alibi_slope``) added, and -inf outside the band and the
    sequences when ``MASKED``.

    Returns ``(logits, capped, keep)``: ``capped`` is the softcap's tanh (for its derivative) and ``keep``
    the band's bool tile (meaningful only when ``MASKED``).
    """
    qk = tl.dot(a, b, input_precision="ieee", out_dtype=ACC_DTYPE)
    bias = 0.0
    if BIAS_KIND != 0:
        bias = load_bias(bias_ptr, row_index, col_index, stride_bm, stride_bn, seqlen_q, seqlen_k)
    scores, capped = logits(qk, bias, qk_scale, softcap_scale, softcap_log2, HAS_SOFTCAP, BIAS_KIND)
    if HAS_ALIBI:
        distance = tl.abs(row_index + (seqlen_k - seqlen_q) - col_index).to(ACC_DTYPE)
        scores = scores + slope * distance
    keep = True
    if MASKED:
        keep = visible(row_index, col_index, seqlen_q, seqlen_k, window_left, window_right, HAS_LEFT, HAS_RIGHT)
        scores = tl.where(keep, scores, float("-inf"))
    return scores, capped, keep


@triton.jit
def online_softmax_step(scores, m_i, l_i, acc):
    """One tile of keys folded into a row block's running softmax: ``(p, acc, m_i, l_i)``, ``p = exp2(scores - m)``
    against the new running max ``m``, the running sum ``l_i`` and the accumulator ``acc`` rescaled to it (the
    caller adds ``p @ V`` to ``acc``). Base 2 throughout: the scores carry log2(e)."""
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    # A row that has seen no key yet keeps m = -inf; subtracting 0 there avoids (-inf) - (-inf) = NaN.
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(scores - m_shift[:, None])
    alpha = tl.math.exp2(m_i - m_shift)
    return p, acc * alpha[:, None], m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def merge_sink(acc, m_i, l_i, sink):
    """``(acc, m_i, l_i)`` with the sink, one more logit (base 2) of a key whose value is 0, in the row's softmax:
    it joins the max and the sum, not the accumulator. A row that saw no key ends with lse = sink."""
    m_new = tl.maximum(m_i, sink)
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_shift)
    return acc * alpha[:, None], m_new, l_i * alpha + tl.math.exp2(sink - m_shift)


@triton.jit
def finish_rows(acc, m_i, l_i):
    """``(acc / l, lse)`` of rows whose running max is ``m_i`` and sum ``l_i`` (base 2: ``lse = m + log2 l``). A row
    that saw no key has ``l = 0``: its output is 0 and its lse -inf, never NaN. A +inf score makes ``l`` NaN
    (inf - inf); its logsumexp is +inf, and a backward then keeps P finite wherever the reference does."""
    empty_row = l_i == 0.0
    l_safe = tl.where(empty_row, 1.0, l_i)
    lse = tl.where(empty_row, float("-inf"), m_i + tl.math.log2(l_safe))
    lse = tl.where(m_i == float("inf"), float("inf"), lse)
    return acc / l_safe[:, None], lse
