"""Hugging Face transformers integration: ``attn_implementation="fs_attention"``.

>>> from flash_softmax.integrations.transformers import register
>>> name = register()                                   # "fs_attention"
>>> model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=name)

``register()`` adds two functions to transformers' global registries under one name:

- ``fs_attention_mask`` (``AttentionMaskInterface``), called once per forward and mask type by
  ``create_causal_mask`` and friends. It recognises the patterns transformers composes (causal, sliding
  window, bidirectional, bidirectional window, and those over sequences packed by ``position_ids``) and,
  wherever the mask is exactly "a causal band or window inside each sequence" with the queries aligned to
  the bottom-right corner of the keys, returns no ``(B, 1, Sq, Sk)`` mask:

  - ``None`` when it is the kernel's own pattern: no padding, no window that hides a key, and causal
    queries at the bottom-right corner of the keys (``q_offset - kv_offset == kv_length - q_length``: prefill,
    decoding with a dynamic cache, chunked prefill on one), or full attention;
  - otherwise, when the pattern is recognised, a compact 2D bool mask ``(B, kv_length)`` (True = real key,
    as transformers' ``flash_attention_mask`` returns) that stands for a record of what it means: the band
    (causal, window), the rows' padding turned into ``cu_seqlens`` (read once per forward, one host sync),
    or the packed sequences;
  - for one causal query row over a cache that the above leaves dense (decoding on a static cache: a tensor
    ``q_offset``, empty slots after the query, or a compileable cache, for which transformers allows no skip
    at ``Sq = 1``), transformers' own keep-mask ``(B, 1, 1, Sk)``, made by tensor ops, with a record of the
    cache's valid lengths ``L_b = q_offset - kv_offset + 1`` (int32 ``(B,)`` on the device, ``q_offset`` never
    read on the host). Its values are exact, so a caller that builds on it, or a reader that lost the
    record, gets transformers' mask; padding that hides a key the query sees leaves it dense;
  - transformers' own bool keep-mask ``(B, 1, Sq, Sk)`` (True = attend) only for what is not "sequences and a
    band": custom overlays (``or_mask_function`` / ``and_mask_function``, blockwise groups, chunked
    attention), a caller that asks for a materialised mask to build on (``allow_is_causal_skip=False`` /
    ``allow_is_bidirectional_skip=False`` with a plain pattern and more than one query), static caches
    outside decoding (a prefill or chunk of several queries into empty slots: a compact mask of the real
    keys could not carry where the queries sit, so a copy of it, or generate handing it to a compiled
    forward, would be misread) and padded batches on them, a band whose queries are not at the bottom-right
    corner of the keys, and anything while tracing or exporting (the record needs to read values).
- ``fs_attention_forward`` (``AttentionInterface``), called by every attention layer. It runs one of:

  - ``fs.flash_attention_with_kvcache`` for a decoding step's record: the layer's static cache read in place
    (transformers has written the step's keys already), row ``b`` over its first ``L_b`` slots, causal and the
    window bottom-right aligned; the slots after them are never read. A full-attention layer has
    ``L_b = cache_position + 1``; a sliding-window layer's cache (``StaticSlidingWindowLayer``) holds at most
    the window, rolled once full, so ``L_b = min(cache_position + 1, window)`` and the window hides nothing.
    Where the kernel cannot serve (grad mode with inputs that require grad, dropout in training,
    ``position_bias``, ``cu_seq_lens``) and while tracing (the mask is read then, so no step's lengths are
    baked into a graph), the mask is read by ``fs.flash_attention``: exact, slower;
  - ``fs.flash_attention_varlen`` on the batch flattened to ``(B * S, H, D)`` rows, causal block skipping
    and windows kept per sequence, for
    - padding, where each row's real tokens are one run (left and/or right padding) and the queries are
      all the keys (no cache: training, prefill) or the keys and values flatten in place: each row's real
      tokens are one sequence (with a band, its real queries are the real tokens among the last ``Sq``
      key positions), the padding lies in sequences without keys (their queries give 0) or without
      queries. Without a band (full attention) every query of a row, padded ones too, attends the row's
      real keys, as in eager attention;
    - packed sequences: ``cu_seq_lens_q`` / ``cu_seq_lens_k`` (with ``max_length_q`` / ``max_length_k`` as
      the bounds of their lengths), the sequences transformers found in ``position_ids``, or
      ``position_ids`` that restart inside a row of a layer without padding (FlashAttention's convention;
      a position that is not its predecessor's + 1 starts a sequence, as in transformers' packed masks);
  - ``fs.flash_attention`` with its own causal band and window and no mask, or with the padding as a
    ``(B, 1, 1, Sk)`` key mask read with stride 0: where the keys are a cache longer than the queries
    (decoding, chunked prefill: flattening would copy the whole cache in every layer and step) and where
    a row has holes;
  - ``fs.flash_attention`` with transformers' ``(B, 1, Sq, Sk)`` mask where the mask function returned it,
    and where a keyword varlen cannot take meets a padded or packed layout: ``position_bias`` (T5), or
    ``cu_seq_lens`` together with padding. That mask is then built from the record (``sdpa_mask``), once
    per forward.

The name must not contain "flash": transformers routes every such name to its own FlashAttention family.

Every keyword an attention layer passes is honoured, known to leave the scores alone, or refused; none is
dropped unread (``transformers`` models grow new ones, and a dropped one gives wrong logits without an
error). The three sets are ``HONOURED_KEYWORDS``, ``HARMLESS_KEYWORDS`` and ``REFUSED_KEYWORDS``:

- honoured: ``scaling``; ``dropout`` (in the kernel, when ``module.training``); ``sliding_window``;
  ``softcap``; ``is_causal``; ``s_aux`` (gpt-oss's per-head sinks ``(Hq,)``, the kernel's ``sinks``, with
  their gradient); ``sinks`` (a per-query sink logit broadcastable to ``(B, Hq, Sq, 1)``, as Inkling 2's,
  applied to the output through the kernel's lse); ``position_bias`` (T5-style relative bias added to the
  scaled scores, combined with the mask; its gradient flows); ``cu_seq_lens_q`` / ``cu_seq_lens_k``
  (sequences packed into one row, run through varlen) with ``max_length_q`` / ``max_length_k`` (their
  bounds); ``position_ids`` (positions that restart inside a row of a layer without padding are packed
  sequences).
  Where ``fs_attention_mask`` recorded the band, the record wins over ``is_causal`` and ``sliding_window``:
  it is the mask transformers' eager attention would apply.
- harmless (accepted, unread): cache objects and cache bookkeeping, rotary ``position_embeddings`` (already
  applied to q and k), output switches (``output_attentions=True`` warns: weights are never materialised),
  FlashAttention's ``deterministic``, and the other model inputs that ``**kwargs`` carries down to the
  layers.
- refused: ``indices`` and ``block_indices`` (sparse key selections that models fold into the mask only for
  ``eager`` and ``sdpa``) and ``head_mask`` / ``layer_head_mask`` when not None, ``position_bias`` together
  with ``softcap`` (no model defines their order), and every keyword in none of the sets: ``ValueError``
  naming it, saying what is supported and to use ``attn_implementation="eager"`` for that model.
"""

