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
    LOG2E_CONSTEXPR,
    LEFT_EDGE,
    RIGHT_EDGE,
    WHOLE_BAND,
    alibi_slope,
    block_and_head,
    dropout_keep,
    dropout_state,
    head_dim_offsets,
    head_start,
    key_range,
    load_tile,
    matrix_descriptor,
    packed_tile,
    program_work,
    query_range,
    query_tile,
    score_tile,
    stage_bounds,
    tile_coordinates,
    tile_pointers,
)
from flash_softmax.attention.options import KernelOptions, PackedBatch, batch_stride, packed_operands


@triton.jit(do_not_specialize=["seqlen_q", "num_seqs", "total_q"])
def _attn_bwd_preprocess_kernel(
    Out, DOut, DLse, LSE, Sinks, CuSeqlensQ, Delta, DSinksPartial,
    stride_ob, stride_oh, stride_om,
    stride_dob, stride_doh, stride_dom,
    num_heads_q, seqlen_q, num_seqs, total_q,
    HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, ACC_DTYPE: tl.constexpr,
    HAS_DLSE: tl.constexpr, HAS_SINKS: tl.constexpr, VARLEN: tl.constexpr,
):
    """Grid ``(cdiv(Sq, BLOCK_M) * B * Hq,)``: ``delta[b, h, i] = sum_d O[b, h, i, d] * dO[b, h, i, d]``.

    With ``HAS_DLSE`` (a loss on the returned lse), ``delta - dlse`` instead: ``d lse_i / d s_ij = P_ij``, so
    the lse's gradient joins ``dS = P * (dP - delta)`` as ``P * dlse``. ``DLse`` is the gradient of the
    base-2 lse the kernels keep, hence the ``log2(e)``. With ``HAS_SINKS`` each program also writes its
    rows' share of the sink's gradient, ``-sum_i exp(sink - lse_i) * delta_i``, to ``DSinksPartial[pid]``
    (``(B, Hq, blocks)`` in the grid's order); the launcher adds the shares in a fixed order.

    ``VARLEN``: a packed batch (see ``_attn_fwd_kernel``), grid ``packed_tile_count(total_q, num_seqs,
    BLOCK_M) * Hq``; a program past the last tile writes a share of 0.
    """
    if VARLEN:
        sequence, block_m, head, found = packed_tile(CuSeqlensQ, num_seqs, total_q, BLOCK_M)
        batch = tl.load(CuSeqlensQ + sequence).to(tl.int32)  # the row strides are the batch strides
        seqlen_q = tl.where(found, tl.load(CuSeqlensQ + sequence + 1).to(tl.int32) - batch, 0)
        stats_start = head.to(tl.int64) * total_q + batch  # DLse, LSE and Delta are (Hq, total_q) matrices
    else:
        block_m, batch_head = block_and_head(tl.cdiv(seqlen_q, BLOCK_M))
        batch = batch_head // num_heads_q
        head = batch_head % num_heads_q
        stats_start = batch_head.to(tl.int64) * seqlen_q  # DLse, LSE and Delta are (B * Hq, Sq) matrices
    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = offs_m < seqlen_q
    offs_dv = tl.arange(0, BLOCK_DV)
    mask = row_mask[:, None] & (offs_dv[None, :] < HEAD_DIM_V)
    o_ptrs = tile_pointers(head_start(Out, batch, head, stride_ob, stride_oh), offs_m[:, None], offs_dv[None, :],
                           stride_om)
    do_ptrs = tile_pointers(head_start(DOut, batch, head, stride_dob, stride_doh), offs_m[:, None],
                            offs_dv[None, :], stride_dom)
    o = tl.load(o_ptrs, mask=mask, other=0.0)
    do = tl.load(do_ptrs, mask=mask, other=0.0)
    delta = tl.sum(o.to(ACC_DTYPE) * do.to(ACC_DTYPE), axis=1)
    rows = stats_start + offs_m
    if HAS_DLSE:
        delta = delta - tl.load(DLse + rows, mask=row_mask, other=0.0).to(ACC_DTYPE) * LOG2E_CONSTEXPR
    tl.store(Delta + rows, delta, mask=row_mask)
    if HAS_SINKS:
        lse = tl.load(LSE + rows, mask=row_mask, other=float("-inf"))
        sink = tl.load(Sinks + head).to(ACC_DTYPE) * LOG2E_CONSTEXPR
        # The sink's probability; 0 for rows past the end and for a row whose lse is -inf (no key, no sink).
        p_sink = tl.where(lse == float("-inf"), 0.0, tl.math.exp2(sink - lse))
        tl.store(DSinksPartial + tl.program_id(0), -tl.sum(p_sink * delta, axis=0))


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
    qk_scale, softcap_scale, softcap_log2, slope, seed, offset, batch_head, dropout_threshold, dropout_scale,
    BLOCK_M: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, BIAS_KIND: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
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
    them out of the registers the accumulators need. With ``HAS_DROPOUT``, ``dV`` takes the kept
    probabilities (rescaled after the loop) and ``dP`` is that of the kept ones, times ``1 / (1 - p)``.
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
            window_left, window_right, qk_scale, softcap_scale, softcap_log2, slope,
            dk.dtype, True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, BIAS_KIND, HAS_ALIBI)
        # exp2(-inf - lse) is NaN for a NaN row: P is zeroed outside the band explicitly.
        p_t = tl.where(keep, tl.math.exp2(scores_t - lse2[None, :]), 0.0)
        kept = True
        if HAS_DROPOUT:
            kept = dropout_keep(seed, offset, batch_head, rows[None, :], offs_n[:, None], dropout_threshold)
        if COMPUTE_DV:
            p_kept = p_t
            if HAS_DROPOUT:
                p_kept = tl.where(kept, p_t, 0.0)
            dv = tl.dot(dot_operand(p_kept, DOT_DTYPE, INTERPRETED_BFLOAT16), do, dv, input_precision="ieee",
                        out_dtype=dv.dtype)
        if COMPUTE_DK:
            dp_t = tl.dot(v, tl.trans(do), input_precision="ieee", out_dtype=dk.dtype)
            if HAS_DROPOUT:
                dp_t = tl.where(kept, dp_t * dropout_scale, 0.0)
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
    Q, K, V, Bias, Sinks, Alibi, Rng, CuSeqlensQ, CuSeqlensK, DOut, LSE, Delta, DK, DV,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_ab, stride_ah,
    stride_dob, stride_doh, stride_dom,
    stride_dks, stride_dkb, stride_dkh, stride_dkn,
    stride_dvs, stride_dvb, stride_dvh, stride_dvn,
    num_heads_q, group_size, seqlen_q, seqlen_k, window_left, window_right,
    softmax_scale, qk_scale, softcap_scale, softcap_log2, dropout_threshold, dropout_scale,
    SEQLEN_Q_BUCKET, SEQLEN_K_BUCKET, batch_heads, num_programs, num_seqs, total_q, total_k, head_splits,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BIAS_KIND: tl.constexpr,
    HAS_SINKS: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    ACC_DTYPE: tl.constexpr, INTERPRETED_BFLOAT16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_TMA: tl.constexpr, PARTITION_WARPS: tl.constexpr, PERSISTENT: tl.constexpr, VARLEN: tl.constexpr,
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
    sums over its query heads in a fixed order, so grouped-query gradients need no atomics either.

    ``VARLEN``: a packed batch (see ``_attn_fwd_kernel``), grid ``packed_tile_count(total_k, num_seqs, BLOCK_N)
    * Hkv * head_splits`` over the sequences' key blocks, taken first to last."""
    num_blocks = tl.cdiv(seqlen_k, BLOCK_N)
    first, stop, step, seqlen_q, seqlen_k, packed, found = program_work(
        CuSeqlensQ, CuSeqlensK, num_seqs, total_k, seqlen_q, seqlen_k, num_blocks, batch_heads, num_programs,
        PERSISTENT, VARLEN, True, BLOCK_N)
    if VARLEN:
        if found == 0:  # past the packed grid's last tile
            return
    DOT_DTYPE: tl.constexpr = Q.dtype.element_ty
    seed, offset = dropout_state(Rng, HAS_DROPOUT)
    for tile in range(first, stop, step):
        if VARLEN:
            sequence, block_n, unit, q_index, k_index = packed
        else:
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
        if VARLEN:
            batch = sequence
            head_kv = batch_head_kv
        else:
            batch = batch_head_kv // num_heads_kv
            head_kv = batch_head_kv % num_heads_kv
            q_index = batch
            k_index = batch

        offs_m = tl.arange(0, BLOCK_M)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d, offs_dv, mask_d, mask_dv = head_dim_offsets(HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV)
        key_rows = offs_n[:, None]
        key_mask = key_rows < seqlen_k

        k_head = head_start(K, k_index, head_kv, stride_kb, stride_kh)
        v_head = head_start(V, k_index, head_kv, stride_vb, stride_vh)
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
            q_head = head_start(Q, q_index, head, stride_qb, stride_qh)
            do_head = head_start(DOut, q_index, head, stride_dob, stride_doh)
            if USE_TMA:
                q_desc = matrix_descriptor(q_head, seqlen_q, stride_qm, HEAD_DIM, BLOCK_M, BLOCK_D)
                do_desc = matrix_descriptor(do_head, seqlen_q, stride_dom, HEAD_DIM_V, BLOCK_M, BLOCK_DV)
            else:
                q_desc = Q
                do_desc = DOut
            bias_ptr = head_start(Bias, batch, head, stride_bb, stride_bh)
            slope = alibi_slope(Alibi, batch, head, stride_ab, stride_ah, HAS_ALIBI)
            batch_head = batch * num_heads_q + head
            if VARLEN:
                row_stats = head.to(tl.int64) * total_q + q_index
            else:
                row_stats = batch_head.to(tl.int64) * seqlen_q
            dk, dv = _attn_bwd_dkdv_inner(
                dk, dv, k, v, q_head, do_head, q_desc, do_desc, LSE + row_stats, Delta + row_stats, bias_ptr,
                stride_qm, stride_dom, stride_bm, stride_bn, offs_m, offs_n, offs_d, offs_dv, mask_d, mask_dv,
                begin, end, seqlen_q, seqlen_k, window_left, window_right,
                qk_scale, softcap_scale, softcap_log2, slope, seed, offset, batch_head, dropout_threshold,
                dropout_scale,
                BLOCK_M, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, BIAS_KIND, HAS_ALIBI, HAS_DROPOUT, DOT_DTYPE,
                INTERPRETED_BFLOAT16,
                COMPUTE_DK, COMPUTE_DV, USE_TMA, PARTITION_WARPS)

        if COMPUTE_DK:
            dk = dk * softmax_scale
            dk_ptrs = tile_pointers(head_start(dk_out, k_index, head_kv, stride_dkb, stride_dkh), key_rows, offs_d[None, :],
                                    stride_dkn)
            _store_gradient(dk_ptrs, dk, key_mask & mask_d[None, :], DK.dtype.element_ty, DOT_DTYPE,
                            INTERPRETED_BFLOAT16)
        if COMPUTE_DV:
            if HAS_DROPOUT:
                dv = dv * dropout_scale
            dv_ptrs = tile_pointers(head_start(dv_out, k_index, head_kv, stride_dvb, stride_dvh), key_rows, offs_dv[None, :],
                                    stride_dvn)
            _store_gradient(dv_ptrs, dv, key_mask & mask_dv[None, :], DV.dtype.element_ty, DOT_DTYPE,
                            INTERPRETED_BFLOAT16)


