"""The public functional ``flash_attention_with_kvcache``: attention of new query rows over a key/value cache,
for decoding, speculative decoding and chunked prefill.

Calls go one way, as for ``flash_attention``: checks and defaults here -> the custom ops
``torch.ops.flash_softmax.kvcache_append`` (when new keys are given) and
``torch.ops.flash_softmax.attention_kvcache`` of ``ops.py`` -> the launchers of ``decode.py`` -> its Triton
kernels. Inference only: there is no backward.
"""

from __future__ import annotations

import torch

from flash_softmax import reference
from flash_softmax._backend import backend_for, backend_reason, record_fallback
from flash_softmax.attention.checks import check_inference_only, check_kvcache_inputs, resolve_score_options
from flash_softmax.attention.common import LN2
from flash_softmax.attention.ops import attention_kvcache_op, kvcache_append_op, last_dim_contiguous


def flash_attention_with_kvcache(
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
    num_splits: int = 0,
    return_lse: bool = False,
):
    """Attention over a key/value cache, read in place, optionally appending new keys and values to it first.

    Sequence ``b`` of the batch has ``L_b = cache_seqlens[b] + Sn`` keys: the ``cache_seqlens[b]`` already in
    its cache, then the ``Sn`` new ones of ``k`` / ``v``, which are written into the cache (in place) at
    positions ``cache_seqlens[b] ... cache_seqlens[b] + Sn - 1``. Its ``Sq`` queries are the last ``Sq``
    positions: with ``causal``, query ``i`` sees key ``j`` iff ``j <= i + L_b - Sq``. Decoding has ``Sq = Sn = 1``;
    speculative decoding and chunked prefill a few or many. Cache entries past ``L_b`` are never read, so
    sequences of different lengths share one batch. Say ``cache_seqlens = [3, 1]``, ``Sq = Sn = 2``, causal
    (``.`` cached, ``n`` new, ``-`` never read; ``1`` = seen)::

        cache b=0:  . . . n n -      query 0 sees  1 1 1 1 0        cache b=1:  . n n - - -   query 0: 1 1 0
                                     query 1 sees  1 1 1 1 1                                  query 1: 1 1 1

    Args:
        q: ``(B, Hq, Sq, D)`` float16, bfloat16 or float32, any strides with a contiguous last dim.
        k_cache: ``(B, Hkv, Smax, D)`` (the layout of Hugging Face's static cache), or with ``block_table`` a paged
            cache ``(num_pages, Hkv, page_size, D)``. Any strides with a contiguous last dim, so a
            ``(B, Smax, Hkv, D)`` or ``(num_pages, page_size, Hkv, D)`` cache passed as ``.transpose(1, 2)`` is
            read and written in place. ``Hq % Hkv == 0``: a group's query heads share each K/V load.
        v_cache: the same with ``Dv``.
        k, v: None, or ``(B, Hkv, Sn, D)`` / ``(B, Hkv, Sn, Dv)``: new keys and values to append (needs
            ``cache_seqlens``). The caches are modified in place; nothing else in them is written.
        cache_seqlens: int32 (int64 accepted) ``(B,)`` on q's device, or an int for every sequence: the tokens
            already cached. None means the caches are full (``L_b`` = the capacity: ``Smax``, or
            ``pages_per_seq * page_size``). A tensor's values are not checked on the device (that would
            synchronise): ``cache_seqlens[b] + Sn`` must not exceed the capacity. Positions past it are never
            written or read, so memory stays safe, but such a sequence attends a truncated cache.
        block_table: int32 (int64 accepted) ``(B, pages_per_seq)``: position ``p`` of sequence ``b`` is slot
            ``p % page_size`` of page ``block_table[b, p // page_size]``. Any page size; pages in any order.
            Only the pages covering ``L_b`` positions are read.
        causal, window_size, softcap, softmax_scale, sinks: as in ``flash_attention``, bottom-right aligned to
            each sequence's ``Sq x L_b`` scores.
        alibi_slopes: ``(Hq,)`` or ``(B, Hq)`` float32: ``-slope * |i + L_b - Sq - j|`` is added to the scores.
        num_splits: how many chunks each sequence's keys are cut into, each attended by its own programs and
            merged through their logsumexps (split-KV, "flash-decoding"), so that a small batch fills the
            GPU. 0 chooses from the batch, heads, cache capacity and the device's SM count; 1 never splits.
            Results agree for every value up to float32 rounding.
        return_lse: also return the logsumexp.

    Returns:
        ``out (B, Hq, Sq, Dv)`` in q's dtype, laid out in memory like q; with ``return_lse`` also
        ``lse (B, Hq, Sq)`` float32, natural log. A query that sees no key gives 0 and lse -inf (the sink).

    Inference only: a q that requires grad with grad mode on is an error. No host synchronisation and no
    allocation that depends on values, so a decode step can be captured in a CUDA graph; the ops compile
    with ``torch.compile(fullgraph=True)``. CPU tensors run the kernels in Triton's interpreter under
    ``TRITON_INTERPRET=1``, and otherwise ``flash_softmax.reference.attention_kvcache`` (with a
    ``FallbackWarning``).
    """
    capacity = check_kvcache_inputs(q, k_cache, v_cache, k, v, cache_seqlens, block_table, num_splits)
    check_inference_only(q, "flash_attention_with_kvcache")
    scale, left, right, softcap, alibi_slopes, _ = resolve_score_options(
        q, causal, return_lse, softmax_scale, window_size, softcap, sinks, alibi_slopes, 0.0)
    new_keys = 0 if k is None else k.shape[2]
    if backend_for(q.device) == "torch":
        record_fallback("attention_kvcache", backend_reason(q.device))
        out, lse = reference.attention_kvcache(
            q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, block_table=block_table, softmax_scale=scale,
            window_size=(left, right), softcap=softcap, sinks=sinks, alibi_slopes=alibi_slopes, return_lse=True)
        return (out, lse) if return_lse else out
    # An int length is passed as a scalar (the kernels read no tensor for it); None is the whole capacity. The
    # kernels read the lengths and a block table row with unit stride: an expanded (stride-0) tensor is copied,
    # which costs an allocation of shape-only size.
    tensor_lengths = cache_seqlens.contiguous() if isinstance(cache_seqlens, torch.Tensor) else None
    if block_table is not None and block_table.stride(-1) != 1:
        block_table = block_table.contiguous()
    cache_length = 0 if tensor_lengths is not None else (capacity - new_keys if cache_seqlens is None
                                                         else int(cache_seqlens))
    if k is not None and new_keys:
        kvcache_append_op(k_cache, v_cache, last_dim_contiguous(k), last_dim_contiguous(v), tensor_lengths,
                          block_table, cache_length)
    out, lse = attention_kvcache_op(
        last_dim_contiguous(q), k_cache, v_cache, tensor_lengths, block_table, sinks, alibi_slopes, cache_length,
        new_keys, scale, left, right, softcap, num_splits)
    if return_lse:
        return out, lse * LN2  # the kernels keep lse in base 2, as their scores are
    return out