from __future__ import annotations

import functools
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.weak import WeakIdKeyDictionary

try:
    from transformers import AttentionInterface
    from transformers import masking_utils
    from transformers.masking_utils import (
        AttentionMaskInterface,
        causal_mask_function,
        prepare_padding_mask,
        sdpa_mask,
    )
    from transformers.utils.import_utils import is_torchdynamo_exporting, is_tracing
except ImportError as error:  # transformers is an optional dependency
    raise ImportError(
        "flash_softmax.integrations.transformers needs Hugging Face transformers (>= 5.0): "
        "pip install 'flash-softmax[hf]'"
    ) from error

from flash_softmax.attention import flash_attention, flash_attention_varlen, flash_attention_with_kvcache

__all__ = [
    "ATTENTION_NAME",
    "HARMLESS_KEYWORDS",
    "HONOURED_KEYWORDS",
    "REFUSED_KEYWORDS",
    "register",
    "fs_attention_forward",
    "fs_attention_mask",
]

#: The ``attn_implementation`` name; free of "flash" so transformers does not treat it as FlashAttention.
ATTENTION_NAME = "fs_attention"

#: Keywords that change the scores and that ``fs_attention_forward`` computes (its named parameters
#: besides ``module``, ``query``, ``key``, ``value`` and ``attention_mask``).
HONOURED_KEYWORDS = frozenset({
    "scaling",
    "dropout",
    "sliding_window",
    "softcap",
    "is_causal",
    "s_aux",
    "sinks",
    "position_bias",
    "cu_seq_lens_q",
    "cu_seq_lens_k",
    "max_length_q",
    "max_length_k",
    "position_ids",
})

#: Keywords the layers pass (explicitly, or through the ``**kwargs`` that carry the model's inputs down)
#: that do not bear on the attention scores: transformers' own eager and sdpa functions ignore them too.
HARMLESS_KEYWORDS = frozenset({
    # Output switches. output_attentions=True warns: the weights are never materialised.
    "output_attentions",
    "output_hidden_states",
    "output_router_logits",
    "return_dict",
    # The cache has already been applied to key and value; a paged cache ("cache") is refused below.
    "use_cache",
    "past_key_values",
    "past_key_value",
    "cache",
    "cache_position",
    # Rotary embeddings are already applied to query and key; the encoder states are already key and value.
    "position_embeddings",
    "encoder_hidden_states",
    # Read by the loss, the LM head, the embeddings or the router, never by the attention.
    "num_items_in_batch",
    "logits_to_keep",
    "token_type_ids",
    "mm_token_type_ids",
    "moe_mm_token_type_ids",
    # Packed-sequence index of state-space (Mamba) layers; attention's packing comes from cu_seq_lens_q/k
    # or position_ids.
    "seq_idx",
    # FlashAttention's switch for a deterministic backward (the kernels' backward is deterministic).
    "deterministic",
})

#: Keywords that change the scores and are not computed here: refused when given a value other than None.
REFUSED_KEYWORDS = {
    "indices": "the sparse top-k key selection of DeepSeek-V3.2-style attention, which the model folds into "
    "the mask only for attn_implementation 'eager' and 'sdpa'",
    "block_indices": "the block-sparse key selection of MiniMax-M3-style attention, which the model folds into "
    "the mask only for attn_implementation 'eager' and 'sdpa'",
    "head_mask": "a per-head multiplier of the attention probabilities",
    "layer_head_mask": "a per-head multiplier of the attention probabilities",
}


def register() -> str:
    """Register the attention and mask functions with transformers; returns ``"fs_attention"``.

    Idempotent. Afterwards ``from_pretrained(..., attn_implementation="fs_attention")``,
    ``Model(config)`` with ``config._attn_implementation = "fs_attention"`` and
    ``model.set_attn_implementation("fs_attention")`` all use the kernel.
    """
    AttentionInterface.register(ATTENTION_NAME, fs_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, fs_attention_mask)
    return ATTENTION_NAME


# --------------------------------------------------------------------------------------------------------
# Sequences along flattened rows: what flash_attention_varlen takes besides q, k and v


@dataclass(eq=False)
class _Varlen:
    """Sequences laid along the rows of a batch flattened to ``(B * S, H, D)``: FlashAttention's cumulative
    lengths (int32, on the device) and bounds of the longest sequence (exact: read with them)."""

    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int | None
    max_seqlen_k: int | None


def _padding_varlen(keep: torch.Tensor, q_length: int, unpad_queries: bool) -> _Varlen | None | bool:
    """The sequences of padded rows, from the keep-mask ``(B, Sk)`` of their keys (True = real token).

    Returns False when no key is padding, None when a row's real keys are not one run (holes: the sequences
    could not be contiguous slices), else the ``_Varlen`` of ``3 B + 2`` sequences over the flattened rows
    ``(B * Sq)`` and ``(B * Sk)``: before each row's real tokens, one sequence of the padding queries with no
    key (their output is 0) and one of the padding keys with no query; then the real ones.

    With ``unpad_queries`` the queries are the last ``q_length`` key positions (bottom-right aligned, as
    transformers lays out prefill, decoding and chunks on a cache) and a query is padding where its key
    is, so each row's real queries and keys end together: the causal band and windows, bottom-right aligned
    per sequence, fall where they do in the padded row. Without it (full attention, where no query's view
    depends on its position) every query of a row attends the row's real keys, as in eager attention.

    One host read: the run check, whether any key is padding, and the two bounds."""
    batch, seqlen_k = keep.shape
    device = keep.device
    real = keep.sum(-1)
    first = keep.int().argmax(-1)
    last = seqlen_k - 1 - keep.flip(-1).int().argmax(-1)
    lead = torch.where(real > 0, first, seqlen_k)  # keys before the row's real run (all of them when none)
    one_run = (real == 0) | (last - first + 1 == real)
    rows = torch.arange(batch, device=device)
    key_start = rows * seqlen_k + lead
    key_end = key_start + real
    if unpad_queries:
        shift = seqlen_k - q_length  # query i is key position i + shift
        query_start = (lead - shift).clamp(0, q_length) + rows * q_length
        query_end = (lead + real - shift).clamp(0, q_length) + rows * q_length
    else:
        query_start, query_end = rows * q_length, (rows + 1) * q_length
    zero = rows.new_zeros(1)
    before_k = torch.cat([zero, key_end[:-1]])  # the previous row's real keys end where this row's padding starts
    # Per row: (padding queries, no key), (no query, padding keys), (real queries, real keys); then the last
    # row's right padding: (its padding queries, no key), (no query, its padding keys).
    per_row_q = torch.stack([query_start, query_start, query_end], 1).flatten()
    per_row_k = torch.stack([before_k, key_start, key_end], 1).flatten()
    cu_q = torch.cat([zero, per_row_q, zero + batch * q_length, zero + batch * q_length])
    cu_k = torch.cat([zero, per_row_k, key_end[-1:], zero + batch * seqlen_k])
    runs, padded, longest_q, longest_k = torch.stack([
        one_run.all().long(), (real < seqlen_k).any().long(), cu_q.diff().max(), cu_k.diff().max(),
    ]).tolist()
    if not padded:
        return False
    if not runs:
        return None
    return _Varlen(cu_q.to(torch.int32), cu_k.to(torch.int32), longest_q, longest_k)


