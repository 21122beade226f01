"""Plain PyTorch references: the full score matrix, materialised, with exactly the package's semantics.

These are the truth every test and ``flash-softmax verify`` compare the kernels against. They are slow
and memory hungry on purpose: nothing here is fused or tiled, so there is nothing to get wrong.
"""

from __future__ import annotations

import math

import torch

from flash_softmax._random import DROPOUT_BITS, dropout_rng_state, dropout_threshold

__all__ = ["attention", "attention_varlen", "attention_kvcache", "softmax", "log_softmax", "compute_dtype", "band_mask", "alibi_bias",
           "dropout_keep_mask", "philox"]

_MASK32 = 0xFFFFFFFF
# Philox-4x32's round multipliers and key increments (Salmon et al., "Parallel random numbers: as easy as
# 1, 2, 3", SC 2011), as Triton's tl.philox uses them.
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85


def compute_dtype(dtype: torch.dtype, upcast: bool) -> torch.dtype:
    """The dtype the reference computes in: float64 for float64, float32 when upcasting, else ``dtype``."""
    if dtype == torch.float64:
        return torch.float64
    return torch.float32 if upcast else dtype


def band_mask(
    seqlen_q: int,
    seqlen_k: int,
    causal: bool,
    window_size: tuple[int, int],
    device: torch.device | str,
) -> torch.Tensor | None:
    """Bool ``(Sq, Sk)`` keep-mask of the causal / sliding-window band, or None when nothing is masked.

    Both are aligned to the bottom-right corner: query ``i`` sees key ``j`` iff
    ``i + Sk - Sq - left <= j <= i + Sk - Sq + right`` (``-1`` meaning unbounded); causal is ``right = 0``
    (drawn in ``flash_softmax.flash_attention``'s docstring). The tests' oracle: the kernels never build it.
    """
    left, right = window_size
    if causal:
        right = 0
    if left < 0 and right < 0:
        return None
    rows = torch.arange(seqlen_q, device=device)[:, None] + (seqlen_k - seqlen_q)
    cols = torch.arange(seqlen_k, device=device)[None, :]
    keep = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if left >= 0:
        keep &= cols >= rows - left
    if right >= 0:
        keep &= cols <= rows + right
    return keep


def _mul_hi_lo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of ``a * b`` for a 32-bit constant ``a`` and int64 tensor ``b`` of 32-bit
    values, without int64 overflow: ``a`` is split into 16-bit halves."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    high_part, low_part = a_hi * b, a_lo * b  # each below 2**48
    hi = (high_part + (low_part >> 16)) >> 16
    lo = (((high_part & 0xFFFF) << 16) + low_part) & _MASK32
    return hi, lo


def philox(seed: int | torch.Tensor, c0, c1, c2, c3, rounds: int = 10) -> tuple[torch.Tensor, ...]:
    """Philox-4x32 with key ``seed`` (64 bits: low word first) on counters ``c0..c3`` (broadcastable int64
    tensors of 32-bit values); the four 32-bit output words as int64 tensors. Plain integer arithmetic, the
    oracle of the kernels' ``tl.philox``."""
    seed = int(seed)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    c0, c1, c2, c3 = torch.broadcast_tensors(*(torch.as_tensor(c).to(torch.int64) & _MASK32 for c in (c0, c1, c2, c3)))
    for _ in range(rounds):
        hi_b, lo_b = _mul_hi_lo(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _PHILOX_KEY_A) & _MASK32, (k1 + _PHILOX_KEY_B) & _MASK32
    return c0, c1, c2, c3


