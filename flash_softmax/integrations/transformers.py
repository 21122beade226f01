"""Hugging Face transformers integration: ``attn_implementation="fs_attention"``.

>>> from flash_softmax.integrations.transformers import register
>>> name = register()                                   # "fs_attention"
>>> model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=name)

``register()`` adds two functions to transformers' global registries under one name:

- ``fs_attention_mask`` (``AttentionMaskInterface``), called once per forward by ``create_causal_mask`` and
  friends. It returns ``None`` when the mask is exactly the kernel's own causal pattern: no padding, and
  queries aligned to the bottom-right corner of the keys (``q_offset - kv_offset == kv_length - q_length``,
  true for prefill, for decoding with a dynamic cache, and for chunked prefill on top of a cache). The
  attention then runs with ``causal=True``, so the kernel skips the blocks above the diagonal and reads no
  mask. Otherwise (padding, static caches with empty future slots, packed sequences, custom overlays, a
  sliding window that cuts into the keys) it returns transformers' own bool keep-mask ``(B, 1, Sq, Sk)``,
  True = attend, which the kernel reads with stride 0 over the heads.
- ``fs_attention_forward`` (``AttentionInterface``), called by every attention layer.

The name must not contain "flash": transformers routes every such name to its own FlashAttention family.

Every keyword an attention layer passes is honoured, known to leave the scores alone, or refused; none is
dropped unread (``transformers`` models grow new ones, and a dropped one gives wrong logits without an
error). The three sets are ``HONOURED_KEYWORDS``, ``HARMLESS_KEYWORDS`` and ``REFUSED_KEYWORDS``:

- honoured: ``scaling``; ``dropout`` (in the kernel, when ``module.training``); ``sliding_window``;
  ``softcap``; ``is_causal``; ``s_aux`` (gpt-oss's per-head sinks ``(Hq,)``, the kernel's ``sinks``, with
  their gradient); ``sinks`` (a per-query sink logit broadcastable to ``(B, Hq, Sq, 1)``, as Inkling 2's,
  applied to the output through the kernel's lse); ``position_bias`` (T5-style relative bias added to the
  scaled scores, combined with the mask; its gradient flows); ``cu_seq_lens_q`` / ``cu_seq_lens_k``
  (sequences packed into one row: a block-diagonal mask keeps them apart); ``position_ids`` (packed rows
  are separated by the mask transformers builds from them; a layer that gets restarting positions without
  a mask raises rather than attend across the sequences).
- harmless (accepted, unread): cache objects and cache bookkeeping, rotary ``position_embeddings`` (already
  applied to q and k), output switches (``output_attentions=True`` warns: weights are never materialised),
  FlashAttention's ``deterministic`` and ``max_length_q`` / ``max_length_k`` grid bounds, and the other
  model inputs that ``**kwargs`` carries down to the layers.
- refused: ``indices`` and ``block_indices`` (sparse key selections that models fold into the mask only for
  ``eager`` and ``sdpa``) and ``head_mask`` / ``layer_head_mask`` when not None, ``position_bias`` together
  with ``softcap`` (no model defines their order), and every keyword in none of the sets: ``ValueError``
  naming it, saying what is supported and to use ``attn_implementation="eager"`` for that model.
"""

from __future__ import annotations

import warnings
import weakref

import torch

try:
    from transformers import AttentionInterface
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

