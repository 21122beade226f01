"""Plain PyTorch references: the full score matrix, materialised, with exactly the package's semantics.

These are the truth every test and ``flash-softmax verify`` compare the kernels against. They are slow
and memory hungry on purpose: nothing here is fused or tiled, so there is nothing to get wrong.
"""

from __future__ import annotations

import math

import torch

__all__ = ["attention", "softmax", "log_softmax", "compute_dtype", "band_mask"]


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
    return_lse: bool = False,
    upcast: bool = True,
):
    """Materialised attention with the semantics of ``flash_softmax.flash_attention``.

    Args:
        q: ``(B, Hq, Sq, D)``.
        k: ``(B, Hkv, Sk, D)``, ``Hq % Hkv == 0`` (grouped heads are repeated here, which the kernels never do).
        v: ``(B, Hkv, Sk, Dv)``.
        causal, softmax_scale, window_size, softcap, attn_bias: as in ``flash_attention``.
        return_lse: also return the float32 ``(B, Hq, Sq)`` logsumexp of the scaled scores.
        upcast: compute in float32 (float64 for float64 input) when True, in the input dtype when False.

    Returns:
        ``out (B, Hq, Sq, Dv)`` in the input dtype, and ``lse`` when ``return_lse``. A row that sees no key
        gives output 0 and lse ``-inf``; its gradients are 0.
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
    keep = band_mask(q.shape[-2], k.shape[-2], causal, window_size, q.device)
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))

    hidden = torch.isneginf(scores)
    # A row that sees no key (all -inf) would give logsumexp's backward exp(-inf - -inf) = NaN; its lse is
    # taken over zeros instead, then set to -inf, so its probabilities and gradients are exactly 0.
    empty_row = hidden.all(dim=-1, keepdim=True)
    lse = torch.logsumexp(scores.masked_fill(empty_row, 0.0), dim=-1, keepdim=True)
    # exp(-inf - lse) is 0 for any lse, NaN included: a NaN row must not reach keys it does not see.
    probs = torch.exp(scores - lse).masked_fill(hidden, 0.0)
    out = torch.matmul(probs, vc).to(q.dtype)
    if return_lse:
        return out, lse.masked_fill(empty_row, float("-inf")).squeeze(-1).float()
    return out


def softmax(x: torch.Tensor, dim: int = -1, upcast: bool = True) -> torch.Tensor:
    """``torch.softmax`` computed in float32 (float64 for float64) when ``upcast``, returned in x's dtype."""
    return torch.softmax(x.to(compute_dtype(x.dtype, upcast)), dim=dim).to(x.dtype)


def log_softmax(x: torch.Tensor, dim: int = -1, upcast: bool = True) -> torch.Tensor:
    """``torch.log_softmax`` computed in float32 (float64 for float64) when ``upcast``, returned in x's dtype."""
    return torch.log_softmax(x.to(compute_dtype(x.dtype, upcast)), dim=dim).to(x.dtype)
