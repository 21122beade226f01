"""``scaled_dot_product_attention`` with torch's signature and results, run by the fused kernels.

``fs.scaled_dot_product_attention`` is a drop-in for ``torch.nn.functional.scaled_dot_product_attention``
and ``fs.patch_sdpa()`` routes torch's own name through it, so transformer code that calls SDPA runs
the kernels unchanged. A call the kernels cannot serve (see ``fallback_reason``) goes to torch's
function, saved when this module is imported, so its result and its errors are torch's own; each such
call is counted and warns once per reason (``FallbackWarning``, ``flash_softmax.stats()``).

torch's ``CausalBias`` masks (``torch.nn.attention.bias.causal_upper_left`` / ``causal_lower_right``) run
as the kernels' causal band, top-left or bottom-right aligned; any other tensor subclass with attention
semantics of its own (its own ``__torch_function__``) goes to torch's function untouched.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch.nn.attention.bias import CausalBias, CausalVariant

from flash_softmax._backend import backend_for, backend_reason, record, record_fallback
from flash_softmax.attention.checks import SUPPORTED_DTYPES
from flash_softmax.attention.configs import MAX_HEAD_DIM
from flash_softmax.attention.function import flash_attention

__all__ = ["scaled_dot_product_attention", "patch_sdpa", "sdpa_is_patched", "fallback_reason", "TORCH_SDPA"]

#: torch's own function, taken before anything here can patch it; every fallback calls this one.
TORCH_SDPA = torch.nn.functional.scaled_dot_product_attention


def _has_own_torch_function(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a subclass that gives torch functions semantics of its own (``CausalBias``,
    ``DTensor``...), unlike ``nn.Parameter`` or the fake tensors of tracing, which disable the hook."""
    kind = type(tensor)
    if kind is torch.Tensor or kind is torch.nn.Parameter:
        return False
    hook = getattr(kind.__torch_function__, "__func__", kind.__torch_function__)
    return hook is not torch.Tensor.__torch_function__.__func__ and hook is not torch._C._disabled_torch_function_impl