def dropout_keep_mask(
    rng_state: torch.Tensor, dropout_p: float, batch: int, heads: int, seqlen_q: int, seqlen_k: int, *,
    batch_index: int | None = None,
) -> torch.Tensor:
    """Bool ``(B, H, Sq, Sk)``: which probabilities dropout keeps for the ``(seed, offset)`` pair ``rng_state``
    (see ``flash_softmax._random``): element ``(b, h, i, j)`` is kept iff the top 31 bits of the first word
    of ``philox(seed, (j, i, b * H + h, offset))`` reach ``round(p * 2**31)``. Built on the CPU.

    With ``batch_index`` (an int in ``[0, B)``) only that batch's slice is built, ``(1, H, Sq, Sk)``, equal to
    ``dropout_keep_mask(...)[batch_index:batch_index + 1]``: what ``attention_varlen`` takes for one sequence
    of a packed batch, without building the mask of every sequence at the longest one's size.
    """
    seed, offset = (int(x) for x in rng_state.detach().cpu().tolist())
    cols = torch.arange(seqlen_k, dtype=torch.int64)[None, None, None, :]
    rows = torch.arange(seqlen_q, dtype=torch.int64)[None, None, :, None]
    if batch_index is None:
        heads_index = torch.arange(batch * heads, dtype=torch.int64).view(batch, heads, 1, 1)
    else:
        if isinstance(batch_index, bool) or not isinstance(batch_index, int) or not 0 <= batch_index < batch:
            raise ValueError(f"batch_index must be an int in [0, {batch}) (the batch size), got {batch_index!r}")
        first = batch_index * heads
        heads_index = torch.arange(first, first + heads, dtype=torch.int64).view(1, heads, 1, 1)
    word, _, _, _ = philox(seed, cols, rows, heads_index, offset)
    return (word >> (32 - DROPOUT_BITS)) >= dropout_threshold(dropout_p)


def alibi_bias(alibi_slopes: torch.Tensor, seqlen_q: int, seqlen_k: int, dtype: torch.dtype) -> torch.Tensor:
    """ALiBi's ``-slope * |i + Sk - Sq - j|`` as a ``(B or 1, Hq, Sq, Sk)`` tensor in ``dtype``, from slopes
    ``(Hq,)`` or ``(B, Hq)`` (FlashAttention 2's definition, aligned to the bottom-right corner)."""
    slopes = alibi_slopes.detach().to(dtype)
    slopes = slopes.view(1, -1) if slopes.dim() == 1 else slopes
    rows = torch.arange(seqlen_q, device=slopes.device)[:, None] + (seqlen_k - seqlen_q)
    cols = torch.arange(seqlen_k, device=slopes.device)[None, :]
    return -slopes[:, :, None, None] * (rows - cols).abs().to(dtype)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    attn_bias: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    return_lse: bool = False,
    upcast: bool = True,
    dropout_mask: torch.Tensor | None = None,
    rng_state: torch.Tensor | None = None,
):
    """Materialised attention with the semantics of ``flash_softmax.flash_attention``.

    Args:
        q: ``(B, Hq, Sq, D)``.
        k: ``(B, Hkv, Sk, D)``, ``Hq % Hkv == 0`` (grouped heads are repeated here, which the kernels never do).
        v: ``(B, Hkv, Sk, Dv)``.
        causal, softmax_scale, window_size, softcap, attn_bias, sinks, alibi_slopes, dropout_p: as in
            ``flash_attention``. Gradients reach a float ``attn_bias`` and ``sinks`` that require them.
        return_lse: also return the float32 ``(B, Hq, Sq)`` logsumexp of the final scores (with the sink).
        upcast: compute in float32 (float64 for float64 input) when True, in the input dtype when False.
        dropout_mask: with ``dropout_p > 0``, a bool keep-mask broadcastable to ``(B, Hq, Sq, Sk)`` to use
            instead of the generator's (tests recover the kernels' mask and pass it here).
        rng_state: with ``dropout_p > 0`` and no ``dropout_mask``, the ``(seed, offset)`` pair whose mask
            (``dropout_keep_mask``) to use; when None it is drawn as ``flash_attention`` draws it, so after
            the same ``torch.manual_seed`` both drop the same elements.

    Returns:
        ``out (B, Hq, Sq, Dv)`` in the input dtype, and ``lse`` when ``return_lse``. A row that sees no key
        gives output 0 and lse ``-inf`` (``sinks[h]`` with sinks); its gradients are 0.
    """
    dtype = compute_dtype(q.dtype, upcast)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    heads_q, heads_kv = q.shape[1], k.shape[1]
    qc, kc, vc = q.to(dtype), k.to(dtype), v.to(dtype)
    if heads_q != heads_kv:
        kc = kc.repeat_interleave(heads_q // heads_kv, dim=1)
        vc = vc.repeat_interleave(heads_q // heads_kv, dim=1)

    scores = torch.matmul(qc, kc.transpose(-1, -2)) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    if attn_bias is not None:
        if attn_bias.dtype == torch.bool:
            scores = scores.masked_fill(~attn_bias, float("-inf"))
        else:
            scores = scores + attn_bias.to(dtype)
    seqlen_q, seqlen_k = q.shape[-2], k.shape[-2]
    if alibi_slopes is not None:
        scores = scores + alibi_bias(alibi_slopes, seqlen_q, seqlen_k, dtype)
    keep = band_mask(seqlen_q, seqlen_k, causal, window_size, q.device)
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))

    hidden = torch.isneginf(scores)
    # The sink is one more logit in every row's softmax, of a key whose value is 0.
    logits = scores
    if sinks is not None:
        sink_column = sinks.to(dtype).view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        logits = torch.cat([scores, sink_column], dim=-1)
    # A row that sees no key (all -inf) would give logsumexp's backward exp(-inf - -inf) = NaN; its lse is
    # taken over zeros instead, then set to -inf, so its probabilities and gradients are exactly 0.
    empty_row = torch.isneginf(logits).all(dim=-1, keepdim=True)
    lse = torch.logsumexp(logits.masked_fill(empty_row, 0.0), dim=-1, keepdim=True)
    # exp(-inf - lse) is 0 for any lse, NaN included: a NaN row must not reach keys it does not see.
    probs = torch.exp(scores - lse).masked_fill(hidden, 0.0)
    if dropout_p > 0:
        if dropout_mask is None:
            if rng_state is None:
                rng_state = dropout_rng_state(q.device)
            dropout_mask = dropout_keep_mask(rng_state, dropout_p, *scores.shape).to(q.device)
        probs = probs.masked_fill(~dropout_mask, 0.0) / (1.0 - dropout_p)
    out = torch.matmul(probs, vc).to(q.dtype)
    if return_lse:
        return out, lse.masked_fill(empty_row, float("-inf")).squeeze(-1).float()
    return out