@triton.jit
def _attn_bwd_dq_inner(
    dq, q, do, lse2, delta,
    k_ptrs, v_ptrs, k_desc, v_desc, bias_ptr, stride_kn, stride_vn, stride_bm, stride_bn,
    offs_m, offs_n, mask_d, mask_dv,
    start_n, end_n, seqlen_q, seqlen_k, window_left, window_right,
    qk_scale, softcap_scale, softcap_log2, slope, seed, offset, batch_head, dropout_threshold, dropout_scale,
    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, BIAS_KIND: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    PAD_D: tl.constexpr, PAD_DV: tl.constexpr, DOT_DTYPE: tl.constexpr, INTERPRETED_BFLOAT16: tl.constexpr,
    USE_TMA: tl.constexpr, PARTITION_WARPS: tl.constexpr,
):
    """Accumulate ``dQ += dS K`` over keys ``[start_n, end_n)`` (scale applied after the loop); with
    ``HAS_DROPOUT``, ``dP`` is that of the kept probabilities, times ``1 / (1 - p)``."""
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
            window_left, window_right, qk_scale, softcap_scale, softcap_log2, slope,
            dq.dtype, MASKED, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, BIAS_KIND, HAS_ALIBI)
        p = tl.math.exp2(scores - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision="ieee", out_dtype=dq.dtype)
        if HAS_DROPOUT:
            kept = dropout_keep(seed, offset, batch_head, offs_m[:, None], cols[None, :], dropout_threshold)
            dp = tl.where(kept, dp * dropout_scale, 0.0)
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
    Q, K, V, Bias, Sinks, Alibi, Rng, CuSeqlensQ, CuSeqlensK, DOut, LSE, Delta, DQ,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_ab, stride_ah,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    num_heads_q, group_size, seqlen_q, seqlen_k, window_left, window_right,
    softmax_scale, qk_scale, softcap_scale, softcap_log2, dropout_threshold, dropout_scale,
    SEQLEN_Q_BUCKET, SEQLEN_K_BUCKET, batch_heads, num_programs, num_seqs, total_q, total_k,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BIAS_KIND: tl.constexpr,
    HAS_SINKS: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    ACC_DTYPE: tl.constexpr, INTERPRETED_BFLOAT16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_TMA: tl.constexpr, PARTITION_WARPS: tl.constexpr, PERSISTENT: tl.constexpr, VARLEN: tl.constexpr,
):
    """dQ rows ``[block_m * BLOCK_M, (block_m + 1) * BLOCK_M)`` of one (batch, query head) per tile.

    Grid ``(cdiv(Sq, BLOCK_M) * B * Hq,)``, or with ``PERSISTENT`` ``(num_programs,)`` walking the tiles
    heaviest first (``batch_heads = B * Hq``). ``VARLEN``: a packed batch, as in ``_attn_fwd_kernel``."""
    DOT_DTYPE: tl.constexpr = Q.dtype.element_ty
    seed, offset = dropout_state(Rng, HAS_DROPOUT)
    first, stop, step, seqlen_q, seqlen_k, packed, found = program_work(
        CuSeqlensQ, CuSeqlensK, num_seqs, total_q, seqlen_q, seqlen_k, tl.cdiv(seqlen_q, BLOCK_M), batch_heads,
        num_programs, PERSISTENT, VARLEN, False, BLOCK_M)
    if VARLEN:
        if found == 0:  # past the packed grid's last tile
            return
    for tile in range(first, stop, step):
        batch_head, batch, head, head_kv, start_m, offs_m, q_index, k_index, row_stats = query_tile(
            tile, seqlen_q, batch_heads, num_heads_q, group_size, total_q, packed, PERSISTENT, VARLEN, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d, offs_dv, mask_d, mask_dv = head_dim_offsets(HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV)
        rows = offs_m[:, None]
        row_mask = offs_m < seqlen_q

        q_head = head_start(Q, q_index, head, stride_qb, stride_qh)
        do_head = head_start(DOut, q_index, head, stride_dob, stride_doh)
        k_head = head_start(K, k_index, head_kv, stride_kb, stride_kh)
        v_head = head_start(V, k_index, head_kv, stride_vb, stride_vh)
        dq_head = head_start(DQ, q_index, head, stride_dqb, stride_dqh)
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
        lse2, delta = _load_row_stats(LSE + row_stats, Delta + row_stats, offs_m, row_mask, True)
        q = dot_operand(q, DOT_DTYPE, INTERPRETED_BFLOAT16)
        do = dot_operand(do, DOT_DTYPE, INTERPRETED_BFLOAT16)
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC_DTYPE)

        k_ptrs = tile_pointers(k_head, offs_n[:, None], offs_d[None, :], stride_kn)
        v_ptrs = tile_pointers(v_head, offs_n[:, None], offs_dv[None, :], stride_vn)
        bias_ptr = head_start(Bias, batch, head, stride_bb, stride_bh)
        slope = alibi_slope(Alibi, batch, head, stride_ab, stride_ah, HAS_ALIBI)
        keys = key_range(start_m, seqlen_q, seqlen_k, window_left, window_right, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
        for stage in tl.static_range(LEFT_EDGE, RIGHT_EDGE + 1):
            stage_begin, stage_end = stage_bounds(keys, stage)
            dq = _attn_bwd_dq_inner(
                dq, q, do, lse2, delta, k_ptrs, v_ptrs, k_desc, v_desc, bias_ptr, stride_kn, stride_vn,
                stride_bm, stride_bn, offs_m, offs_n, mask_d, mask_dv, stage_begin, stage_end, seqlen_q, seqlen_k,
                window_left, window_right, qk_scale, softcap_scale, softcap_log2,
                slope, seed, offset, batch_head, dropout_threshold, dropout_scale,
                BLOCK_N, stage != INTERIOR, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, BIAS_KIND, HAS_ALIBI, HAS_DROPOUT,
                BLOCK_D != HEAD_DIM, BLOCK_DV != HEAD_DIM_V, DOT_DTYPE, INTERPRETED_BFLOAT16, USE_TMA,
                PARTITION_WARPS)

        dq = round_to_dtype(dq * softmax_scale, DOT_DTYPE, INTERPRETED_BFLOAT16)
        if USE_TMA:
            matrix_descriptor(dq_head, seqlen_q, stride_dqm, HEAD_DIM, BLOCK_M, BLOCK_D).store([start_m, 0], dq)
        else:
            tl.store(tile_pointers(dq_head, rows, offs_d[None, :], stride_dqm), dq,
                     mask=row_mask[:, None] & mask_d[None, :])


@triton.jit(do_not_specialize=configs.RUNTIME_SIZES + ["batch", "bias_batch", "bias_heads"])
def _attn_bwd_dbias_kernel(
    Q, K, V, Bias, Sinks, Alibi, Rng, DOut, LSE, Delta, DBias,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_ab, stride_ah,
    stride_dob, stride_doh, stride_dom,
    stride_dbb, stride_dbh, stride_dbm, stride_dbn,
    num_heads_q, group_size, seqlen_q, seqlen_k, window_left, window_right,
    softmax_scale, qk_scale, softcap_scale, softcap_log2, dropout_threshold, dropout_scale,
    batch, bias_batch, bias_heads,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BIAS_KIND: tl.constexpr,
    HAS_SINKS: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    ACC_DTYPE: tl.constexpr, INTERPRETED_BFLOAT16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ROWS_BROADCAST: tl.constexpr, COLS_BROADCAST: tl.constexpr,
):
    """The gradient of a float bias: ``dBias = dS`` (``P * (dP - delta)``, with respect to the final scores)
    summed over the dims the bias is broadcast along.

    ``DBias`` is float32 with the bias's own sizes, ``(bias_batch, bias_heads, 1 or Sq, 1 or Sk)``, where
    ``bias_batch`` is 1 or B and ``bias_heads`` 1 or Hq (``ROWS_BROADCAST`` / ``COLS_BROADCAST`` for the last
    two). One program per ``BLOCK_M x BLOCK_N`` tile of it (``1 x BLOCK_N``, ``BLOCK_M x 1`` or ``1 x 1`` along
    broadcast rows / columns): it walks, in a fixed order, every (batch, head, query block, key block) that
    reads its entries, recomputing P and dP there, and sums their dS in registers before one store. Nothing
    is added atomically and nothing of size Sq x Sk is written beyond the bias's own size, so the gradient is
    deterministic. Key blocks outside the causal / sliding-window band are skipped (their dS is 0).
    """
    DOT_DTYPE: tl.constexpr = Q.dtype.element_ty
    seed, offset = dropout_state(Rng, HAS_DROPOUT)
    num_m = 1 if ROWS_BROADCAST else tl.cdiv(seqlen_q, BLOCK_M)
    num_n = 1 if COLS_BROADCAST else tl.cdiv(seqlen_k, BLOCK_N)
    pid = tl.program_id(0)
    block_n = pid % num_n
    block_m = (pid // num_n) % num_m
    bias_unit = pid // (num_n * num_m)
    bias_head = bias_unit % bias_heads
    bias_b = bias_unit // bias_heads
    # The (batch, head) pairs that read this tile of the bias, and its query and key spans.
    batch_begin = tl.where(bias_batch == 1, 0, bias_b)
    batch_end = tl.where(bias_batch == 1, batch, bias_b + 1)
    head_begin = tl.where(bias_heads == 1, 0, bias_head)
    head_end = tl.where(bias_heads == 1, num_heads_q, bias_head + 1)
    if ROWS_BROADCAST:
        rows_begin = 0
        rows_end = seqlen_q
    else:
        rows_begin = block_m * BLOCK_M
        rows_end = tl.minimum(rows_begin + BLOCK_M, seqlen_q)
    if COLS_BROADCAST:
        cols_begin = 0
        cols_end = seqlen_k
    else:
        cols_begin = block_n * BLOCK_N
        cols_end = tl.minimum(cols_begin + BLOCK_N, seqlen_k)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d, offs_dv, mask_d, mask_dv = head_dim_offsets(HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC_DTYPE)
    zero = pid * 0  # loop indices as tensors (the interpreter's range yields Python ints)
    for b in range(batch_begin, batch_end):
        b = zero + b
        for head in range(head_begin, head_end):
            head = zero + head
            head_kv = head // group_size
            batch_head = b * num_heads_q + head
            q_head = head_start(Q, b, head, stride_qb, stride_qh)
            do_head = head_start(DOut, b, head, stride_dob, stride_doh)
            k_head = head_start(K, b, head_kv, stride_kb, stride_kh)
            v_head = head_start(V, b, head_kv, stride_vb, stride_vh)
            bias_ptr = head_start(Bias, b, head, stride_bb, stride_bh)
            slope = alibi_slope(Alibi, b, head, stride_ab, stride_ah, HAS_ALIBI)
            row_stats = batch_head.to(tl.int64) * seqlen_q
            for start_m in range(rows_begin, rows_end, BLOCK_M):
                start_m = zero + start_m
                rows = start_m + offs_m
                row_mask = rows < seqlen_q
                q = tl.load(tile_pointers(q_head, rows[:, None], offs_d[None, :], stride_qm),
                            mask=row_mask[:, None] & mask_d[None, :], other=0.0)
                do = tl.load(tile_pointers(do_head, rows[:, None], offs_dv[None, :], stride_dom),
                             mask=row_mask[:, None] & mask_dv[None, :], other=0.0)
                q = dot_operand(q, DOT_DTYPE, INTERPRETED_BFLOAT16)
                do = dot_operand(do, DOT_DTYPE, INTERPRETED_BFLOAT16)
                lse2, delta = _load_row_stats(LSE + row_stats, Delta + row_stats, rows, row_mask, True)
                # (No ``_`` for the unused bounds: a name assigned again in the loop below must keep its type.)
                band = key_range(start_m, seqlen_q, seqlen_k, window_left, window_right, BLOCK_M, BLOCK_N,
                                 HAS_LEFT, HAS_RIGHT)
                band_begin, band_end = band[0], band[3]
                # Both starts are multiples of BLOCK_N, so the walk stays on this tile's key blocks.
                for start_n in range(tl.maximum(cols_begin, band_begin), tl.minimum(cols_end, band_end), BLOCK_N):
                    cols = start_n + offs_n
                    col_mask = cols < seqlen_k
                    k = tl.load(tile_pointers(k_head, cols[:, None], offs_d[None, :], stride_kn),
                                mask=col_mask[:, None] & mask_d[None, :], other=0.0)
                    v = tl.load(tile_pointers(v_head, cols[:, None], offs_dv[None, :], stride_vn),
                                mask=col_mask[:, None] & mask_dv[None, :], other=0.0)
                    k = dot_operand(k, DOT_DTYPE, INTERPRETED_BFLOAT16)
                    v = dot_operand(v, DOT_DTYPE, INTERPRETED_BFLOAT16)
                    scores, capped, keep = score_tile(
                        q, tl.trans(k), rows[:, None], cols[None, :], bias_ptr, stride_bm, stride_bn, seqlen_q,
                        seqlen_k, window_left, window_right, qk_scale, softcap_scale, softcap_log2, slope,
                        ACC_DTYPE, True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, BIAS_KIND, HAS_ALIBI)
                    p = tl.math.exp2(scores - lse2[:, None])
                    dp = tl.dot(do, tl.trans(v), input_precision="ieee", out_dtype=ACC_DTYPE)
                    if HAS_DROPOUT:
                        kept = dropout_keep(seed, offset, batch_head, rows[:, None], cols[None, :], dropout_threshold)
                        dp = tl.where(kept, dp * dropout_scale, 0.0)
                    # The bias is added after the softcap: its gradient is dS before the softcap's factor.
                    acc += tl.where(keep, p * (dp - delta[:, None]), 0.0)

    dbias = DBias + bias_b.to(tl.int64) * stride_dbb + bias_head.to(tl.int64) * stride_dbh
    out_rows = rows_begin + offs_m
    out_cols = cols_begin + offs_n
    if ROWS_BROADCAST and COLS_BROADCAST:
        tl.store(dbias, tl.sum(tl.sum(acc, axis=1), axis=0))
    elif ROWS_BROADCAST:
        tl.store(dbias + out_cols * stride_dbn, tl.sum(acc, axis=0), mask=out_cols < seqlen_k)
    elif COLS_BROADCAST:
        tl.store(dbias + out_rows * stride_dbm, tl.sum(acc, axis=1), mask=out_rows < seqlen_q)
    else:
        tl.store(dbias + out_rows[:, None] * stride_dbm + out_cols[None, :] * stride_dbn, acc,
                 mask=(out_rows[:, None] < seqlen_q) & (out_cols[None, :] < seqlen_k))


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
    dlse: torch.Tensor | None = None,
    bias_grad_shape: tuple[int, int, int, int] | None = None,
    packed: PackedBatch | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Launch the backward kernels.

    Args:
        dout: ``(B, Hq, Sq, Dv)`` gradient of the output, contiguous last dim, any other strides.
        q, k, v, out, lse: as saved by ``attention_forward``.
        options: the forward's options.
        dlse: ``(B, Hq, Sq)`` gradient of the (base-2) lse when a loss used it, else None.
        bias_grad_shape: for the gradient of a float bias, its sizes as 4 dims, each 1 (broadcast) or the
            full ``(B, Hq, Sq, Sk)`` size; None when the bias needs no gradient.
        packed: for a packed batch, its sequences (as for ``attention_forward``; no bias then).

    Returns:
        ``dq, dk, dv`` with the shapes, dtypes and memory layouts of ``q, k, v`` (for a packed batch, of the
        packed ``(T, H, D)`` tensors: ``torch.empty_like`` of them); ``dsinks`` float32 ``(Hq,)``
        (None without sinks); ``dbias`` float32 of ``bias_grad_shape`` (None without it).
    """
    batch, heads_q, seqlen_q, _ = q.shape
    heads_kv, seqlen_k, head_dim_v = k.shape[1], k.shape[2], v.shape[3]
    if packed is None:
        dq, dk, dv = gradients = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    else:
        gradients = tuple(torch.empty_like(PackedBatch.as_packed(t)) for t in (q, k, v))
        dq, dk, dv = (PackedBatch.as_batch(t) for t in gradients)
    has_sinks = options.sinks is not None
    # Nothing to sum over when there are no query rows (dsinks) or no scores (dbias): zeros, else the kernels
    # write every entry.
    dsinks = None
    if has_sinks and batch * heads_q * seqlen_q == 0:
        dsinks = torch.zeros(heads_q, dtype=torch.float32, device=q.device)
    dbias = None
    if bias_grad_shape is not None:
        allocate = torch.zeros if seqlen_q * seqlen_k * batch * heads_q == 0 else torch.empty
        dbias = allocate(bias_grad_shape, dtype=torch.float32, device=q.device)
    if batch * heads_q == 0:
        return *gradients, dsinks, dbias
    delta = torch.empty((batch, heads_q, seqlen_q), dtype=options.statistics_dtype(q), device=q.device)
    constexprs = {**options.constexprs(q, v), "VARLEN": packed is not None}
    sinks, alibi, rng, *alibi_strides = options.modifier_operands(q)
    sequences, packed_sizes = packed_operands(packed, q, k)
    num_seqs = None if packed is None else packed.num_seqs
    if seqlen_q > 0:
        block_m = configs.PREPROCESS_BLOCK_M
        blocks = configs.cdiv(seqlen_q, block_m) if packed is None else configs.packed_tiles(seqlen_q, num_seqs, block_m)
        # Each program's share of the sinks' gradient, added below in a fixed order (deterministic).
        dsinks_partial = torch.empty((batch, heads_q, blocks), dtype=torch.float32, device=q.device) if has_sinks \
            else delta
        _attn_bwd_preprocess_kernel[(blocks * batch * heads_q,)](
            out, dout, delta if dlse is None else dlse.contiguous(), lse, sinks, sequences[0], delta, dsinks_partial,
            batch_stride(out, packed), out.stride(1), out.stride(2),
            batch_stride(dout, packed), dout.stride(1), dout.stride(2),
            heads_q, seqlen_q, *packed_sizes[:2],
            HEAD_DIM_V=head_dim_v, BLOCK_DV=constexprs["BLOCK_DV"], BLOCK_M=block_m,
            ACC_DTYPE=constexprs["ACC_DTYPE"], HAS_DLSE=dlse is not None, HAS_SINKS=has_sinks,
            VARLEN=packed is not None,
        )
        if has_sinks:
            dsinks = dsinks_partial.sum(dim=(0, 2))

    bias, bias_strides = options.bias_operand(q)
    inputs, row_operands = (q, k, v, bias, sinks, alibi, rng), (dout, lse, delta)
    input_strides = (
        batch_stride(q, packed), q.stride(1), q.stride(2),
        batch_stride(k, packed), k.stride(1), k.stride(2),
        batch_stride(v, packed), v.stride(1), v.stride(2),
        *bias_strides, *alibi_strides,
        batch_stride(dout, packed), dout.stride(1), dout.stride(2),
    )
    runtime = options.runtime_arguments(q, k, packed)
    selection = options.selection_arguments(q, k, v, packed)
    device_index = selection[-1]
    if seqlen_k > 0:
        kernel, config, launch = configs.launch(
            "backward_dkdv", _attn_bwd_dkdv_kernel, _attn_bwd_dkdv_kernel_tuned, *selection)
        splits = 1
        if config is not None:
            key_blocks = (configs.cdiv(seqlen_k, config.block_n) if packed is None
                          else configs.packed_tiles(seqlen_k, num_seqs, config.block_n))
            splits = configs.gqa_head_splits(key_blocks * batch * heads_kv, heads_q // heads_kv, device_index)
        if splits > 1:
            # Each share of a group writes float32 partial sums; they are added in share order below.
            dk_out = torch.empty((splits, *dk.shape), dtype=torch.float32, device=q.device)
            dv_out = torch.empty((splits, *dv.shape), dtype=torch.float32, device=q.device)
            split_strides = (dk_out.stride(0), batch_stride(dk_out[0], packed), *dk_out.stride()[2:4],
                             dv_out.stride(0), batch_stride(dv_out[0], packed), *dv_out.stride()[2:4])
        else:
            dk_out, dv_out = dk, dv
            split_strides = (0, batch_stride(dk, packed), *dk.stride()[1:3],
                             0, batch_stride(dv, packed), *dv.stride()[1:3])
        grid, programs, launch = configs.grid_and_arguments(
            config, launch, seqlen_k, batch * heads_kv * splits, "BLOCK_N", (q, k, v, dout), device_index, num_seqs)
        for part in dkdv_parts(config):
            kernel[grid](
                *inputs, *sequences, *row_operands, dk_out, dv_out, *input_strides, *split_strides,
                *runtime, *programs, *packed_sizes, splits, **constexprs, **launch, **part,
                SPLIT_GROUPS=splits > 1,
            )
        if splits > 1:
            dk.copy_(dk_out.sum(0))
            dv.copy_(dv_out.sum(0))
    if seqlen_q > 0:
        kernel, config, launch = configs.launch(
            "backward_dq", _attn_bwd_dq_kernel, _attn_bwd_dq_kernel_tuned, *selection)
        grid, programs, launch = configs.grid_and_arguments(
            config, launch, seqlen_q, batch * heads_q, "BLOCK_M", (q, k, v, dout, dq), device_index, num_seqs)
        kernel[grid](
            *inputs, *sequences, *row_operands, dq, *input_strides,
            batch_stride(dq, packed), dq.stride(1), dq.stride(2),
            *runtime, *programs, *packed_sizes, **constexprs, **launch,
        )
    if dbias is not None and seqlen_q > 0 and seqlen_k > 0:
        constexprs.pop("VARLEN")  # a packed batch has no bias
        _launch_dbias(dbias, (*inputs, *row_operands), input_strides, runtime, constexprs, batch, heads_q, seqlen_q,
                      seqlen_k)
    return *gradients, dsinks, dbias


def _launch_dbias(dbias, operands, input_strides, runtime, constexprs, batch, heads_q, seqlen_q, seqlen_k):
    """``_attn_bwd_dbias_kernel`` into ``dbias`` (float32, the bias's 4-dim sizes, 1 along broadcast dims)."""
    bias_batch, bias_heads, bias_rows, bias_cols = dbias.shape
    rows_broadcast, cols_broadcast = bias_rows == 1 and seqlen_q > 1, bias_cols == 1 and seqlen_k > 1
    config = configs.dbias_config(constexprs["HEAD_DIM"], constexprs["HEAD_DIM_V"])
    blocks_m = 1 if rows_broadcast else configs.cdiv(seqlen_q, config.block_m)
    blocks_n = 1 if cols_broadcast else configs.cdiv(seqlen_k, config.block_n)
    # The bias's own stride along a broadcast dim of size 1 is irrelevant: its program writes index 0 there.
    _attn_bwd_dbias_kernel[(blocks_m * blocks_n * bias_batch * bias_heads,)](
        *operands, dbias, *input_strides, *dbias.stride(),
        *runtime[:-2], batch, bias_batch, bias_heads,  # without the length buckets, which only key tuning
        **constexprs, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        ROWS_BROADCAST=rows_broadcast, COLS_BROADCAST=cols_broadcast,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