def fallback_reason(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
) -> str | None:
    """Why ``scaled_dot_product_attention`` hands this call to torch, or None when the kernels run it.

    Reads only types, shapes, dtypes and devices. Anything torch would reject also lands here, so torch
    raises its own error for it.
    """
    tensors = {"query": query, "key": key, "value": value}
    if not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        return "query, key and value are not all tensors"
    if any(t.is_nested or t.layout != torch.strided for t in tensors.values()):
        return "nested or sparse inputs"
    for name, tensor in (*tensors.items(), ("attn_mask", attn_mask)):
        if isinstance(tensor, torch.Tensor) and _has_own_torch_function(tensor):
            return f"{name} is a {type(tensor).__name__}, a tensor subclass with semantics of its own"
    if any(t.dim() != 4 for t in tensors.values()):
        return "inputs are not 4-d (batch, heads, seqlen, head_dim)"
    if query.dtype not in SUPPORTED_DTYPES or not query.dtype == key.dtype == value.dtype:
        return f"dtypes {query.dtype}, {key.dtype}, {value.dtype}: the kernels take one of float16, bfloat16, float32"
    if not query.device == key.device == value.device:
        return "inputs on different devices"
    if backend_for(query.device) == "torch":
        return backend_reason(query.device)
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) or not 0 <= dropout_p < 1:
        return f"dropout_p={dropout_p!r} is not a probability in [0, 1)"
    if not isinstance(is_causal, bool) or not isinstance(enable_gqa, bool):
        return "is_causal or enable_gqa is not a bool"
    if scale is not None and (
        isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not -math.inf < scale < math.inf
    ):
        return f"scale={scale!r} is not a finite number"

    batch, heads_q, seqlen_q, head_dim = query.shape
    _, heads_kv, seqlen_k, head_dim_v = value.shape
    if key.shape[0] != batch or value.shape[0] != batch or key.shape[1] != heads_kv or key.shape[2] != seqlen_k:
        return "batch sizes, key/value heads or key/value lengths differ"
    if key.shape[3] != head_dim:
        return "query and key head dims differ"
    if not (1 <= head_dim <= MAX_HEAD_DIM and 1 <= head_dim_v <= MAX_HEAD_DIM):
        return f"head dims {head_dim}, {head_dim_v}: the kernels take 1 to {MAX_HEAD_DIM}"
    if enable_gqa:
        if heads_kv == 0 or heads_q % heads_kv != 0:
            return f"enable_gqa with {heads_q} query heads and {heads_kv} key/value heads"
    elif heads_q != heads_kv:
        # torch broadcasts a single key/value head without enable_gqa and rejects anything else.
        return f"{heads_q} query heads and {heads_kv} key/value heads without enable_gqa"

    if attn_mask is not None:
        if is_causal:
            return "attn_mask together with is_causal"
        if not isinstance(attn_mask, torch.Tensor) or attn_mask.is_nested or attn_mask.layout != torch.strided:
            return "attn_mask is not a strided tensor"
        if attn_mask.dtype not in (torch.bool, torch.float32, query.dtype):
            return f"attn_mask dtype {attn_mask.dtype} with {query.dtype} inputs"
        if attn_mask.device != query.device:
            return "attn_mask on another device"
        target = (batch, heads_q, seqlen_q, seqlen_k)
        try:
            broadcasts = attn_mask.dim() <= 4 and tuple(torch.broadcast_shapes(attn_mask.shape, target)) == target
        except RuntimeError:
            broadcasts = False
        if not broadcasts:
            return f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to {target}"
    return None


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """``torch.nn.functional.scaled_dot_product_attention`` computed by the fused kernels.

    Args:
        query: ``(B, Hq, Sq, D)``; key: ``(B, Hkv, Sk, D)``; value: ``(B, Hkv, Sk, Dv)``.
        attn_mask: bool (True = takes part) or float (added to the scaled scores), broadcastable to
            ``(B, Hq, Sq, Sk)``; read in place with stride 0 along broadcast dims. A float mask that
            requires grad gets its gradient, summed over its broadcast dims, as with torch.
        dropout_p: dropout on the attention probabilities, in the kernels (as torch's function, it applies
            whenever it is > 0, in training or not). The keep decisions come from the kernels' own Philox
            generator seeded from torch's default generator, so ``torch.manual_seed`` reproduces a call; they
            are not the elements torch's implementation would drop.
        is_causal: torch's causal mask, aligned to the top-left corner: query ``i`` sees key ``j`` iff
            ``j <= i``. (``flash_attention(causal=True)`` aligns to the bottom-right instead.)
        scale: multiplies ``query @ key.T``; defaults to ``1 / sqrt(D)``.
        enable_gqa: allow ``Hq % Hkv == 0`` (grouped-query attention, K/V heads read in place).

    Returns:
        ``(B, Hq, Sq, Dv)`` in the input dtype. Where the kernels run it is laid out like query: contiguous
        for a contiguous query, and for a ``(B, S, H, D)`` tensor seen as ``.transpose(1, 2)`` a
        ``(B, S, H, Dv)``-contiguous tensor seen the same way. A row that sees no key gives 0 with zero
        gradients, as torch's CPU and math implementations do; torch's fused GPU implementations may
        differ on such rows (NaN).

    ``attn_mask`` may be one of torch's ``CausalBias`` masks: ``causal_upper_left(Sq, Sk)`` is ``is_causal``,
    ``causal_lower_right(Sq, Sk)`` the kernels' bottom-right causal (query ``i`` sees key ``j`` iff
    ``j <= i + Sk - Sq``); with ``is_causal=True`` it is torch's error, a ``ValueError``.

    Calls the kernels cannot serve fall back to torch's function with the same arguments (see
    ``fallback_reason``): inputs that are not 4-d, float64, head dims above 256, ``attn_mask`` with
    ``is_causal``, devices without a Triton backend, tensor subclasses with semantics of their own, and
    everything torch rejects, which then raises torch's own error.
    Each fallback warns once per reason (``flash_softmax.FallbackWarning``) and is counted in
    ``flash_softmax.stats()``.
    """
    if isinstance(attn_mask, CausalBias):
        return _causal_bias_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    reason = fallback_reason(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if reason is not None:
        return _torch_sdpa(reason, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    record("scaled_dot_product_attention", backend_for(query.device))
    window = (-1, -1)
    if is_causal:
        # The kernels' band is j <= i + (Sk - Sq) + right with right >= 0. With Sk <= Sq, right = Sq - Sk
        # gives torch's j <= i. With Sk > Sq, keys j >= Sq are beyond every query's reach: attending over
        # the first Sq keys only is the same computation, and their gradients come back as zeros.
        seqlen_q = query.shape[2]
        if key.shape[2] > seqlen_q:
            key, value = key[:, :, :seqlen_q], value[:, :, :seqlen_q]
        window = (-1, seqlen_q - key.shape[2])
    return flash_attention(query, key, value, softmax_scale=scale, window_size=window, attn_bias=attn_mask,
                           dropout_p=float(dropout_p))


def _torch_sdpa(reason, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """torch's function on the same arguments, counted and warned about as a fallback for ``reason``."""
    record_fallback("scaled_dot_product_attention", reason, stacklevel=4)
    return TORCH_SDPA(
        query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
        scale=scale, enable_gqa=enable_gqa,
    )


def _causal_bias_attention(query, key, value, attn_mask: CausalBias, dropout_p, is_causal, scale, enable_gqa):
    """A ``CausalBias`` mask as the kernels' causal band. Its storage holds no values: it must never be
    read as a bias. torch treats an upper-left bias, or one with equal lengths, as ``is_causal=True``."""
    if is_causal:
        raise ValueError("CausalBias should not be used with causal=True")  # torch's own error
    if attn_mask.variant == CausalVariant.UPPER_LEFT or attn_mask.seq_len_q == attn_mask.seq_len_kv:
        return scaled_dot_product_attention(query, key, value, None, dropout_p, True, scale, enable_gqa)
    reason = fallback_reason(query, key, value, None, dropout_p, False, scale, enable_gqa)
    if reason is None and (attn_mask.seq_len_q, attn_mask.seq_len_kv) != (query.shape[2], key.shape[2]):
        reason = (f"a causal_lower_right({attn_mask.seq_len_q}, {attn_mask.seq_len_kv}) mask for "
                  f"{query.shape[2]} queries and {key.shape[2]} keys")
    if reason is not None:
        return _torch_sdpa(reason, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    record("scaled_dot_product_attention", backend_for(query.device))
    return flash_attention(query, key, value, causal=True, softmax_scale=scale, dropout_p=float(dropout_p))


class patch_sdpa:
    """Route ``torch.nn.functional.scaled_dot_product_attention`` through ``scaled_dot_product_attention``.

    As a switch, ``patch_sdpa()`` / ``patch_sdpa(enable=True)`` installs it and ``patch_sdpa(enable=False)``
    puts torch's function back. As a context manager, ``with patch_sdpa(): ...`` installs it for the
    body and then restores whatever was installed before, also when the body raises; nested blocks
    (``with patch_sdpa(enable=False):`` inside a patched one) restore correctly.

    Only calls that look the function up on ``torch.nn.functional`` at call time see the patch (as
    Hugging Face transformers' "sdpa" attention does); a name imported earlier with
    ``from torch.nn.functional import scaled_dot_product_attention`` keeps torch's function.

    While patched, torch's ``nn.MultiheadAttention`` fast path (``torch.backends.mha``), which in eval mode
    computes attention in one native op without calling the function above, is switched off, so those
    modules run the kernels too (with ``need_weights=False``; weights are never materialised). Unpatching
    restores the fast path setting found when the patch was installed.
    """

    def __init__(self, enable: bool = True):
        if not isinstance(enable, bool):
            raise TypeError(f"enable must be a bool, got {type(enable).__name__} {enable!r}")
        self._previous = torch.nn.functional.scaled_dot_product_attention
        _install(scaled_dot_product_attention if enable else TORCH_SDPA)

    def __enter__(self) -> "patch_sdpa":
        return self

    def __exit__(self, *exc_info) -> None:
        _install(self._previous)


#: torch's MultiheadAttention fast path setting when the patch went in, to restore when it comes out.
_fastpath_before_patch: bool | None = None


def _install(function) -> None:
    """Make ``function`` torch's SDPA, with the MultiheadAttention fast path off exactly while patched."""
    global _fastpath_before_patch
    patched_now = sdpa_is_patched()
    torch.nn.functional.scaled_dot_product_attention = function
    if function is scaled_dot_product_attention and not patched_now:
        _fastpath_before_patch = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
    elif function is not scaled_dot_product_attention and patched_now and _fastpath_before_patch is not None:
        torch.backends.mha.set_fastpath_enabled(_fastpath_before_patch)
        _fastpath_before_patch = None


def sdpa_is_patched() -> bool:
    """Whether ``torch.nn.functional.scaled_dot_product_attention`` currently routes through the kernels."""
    return torch.nn.functional.scaled_dot_product_attention is scaled_dot_product_attention