def _starts_varlen(starts: torch.Tensor) -> _Varlen:
    """The sequences of rows ``(B, S)`` cut where ``starts`` is True (and at each row's first token), over the
    flattened rows, the same for queries and keys. One host read (the cuts' positions)."""
    batch, seqlen = starts.shape
    starts = starts.clone()
    starts[:, 0] = True
    bounds = starts.flatten().nonzero().flatten().tolist() + [batch * seqlen]
    longest = max(b - a for a, b in zip(bounds, bounds[1:]))
    cu = torch.tensor(bounds, dtype=torch.int32, device=starts.device)
    return _Varlen(cu, cu, longest, longest)


def _flattens(*tensors: torch.Tensor) -> bool:
    """Whether each ``(B, H, S, D)`` tensor can be seen as ``(B * S, H, D)`` without a copy (a cache stores
    ``(B, H, S, D)``-contiguous keys, which it cannot)."""
    for tensor in tensors:
        try:
            tensor.transpose(1, 2).view(-1, *tensor.shape[1:2], *tensor.shape[3:])
        except RuntimeError:
            return False
    return True


def _run_varlen(query, key, value, plan: _Varlen, **options):
    """``flash_attention_varlen`` on the batch's flattened rows (views where the strides allow, as
    transformers lays out queries, and keys and values without a cache); ``(out (B, Sq, Hq, Dv), lse
    (B, Hq, Sq) or None)``."""
    batch, heads_q, seqlen_q, _ = query.shape
    q, k, v = _rows(query), _rows(key), _rows(value)
    result = flash_attention_varlen(
        q, k, v, plan.cu_seqlens_q.to(q.device), plan.cu_seqlens_k.to(q.device), plan.max_seqlen_q,
        plan.max_seqlen_k, **options,
    )
    out, lse = result if options.get("return_lse") else (result, None)
    out = out.view(batch, seqlen_q, heads_q, out.shape[-1])
    if lse is not None:
        lse = lse.view(heads_q, batch, seqlen_q).transpose(0, 1)
    return out, lse


def _run_kvcache(query, key, value, cache_seqlens: torch.Tensor, window: tuple[int, int], **options):
    """``flash_attention_with_kvcache`` of the queries over a static cache's keys and values ``(B, Hkv, Smax, D)``,
    read in place (transformers has already written this step's keys): row ``b`` attends its first
    ``cache_seqlens[b]`` slots, causal and ``window`` bottom-right aligned, and never reads the slots after
    them. ``(out (B, Sq, Hq, Dv), lse (B, Hq, Sq) or None)``."""
    result = flash_attention_with_kvcache(
        query, key, value, cache_seqlens=cache_seqlens.to(query.device), causal=True, window_size=window, **options,
    )
    out, lse = result if options.get("return_lse") else (result, None)
    return out.transpose(1, 2), lse  # out is laid out like the query: (B, Sq, Hq, Dv) in memory


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    """``(B, H, S, D)`` as ``(B * S, H, D)``: a view where the strides allow it, else a copy."""
    rows = tensor.transpose(1, 2)
    return rows.reshape(-1, *rows.shape[2:])


# --------------------------------------------------------------------------------------------------------
# The mask function


@dataclass(eq=False)
class _Pattern:
    """A mask pattern recognised among transformers' building blocks: causal or not, a band ``(left, right)``
    in key positions (-1 unbounded; causal has ``right = 0``) and, for sequences packed by ``position_ids``,
    the ``(B, S)`` index of each token's sequence."""

    causal: bool
    window: tuple[int, int]
    sequences: torch.Tensor | None = None


def _free_variables(function) -> dict:
    """The values a closure captured, by name."""
    cells = getattr(function, "__closure__", None) or ()
    return dict(zip(function.__code__.co_freevars, (cell.cell_contents for cell in cells)))


def _closure_code(factory: str, *args):
    """The code of the closures ``masking_utils.<factory>(*args)`` makes: a closure is recognised by its code,
    then read by its captures. A factory this transformers lacks gives a code no function has."""
    try:
        return getattr(masking_utils, factory)(*args).__code__
    except (AttributeError, TypeError):
        return object()


_AND_MASKS = _closure_code("and_masks", causal_mask_function)
_SLIDING = _closure_code("sliding_window_overlay", 1)
_SLIDING_BOTH_SIDES = _closure_code("sliding_window_bidirectional_overlay", 1)
_PACKED = _closure_code("packed_sequence_mask_function", None)
_REMAPPED = _closure_code("remap_positions_for_packed_sequence", causal_mask_function, None)
_BIDIRECTIONAL = getattr(masking_utils, "bidirectional_mask_function", object())


def _recognise(mask_function) -> _Pattern | None:
    """The pattern of ``mask_function`` where it is one of those ``create_causal_mask``,
    ``create_sliding_window_causal_mask``, ``create_bidirectional_mask`` and
    ``create_bidirectional_sliding_window_mask`` compose without overlays, or one of the causal ones over
    packed sequences; None for anything else (overlays, chunks, blockwise groups, custom functions), which
    then keeps its materialised mask.

    - ``causal_mask_function``: ``kv <= q``, band ``(-1, 0)``;
    - ``sliding_window_overlay(w)`` and causal: ``q - w < kv <= q``, band ``(w - 1, 0)``;
    - ``bidirectional_mask_function``: every key, band ``(-1, -1)``;
    - ``sliding_window_bidirectional_overlay(w)`` and bidirectional: ``|q - kv| <= w``, band ``(w, w)``;
    - ``packed_sequence_mask_function(ids)`` and one of the above remapped to ``position_ids``: the same band
      inside each sequence (transformers starts a sequence wherever a position is not its predecessor's + 1,
      so positions and indices differ by a constant inside one).
    """
    if mask_function is causal_mask_function:
        return _Pattern(True, (-1, 0))
    if mask_function is _BIDIRECTIONAL:
        return _Pattern(False, (-1, -1))
    if getattr(mask_function, "__code__", None) is not _AND_MASKS:
        return None
    parts = _free_variables(mask_function).get("mask_functions")
    if not isinstance(parts, tuple) or len(parts) != 2:
        return None
    overlay, base = parts
    code = getattr(overlay, "__code__", None)
    if code is _SLIDING or code is _SLIDING_BOTH_SIDES:
        size = _free_variables(overlay).get("sliding_window")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            return None
        if code is _SLIDING and base is causal_mask_function:
            return _Pattern(True, (size - 1, 0))
        if code is _SLIDING_BOTH_SIDES and base is _BIDIRECTIONAL:
            return _Pattern(False, (size, size))
        return None
    if code is _PACKED and getattr(base, "__code__", None) is _REMAPPED:
        sequences = _free_variables(overlay).get("packed_sequence_mask")
        inner = _recognise(_free_variables(base).get("mask_function"))
        if inner is None or inner.sequences is not None:
            return None
        if not isinstance(sequences, torch.Tensor) or sequences.ndim != 2:
            return None
        return _Pattern(inner.causal, inner.window, sequences)
    return None