def _sequence_offsets(name: str, cu_seqlens: torch.Tensor, total: int, total_name: str) -> list[int]:
    """The offsets of ``cu_seqlens`` as Python ints, after checking that they describe a packed batch: a 1-d
    integer tensor of ``N + 1`` offsets that starts at 0, never decreases and ends at ``total``. (The reference
    reads the values; the kernels' checks cannot, since that would synchronise with the GPU.)"""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype not in (torch.int32, torch.int64):
        given = cu_seqlens.dtype if isinstance(cu_seqlens, torch.Tensor) else type(cu_seqlens).__name__
        raise TypeError(f"{name} must be an int32 or int64 tensor, got {given}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() == 0:
        raise ValueError(f"{name} must be 1-d with N + 1 >= 1 offsets, got shape {tuple(cu_seqlens.shape)}")
    offsets = [int(offset) for offset in cu_seqlens.detach().cpu().tolist()]
    if offsets[0] != 0 or offsets[-1] != total or any(b < a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"{name} must start at 0, never decrease and end at {total_name} = {total}, got {offsets}")
    return offsets


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    return_lse: bool = False,
    upcast: bool = True,
    rng_state: torch.Tensor | None = None,
):
    """Attention over sequences packed along dim 0, with the semantics of ``flash_softmax.flash_attention_varlen``:
    a loop over the sequences, each one a batch-1 call of :func:`attention`.

    Sequence ``n`` is query rows ``cu_seqlens_q[n]:cu_seqlens_q[n + 1]`` and key rows
    ``cu_seqlens_k[n]:cu_seqlens_k[n + 1]``; its queries see only its keys, with causal masks, windows and ALiBi
    aligned to the bottom-right corner of its own ``sq_n x sk_n`` score matrix. Sequences of length 0 (on
    either side) are allowed anywhere; a query row that sees no key gives 0 and lse ``-inf`` (the sink).

    Args:
        q: ``(Tq, Hq, D)``: the queries of all ``N`` sequences, one after another.
        k: ``(Tk, Hkv, D)``, ``Hq % Hkv == 0``.
        v: ``(Tk, Hkv, Dv)``.
        cu_seqlens_q, cu_seqlens_k: int32 or int64 ``(N + 1,)`` offsets, starting at 0, nondecreasing, ending
            at ``Tq`` / ``Tk``.
        causal, softmax_scale, window_size, softcap, sinks, dropout_p, return_lse, upcast: as in
            :func:`attention`; ``softmax_scale`` defaults to ``1 / sqrt(D)``. Gradients reach q, k, v and sinks.
        alibi_slopes: ``(Hq,)``, or ``(N, Hq)`` whose row ``n`` is sequence ``n``'s.
        rng_state: with ``dropout_p > 0``, dropout's ``(seed, offset)`` pair; when None it is drawn once, as
            ``flash_attention_varlen`` draws it. Element ``(h, i, j)`` of sequence ``n`` (``i``, ``j`` counted
            within the sequence) is dropped as element ``(n, h, i, j)`` of a batch of ``N`` in
            ``flash_attention``: ``dropout_keep_mask(rng_state, p, N, Hq, sq_n, sk_n, batch_index=n)``.

    Returns:
        ``out (Tq, Hq, Dv)`` in q's dtype, and with ``return_lse`` also ``lse (Hq, Tq)`` float32 (natural log).
    """
    total_q, heads_q = q.shape[0], q.shape[1]
    starts_q = _sequence_offsets("cu_seqlens_q", cu_seqlens_q, total_q, "Tq (q.shape[0])")
    starts_k = _sequence_offsets("cu_seqlens_k", cu_seqlens_k, k.shape[0], "Tk (k.shape[0])")
    sequences = len(starts_q) - 1
    if len(starts_k) != len(starts_q):
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must hold the same number of sequences, got "
                         f"{sequences} and {len(starts_k) - 1}")
    if alibi_slopes is not None and alibi_slopes.shape not in ((heads_q,), (sequences, heads_q)):
        raise ValueError(f"alibi_slopes must have shape (Hq,) = ({heads_q},) or (N, Hq) = ({sequences}, {heads_q}), "
                         f"got {tuple(alibi_slopes.shape)}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    if dropout_p > 0 and rng_state is None:
        rng_state = dropout_rng_state(q.device)  # once for the whole batch, as the kernel draws it

    outputs, lses = [], []
    for index in range(sequences):
        rows_q = slice(starts_q[index], starts_q[index + 1])
        rows_k = slice(starts_k[index], starts_k[index + 1])
        # (S, H, D) rows seen as a batch of one (1, H, S, D): a view, so gradients flow back into the packed rows.
        q_n, k_n, v_n = (tensor[rows].transpose(0, 1).unsqueeze(0) for tensor, rows in
                         ((q, rows_q), (k, rows_k), (v, rows_k)))
        slopes = None
        if alibi_slopes is not None:
            slopes = alibi_slopes if alibi_slopes.dim() == 1 else alibi_slopes[index]
        dropout_mask = None
        if dropout_p > 0:
            dropout_mask = dropout_keep_mask(rng_state, dropout_p, sequences, heads_q, q_n.shape[2], k_n.shape[2],
                                             batch_index=index).to(q.device)
        out_n, lse_n = attention(q_n, k_n, v_n, causal=causal, softmax_scale=scale, window_size=window_size,
                                 softcap=softcap, sinks=sinks, alibi_slopes=slopes, dropout_p=dropout_p,
                                 return_lse=True, upcast=upcast, dropout_mask=dropout_mask)
        outputs.append(out_n[0].transpose(0, 1))  # (sq_n, Hq, Dv)
        lses.append(lse_n[0])  # (Hq, sq_n)
    if not outputs:  # no sequence at all: Tq == Tk == 0
        outputs.append(q.new_zeros(0, heads_q, v.shape[-1]))
        lses.append(torch.zeros(heads_q, 0, dtype=torch.float32, device=q.device))
    out = torch.cat(outputs, dim=0)
    if return_lse:
        return out, torch.cat(lses, dim=1)
    return out


def _cache_lengths(cache_seqlens, batch: int, capacity: int, new_keys: int) -> list[int]:
    """``cache_seqlens`` (None, an int, or a ``(B,)`` integer tensor) as Python ints, each checked to leave room
    for the ``new_keys``. (The reference reads the values; the kernels cannot without synchronising.)"""
    if cache_seqlens is None:
        return [capacity - new_keys] * batch
    if isinstance(cache_seqlens, int):
        lengths = [cache_seqlens] * batch
    else:
        lengths = [int(n) for n in cache_seqlens.detach().cpu().tolist()]
    for index, length in enumerate(lengths):
        if not 0 <= length <= capacity - new_keys:
            raise ValueError(f"cache_seqlens[{index}] = {length} must be in [0, capacity - Sn] = [0, "
                             f"{capacity - new_keys}] (the cache holds {capacity} tokens, {new_keys} are appended)")
    return lengths


def attention_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    *,
    cache_seqlens: torch.Tensor | int | None = None,
    block_table: torch.Tensor | None = None,
    causal: bool = False,
    softmax_scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    return_lse: bool = False,
    upcast: bool = True,
):
    """Attention over a key/value cache, with the semantics of ``flash_softmax.flash_attention_with_kvcache``:
    the new ``k``, ``v`` written into the caches in place, then each sequence's ``L_b`` cached keys gathered
    (through ``block_table`` when paged) and attended by a batch-1 call of :func:`attention`.

    Args:
        q: ``(B, Hq, Sq, D)``.
        k_cache, v_cache: ``(B, Hkv, Smax, D / Dv)``, or with ``block_table (B, pages_per_seq)``
            ``(num_pages, Hkv, page_size, D / Dv)``: position ``p`` of sequence ``b`` is slot ``p % page_size``
            of page ``block_table[b, p // page_size]``.
        k, v: None or ``(B, Hkv, Sn, D / Dv)``, written at positions ``cache_seqlens[b] ...`` (modifies the caches).
        cache_seqlens: tokens cached before the call, an int or ``(B,)``; None means the whole capacity.
        causal, softmax_scale, window_size, softcap, sinks, alibi_slopes (``(Hq,)`` or ``(B, Hq)``), return_lse,
            upcast: as in :func:`attention`, aligned to the bottom-right of each ``Sq x L_b`` score matrix.

    Returns:
        ``out (B, Hq, Sq, Dv)`` in q's dtype, and with ``return_lse`` ``lse (B, Hq, Sq)`` float32 (natural log).
    """
    batch = q.shape[0]
    new_keys = 0 if k is None else k.shape[2]
    page_size = k_cache.shape[2]
    capacity = page_size if block_table is None else block_table.shape[1] * page_size
    lengths = _cache_lengths(cache_seqlens, batch, capacity, new_keys)
    pages = None if block_table is None else block_table.detach().cpu().tolist()

    def locate(index: int, position: int) -> tuple[int, int]:
        if pages is None:
            return index, position
        return pages[index][position // page_size], position % page_size

    outputs, lses = [], []
    for index in range(batch):
        for offset in range(new_keys):
            outer, slot = locate(index, lengths[index] + offset)
            k_cache[outer, :, slot] = k[index, :, offset]
            v_cache[outer, :, slot] = v[index, :, offset]
        places = [locate(index, position) for position in range(lengths[index] + new_keys)]
        outer = torch.tensor([p[0] for p in places], dtype=torch.long, device=k_cache.device)
        slot = torch.tensor([p[1] for p in places], dtype=torch.long, device=k_cache.device)
        keys = k_cache[outer, :, slot].transpose(0, 1).unsqueeze(0)  # (1, Hkv, L_b, D)
        values = v_cache[outer, :, slot].transpose(0, 1).unsqueeze(0)
        slopes = None
        if alibi_slopes is not None:
            slopes = alibi_slopes if alibi_slopes.dim() == 1 else alibi_slopes[index]
        out_b, lse_b = attention(q[index:index + 1], keys, values, causal=causal, softmax_scale=softmax_scale,
                                 window_size=window_size, softcap=softcap, sinks=sinks, alibi_slopes=slopes,
                                 return_lse=True, upcast=upcast)
        outputs.append(out_b)
        lses.append(lse_b)
    if not outputs:
        out = q.new_zeros(*q.shape[:3], v_cache.shape[-1])
        lse = torch.zeros(q.shape[:3], dtype=torch.float32, device=q.device)
    else:
        out, lse = torch.cat(outputs), torch.cat(lses)
    return (out, lse) if return_lse else out


def softmax(x: torch.Tensor, dim: int = -1, upcast: bool = True) -> torch.Tensor:
    """``torch.softmax`` computed in float32 (float64 for float64) when ``upcast``, returned in x's dtype."""
    return torch.softmax(x.to(compute_dtype(x.dtype, upcast)), dim=dim).to(x.dtype)


def log_softmax(x: torch.Tensor, dim: int = -1, upcast: bool = True) -> torch.Tensor:
    """``torch.log_softmax`` computed in float32 (float64 for float64) when ``upcast``, returned in x's dtype."""
    return torch.log_softmax(x.to(compute_dtype(x.dtype, upcast)), dim=dim).to(x.dtype)
