"""Attention backward: P recomputed from the saved logsumexp, ``dS = P * (dP - delta)``, no atomics.

Three launches:

1. ``_attn_bwd_preprocess_kernel``: ``delta = rowsum(dO * O)`` (equal to ``rowsum(P * dP)``), one float32
   per query row, so the Sq x Sk product never has to be summed.
2. ``_attn_bwd_dkdv_kernel``: one program per key block of one key/value head. It walks the query blocks
   (of every query head in its group) that see those keys and accumulates ``dV += Pᵀ dO`` and
   ``dK += dSᵀ Q``. It owns its dK/dV rows, so nothing is added atomically.
3. ``_attn_bwd_dq_kernel``: one program per query block, walking key blocks: ``dQ += dS K``.

Each program writes only its own rows, always in the same order, so gradients are bitwise reproducible.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flash_softmax._triton_helpers import dot_operand, round_to_dtype
from flash_softmax.attention import configs
from flash_softmax.attention.common import (
    INTERIOR,
    LEFT_EDGE,
    RIGHT_EDGE,
    WHOLE_BAND,
    block_and_head,
    head_dim_offsets,
    head_start,
    key_range,
    load_tile,
    matrix_descriptor,
    program_tiles,
    query_block,
    query_range,
    score_tile,
    stage_bounds,
    tile_coordinates,
    tile_pointers,
)
from flash_softmax.attention.options import KernelOptions


@triton.jit(do_not_specialize=["seqlen_q"])
def _attn_bwd_preprocess_kernel(
    Out, DOut, Delta,
    stride_ob, stride_oh, stride_om,
    stride_dob, stride_doh, stride_dom,
    num_heads_q, seqlen_q,
    HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """Grid ``(cdiv(Sq, BLOCK_M) * B * Hq,)``: ``delta[b, h, i] = sum_d O[b, h, i, d] * dO[b, h, i, d]``."""
    block_m, batch_head = block_and_head(tl.cdiv(seqlen_q, BLOCK_M))
    batch = batch_head // num_heads_q
    head = batch_head % num_heads_q
    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask = (offs_m[:, None] < seqlen_q) & (offs_dv[None, :] < HEAD_DIM_V)
    o_ptrs = tile_pointers(head_start(Out, batch, head, stride_ob, stride_oh), offs_m[:, None], offs_dv[None, :],
                           stride_om)
    do_ptrs = tile_pointers(head_start(DOut, batch, head, stride_dob, stride_doh), offs_m[:, None],
                            offs_dv[None, :], stride_dom)
    o = tl.load(o_ptrs, mask=mask, other=0.0)
    do = tl.load(do_ptrs, mask=mask, other=0.0)
    delta = tl.sum(o.to(ACC_DTYPE) * do.to(ACC_DTYPE), axis=1)
    tl.store(tile_pointers(Delta, batch_head, offs_m, seqlen_q), delta, mask=offs_m < seqlen_q)


@triton.jit
def _load_row_stats(LSE, Delta, rows, row_mask, MASKED: tl.constexpr):
    """Base-2 lse (as the forward stores it) and delta of query rows. A row that saw no key (lse = -inf)
    gets +inf, so its P is 0."""
    lse = load_tile(LSE + rows, row_mask, MASKED)
    delta = load_tile(Delta + rows, row_mask, MASKED)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse)
    return lse2, delta


@triton.jit
def _score_gradient(p, dp, delta, capped, HAS_SOFTCAP: tl.constexpr):
    """``dS = P * (dP - delta)`` with respect to ``scale * q.k``; through the softcap, times ``1 - tanh²``."""
    ds = p * (dp - delta)
    if HAS_SOFTCAP:
        ds = ds * (1.0 - capped * capped)
    return ds


@triton.jit
def _attn_bwd_dkdv_inner(
    dk, dv, k, v,
    q_head, do_head, q_desc, do_desc, LSE, Delta, bias_ptr, stride_qm, stride_dom, stride_bm, stride_bn,
    offs_m, offs_n, offs_d, offs_dv, mask_d, mask_dv,
    start_m, end_m, seqlen_q, seqlen_k, window_left, window_right,
    qk_scale, softcap_scale, softcap_log2,
    BLOCK_M: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, BIAS_KIND: tl.constexpr, DOT_DTYPE: tl.constexpr,
    INTERPRETED_BFLOAT16: tl.constexpr, COMPUTE_DK: tl.constexpr, COMPUTE_DV: tl.constexpr,
    USE_TMA: tl.constexpr, PARTITION_WARPS: tl.constexpr,
):
    """Accumulate the contribution of query rows ``[start_m, end_m)`` of one head to this key block.

    Works on transposed tiles (keys along rows) so that ``dK`` and ``dV`` come out of ``tl.dot`` directly:
    ``Sᵀ = K Qᵀ``, ``Pᵀ = exp2(Sᵀ - lse)``, ``dV += Pᵀ dO``, ``dPᵀ = V dOᵀ``, ``dSᵀ = Pᵀ (dPᵀ - delta)``,
    ``dK += dSᵀ Q`` (the softmax scale is applied once, after the loop). ``COMPUTE_DK`` / ``COMPUTE_DV`` say
    which of the two accumulate (a split launch computes one per pass). Q and dO come from tensor
    descriptors with ``USE_TMA``; otherwise Q is loaded already transposed, and tile addresses are
    recomputed each step from the head's base pointer rather than carried across iterations, which keeps
    them out of the registers the accumulators need.
    """
    for block_start in tl.range(start_m, end_m, BLOCK_M, warp_specialize=PARTITION_WARPS):
        rows = block_start + offs_m
        row_mask = rows < seqlen_q
        if USE_TMA:
            q_t = tl.trans(q_desc.load([block_start, 0]))
            do = do_desc.load([block_start, 0])
        else:
            q_t_ptrs = tile_pointers(q_head, rows[None, :], offs_d[:, None], stride_qm)
            do_ptrs = tile_pointers(do_head, rows[:, None], offs_dv[None, :], stride_dom)
            q_t = tl.load(q_t_ptrs, mask=row_mask[None, :] & mask_d[:, None], other=0.0)
            do = tl.load(do_ptrs, mask=row_mask[:, None] & mask_dv[None, :], other=0.0)
        lse2, delta = _load_row_stats(LSE, Delta, rows, row_mask, True)
        q_t = dot_operand(q_t, DOT_DTYPE, INTERPRETED_BFLOAT16)
        do = dot_operand(do, DOT_DTYPE, INTERPRETED_BFLOAT16)

        scores_t, capped_t, keep = score_tile(
            k, q_t, rows[None, :], offs_n[:, None], bias_ptr, stride_bm, stride_bn, seqlen_q, seqlen_k,
            window_left, window_right, qk_scale, softcap_scale, softcap_log2,
            dk.dtype, True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, BIAS_KIND)
        # exp2(-inf - lse) is NaN for a NaN row: P is zeroed outside the band explicitly.
        p_t = tl.where(keep, tl.math.exp2(scores_t - lse2[None, :]), 0.0)
        if COMPUTE_DV:
            dv = tl.dot(dot_operand(p_t, DOT_DTYPE, INTERPRETED_BFLOAT16), do, dv, input_precision="ieee",
                        out_dtype=dv.dtype)
        if COMPUTE_DK:
            dp_t = tl.dot(v, tl.trans(do), input_precision="ieee", out_dtype=dk.dtype)
            # Masked here too, not only through P: 0 * NaN would carry a NaN row's delta, or a NaN/inf score
            # outside the band, into keys that row never sees.
            ds_t = tl.where(keep, _score_gradient(p_t, dp_t, delta[None, :], capped_t, HAS_SOFTCAP), 0.0)
            dk = tl.dot(dot_operand(ds_t, DOT_DTYPE, INTERPRETED_BFLOAT16), tl.trans(q_t), dk,
                        input_precision="ieee", out_dtype=dk.dtype)
    return dk, dv


@triton.jit
def _store_gradient(ptrs, x, mask, DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr,
                    INTERPRETED_BFLOAT16: tl.constexpr):
    """Store an accumulator in the gradient's dtype: the input dtype, or float32 partial sums (GQA splits)."""
    if DTYPE == DOT_DTYPE:
        tl.store(ptrs, round_to_dtype(x, DOT_DTYPE, INTERPRETED_BFLOAT16), mask=mask)
    else:
        tl.store(ptrs, x.to(DTYPE), mask=mask)