@dataclass(eq=False)
class _Layout:
    """What a compact mask from ``fs_attention_mask`` stands for.

    ``causal`` and ``window`` are the band (the window's sides that hide no key dropped); ``keep`` is the
    padding as a ``(B, 1, 1, Sk)`` key mask (None without padding) and ``varlen`` its sequences (None with
    holes); ``sequences`` the packed sequences' ``(B, S)`` index (their ``_Varlen`` made on first use);
    ``build_dense`` makes transformers' own ``(B, 1, Sq, Sk)`` mask, for the keywords varlen cannot take.
    ``cache_seqlens``, int32 ``(B,)`` on the device, marks a decoding step over a cache with slots past the
    query (a static cache): row ``b``'s keys are the first ``cache_seqlens[b]`` slots, the query the last of
    them (``flash_attention_with_kvcache``'s ``L_b``), and the slots after them are never read."""

    batch: int
    q_length: int
    kv_length: int
    causal: bool
    window: tuple[int, int]
    keep: torch.Tensor | None
    varlen: _Varlen | None
    sequences: torch.Tensor | None
    build_dense: Callable[[], torch.Tensor]
    cache_seqlens: torch.Tensor | None = None
    _dense: torch.Tensor | None = None
    _packed: _Varlen | None = None

    def dense(self) -> torch.Tensor:
        if self._dense is None:
            self._dense = self.build_dense()
        return self._dense

    def packed(self) -> _Varlen:
        if self._packed is None:
            ids = self.sequences
            starts = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
            starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
            self._packed = _starts_varlen(starts)
        return self._packed


#: Compact masks returned by ``fs_attention_mask``, by identity, and what each stands for; an entry goes with
#: its mask. (The layout must not hold the mask object itself, or neither would ever go.)
_LAYOUTS = WeakIdKeyDictionary()

#: ``fs_attention_mask``'s answer where the mask must be materialised.
_DENSE = object()


def _register(mask: torch.Tensor, layout: _Layout) -> torch.Tensor:
    _LAYOUTS[mask] = layout
    return mask


def _compact_mask(
    pattern: _Pattern,
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int,
    kv_offset: int,
    padding_mask: torch.Tensor | None,
    allow_skip: bool,
    device,
    build_dense: Callable[[], torch.Tensor],
):
    """None, a registered compact mask, or ``_DENSE``, for a recognised pattern with known offsets."""
    if pattern.sequences is not None:
        ids = pattern.sequences
        if padding_mask is not None or q_offset != 0 or kv_offset != 0 or q_length != kv_length:
            return _DENSE
        if tuple(ids.shape) != (batch_size, q_length):
            return _DENSE
        layout = _Layout(batch_size, q_length, kv_length, pattern.causal, pattern.window, None, None, ids, build_dense)
        return _register(torch.ones(batch_size, kv_length, dtype=torch.bool, device=device), layout)
    if not allow_skip:
        return _DENSE  # the caller builds on the mask (adds a bias, concatenates another one)
    causal = pattern.causal
    left, right = pattern.window
    # Query i sits at key position i + offset; key j is hidden by the left side iff j < i + offset - left.
    offset = q_offset - kv_offset
    if left >= offset + q_length - 1:
        left = -1  # hides no key of any query
    if causal:
        right = 0
    elif right >= kv_length - 1 - offset:
        right = -1
    window = (left, right)
    banded = causal or left >= 0 or right >= 0
    if banded and offset != kv_length - q_length:
        return _DENSE  # the kernels align bands to the bottom-right corner
    keep = varlen = None
    if padding_mask is not None:
        keep = padding_mask[:, kv_offset : kv_offset + kv_length]
        if keep.shape != (batch_size, kv_length):
            return _DENSE
        varlen = _padding_varlen(keep.bool(), q_length, unpad_queries=banded)
        if varlen is False:
            keep = varlen = None  # no key is padding
    if keep is None and window == (-1, 0 if causal else -1):
        return None  # the kernels' own causal band, or full attention
    mask = keep if keep is not None else torch.ones(batch_size, kv_length, dtype=torch.bool, device=device)
    # The layout holds its own view of the padding, not the mask object (see _LAYOUTS).
    key_mask = None if keep is None else keep.bool()[:, None, None, :]
    layout = _Layout(batch_size, q_length, kv_length, causal, window, key_mask, varlen, None, build_dense)
    return _register(mask, layout)


def _decode_mask(
    pattern: _Pattern,
    batch_size: int,
    kv_length: int,
    q_offset: int | torch.Tensor,
    kv_offset: int,
    padding_mask: torch.Tensor | None,
    device,
):
    """For one causal query row over a cache (a decoding step) that ``_compact_mask`` leaves dense: transformers'
    own keep-mask ``(B, 1, 1, kv_length)``, registered with the cache's valid lengths; or ``_DENSE``.

    Static caches come here: their full-attention layers pass ``q_offset`` as a tensor and keep slots past
    the query, their sliding-window layers integer offsets (slots past the query until the window fills,
    then the rolled window), and every decoding step on a compileable cache allows no skip. The query sits at
    key index ``q_offset - kv_offset``, so row ``b`` has ``L_b = q_offset - kv_offset + 1`` keys, the query the
    last of them: ``flash_attention_with_kvcache(cache_seqlens=L_b, causal=True)`` with the pattern's window
    is exactly this mask. The lengths are made by tensor ops, ``q_offset`` is never read on the host, and
    they are made now: the layers' cache updates advance ``q_offset`` (the cache's own counter) in place.

    The mask is transformers' values, not a stand-in, so a caller that builds on it (a bias added, as a
    model that allows no skip may do) or a reader that lost the record (a copy, a traced graph) still gets
    the exact mask; one query row makes it as small as a ``(B, Sk)`` padding mask. Padding that hides a key
    the query would see is left to the dense mask (one host read of whether it does), as are patterns over
    packed sequences and bidirectional ones."""
    if pattern.sequences is not None or not pattern.causal or not isinstance(kv_offset, int):
        return _DENSE
    left = pattern.window[0]
    keys = torch.arange(kv_length, device=device)
    if isinstance(q_offset, torch.Tensor):
        if q_offset.numel() != 1 or q_offset.dtype.is_floating_point:
            return _DENSE
        position = q_offset.reshape(()).to(device) - kv_offset  # 0 <= position < kv_length: the cache holds it
    else:
        position = q_offset - kv_offset
        if not 0 <= position < kv_length:
            return _DENSE
        if left >= position:
            left = -1  # the window reaches the first key: it hides nothing
    visible = keys <= position
    if left >= 0:
        visible &= keys >= position - left  # transformers' window w keeps q - w < kv: left = w - 1
    if padding_mask is not None:
        real = padding_mask[:, kv_offset : kv_offset + kv_length]
        if tuple(real.shape) != (batch_size, kv_length) or bool((visible & ~real.bool()).any()):
            return _DENSE
    keep = visible.expand(batch_size, kv_length).contiguous()
    if isinstance(position, torch.Tensor):
        # The decode kernel reads one length per row with unit stride: the expanded (stride 0) view is copied.
        cache_seqlens = (position + 1).to(torch.int32).expand(batch_size).contiguous()
    else:
        cache_seqlens = torch.full((batch_size,), position + 1, dtype=torch.int32, device=device)
    layout = _Layout(
        batch_size, 1, kv_length, True, (left, 0), None, None, None, lambda: keep[:, None, None, :], cache_seqlens,
    )
    # A view of ``keep``: the layout holds ``keep``, never the registered mask itself (see _LAYOUTS).
    return _register(keep[:, None, None, :], layout)


