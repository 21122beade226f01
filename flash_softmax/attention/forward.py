"""Attention forward: a tiled online softmax that never materialises the Sq x Sk score matrix.

One program owns BLOCK_M query rows of one (batch, query head). It loads its Q tile once, walks the
K/V tiles of the matching key/value head, and keeps per row the running max ``m`` and running sum ``l``
of ``exp2(s - m)`` (scores in base 2: log2(e) is folded into the scale) next to a float32 accumulator
that is rescaled whenever the max grows. At the end it writes ``O = acc / l`` and the base-2
``lse = m + log2 l`` that the backward uses to recompute P (the public functions convert it to the natural
log).

Key blocks outside the causal / sliding-window band are never visited; blocks wholly inside it skip
the mask; only blocks that cross its edges or the end of the sequence pay for it.

The same kernel serves packed batches (``VARLEN``, ``flash_attention_varlen``): a sequence takes the place of
a batch entry, with its own lengths, and each program finds its sequence and block itself
(``common.packed_tile``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flash_softmax._triton_helpers import dot_operand, round_to_dtype
from flash_softmax.attention import configs, decode
from flash_softmax.attention.common import (
    INTERIOR,
    LOG2E_CONSTEXPR,
    LEFT_EDGE,
    RIGHT_EDGE,
    alibi_slope,
    dropout_keep,
    dropout_state,
    finish_rows,
    head_dim_offsets,
    head_start,
    key_range,
    load_tile,
    matrix_descriptor,
    merge_sink,
    online_softmax_step,
    program_work,
    query_tile,
    score_tile,
    stage_bounds,
    tile_pointers,
)
from flash_softmax.attention.layout import empty_in_layout_of
from flash_softmax.attention.options import KernelOptions, PackedBatch, batch_stride, packed_operands


@triton.jit
def _attn_fwd_inner(
    acc, m_i, l_i, q,
    k_ptrs, v_ptrs, k_desc, v_desc, bias_ptr, stride_kn, stride_vn, stride_bm, stride_bn,
    offs_m, offs_n, mask_d, mask_dv,
    start_n, end_n, seqlen_q, seqlen_k, window_left, window_right,
    qk_scale, softcap_scale, softcap_log2, slope, seed, offset, batch_head, dropout_threshold,
    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, BIAS_KIND: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    PAD_D: tl.constexpr, PAD_DV: tl.constexpr, DOT_DTYPE: tl.constexpr, INTERPRETED_BFLOAT16: tl.constexpr,
    USE_TMA: tl.constexpr, PARTITION_WARPS: tl.constexpr,
):
    """Fold keys ``[start_n, end_n)`` into ``(acc, m_i, l_i)``; ``MASKED`` blocks apply bounds and the band.
    With ``HAS_DROPOUT`` the dropped probabilities leave ``acc`` but not ``l_i``: the normaliser (and lse)
    is that of the undropped softmax, and the ``1 / (1 - p)`` rescale is applied once, at the end.

    K/V tiles come from pointer tiles (``k_ptrs``: ``BLOCK_D x BLOCK_N``, ``v_ptrs``: ``BLOCK_N x BLOCK_DV``,
    at key 0) or, with ``USE_TMA``, from tensor descriptors, which fill rows past the end with zeros.
    """
    k_ptrs += start_n.to(tl.int64) * stride_kn
    v_ptrs += start_n.to(tl.int64) * stride_vn
    for block_start in tl.range(start_n, end_n, BLOCK_N, warp_specialize=PARTITION_WARPS):
        cols = block_start + offs_n
        if USE_TMA:
            k = tl.trans(k_desc.load([block_start, 0]))
            v = v_desc.load([block_start, 0])
        elif MASKED:
            k = tl.load(k_ptrs, mask=(cols[None, :] < seqlen_k) & mask_d[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=(cols[:, None] < seqlen_k) & mask_dv[None, :], other=0.0)
        else:
            k = load_tile(k_ptrs, mask_d[:, None], PAD_D)
            v = load_tile(v_ptrs, mask_dv[None, :], PAD_DV)
        k = dot_operand(k, DOT_DTYPE, INTERPRETED_BFLOAT16)
        scores, _, _ = score_tile(
            q, k, offs_m[:, None], cols[None, :], bias_ptr, stride_bm, stride_bn,
            seqlen_q, seqlen_k, window_left, window_right, qk_scale, softcap_scale, softcap_log2, slope,
            acc.dtype, MASKED, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, BIAS_KIND, HAS_ALIBI)
        p, acc, m_new, l_i = online_softmax_step(scores, m_i, l_i, acc)
        if HAS_DROPOUT:
            p = tl.where(dropout_keep(seed, offset, batch_head, offs_m[:, None], cols[None, :], dropout_threshold),
                         p, 0.0)
        acc = tl.dot(dot_operand(p, DOT_DTYPE, INTERPRETED_BFLOAT16), dot_operand(v, DOT_DTYPE, INTERPRETED_BFLOAT16),
                     acc, input_precision="ieee", out_dtype=acc.dtype)
        m_i = m_new
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
    return acc, m_i, l_i


@triton.jit(do_not_specialize=configs.RUNTIME_SIZES)
def _attn_fwd_kernel(
    Q, K, V, Bias, Sinks, Alibi, Rng, CuSeqlensQ, CuSeqlensK, Out, LSE,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_ab, stride_ah,
    stride_ob, stride_oh, stride_om,
    num_heads_q, group_size, seqlen_q, seqlen_k, window_left, window_right,
    softmax_scale, qk_scale, softcap_scale, softcap_log2, dropout_threshold, dropout_scale,
    SEQLEN_Q_BUCKET, SEQLEN_K_BUCKET, batch_heads, num_programs, num_seqs, total_q, total_k,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BIAS_KIND: tl.constexpr,
    HAS_SINKS: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    ACC_DTYPE: tl.constexpr, INTERPRETED_BFLOAT16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_TMA: tl.constexpr, PARTITION_WARPS: tl.constexpr, PERSISTENT: tl.constexpr, VARLEN: tl.constexpr,
):
    """Output rows ``[block_m * BLOCK_M, (block_m + 1) * BLOCK_M)`` of one (batch, query head) per tile.

    Grid ``(cdiv(Sq, BLOCK_M) * B * Hq,)``, one tile per program, or with ``PERSISTENT`` ``(num_programs,)``,
    each program then walking tiles ``pid, pid + num_programs, ...`` heaviest first (``batch_heads = B * Hq``).
    Last dims of Q/K/V/Out are contiguous; every other stride is passed, and the bias's broadcast dims have
    stride 0. ``Sinks (Hq,)``, ``Alibi`` (slopes, batch stride ``stride_ab``, 0 when shared) and ``Rng`` (dropout's
    int64 ``(seed, offset)``) are read only under their switches.

    ``VARLEN``: a packed batch of ``num_seqs`` sequences, the rows of sequence ``n`` being
    ``CuSeqlensQ[n]:CuSeqlensQ[n + 1]`` of Q/Out (``total_q`` in all) and ``CuSeqlensK[n]:CuSeqlensK[n + 1]``
    of K/V. The grid is ``packed_tile_count(total_q, num_seqs, BLOCK_M) * Hq`` (``packed_tile``), the batch
    strides are the row strides, ``seqlen_q`` / ``seqlen_k`` become each sequence's own, and lse is
    ``(Hq, total_q)``; ``Alibi``'s batch index and dropout's are the sequence's."""
    DOT_DTYPE: tl.constexpr = Q.dtype.element_ty
    seed, offset = dropout_state(Rng, HAS_DROPOUT)
    first, stop, step, seqlen_q, seqlen_k, packed, found = program_work(
        CuSeqlensQ, CuSeqlensK, num_seqs, total_q, seqlen_q, seqlen_k, tl.cdiv(seqlen_q, BLOCK_M), batch_heads,
        num_programs, PERSISTENT, VARLEN, False, BLOCK_M)
    if VARLEN:
        if found == 0:  # past the packed grid's last tile
            return
    for tile in range(first, stop, step):
        batch_head, batch, head, head_kv, start_m, offs_m, q_index, k_index, stats_start = query_tile(
            tile, seqlen_q, batch_heads, num_heads_q, group_size, total_q, packed, PERSISTENT, VARLEN, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d, offs_dv, mask_d, mask_dv = head_dim_offsets(HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV)

        q_head = head_start(Q, q_index, head, stride_qb, stride_qh)
        k_head = head_start(K, k_index, head_kv, stride_kb, stride_kh)
        v_head = head_start(V, k_index, head_kv, stride_vb, stride_vh)
        o_head = head_start(Out, q_index, head, stride_ob, stride_oh)
        k_ptrs = tile_pointers(k_head, offs_n[None, :], offs_d[:, None], stride_kn)
        v_ptrs = tile_pointers(v_head, offs_n[:, None], offs_dv[None, :], stride_vn)
        bias_ptr = head_start(Bias, batch, head, stride_bb, stride_bh)
        slope = alibi_slope(Alibi, batch, head, stride_ab, stride_ah, HAS_ALIBI)
        if USE_TMA:
            q_desc = matrix_descriptor(q_head, seqlen_q, stride_qm, HEAD_DIM, BLOCK_M, BLOCK_D)
            k_desc = matrix_descriptor(k_head, seqlen_k, stride_kn, HEAD_DIM, BLOCK_N, BLOCK_D)
            v_desc = matrix_descriptor(v_head, seqlen_k, stride_vn, HEAD_DIM_V, BLOCK_N, BLOCK_DV)
            q = q_desc.load([start_m, 0])
        else:
            k_desc = K
            v_desc = V
            q_ptrs = tile_pointers(q_head, offs_m[:, None], offs_d[None, :], stride_qm)
            q = tl.load(q_ptrs, mask=(offs_m[:, None] < seqlen_q) & mask_d[None, :], other=0.0)
        q = dot_operand(q, DOT_DTYPE, INTERPRETED_BFLOAT16)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC_DTYPE)
        l_i = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=ACC_DTYPE)

        keys = key_range(start_m, seqlen_q, seqlen_k, window_left, window_right, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
        for stage in tl.static_range(LEFT_EDGE, RIGHT_EDGE + 1):
            stage_begin, stage_end = stage_bounds(keys, stage)
            acc, m_i, l_i = _attn_fwd_inner(
                acc, m_i, l_i, q, k_ptrs, v_ptrs, k_desc, v_desc, bias_ptr, stride_kn, stride_vn, stride_bm, stride_bn,
                offs_m, offs_n, mask_d, mask_dv, stage_begin, stage_end, seqlen_q, seqlen_k,
                window_left, window_right, qk_scale, softcap_scale, softcap_log2,
                slope, seed, offset, batch_head, dropout_threshold,
                BLOCK_N, stage != INTERIOR, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, BIAS_KIND, HAS_ALIBI, HAS_DROPOUT,
                BLOCK_D != HEAD_DIM, BLOCK_DV != HEAD_DIM_V, DOT_DTYPE, INTERPRETED_BFLOAT16, USE_TMA,
                PARTITION_WARPS)

        if HAS_SINKS:
            sink = tl.load(Sinks + head).to(ACC_DTYPE) * LOG2E_CONSTEXPR
            acc, m_i, l_i = merge_sink(acc, m_i, l_i, sink)
        # Base 2, as the scores are: backward recomputes exp2(s - lse) from the same float32 values, with no
        # ln 2 round trip (the API converts to the natural log once).
        out, lse = finish_rows(acc, m_i, l_i)
        if HAS_DROPOUT:
            out = out * dropout_scale
        out = round_to_dtype(out, DOT_DTYPE, INTERPRETED_BFLOAT16)

        row_ok = offs_m < seqlen_q
        if USE_TMA:
            matrix_descriptor(o_head, seqlen_q, stride_om, HEAD_DIM_V, BLOCK_M, BLOCK_DV).store([start_m, 0], out)
        else:
            tl.store(tile_pointers(o_head, offs_m[:, None], offs_dv[None, :], stride_om), out,
                     mask=row_ok[:, None] & mask_dv[None, :])
        tl.store(LSE + stats_start + offs_m, lse, mask=row_ok)


_attn_fwd_kernel_tuned = configs.autotune("forward", _attn_fwd_kernel)


def attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: KernelOptions, packed: PackedBatch | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel.

    Args:
        q: ``(B, Hq, Sq, D)``, k: ``(B, Hkv, Sk, D)``, v: ``(B, Hkv, Sk, Dv)``, all with a contiguous last dim.
        options: scale, band, softcap, bias, sinks, ALiBi and dropout, already validated.
        packed: for a packed batch, its sequences; q, k, v are then the packed ``(T, H, D)`` tensors as
            ``(1, H, T, D)`` views.

    Returns:
        ``out (B, Hq, Sq, Dv)`` in q's dtype, and ``lse (B, Hq, Sq)`` float32 (base 2, -inf for a row
        that sees no key); for a packed batch ``out (T, Hq, Dv)`` contiguous and ``lse (Hq, T)``.

    Decode shapes (a few query rows over many keys, ``decode.takes_decode_path``) run the decode kernels,
    which share each K/V tile among a group's query heads and split the keys to fill the GPU; they return
    the same ``out`` and ``lse``, so the backward is the same.
    """
    if packed is None and decode.takes_decode_path(q, k, options):
        return decode.attention_decode(q, k, v, options, cache_length=k.shape[2])
    batch, heads_q, seqlen_q, _ = q.shape
    statistics_dtype = options.statistics_dtype(q)
    if packed is None:
        out = empty_in_layout_of(q, (batch, heads_q, seqlen_q, v.shape[3]), q.dtype)  # q's (B, H, S) order
        lse = torch.empty((batch, heads_q, seqlen_q), dtype=statistics_dtype, device=q.device)
        results = out, lse
    else:
        results = (torch.empty((seqlen_q, heads_q, v.shape[3]), dtype=q.dtype, device=q.device),
                   torch.empty((heads_q, seqlen_q), dtype=statistics_dtype, device=q.device))
        out, lse = PackedBatch.as_batch(results[0]), results[1].unsqueeze(0)
    if out.numel() == 0:
        return results

    bias, bias_strides = options.bias_operand(q)
    selection = options.selection_arguments(q, k, v, packed)
    kernel, config, launch = configs.launch("forward", _attn_fwd_kernel, _attn_fwd_kernel_tuned, *selection,
                                            modified=options.modified)
    sequences, packed_sizes = packed_operands(packed, q, k)
    grid, programs, launch = configs.grid_and_arguments(
        config, launch, seqlen_q, batch * heads_q, "BLOCK_M", (q, k, v, out), selection[-1],
        None if packed is None else packed.num_seqs)
    sinks, alibi, rng, *alibi_strides = options.modifier_operands(q)
    kernel[grid](
        q, k, v, bias, sinks, alibi, rng, *sequences, out, lse,
        batch_stride(q, packed), q.stride(1), q.stride(2),
        batch_stride(k, packed), k.stride(1), k.stride(2),
        batch_stride(v, packed), v.stride(1), v.stride(2),
        *bias_strides, *alibi_strides,
        batch_stride(out, packed), out.stride(1), out.stride(2),
        *options.runtime_arguments(q, k, packed), *programs, *packed_sizes,
        **options.constexprs(q, v), **launch, VARLEN=packed is not None,
    )
    return results
