"""Device helpers shared by the forward and backward attention kernels.

Lengths are aligned bottom-right (SPEC section 1): query ``i`` sees key ``j`` iff ``j <= i + Sk - Sq`` when
causal. Each kernel splits its loop into blocks that need no mask (every pair in the tile is visible and
in bounds) and blocks that do (they cross the diagonal or the end of a sequence); blocks that nobody sees
are never visited.
"""

import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # log2(e): exp(x) == exp2(x * LOG2E)
LN2 = 0.6931471805599453  # ln(2): converts a base-2 logsumexp back to the natural log
# The same constants for use inside kernels (a jitted function may only read constexpr globals).
LOG2E_CONSTEXPR = tl.constexpr(LOG2E)
LN2_CONSTEXPR = tl.constexpr(LN2)


@triton.jit
def mma_operand(x, DTYPE: tl.constexpr, UPCAST: tl.constexpr):
    """Round ``x`` to the input dtype, as the tensor cores will see it.

    Under Triton's interpreter ``tl.dot`` on bfloat16 multiplies raw bit patterns, so there the rounded
    value is widened back to float32 (``UPCAST``): same rounding, exact product.
    """
    x = x.to(DTYPE)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def block_and_head(num_blocks):
    """Split the 1-D program id into ``(block index, batch * head index)``, the block index varying fastest.

    A flat grid has no 65535 limit on the number of heads, and consecutive programs share one head, so
    its K/V tiles stay hot in L2.
    """
    pid = tl.program_id(0)
    return pid % num_blocks, pid // num_blocks


@triton.jit
def load_tile(ptrs, mask, MASKED: tl.constexpr):
    """Load a tile, masked (zeros outside) only when ``MASKED``: the unmasked load is the fast path."""
    if MASKED:
        return tl.load(ptrs, mask=mask, other=0.0)
    return tl.load(ptrs)


@triton.jit
def key_blocks_for_queries(start_m, seqlen_q, seqlen_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           IS_CAUSAL: tl.constexpr):
    """Key range of the query block ``[start_m, start_m + BLOCK_M)``.

    Returns ``(full_end, end)``: keys ``[0, full_end)`` come in whole blocks every row of the query block
    sees, so they need no mask; keys ``[full_end, end)`` need one (causal diagonal, or the last partial
    block); keys from ``end`` on are seen by no row and are skipped. ``full_end`` is a multiple of BLOCK_N.
    """
    full_end = seqlen_k // BLOCK_N * BLOCK_N
    end = seqlen_k
    if IS_CAUSAL:
        diagonal = seqlen_k - seqlen_q
        end = tl.minimum(end, tl.maximum(start_m + BLOCK_M + diagonal, 0))
        # The first row of the block sees keys up to start_m + diagonal; whole blocks below that are unmasked.
        full_end = tl.minimum(full_end, tl.maximum(start_m + diagonal + 1, 0) // BLOCK_N * BLOCK_N)
    return full_end, end


@triton.jit
def query_blocks_for_keys(start_n, seqlen_q, seqlen_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          IS_CAUSAL: tl.constexpr):
    """Query range that sees the key block ``[start_n, start_n + BLOCK_N)``.

    Returns ``(begin, full_begin, full_end)``: query blocks ``[begin, full_begin)`` cross the causal
    diagonal (masked), ``[full_begin, full_end)`` see every key of the block and lie inside ``seqlen_q``
    (unmasked), and ``[max(full_begin, full_end), seqlen_q)`` is the masked partial last block. Rows before
    ``begin`` see none of these keys. ``begin``, ``full_begin`` and ``full_end`` are multiples of BLOCK_M.
    """
    begin = start_n * 0
    full_begin = begin
    full_end = seqlen_q // BLOCK_M * BLOCK_M
    if IS_CAUSAL:
        diagonal = seqlen_k - seqlen_q
        begin = tl.maximum(start_n - diagonal, 0) // BLOCK_M * BLOCK_M
        # Row i sees the whole key block once i >= start_n + BLOCK_N - 1 - diagonal; round up to a block.
        first_full_row = tl.maximum(start_n + BLOCK_N - 1 - diagonal, 0)
        full_begin = tl.cdiv(first_full_row, BLOCK_M) * BLOCK_M
    return begin, full_begin, full_end