from flash_softmax.attention import flash_attention

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
    # FlashAttention's switch for a deterministic backward, and its grid bounds for packed sequences (the
    # sequences themselves are cu_seq_lens_q/k).
    "deterministic",
    "max_length_q",
    "max_length_k",
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

    The mask function cannot tell a sliding window from a chunked pattern, so it keeps the mask whenever
    the pattern bites, rather than rely on the attention layer passing ``sliding_window``."""
    return local_size is None or kv_length < local_size


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
    """The mask for ``fs_attention``: ``None`` where the kernel's own pattern is exact, else a bool
    keep-mask ``(batch_size, 1, q_length, kv_length)`` (True = attend), the one transformers builds for sdpa.

    Args (as transformers' ``sdpa_mask``):
        q_length, kv_length: lengths the query and key states will have in the attention layers.
        q_offset, kv_offset: absolute positions of the first query and the first key. ``q_offset`` is a
            tensor for static caches, whose values are not read here (it would break compiled graphs).
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
    """
    padding_mask = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    # Static caches pass q_offset as a tensor so compiled graphs do not depend on it; exported graphs must
    # not depend on the padding either. Both keep the mask.
    offsets_known = not is_torchdynamo_exporting() and not isinstance(q_offset, torch.Tensor)
    if offsets_known and _window_fits(local_size, kv_length):
        bottom_right_aligned = q_offset - kv_offset == kv_length - q_length
        if allow_is_causal_skip and bottom_right_aligned and _padding_is_absent(padding_mask, kv_length, kv_offset):
            return None
        if allow_is_bidirectional_skip and _padding_is_absent(padding_mask, kv_length, kv_offset):
            return None
    # transformers' own mask for sdpa, never skipped: the kernel then reads it instead of its own band.
    return sdpa_mask(
        batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset,
        mask_function=mask_function, attention_mask=attention_mask, local_size=local_size,
        allow_is_causal_skip=False, allow_is_bidirectional_skip=False, use_vmap=use_vmap, device=device,
    )


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


def _packed_keep_mask(
    cu_seq_lens_q: torch.Tensor | None,
    cu_seq_lens_k: torch.Tensor | None,
    query: torch.Tensor,
    key: torch.Tensor,
    window: tuple[int, int],
) -> torch.Tensor | None:
    """The keep-mask ``(1, 1, Sq, Sk)`` of sequences packed into one row, or None without ``cu_seq_lens``.

    ``cu_seq_lens_q = [0, q_1, q_1 + q_2, ..., Sq]`` (FlashAttention's varlen convention, int ``(n + 1,)``)
    delimits the queries of the ``n`` sequences and ``cu_seq_lens_k`` their keys. Query ``i`` sees key ``j``
    iff both belong to the same sequence and the band ``window = (left, right)`` (-1 unbounded, causal
    already folded into ``right = 0``), aligned to that sequence's own bottom-right corner as in
    ``flash_attention``, keeps ``j``.
    """
    if cu_seq_lens_q is None and cu_seq_lens_k is None:
        return None
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
    cu_q = cu_seq_lens_q.to(device=query.device, dtype=torch.long)
    cu_k = cu_seq_lens_k.to(device=query.device, dtype=torch.long)
    if not is_tracing(cu_q):  # one host read of a few integers: a wrong packing would be silently wrong logits
        bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
        for name, bounds, length in (("cu_seq_lens_q", bounds_q, seqlen_q), ("cu_seq_lens_k", bounds_k, seqlen_k)):
            if bounds[0] != 0 or bounds[-1] != length or any(b < a for a, b in zip(bounds, bounds[1:])):
                raise ValueError(
                    f"fs_attention: {name} must rise from 0 to the row's length {length}; got {bounds}"
                )
    positions_q = torch.arange(seqlen_q, device=query.device)
    positions_k = torch.arange(seqlen_k, device=query.device)
    # The sequence of each token: the number of sequence ends at or before it.
    sequence_q = torch.searchsorted(cu_q[1:], positions_q, right=True)
    sequence_k = torch.searchsorted(cu_k[1:], positions_k, right=True)
    keep = sequence_q[:, None] == sequence_k[None, :]
    left, right = window
    if left >= 0 or right >= 0:
        # Key j's distance from query i's diagonal, both counted within their own sequence.
        lengths_q, lengths_k = cu_q.diff(), cu_k.diff()
        diagonal = positions_q - cu_q[sequence_q] + (lengths_k - lengths_q)[sequence_q]
        distance = (positions_k - cu_k[sequence_k])[None, :] - diagonal[:, None]
        if left >= 0:
            keep &= distance >= -left
        if right >= 0:
            keep &= distance <= right
    return keep[None, None]


#: The last ``position_ids`` checked by ``_refuse_unseparated_packing``: (weak reference, its ``_version``).
_checked_positions: tuple[weakref.ref, int] | None = None


def _refuse_unseparated_packing(position_ids, seqlen_q: int) -> None:
    """Raise when ``position_ids (B, Sq)`` decrease inside a row (sequences packed into it) although the
    layer got no mask to keep them apart.

    transformers builds the packed mask from ``position_ids`` itself (``create_causal_mask`` called without
    a 2D attention mask and without a cache), and ``fs_attention_mask`` then returns it, never None. A layer
    that sees restarting positions with no mask is a call where that did not happen: the attention would run
    across the sequences. Every layer of a forward gets the same tensor, so it is read once (one host
    sync per forward); while tracing it cannot be read and is not checked.
    """
    global _checked_positions
    if not isinstance(position_ids, torch.Tensor) or position_ids.ndim != 2 or position_ids.shape[-1] != seqlen_q:
        return  # multimodal (3D) rotary positions, or positions of other tokens: nothing to tell packing by
    if seqlen_q < 2 or is_tracing(position_ids):
        return
    checked = _checked_positions
    if checked is not None and checked[0]() is position_ids and checked[1] == position_ids._version:
        return
    if bool((position_ids[:, 1:] < position_ids[:, :-1]).any()):
        raise ValueError(
            f"fs_attention: position_ids {_describe(position_ids)} restart inside a row (sequences packed into "
            "it), but the layer got no attention mask keeping the sequences apart. Call the model without a 2D "
            "attention_mask and without a cache (transformers then builds the packed mask from position_ids), "
            "or pass cu_seq_lens_q and cu_seq_lens_k"
        )
    _checked_positions = (weakref.ref(position_ids), position_ids._version)


def _combine_bias(
    attention_mask: torch.Tensor | None,
    position_bias: torch.Tensor | None,
    packed_keep: torch.Tensor | None,
) -> torch.Tensor | None:
    """The kernel's one ``attn_bias`` from what the layer passed, each broadcastable to ``(B, Hq, Sq, Sk)``:
    the mask (bool keep-mask, or float added to the scores), the float ``position_bias`` (added to the scaled
    scores, before the mask, as the models' eager functions do) and the packed sequences' keep-mask.

    A single tensor is passed as it is (stride 0 over its broadcast dims). Keep-masks combine into one bool
    mask; a keep-mask and a float bias into a float bias with ``-inf`` at the removed keys, whose gradient
    autograd carries back to the ``position_bias`` or float mask that requires one.
    """
    keep = None
    for part in (attention_mask, packed_keep):
        if part is not None and part.dtype == torch.bool:
            keep = part if keep is None else keep & part
    additive = None
    for part in (position_bias, attention_mask):
        if part is not None and part.dtype != torch.bool:
            additive = part if additive is None else additive + part
    if additive is None:
        return keep
    if keep is None:
        return additive
    return torch.where(keep, additive, float("-inf"))


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
    position_ids: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention for transformers models, computed by ``fs.flash_attention``.

    Args:
        module: the calling attention layer; ``module.is_causal`` (default True) is used when ``is_causal``
            is not given, ``module.training`` decides whether ``dropout`` applies.
        query: ``(B, Hq, Sq, D)``.
        key: ``(B, Hkv, Sk, D)`` with ``Hq % Hkv == 0``, the full keys including any cache; the kernel reads
            each group's head in place, K/V are never repeated.
        value: ``(B, Hkv, Sk, Dv)``.
        attention_mask: from ``fs_attention_mask``: None (the kernel's causal pattern, bottom-right
            aligned) or a bool keep-mask broadcastable to ``(B, Hq, Sq, Sk)``; a float mask (a 4D mask the
            user prepared, or a bias a model passes as the mask) is added to the scores and receives its
            gradient. A mask longer than the keys is cut to ``Sk``.
        scaling: softmax scale, default ``1 / sqrt(D)``.
        dropout: attention dropout probability, applied in the kernel when ``module.training``.
        sliding_window: ``w`` keeps keys less than ``w`` positions away; applied when the mask is None (a
            materialised mask already holds the window).
        softcap: Gemma 2's ``attn_logit_softcapping``: ``softcap * tanh(scores / softcap)`` before masking.
        is_causal: overrides ``module.is_causal``; used only when the mask is None.
        position_bias: float, broadcastable to ``(B, Hq, Sq, Sk)`` (T5's ``(1, Hq, Sq, Sk)``): added to the
            scaled scores, the mask applied on top; a bias that requires grad receives it.
        s_aux: ``(Hq,)`` attention sinks (gpt-oss): per head the logit of a virtual key of value 0.
        sinks: per-query sink logits broadcastable to ``(B, Hq, Sq, 1)`` (Inkling 2): the output is scaled by
            ``sigmoid(lse - sink)``, the share of the probability the keys keep.
        cu_seq_lens_q, cu_seq_lens_k: ``(n + 1,)`` cumulative lengths of ``n`` sequences packed into a
            batch of one row; each attends only within itself.
        position_ids: ``(B, Sq)``; positions that restart inside a row with no mask are refused (see
            ``_refuse_unseparated_packing``); otherwise unread (rotary embeddings are already applied).
        **kwargs: keywords of ``HARMLESS_KEYWORDS`` or None-valued ones of ``REFUSED_KEYWORDS``; any other
            raises ``ValueError``.

    Returns:
        ``(out, None)`` with ``out (B, Sq, Hq, Dv)`` contiguous, in the input dtype. There are no attention
        weights to return (they are never materialised). Query rows that see no key (left padding) give 0.
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
    heads_q = query.shape[1]
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
    seqlen_k = key.shape[2]
    attention_mask = _cut_to_keys(attention_mask, seqlen_k)
    position_bias = _cut_to_keys(position_bias, seqlen_k)
    band = (window[0], 0 if causal else window[1])
    packed_keep = _packed_keep_mask(cu_seq_lens_q, cu_seq_lens_k, query, key, band)
    if attention_mask is None and packed_keep is None:
        _refuse_unseparated_packing(position_ids, query.shape[2])
    scale = None if scaling is None else float(scaling)
    dropout_p = float(dropout) if dropout and getattr(module, "training", False) else 0.0

    attn_bias = _combine_bias(attention_mask, position_bias, packed_keep)
    if attention_mask is None and packed_keep is None:
        # The kernel's own band: causal and the window; a position_bias alone is read in place.
        band_options = dict(causal=causal, window_size=window)
    else:
        # A materialised mask (transformers' or the packed one) already holds the causal band and the window.
        band_options = {}
    out = flash_attention(
        query, key, value, softmax_scale=scale, softcap=softcap, attn_bias=attn_bias, sinks=s_aux,
        dropout_p=dropout_p, return_lse=sinks is not None, **band_options,
    )
    if sinks is not None:
        # p_ij = exp(s_ij) / (sum_j exp(s_ij) + exp(sink_i)): the kernel's normalised output scaled by the
        # keys' share, sum / (sum + exp(sink)) = sigmoid(lse - sink). lse is differentiable, so is this.
        out, lse = out
        share = torch.sigmoid(lse - sinks[..., 0].to(torch.float32))
        out = (out * share[..., None]).to(query.dtype)
    # transformers' attention layers pass query states laid out as (B, S, H, D) (projections viewed and
    # transposed, rotary embeddings keep that order), so out is (B, S, H, Dv)-contiguous already and this
    # copies nothing; it copies only a query in another layout, for the contiguous result promised above.
    return out.transpose(1, 2).contiguous(), None