def fs_attention_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | torch.Tensor = 0,
    kv_offset: int = 0,
    mask_function=causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    local_size: int | None = None,
    allow_is_causal_skip: bool = True,
    allow_is_bidirectional_skip: bool = False,
    use_vmap: bool = False,
    device: torch.device | str = "cpu",
    **kwargs,
) -> torch.Tensor | None:
    """The mask for ``fs_attention``: None where the kernel's own pattern is exact, a compact 2D bool mask
    ``(batch_size, kv_length)`` (True = real key) standing for sequences and a band, else transformers'
    bool keep-mask ``(batch_size, 1, q_length, kv_length)`` (True = attend), the one it builds for sdpa.

    Args (as transformers' ``sdpa_mask``):
        q_length, kv_length: lengths the query and key states will have in the attention layers.
        q_offset, kv_offset: absolute positions of the first query and the first key. ``q_offset`` is a
            tensor for static caches: only tensor ops use it (a decoding step's lengths), it is never
            turned into a Python number (that would break compiled graphs).
        mask_function: the pattern (causal, sliding window, chunked, bidirectional, or overlays on them).
        attention_mask: the 2D padding mask ``(batch_size, past + q_length)``, True = real token.
        local_size: sliding window or chunk size, when the pattern has one.
        allow_is_causal_skip: False when the pattern is not plain causal (overlays, packed sequences), or
            when the mask is to be concatenated with another one.
        allow_is_bidirectional_skip: True when a full (non-causal) attention without padding may be None.

    Returns None when
        - causal: ``allow_is_causal_skip``, no padding, integer offsets with
          ``q_offset - kv_offset == kv_length - q_length`` (query ``i`` sees key ``j`` iff
          ``j <= i + kv_length - q_length``, which is ``fs.flash_attention(causal=True)``), and no window
          that hides a key;
        - bidirectional: ``allow_is_bidirectional_skip``, no padding and no window that hides a key.

    Returns a compact mask (see the module docstring) for the recognised patterns (``_recognise``) with
    integer offsets, outside tracing and exporting, when the caller allows a skip (or the pattern is packed
    sequences), and a band, if any, is bottom-right aligned. Reading the padding costs one host sync.

    Returns transformers' own ``(batch_size, 1, 1, kv_length)`` mask, registered with the cache's valid
    lengths (``_decode_mask``), for one causal query row that the above leaves dense: a decoding step on a
    static cache (tensor ``q_offset``, or empty slots after the query, or no skip allowed), outside tracing
    and exporting, when no padding hides a key the query sees.
    """
    padding_mask = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    # Static caches pass q_offset as a tensor so compiled graphs do not depend on it: it is never read on the
    # host (only a decoding step uses it, in tensor ops). Exported and traced graphs must not depend on the
    # padding or the offsets either: they keep the mask.
    exporting = is_torchdynamo_exporting()
    tensor_offset = isinstance(q_offset, torch.Tensor)
    offsets_known = not exporting and not tensor_offset
    readable = not exporting and not is_tracing(padding_mask) and not (tensor_offset and is_tracing(q_offset))
    dense = functools.partial(
        sdpa_mask, batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
        kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask, local_size=local_size,
        allow_is_causal_skip=False, allow_is_bidirectional_skip=False, use_vmap=use_vmap, device=device,
    )
    if readable:
        pattern = _recognise(mask_function)
        if pattern is not None and not is_tracing(pattern.sequences):
            compact = _DENSE
            if offsets_known:
                allow_skip = allow_is_causal_skip if pattern.causal else allow_is_bidirectional_skip
                compact = _compact_mask(
                    pattern, batch_size, q_length, kv_length, q_offset, kv_offset, padding_mask, allow_skip,
                    device, dense,
                )
            if compact is _DENSE and q_length == 1:
                compact = _decode_mask(pattern, batch_size, kv_length, q_offset, kv_offset, padding_mask, device)
            if compact is not _DENSE:
                return compact
    if offsets_known and _window_fits(local_size, kv_length):
        bottom_right_aligned = q_offset - kv_offset == kv_length - q_length
        if allow_is_causal_skip and bottom_right_aligned and _padding_is_absent(padding_mask, kv_length, kv_offset):
            return None
        if allow_is_bidirectional_skip and _padding_is_absent(padding_mask, kv_length, kv_offset):
            return None
    # transformers' own mask for sdpa, never skipped: the kernel then reads it instead of its own band.
    return dense()


def _padding_is_absent(padding_mask: torch.Tensor | None, kv_length: int, kv_offset: int) -> bool:
    """True when no key in ``[kv_offset, kv_offset + kv_length)`` is padding. Reads the mask's values
    (one host sync per forward, as transformers' sdpa path does), so it answers False while tracing."""
    if padding_mask is None:
        return True
    if is_tracing(padding_mask):
        return False
    return bool(padding_mask[:, kv_offset : kv_offset + kv_length].all())


def _window_fits(local_size: int | None, kv_length: int) -> bool:
    """True when a sliding window or chunk of ``local_size`` tokens cannot hide any of ``kv_length`` keys.

    For the patterns ``_recognise`` does not know, which cannot tell a sliding window from a chunked one: the
    mask is kept whenever the pattern bites, rather than rely on the attention layer passing
    ``sliding_window``."""
    return local_size is None or kv_length < local_size


# --------------------------------------------------------------------------------------------------------
# The attention function


def _sliding_window_size(sliding_window: int | None, causal: bool) -> tuple[int, int]:
    """transformers' ``sliding_window=w`` keeps keys with ``q - w < k`` (and ``k < q + w`` when not causal):
    ``w - 1`` keys on each side besides the query's own position."""
    if sliding_window is None or sliding_window <= 0:
        return (-1, -1)
    return (sliding_window - 1, 0 if causal else sliding_window - 1)


def _describe(value) -> str:
    """A short account of a keyword's value for an error message (a tensor's shape, not its contents)."""
    if isinstance(value, torch.Tensor):
        return f"<tensor of shape {tuple(value.shape)}, {value.dtype}>"
    text = repr(value)
    return text if len(text) <= 60 else f"<{type(value).__name__}>"


