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
"""

from __future__ import annotations

import warnings

import torch
from torch.nn.attention.bias import causal_lower_right

try:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
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

from flash_softmax._backend import record_fallback
from flash_softmax.attention import flash_attention

__all__ = ["ATTENTION_NAME", "register", "fs_attention_forward", "fs_attention_mask"]

#: The ``attn_implementation`` name; free of "flash" so transformers does not treat it as FlashAttention.
ATTENTION_NAME = "fs_attention"


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


def _dropout_fallback(module, query, key, value, attention_mask, *, causal, window, dropout, scaling, softcap, kwargs):
    """Attention dropout in training is not in the kernel: run transformers' sdpa function instead, with the
    causal band made explicit (sdpa's ``is_causal`` is top-left aligned, ours bottom-right)."""
    if softcap:
        raise ValueError(
            f"fs_attention: attention dropout ({dropout}) together with softcap ({softcap}) is not supported "
            "(the kernel has no dropout and sdpa no softcap); set the model's attention_dropout to 0.0 "
            "or use attn_implementation='eager'"
        )
    seqlen_q, seqlen_k = query.shape[2], key.shape[2]
    if attention_mask is None and _window_hides_keys(window, seqlen_q, seqlen_k):
        # fs_attention_mask hands over a materialised mask whenever a window hides keys, so this is only
        # reached by callers that bypass it.
        raise ValueError(
            f"fs_attention: attention dropout ({dropout}) with a sliding window {window} that hides keys and no "
            "attention mask is not supported; set the model's attention_dropout to 0.0 or pass the mask"
        )
    record_fallback(
        "fs_attention",
        f"attention dropout {dropout} in training mode is not in the kernel; torch's scaled_dot_product_attention "
        "runs this layer (set the model's attention_dropout to 0.0 to use the kernel)",
        stacklevel=4,
    )
    is_causal = False
    if attention_mask is None and causal:
        # Equal lengths: top-left is bottom-right. Otherwise torch's own bottom-right causal bias.
        is_causal = seqlen_q == seqlen_k
        attention_mask = None if is_causal else causal_lower_right(seqlen_q, seqlen_k)
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
    )


def _window_hides_keys(window: tuple[int, int], seqlen_q: int, seqlen_k: int) -> bool:
    """Whether the band ``window = (left, right)`` (bottom-right aligned, -1 unbounded; causal is the
    caller's) keeps some query from some key, beyond what causality already does."""
    left, right = window
    return (left >= 0 and left < seqlen_k - 1) or (right > 0 and right < seqlen_q - 1)


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
            aligned) or a bool keep-mask broadcastable to ``(B, Hq, Sq, Sk)``; a float additive mask (e.g. a
            4D mask the user prepared) is added to the scores. A mask longer than the keys is cut to ``Sk``.
        scaling: softmax scale, default ``1 / sqrt(D)``.
        dropout: attention dropout probability. Not in the kernel: in training mode with ``dropout > 0``
            this layer falls back to transformers' sdpa function, with a warning.
        sliding_window: ``w`` keeps keys less than ``w`` positions away; applied when the mask is None (a
            materialised mask already holds the window).
        softcap: Gemma 2's ``attn_logit_softcapping``: ``softcap * tanh(scores / softcap)`` before masking.
        is_causal: overrides ``module.is_causal``; used only when the mask is None.

    Returns:
        ``(out, None)`` with ``out (B, Sq, Hq, Dv)`` contiguous, in the input dtype. There are no attention
        weights to return (they are never materialised). Query rows that see no key (left padding) give 0.
    """
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
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    window = _sliding_window_size(sliding_window, causal)
    if attention_mask is not None and attention_mask.shape[-1] > key.shape[2]:
        attention_mask = attention_mask[..., : key.shape[2]]
    scale = None if scaling is None else float(scaling)
    softcap = float(softcap) if softcap else 0.0

    if dropout > 0.0 and getattr(module, "training", False):
        return _dropout_fallback(
            module, query, key, value, attention_mask, causal=causal, window=window, dropout=dropout,
            scaling=scale, softcap=softcap, kwargs=kwargs,
        )

    if attention_mask is None:
        out = flash_attention(
            query, key, value, causal=causal, softmax_scale=scale, window_size=window, softcap=softcap
        )
    else:
        out = flash_attention(query, key, value, softmax_scale=scale, softcap=softcap, attn_bias=attention_mask)
    # transformers' attention layers pass query states laid out as (B, S, H, D) (projections viewed and
    # transposed, rotary embeddings keep that order), so out is (B, S, H, Dv)-contiguous already and this
    # copies nothing; it copies only a query in another layout, for the contiguous result promised above.
    return out.transpose(1, 2).contiguous(), None