@triton.jit(do_not_specialize=configs.RUNTIME_SIZES)
def _attn_bwd_dkdv_kernel(
    Q, K, V, Bias, DOut, LSE, Delta, DK, DV,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_dob, stride_doh, stride_dom,
    stride_dks, stride_dkb, stride_dkh, stride_dkn,
    stride_dvs, stride_dvb, stride_dvh, stride_dvn,
    num_heads_q, group_size, seqlen_q, seqlen_k, window_left, window_right,
    softmax_scale, qk_scale, softcap_scale, softcap_log2,
    SEQLEN_Q_BUCKET, SEQLEN_K_BUCKET, batch_heads, num_programs, head_splits,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BIAS_KIND: tl.constexpr,
    ACC_DTYPE: tl.constexpr, INTERPRETED_BFLOAT16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_TMA: tl.constexpr, PARTITION_WARPS: tl.constexpr, PERSISTENT: tl.constexpr,
    COMPUTE_DK: tl.constexpr, COMPUTE_DV: tl.constexpr, SPLIT_GROUPS: tl.constexpr,
):
    """dK/dV rows ``[block_n * BLOCK_N, (block_n + 1) * BLOCK_N)`` of one (batch, K/V head) per tile, summed
    over the query heads of one share of its group.

    Grid ``(cdiv(Sk, BLOCK_N) * batch_heads,)`` with ``batch_heads = B * Hkv * head_splits``, or with
    ``PERSISTENT`` ``(num_programs,)`` walking those tiles heaviest first. A tile's
    ``unit = (batch * Hkv + head_kv) * head_splits + split``: share ``split`` of ``head_splits`` takes
    consecutive members of the group and writes its partial sums at ``split * stride_dks`` (without
    ``SPLIT_GROUPS``, ``head_splits = 1``: the whole group, written straight into dK/dV; a compile-time
    switch, because the share arithmetic costs the registers a 256-wide head does not have). Each program
    sums over its query heads in a fixed order, so grouped-query gradients need no atomics either."""
    num_blocks = tl.cdiv(seqlen_k, BLOCK_N)
    first, stop, step = program_tiles(num_blocks, batch_heads, num_programs, PERSISTENT)
    DOT_DTYPE: tl.constexpr = Q.dtype.element_ty
    for tile in range(first, stop, step):
        block_n, unit = tile_coordinates(tile, num_blocks, batch_heads, PERSISTENT, False)
        start_n = block_n * BLOCK_N
        num_heads_kv = num_heads_q // group_size
        if SPLIT_GROUPS:
            split = unit % head_splits
            batch_head_kv = unit // head_splits
            members = tl.cdiv(group_size, head_splits)
            member_begin = split * members
            member_end = tl.minimum(member_begin + members, group_size)
            dk_out = DK + split.to(tl.int64) * stride_dks
            dv_out = DV + split.to(tl.int64) * stride_dvs
        else:
            batch_head_kv = unit
            member_begin = 0
            member_end = group_size
            dk_out, dv_out = DK, DV
        batch = batch_head_kv // num_heads_kv
        head_kv = batch_head_kv % num_heads_kv

        offs_m = tl.arange(0, BLOCK_M)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d, offs_dv, mask_d, mask_dv = head_dim_offsets(HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV)
        key_rows = offs_n[:, None]
        key_mask = key_rows < seqlen_k

        k_head = head_start(K, batch, head_kv, stride_kb, stride_kh)
        v_head = head_start(V, batch, head_kv, stride_vb, stride_vh)
        if USE_TMA:
            k = matrix_descriptor(k_head, seqlen_k, stride_kn, HEAD_DIM, BLOCK_N, BLOCK_D).load([start_n, 0])
            v = matrix_descriptor(v_head, seqlen_k, stride_vn, HEAD_DIM_V, BLOCK_N, BLOCK_DV).load([start_n, 0])
        else:
            k = tl.load(tile_pointers(k_head, key_rows, offs_d[None, :], stride_kn), mask=key_mask & mask_d[None, :],
                        other=0.0)
            v = tl.load(tile_pointers(v_head, key_rows, offs_dv[None, :], stride_vn), mask=key_mask & mask_dv[None, :],
                        other=0.0)
        k = dot_operand(k, DOT_DTYPE, INTERPRETED_BFLOAT16)
        v = dot_operand(v, DOT_DTYPE, INTERPRETED_BFLOAT16)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC_DTYPE)
        dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=ACC_DTYPE)

        # One masked loop over the band. Splitting off the mask-free interior, as the forward and dQ do,
        # makes ptxas spill here: with dK and dV both accumulating, a second copy of the loop does not
        # fit the registers (see notes/perf.md and `flash-softmax compile-report`).
        queries = query_range(start_n, seqlen_q, seqlen_k, window_left, window_right,
                              BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
        begin, end = stage_bounds(queries, WHOLE_BAND)
        for member in range(member_begin, member_end):
            head = head_kv * group_size + member
            q_head = head_start(Q, batch, head, stride_qb, stride_qh)
            do_head = head_start(DOut, batch, head, stride_dob, stride_doh)
            if USE_TMA:
                q_desc = matrix_descriptor(q_head, seqlen_q, stride_qm, HEAD_DIM, BLOCK_M, BLOCK_D)
                do_desc = matrix_descriptor(do_head, seqlen_q, stride_dom, HEAD_DIM_V, BLOCK_M, BLOCK_DV)
            else:
                q_desc = Q
                do_desc = DOut
            bias_ptr = head_start(Bias, batch, head, stride_bb, stride_bh)
            row_stats = (batch * num_heads_q + head).to(tl.int64) * seqlen_q
            dk, dv = _attn_bwd_dkdv_inner(
                dk, dv, k, v, q_head, do_head, q_desc, do_desc, LSE + row_stats, Delta + row_stats, bias_ptr,
                stride_qm, stride_dom, stride_bm, stride_bn, offs_m, offs_n, offs_d, offs_dv, mask_d, mask_dv,
                begin, end, seqlen_q, seqlen_k, window_left, window_right,
                qk_scale, softcap_scale, softcap_log2,
                BLOCK_M, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, BIAS_KIND, DOT_DTYPE, INTERPRETED_BFLOAT16,
                COMPUTE_DK, COMPUTE_DV, USE_TMA, PARTITION_WARPS)

        if COMPUTE_DK:
            dk = dk * softmax_scale
            dk_ptrs = tile_pointers(head_start(dk_out, batch, head_kv, stride_dkb, stride_dkh), key_rows, offs_d[None, :],
                                    stride_dkn)
            _store_gradient(dk_ptrs, dk, key_mask & mask_d[None, :], DK.dtype.element_ty, DOT_DTYPE,
                            INTERPRETED_BFLOAT16)
        if COMPUTE_DV:
            dv_ptrs = tile_pointers(head_start(dv_out, batch, head_kv, stride_dvb, stride_dvh), key_rows, offs_dv[None, :],
                                    stride_dvn)
            _store_gradient(dv_ptrs, dv, key_mask & mask_dv[None, :], DV.dtype.element_ty, DOT_DTYPE,
                            INTERPRETED_BFLOAT16)


@triton.jit
def _attn_bwd_dq_inner(
    dq, q, do, lse2, delta,
    k_ptrs, v_ptrs, k_desc, v_desc, bias_ptr, stride_kn, stride_vn, stride_bm, stride_bn,
    offs_m, offs_n, mask_d, mask_dv,
    start_n, end_n, seqlen_q, seqlen_k, window_left, window_right,
    qk_scale, softcap_scale, softcap_log2,
    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, BIAS_KIND: tl.constexpr,
    PAD_D: tl.constexpr, PAD_DV: tl.constexpr, DOT_DTYPE: tl.constexpr, INTERPRETED_BFLOAT16: tl.constexpr,
    USE_TMA: tl.constexpr, PARTITION_WARPS: tl.constexpr,
):
    """Accumulate ``dQ += dS K`` over keys ``[start_n, end_n)`` (scale applied after the loop)."""
    k_ptrs += start_n.to(tl.int64) * stride_kn
    v_ptrs += start_n.to(tl.int64) * stride_vn
    for block_start in tl.range(start_n, end_n, BLOCK_N, warp_specialize=PARTITION_WARPS):
        cols = block_start + offs_n
        if USE_TMA:
            k = k_desc.load([block_start, 0])
            v = v_desc.load([block_start, 0])
        elif MASKED:
            k = tl.load(k_ptrs, mask=(cols[:, None] < seqlen_k) & mask_d[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=(cols[:, None] < seqlen_k) & mask_dv[None, :], other=0.0)
        else:
            k = load_tile(k_ptrs, mask_d[None, :], PAD_D)
            v = load_tile(v_ptrs, mask_dv[None, :], PAD_DV)
        k = dot_operand(k, DOT_DTYPE, INTERPRETED_BFLOAT16)
        v = dot_operand(v, DOT_DTYPE, INTERPRETED_BFLOAT16)
        scores, capped, keep = score_tile(
            q, tl.trans(k), offs_m[:, None], cols[None, :], bias_ptr, stride_bm, stride_bn, seqlen_q, seqlen_k,
            window_left, window_right, qk_scale, softcap_scale, softcap_log2,
            dq.dtype, MASKED, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, BIAS_KIND)
        p = tl.math.exp2(scores - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision="ieee", out_dtype=dq.dtype)
        ds = _score_gradient(p, dp, delta[:, None], capped, HAS_SOFTCAP)
        if MASKED:
            ds = tl.where(keep, ds, 0.0)
        dq = tl.dot(dot_operand(ds, DOT_DTYPE, INTERPRETED_BFLOAT16), k, dq, input_precision="ieee",
                    out_dtype=dq.dtype)
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
    return dq


@triton.jit(do_not_specialize=configs.RUNTIME_SIZES)
def _attn_bwd_dq_kernel(
    Q, K, V, Bias, DOut, LSE, Delta, DQ,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    num_heads_q, group_size, seqlen_q, seqlen_k, window_left, window_right,
    softmax_scale, qk_scale, softcap_scale, softcap_log2,
    SEQLEN_Q_BUCKET, SEQLEN_K_BUCKET, batch_heads, num_programs,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BIAS_KIND: tl.constexpr,
    ACC_DTYPE: tl.constexpr, INTERPRETED_BFLOAT16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_TMA: tl.constexpr, PARTITION_WARPS: tl.constexpr, PERSISTENT: tl.constexpr,
):
    """dQ rows ``[block_m * BLOCK_M, (block_m + 1) * BLOCK_M)`` of one (batch, query head) per tile.

    Grid ``(cdiv(Sq, BLOCK_M) * B * Hq,)``, or with ``PERSISTENT`` ``(num_programs,)`` walking the tiles
    heaviest first (``batch_heads = B * Hq``)."""
    DOT_DTYPE: tl.constexpr = Q.dtype.element_ty
    first, stop, step = program_tiles(tl.cdiv(seqlen_q, BLOCK_M), batch_heads, num_programs, PERSISTENT)
    for tile in range(first, stop, step):
        batch_head, batch, head, head_kv, start_m, offs_m = query_block(
            tile, seqlen_q, batch_heads, num_heads_q, group_size, PERSISTENT, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d, offs_dv, mask_d, mask_dv = head_dim_offsets(HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV)
        rows = offs_m[:, None]
        row_mask = offs_m < seqlen_q

        q_head = head_start(Q, batch, head, stride_qb, stride_qh)
        do_head = head_start(DOut, batch, head, stride_dob, stride_doh)
        k_head = head_start(K, batch, head_kv, stride_kb, stride_kh)
        v_head = head_start(V, batch, head_kv, stride_vb, stride_vh)
        dq_head = head_start(DQ, batch, head, stride_dqb, stride_dqh)
        if USE_TMA:
            q = matrix_descriptor(q_head, seqlen_q, stride_qm, HEAD_DIM, BLOCK_M, BLOCK_D).load([start_m, 0])
            do = matrix_descriptor(do_head, seqlen_q, stride_dom, HEAD_DIM_V, BLOCK_M, BLOCK_DV).load([start_m, 0])
            k_desc = matrix_descriptor(k_head, seqlen_k, stride_kn, HEAD_DIM, BLOCK_N, BLOCK_D)
            v_desc = matrix_descriptor(v_head, seqlen_k, stride_vn, HEAD_DIM_V, BLOCK_N, BLOCK_DV)
        else:
            q = tl.load(tile_pointers(q_head, rows, offs_d[None, :], stride_qm), mask=row_mask[:, None] & mask_d[None, :],
                        other=0.0)
            do = tl.load(tile_pointers(do_head, rows, offs_dv[None, :], stride_dom),
                         mask=row_mask[:, None] & mask_dv[None, :], other=0.0)
            k_desc = K
            v_desc = V
        row_stats = batch_head.to(tl.int64) * seqlen_q
        lse2, delta = _load_row_stats(LSE + row_stats, Delta + row_stats, offs_m, row_mask, True)
        q = dot_operand(q, DOT_DTYPE, INTERPRETED_BFLOAT16)
        do = dot_operand(do, DOT_DTYPE, INTERPRETED_BFLOAT16)
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC_DTYPE)

        k_ptrs = tile_pointers(k_head, offs_n[:, None], offs_d[None, :], stride_kn)
        v_ptrs = tile_pointers(v_head, offs_n[:, None], offs_dv[None, :], stride_vn)
        bias_ptr = head_start(Bias, batch, head, stride_bb, stride_bh)
        keys = key_range(start_m, seqlen_q, seqlen_k, window_left, window_right, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
        for stage in tl.static_range(LEFT_EDGE, RIGHT_EDGE + 1):
            stage_begin, stage_end = stage_bounds(keys, stage)
            dq = _attn_bwd_dq_inner(
                dq, q, do, lse2, delta, k_ptrs, v_ptrs, k_desc, v_desc, bias_ptr, stride_kn, stride_vn,
                stride_bm, stride_bn, offs_m, offs_n, mask_d, mask_dv, stage_begin, stage_end, seqlen_q, seqlen_k,
                window_left, window_right, qk_scale, softcap_scale, softcap_log2,
                BLOCK_N, stage != INTERIOR, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, BIAS_KIND,
                BLOCK_D != HEAD_DIM, BLOCK_DV != HEAD_DIM_V, DOT_DTYPE, INTERPRETED_BFLOAT16, USE_TMA,
                PARTITION_WARPS)

        dq = round_to_dtype(dq * softmax_scale, DOT_DTYPE, INTERPRETED_BFLOAT16)
        if USE_TMA:
            matrix_descriptor(dq_head, seqlen_q, stride_dqm, HEAD_DIM, BLOCK_M, BLOCK_D).store([start_m, 0], dq)
        else:
            tl.store(tile_pointers(dq_head, rows, offs_d[None, :], stride_dqm), dq,
                     mask=row_mask[:, None] & mask_d[None, :])


def dkdv_parts(config: configs.KernelConfig | None) -> list[dict]:
    """The launches of the dK/dV kernel for ``config``, as the constexprs that differ between them: one
    launch computing both, or (``split_dkdv``) dV first, then dK, each holding a single accumulator."""
    if config is not None and config.split_dkdv:
        return [dict(COMPUTE_DK=False, COMPUTE_DV=True), dict(COMPUTE_DK=True, COMPUTE_DV=False)]
    return [dict(COMPUTE_DK=True, COMPUTE_DV=True)]


_attn_bwd_dkdv_kernel_tuned = configs.autotune("backward_dkdv", _attn_bwd_dkdv_kernel)
_attn_bwd_dq_kernel_tuned = configs.autotune("backward_dq", _attn_bwd_dq_kernel)


def attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor,
    options: KernelOptions,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the three backward kernels.

    Args:
        dout: ``(B, Hq, Sq, Dv)`` gradient of the output, contiguous last dim, any other strides.
        q, k, v, out, lse: as saved by ``attention_forward``.
        options: the forward's options.

    Returns:
        ``dq, dk, dv`` with the shapes, dtypes and memory layouts of ``q, k, v``.
    """
    batch, heads_q, seqlen_q, _ = q.shape
    heads_kv, seqlen_k, head_dim_v = k.shape[1], k.shape[2], v.shape[3]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if batch * heads_q == 0:
        return dq, dk, dv
    delta = torch.empty((batch, heads_q, seqlen_q), dtype=options.statistics_dtype(q), device=q.device)
    constexprs = options.constexprs(q, v)
    if seqlen_q > 0:
        block_m = configs.PREPROCESS_BLOCK_M
        _attn_bwd_preprocess_kernel[(configs.cdiv(seqlen_q, block_m) * batch * heads_q,)](
            out, dout, delta,
            out.stride(0), out.stride(1), out.stride(2),
            dout.stride(0), dout.stride(1), dout.stride(2),
            heads_q, seqlen_q,
            HEAD_DIM_V=head_dim_v, BLOCK_DV=constexprs["BLOCK_DV"], BLOCK_M=block_m,
            ACC_DTYPE=constexprs["ACC_DTYPE"],
        )

    bias, bias_strides = options.bias_operand(q)
    input_strides = (
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        *bias_strides,
        dout.stride(0), dout.stride(1), dout.stride(2),
    )
    runtime = options.runtime_arguments(q, k)
    selection = options.selection_arguments(q, k, v)
    device_index = selection[-1]
    if seqlen_k > 0:
        kernel, config, launch = configs.launch(
            "backward_dkdv", _attn_bwd_dkdv_kernel, _attn_bwd_dkdv_kernel_tuned, *selection)
        splits = 1
        if config is not None:
            splits = configs.gqa_head_splits(
                configs.cdiv(seqlen_k, config.block_n) * batch * heads_kv, heads_q // heads_kv, device_index)
        if splits > 1:
            # Each share of a group writes float32 partial sums; they are added in share order below.
            dk_out = torch.empty((splits, *dk.shape), dtype=torch.float32, device=q.device)
            dv_out = torch.empty((splits, *dv.shape), dtype=torch.float32, device=q.device)
            split_strides = (*dk_out.stride()[:4], *dv_out.stride()[:4])
        else:
            dk_out, dv_out = dk, dv
            split_strides = (0, *dk.stride()[:3], 0, *dv.stride()[:3])
        grid, programs, launch = configs.grid_and_arguments(
            config, launch, seqlen_k, batch * heads_kv * splits, "BLOCK_N", (q, k, v, dout), device_index)
        for part in dkdv_parts(config):
            kernel[grid](
                q, k, v, bias, dout, lse, delta, dk_out, dv_out, *input_strides, *split_strides,
                *runtime, *programs, splits, **constexprs, **launch, **part, SPLIT_GROUPS=splits > 1,
            )
        if splits > 1:
            dk.copy_(dk_out.sum(0))
            dv.copy_(dv_out.sum(0))
    if seqlen_q > 0:
        kernel, config, launch = configs.launch(
            "backward_dq", _attn_bwd_dq_kernel, _attn_bwd_dq_kernel_tuned, *selection)
        grid, programs, launch = configs.grid_and_arguments(
            config, launch, seqlen_q, batch * heads_q, "BLOCK_M", (q, k, v, dout, dq), device_index)
        kernel[grid](
            q, k, v, bias, dout, lse, delta, dq, *input_strides,
            dq.stride(0), dq.stride(1), dq.stride(2),
            *runtime, *programs, **constexprs, **launch,
        )
    return dq, dk, dv