def _refuse_unknown_keywords(kwargs: dict) -> None:
    """Raise ``ValueError`` for the first keyword that is neither harmless nor None-valued and refused (the
    honoured ones are named parameters of ``fs_attention_forward`` and never reach ``kwargs``)."""
    for name, value in kwargs.items():
        if name in HARMLESS_KEYWORDS or (name in REFUSED_KEYWORDS and value is None):
            continue
        what = REFUSED_KEYWORDS.get(name, "a keyword fs_attention does not know, so it may change the scores")
        raise ValueError(
            f"fs_attention: {name}={_describe(value)} is not supported: {what}. fs_attention computes "
            f"{', '.join(sorted(HONOURED_KEYWORDS))} and accepts the keywords of HARMLESS_KEYWORDS, which do "
            "not change the scores. Use attn_implementation='eager' (or 'sdpa') for this model"
        )


def _cut_to_keys(bias: torch.Tensor | None, seqlen_k: int) -> torch.Tensor | None:
    """A mask or bias built for more key positions than the layer has (a static cache's full length) cut to
    the first ``seqlen_k``."""
    if bias is not None and bias.ndim > 0 and bias.shape[-1] > seqlen_k:
        return bias[..., :seqlen_k]
    return bias


#: The last ``cu_seq_lens_q`` / ``cu_seq_lens_k`` checked by ``_given_varlen``, and the result.
_checked_cu: tuple | None = None


def _same_tensor(entry: tuple[weakref.ref, int], tensor: torch.Tensor) -> bool:
    return entry[0]() is tensor and entry[1] == tensor._version


def _given_varlen(cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k, query, key) -> _Varlen:
    """The ``_Varlen`` of the ``cu_seq_lens_q`` / ``cu_seq_lens_k`` keywords: ``n`` sequences packed into one row
    (FlashAttention's varlen convention, ``[0, q_1, q_1 + q_2, ..., Sq]``), with ``max_length_q`` /
    ``max_length_k`` as the bounds of their lengths.

    Every layer of a forward gets the same tensors: they are read once (one host sync per forward), checked
    to rise from 0 to the row's length, and bound (a given ``max_length`` must cover the longest sequence);
    while tracing they cannot be read, and are trusted.
    """
    global _checked_cu
    for name, cu in (("cu_seq_lens_q", cu_seq_lens_q), ("cu_seq_lens_k", cu_seq_lens_k)):
        if not isinstance(cu, torch.Tensor) or cu.ndim != 1 or cu.numel() < 2 or cu.dtype.is_floating_point:
            raise ValueError(
                f"fs_attention: {name} must be an integer tensor (n + 1,) of cumulative sequence lengths, given "
                f"together with the other of cu_seq_lens_q / cu_seq_lens_k; got {_describe(cu)}"
            )
    if cu_seq_lens_q.numel() != cu_seq_lens_k.numel():
        raise ValueError(
            f"fs_attention: cu_seq_lens_q and cu_seq_lens_k must count the same sequences; got "
            f"{cu_seq_lens_q.numel() - 1} and {cu_seq_lens_k.numel() - 1}"
        )
    batch, seqlen_q, seqlen_k = query.shape[0], query.shape[2], key.shape[2]
    if batch != 1:
        raise ValueError(
            f"fs_attention: cu_seq_lens_q / cu_seq_lens_k describe sequences packed into one row (batch 1); got "
            f"batch {batch}"
        )
    bounds = [_given_bound(max_length_q), _given_bound(max_length_k)]
    asked = (seqlen_q, seqlen_k, *bounds, query.device)
    checked = _checked_cu
    if (
        checked is not None
        and _same_tensor(checked[0], cu_seq_lens_q)
        and _same_tensor(checked[1], cu_seq_lens_k)
        and checked[2] == asked
    ):
        return checked[3]
    cu_q, cu_k = (cu.to(device=query.device, dtype=torch.int32) for cu in (cu_seq_lens_q, cu_seq_lens_k))
    if is_tracing(cu_q):
        return _Varlen(cu_q, cu_k, *bounds)
    # One host read of a few integers: a wrong packing would be silently wrong logits.
    for index, (name, cu, length) in enumerate(
        (("cu_seq_lens_q", cu_seq_lens_q, seqlen_q), ("cu_seq_lens_k", cu_seq_lens_k, seqlen_k))
    ):
        offsets = cu.tolist()
        if offsets[0] != 0 or offsets[-1] != length or any(b < a for a, b in zip(offsets, offsets[1:])):
            raise ValueError(f"fs_attention: {name} must rise from 0 to the row's length {length}; got {offsets}")
        longest = max(b - a for a, b in zip(offsets, offsets[1:]))
        given = bounds[index]
        if given is not None and given < longest:
            raise ValueError(
                f"fs_attention: max_length_{name[-1]}={given} is less than the longest sequence of {name}, "
                f"{longest}"
            )
        bounds[index] = longest if given is None else given
    plan = _Varlen(cu_q, cu_k, *bounds)
    _checked_cu = (
        (weakref.ref(cu_seq_lens_q), cu_seq_lens_q._version),
        (weakref.ref(cu_seq_lens_k), cu_seq_lens_k._version),
        asked,
        plan,
    )
    return plan


def _given_bound(bound) -> int | None:
    """A ``max_length_q`` / ``max_length_k`` as an int: a Python int, or a tensor that can be read (not while
    tracing: None, and the kernel reads the bound from the lengths)."""
    if bound is None or isinstance(bound, int):
        return bound
    if isinstance(bound, torch.Tensor) and bound.numel() == 1 and not bound.dtype.is_floating_point:
        return None if is_tracing(bound) else int(bound)
    raise ValueError(f"fs_attention: max_length_q / max_length_k must be ints; got {_describe(bound)}")


#: The last ``position_ids`` read by ``_positions_varlen``: (weak reference, its ``_version``, batch, result).
_checked_positions: tuple | None = None


def _positions_varlen(position_ids, batch: int, seqlen_q: int, seqlen_k: int) -> _Varlen | None:
    """The sequences packed into the rows of ``position_ids (B, Sq)`` (or ``(1, Sq)``), where a layer got no mask;
    None where no position restarts.

    A position that is not its predecessor's + 1 starts a sequence (transformers' rule for the packed masks it
    builds from ``position_ids``). Every layer of a forward gets the same tensor, so it is read once (one host
    sync per forward, two when packed); while tracing it cannot be read and is not. Restarting positions of
    queries that are not all the keys (a chunk on a cache) cannot be told apart into sequences of keys: refused.
    """
    global _checked_positions
    if not isinstance(position_ids, torch.Tensor) or position_ids.ndim != 2 or position_ids.shape[-1] != seqlen_q:
        return None  # multimodal (3D) rotary positions, or positions of other tokens: nothing to tell packing by
    if seqlen_q < 2 or position_ids.shape[0] not in (1, batch) or is_tracing(position_ids):
        return None
    checked = _checked_positions
    if checked is not None and _same_tensor(checked[0], position_ids) and checked[1] == batch:
        plan = checked[2]
    else:
        positions = position_ids.expand(batch, -1)
        restarts = positions[:, 1:] != positions[:, :-1] + 1
        plan = None
        if bool(restarts.any()):
            starts = torch.zeros(positions.shape, dtype=torch.bool, device=positions.device)
            starts[:, 1:] = restarts
            plan = _starts_varlen(starts)
        _checked_positions = ((weakref.ref(position_ids), position_ids._version), batch, plan)
    if plan is not None and seqlen_k != seqlen_q:
        raise ValueError(
            f"fs_attention: position_ids {_describe(position_ids)} restart inside a row (sequences packed into "
            f"it), but the layer's {seqlen_k} keys are not its {seqlen_q} queries (a cache), so the sequences "
            "of the keys are unknown. Call the model without a cache, or pass cu_seq_lens_q and cu_seq_lens_k"
        )
    return plan


def _packed_keep_mask(plan: _Varlen, batch: int, seqlen_q: int, seqlen_k: int, window: tuple[int, int], device):
    """The keep-mask ``(B, 1, Sq, Sk)`` of the sequences ``plan`` lays along the flattened rows.

    Query ``i`` sees key ``j`` iff both belong to the same sequence and the band ``window = (left, right)``
    (-1 unbounded, causal already folded into ``right = 0``), aligned to that sequence's own bottom-right
    corner as in ``flash_attention``, keeps ``j``. For the combinations varlen cannot take (a bias).
    """
    cu_q = plan.cu_seqlens_q.to(device=device, dtype=torch.long)
    cu_k = plan.cu_seqlens_k.to(device=device, dtype=torch.long)
    positions_q = torch.arange(batch * seqlen_q, device=device)
    positions_k = torch.arange(batch * seqlen_k, device=device)
    # The sequence of each token: the number of sequence ends at or before it.
    sequence_q = torch.searchsorted(cu_q[1:], positions_q, right=True)
    sequence_k = torch.searchsorted(cu_k[1:], positions_k, right=True)
    rows_q, rows_k = sequence_q.view(batch, seqlen_q), sequence_k.view(batch, seqlen_k)
    keep = rows_q[:, :, None] == rows_k[:, None, :]
    left, right = window
    if left >= 0 or right >= 0:
        # Key j's distance from query i's diagonal, both counted within their own sequence.
        lengths_q, lengths_k = cu_q.diff(), cu_k.diff()
        diagonal = positions_q - cu_q[sequence_q] + (lengths_k - lengths_q)[sequence_q]
        within_k = positions_k - cu_k[sequence_k]
        distance = within_k.view(batch, 1, seqlen_k) - diagonal.view(batch, seqlen_q, 1)
        if left >= 0:
            keep &= distance >= -left
        if right >= 0:
            keep &= distance <= right
    return keep[:, None]


def _combine_bias(*parts: torch.Tensor | None) -> torch.Tensor | None:
    """The kernel's one ``attn_bias`` from what the layer passed, each broadcastable to ``(B, Hq, Sq, Sk)``:
    bool keep-masks (transformers' mask, the packed sequences', a key padding mask) and float biases (a float
    mask, the ``position_bias``, added to the scaled scores before the mask, as the models' eager functions
    do).

    A single tensor is passed as it is (stride 0 over its broadcast dims). Keep-masks combine into one bool
    mask; a keep-mask and a float bias into a float bias with ``-inf`` at the removed keys, whose gradient
    autograd carries back to the ``position_bias`` or float mask that requires one.
    """
    keep = additive = None
    for part in parts:
        if part is None:
            continue
        if part.dtype == torch.bool:
            keep = part if keep is None else keep & part
        else:
            additive = part if additive is None else additive + part
    if additive is None:
        return keep
    if keep is None:
        return additive
    return torch.where(keep, additive, float("-inf"))


def _is_padding_mask(mask, batch: int, seqlen_k: int) -> bool:
    """Whether ``mask`` is a 2D bool ``(B, Sk)`` key padding mask, FlashAttention's convention for a mask that
    reaches the attention in 2D (one ``fs_attention_mask`` returned, seen again after a model copied it)."""
    return isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and tuple(mask.shape) == (batch, seqlen_k)


def fs_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    position_bias: torch.Tensor | None = None,
    s_aux: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    max_length_q: int | None = None,
    max_length_k: int | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention for transformers models, computed by ``fs.flash_attention_varlen`` or ``fs.flash_attention``.

    Args:
        module: the calling attention layer; ``module.is_causal`` (default True) is used when ``is_causal``
            is not given, ``module.training`` decides whether ``dropout`` applies.
        query: ``(B, Hq, Sq, D)``.
        key: ``(B, Hkv, Sk, D)`` with ``Hq % Hkv == 0``, the full keys including any cache; the kernel reads
            each group's head in place, K/V are never repeated.
        value: ``(B, Hkv, Sk, Dv)``.
        attention_mask: from ``fs_attention_mask``: None (the kernel's causal pattern, bottom-right
            aligned, or full attention), a compact ``(B, Sk)`` mask standing for padding, packed sequences
            and a band (see the module docstring), a decoding step's ``(B, 1, 1, Sk)`` mask recording a static
            cache's valid lengths (run by ``flash_attention_with_kvcache``), or a bool keep-mask
            broadcastable to ``(B, Hq, Sq, Sk)``; a
            float mask (a 4D mask the user prepared, or a bias a model passes as the mask) is added to the
            scores and receives its gradient. A mask longer than the keys is cut to ``Sk``. Any other 2D bool
            ``(B, Sk)`` mask is a key padding mask, as for FlashAttention (the band then comes from
            ``is_causal`` and ``sliding_window``).
        scaling: softmax scale, default ``1 / sqrt(D)``.
        dropout: attention dropout probability, applied in the kernel when ``module.training``.
        sliding_window: ``w`` keeps keys less than ``w`` positions away; applied when the mask does not
            hold the band (None, or a 2D padding mask ``fs_attention_mask`` did not return).
        softcap: Gemma 2's ``attn_logit_softcapping``: ``softcap * tanh(scores / softcap)`` before masking.
        is_causal: overrides ``module.is_causal``; used when the mask does not hold the band.
        position_bias: float, broadcastable to ``(B, Hq, Sq, Sk)`` (T5's ``(1, Hq, Sq, Sk)``): added to the
            scaled scores, the mask applied on top; a bias that requires grad receives it.
        s_aux: ``(Hq,)`` attention sinks (gpt-oss): per head the logit of a virtual key of value 0.
        sinks: per-query sink logits broadcastable to ``(B, Hq, Sq, 1)`` (Inkling 2): the output is scaled by
            ``sigmoid(lse - sink)``, the share of the probability the keys keep.
        cu_seq_lens_q, cu_seq_lens_k: ``(n + 1,)`` cumulative lengths of ``n`` sequences packed into a
            batch of one row; each attends only within itself.
        max_length_q, max_length_k: bounds of those sequences' lengths (ints, or 0-d tensors), passed to the
            kernel; read from ``cu_seq_lens_q/k`` when not given.
        position_ids: ``(B, Sq)``; with no mask, positions that restart inside a row are packed sequences
            (see ``_positions_varlen``); otherwise unread (rotary embeddings are already applied).
        **kwargs: keywords of ``HARMLESS_KEYWORDS`` or None-valued ones of ``REFUSED_KEYWORDS``; any other
            raises ``ValueError``.

    Returns:
        ``(out, None)`` with ``out (B, Sq, Hq, Dv)`` contiguous, in the input dtype. There are no attention
        weights to return (they are never materialised). Query rows that see no key (left padding) give 0,
        and so do padded query rows of a causal or windowed layer run through varlen.
    """
    _refuse_unknown_keywords(kwargs)
    if kwargs.get("output_attentions", False):
        warnings.warn(
            "fs_attention does not materialise attention weights; output_attentions=True returns None for them. "
            "Use attn_implementation='eager' to inspect them.",
            stacklevel=2,
        )
    if type(kwargs.get("cache")).__name__ == "PagedAttentionCache":
        raise NotImplementedError(
            "fs_attention does not support paged caches (continuous batching); use attn_implementation='sdpa' "
            "or 'paged|eager' for it"
        )
    softcap = float(softcap) if softcap else 0.0
    if position_bias is not None and softcap:
        raise ValueError(
            f"fs_attention: position_bias together with softcap={softcap} is not supported: no model defines "
            "whether the bias is added before or after the cap. Use attn_implementation='eager' for this model"
        )
    batch, heads_q, seqlen_q = query.shape[:3]
    seqlen_k = key.shape[2]
    if s_aux is not None and (not isinstance(s_aux, torch.Tensor) or tuple(s_aux.shape) != (heads_q,)):
        raise ValueError(
            f"fs_attention: s_aux (attention sinks) must be a tensor of shape (Hq,) = ({heads_q},); got "
            f"{_describe(s_aux)}"
        )
    if sinks is not None and not (
        isinstance(sinks, torch.Tensor)
        and sinks.ndim == 4
        and all(size in (1, want) for size, want in zip(sinks.shape, (*query.shape[:3], 1)))
    ):
        raise ValueError(
            f"fs_attention: sinks (per-query sink logits) must broadcast to (B, Hq, Sq, 1) = "
            f"{(*query.shape[:3], 1)}; got {_describe(sinks)}"
        )

    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    window = _sliding_window_size(sliding_window, causal)
    packed = cu_seq_lens_q is not None or cu_seq_lens_k is not None
    given = _given_varlen(cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k, query, key) if packed else None

    dropout_p = float(dropout) if dropout and getattr(module, "training", False) else 0.0

    # What runs: flash_attention_with_kvcache over a static cache (cache_seqlens), varlen over the flattened
    # rows (plan), or flash_attention with the band, a key padding mask, or a mask materialised for a
    # combination varlen cannot take.
    plan, key_mask, cache_seqlens = given, None, None
    layout = None
    if isinstance(attention_mask, torch.Tensor) and not (attention_mask.ndim == 4 and is_tracing(query)):
        # A 4D mask holds transformers' values (a decoding step's record only adds the cache's lengths): while
        # tracing it is read as it is, so that no step's lengths are baked into a graph, and the lookup, which
        # dynamo refuses to trace, is not made.
        layout = _LAYOUTS.get(attention_mask)
    if layout is not None and (layout.batch, layout.q_length, layout.kv_length) != (batch, seqlen_q, seqlen_k):
        attention_mask, layout = layout.dense(), None  # a layer whose queries or keys are not the mask's
    if layout is not None and layout.cache_seqlens is not None:
        causal, window = layout.causal, layout.window
        wants_grad = torch.is_grad_enabled() and any(
            tensor is not None and tensor.requires_grad for tensor in (query, key, value, s_aux)
        )
        if position_bias is not None or given is not None or dropout_p or wants_grad:
            # flash_attention_with_kvcache has no backward, dropout, bias or packing: flash_attention reads
            # the mask, which is transformers' own.
            attention_mask = layout.dense()
        else:
            attention_mask, cache_seqlens = None, layout.cache_seqlens
    elif layout is not None:
        causal, window = layout.causal, layout.window  # the record of transformers' mask wins
        if position_bias is not None or (given is not None and layout.keep is not None):
            attention_mask = layout.dense()
        else:
            attention_mask = None
            if plan is None and layout.sequences is not None:
                plan = layout.packed()
            elif plan is None and layout.keep is not None:
                if layout.varlen is not None and (seqlen_q == seqlen_k or _flattens(key, value)):
                    plan = layout.varlen
                else:
                    key_mask = layout.keep  # holes, or a cache that would have to be copied to be flattened
            elif plan is None:
                # Only a band: restarting positions are packed sequences, as they are without a mask.
                plan = _positions_varlen(position_ids, batch, seqlen_q, seqlen_k)
    elif _is_padding_mask(attention_mask, batch, seqlen_k):
        # A 2D padding mask fs_attention_mask did not return (or a model copied): FlashAttention's convention,
        # the band from is_causal and sliding_window.
        key_mask, attention_mask = attention_mask[:, None, None, :], None
    elif attention_mask is None and plan is None:
        plan = _positions_varlen(position_ids, batch, seqlen_q, seqlen_k)

    band = dict(causal=causal, window_size=(window[0], 0 if causal else window[1]))
    scale = None if scaling is None else float(scaling)
    options = dict(softmax_scale=scale, softcap=softcap, sinks=s_aux, return_lse=sinks is not None)

    if cache_seqlens is not None:
        out, lse = _run_kvcache(query, key, value, cache_seqlens, band["window_size"], **options)
    elif plan is not None and attention_mask is None and key_mask is None and position_bias is None:
        out, lse = _run_varlen(query, key, value, plan, **band, dropout_p=dropout_p, **options)
    else:
        attention_mask = _cut_to_keys(attention_mask, seqlen_k)
        position_bias = _cut_to_keys(position_bias, seqlen_k)
        packed_keep = None
        if plan is not None:
            packed_keep = _packed_keep_mask(plan, batch, seqlen_q, seqlen_k, band["window_size"], query.device)
        attn_bias = _combine_bias(attention_mask, position_bias, packed_keep, key_mask)
        if attention_mask is not None or packed_keep is not None:
            band = {}  # a materialised mask (transformers' or the packed one) already holds the band
        out = flash_attention(query, key, value, attn_bias=attn_bias, **band, dropout_p=dropout_p, **options)
        out, lse = out if sinks is not None else (out, None)
        # transformers' attention layers pass query states laid out as (B, S, H, D) (projections viewed and
        # transposed, rotary embeddings keep that order), so out is (B, S, H, Dv)-contiguous already and this
        # copies nothing; it copies only a query in another layout, for the contiguous result promised above.
        out = out.transpose(1, 2)
    if sinks is not None:
        # p_ij = exp(s_ij) / (sum_j exp(s_ij) + exp(sink_i)): the kernel's normalised output scaled by the
        # keys' share, sum / (sum + exp(sink)) = sigmoid(lse - sink). lse is differentiable, so is this.
        share = torch.sigmoid(lse - sinks[..., 0].to(torch.float32))
        out = (out * share.transpose(1, 2)[..., None]).to(query.dtype)
    return out.contiguous(), None
