"""``MultiheadAttention``: projections around the fused kernels, called like ``torch.nn.MultiheadAttention``."""

from __future__ import annotations

import numbers

import torch
from einops import rearrange
from torch import nn

from flash_softmax.attention.checks import resolve_dropout_p
from flash_softmax.attention.configs import MAX_HEAD_DIM
from flash_softmax.attention.function import flash_attention

__all__ = ["MultiheadAttention"]


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


class MultiheadAttention(nn.Module):
    """Self or cross attention with separate q/k/v/out projections, computed by the fused kernels.

    A drop-in for ``torch.nn.MultiheadAttention`` (``from_torch`` copies one): the same call, masks
    with the same conventions, and ``(output, None)`` as the result, since the attention weights are
    never materialised. ``num_kv_heads < num_heads`` gives grouped-query attention: ``k_proj`` and
    ``v_proj`` produce ``num_kv_heads`` heads that the kernels share across each group of query heads
    without copying them.

    Args:
        embed_dim: model width E; the query input's last dim and the output's.
        num_heads: query heads H; ``embed_dim % num_heads == 0``, head dim ``E / H`` at most 256.
        num_kv_heads: key/value heads, dividing ``num_heads``; defaults to ``num_heads``.
        bias: whether the four projections have a bias.
        batch_first: inputs and output are ``(B, S, E)`` when True, ``(S, B, E)`` when False.
        causal: always apply the causal mask, aligned to the bottom-right corner (query ``i`` sees key
            ``j`` iff ``j <= i + Sk - Sq``); for self-attention that is the usual lower triangle.
        kdim, vdim: last dims of the key and value inputs; default ``embed_dim``.
        dropout: attention dropout probability in [0, 1), applied in the kernels in training mode only (as
            ``torch.nn.MultiheadAttention`` does).
        device, dtype: of the parameters.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        bias: bool = True,
        batch_first: bool = True,
        causal: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        dropout: float = 0.0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        embed_dim = _positive_int("embed_dim", embed_dim)
        num_heads = _positive_int("num_heads", num_heads)
        num_kv_heads = num_heads if num_kv_heads is None else _positive_int("num_kv_heads", num_kv_heads)
        if embed_dim % num_heads != 0:
            raise ValueError(
                f"embed_dim must be divisible by num_heads, got embed_dim {embed_dim} and num_heads {num_heads}"
            )
        if num_heads % num_kv_heads != 0:
            raise ValueError(
                f"num_heads must be a multiple of num_kv_heads, "
                f"got num_heads {num_heads} and num_kv_heads {num_kv_heads}"
            )
        head_dim = embed_dim // num_heads
        if head_dim > MAX_HEAD_DIM:
            raise ValueError(
                f"the head dim embed_dim / num_heads must be at most {MAX_HEAD_DIM}, "
                f"got {embed_dim} / {num_heads} = {head_dim}"
            )
        dropout = resolve_dropout_p(dropout)
        for name, flag in (("bias", bias), ("batch_first", batch_first), ("causal", causal)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__} {flag!r}")
        kdim = embed_dim if kdim is None else _positive_int("kdim", kdim)
        vdim = embed_dim if vdim is None else _positive_int("vdim", vdim)

        self.embed_dim, self.kdim, self.vdim = embed_dim, kdim, vdim
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.batch_first, self.causal, self.dropout = batch_first, causal, dropout
        factory = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(kdim, num_kv_heads * head_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(vdim, num_kv_heads * head_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)

    @property
    def _sequence_layout(self) -> str:
        return "b s" if self.batch_first else "s b"

    def _split_heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        """``(B, S, heads * D)`` (or ``(S, B, heads * D)``) to a ``(B, heads, S, D)`` view with a contiguous
        last dim: no copy."""
        return rearrange(x, f"{self._sequence_layout} (h d) -> b h s d", h=heads)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, None]:
        """Attention of ``query`` over ``key``/``value``; arguments in ``torch.nn.MultiheadAttention``'s order.

        Args:
            query: ``(B, Sq, E)`` (``(Sq, B, E)`` when not batch_first).
            key: ``(B, Sk, kdim)``; defaults to ``query`` (self-attention).
            value: ``(B, Sk, vdim)``; defaults to ``key``.
            key_padding_mask: ``(B, Sk)``; bool with True = ignore that key (torch's convention), or float
                added to the scores. Read in place as a ``(B, 1, 1, Sk)`` view.
            need_weights: must be False: the weights are never materialised.
            attn_mask: ``(Sq, Sk)`` or ``(B * H, Sq, Sk)``; bool with True = not allowed (torch's
                convention), or float added to the scores. Given with key_padding_mask, the two are
                combined into one ``(B, 1 or H, Sq, Sk)`` mask, as torch does.
            is_causal: apply the causal mask (as ``causal=True`` does, bottom-right aligned, which is
                torch's mask when Sq == Sk). An ``attn_mask`` given as well still applies.

        Returns:
            ``(output, None)``: output ``(B, Sq, E)`` (or ``(Sq, B, E)``). A query that sees no key has
            attention output 0, so its output is the out projection's bias, never NaN.
        """
        if need_weights:
            raise ValueError(
                "need_weights=True is not supported: the fused kernels never materialise the attention "
                "weights; call with need_weights=False"
            )
        key = query if key is None else key
        value = key if value is None else value
        expected_widths = (("query", query, self.embed_dim), ("key", key, self.kdim), ("value", value, self.vdim))
        for name, tensor, width in expected_widths:
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
            if tensor.dim() != 3 or tensor.shape[-1] != width:
                layout = "(B, S, " if self.batch_first else "(S, B, "
                raise ValueError(f"{name} must have shape {layout}{width}), got {tuple(tensor.shape)}")
        batch_dim = 0 if self.batch_first else 1
        batch, seqlen_q = query.shape[batch_dim], query.shape[1 - batch_dim]
        seqlen_k = key.shape[1 - batch_dim]
        if key.shape[:2] != value.shape[:2]:
            raise ValueError(
                f"key and value must agree in batch and length, got key {tuple(key.shape)}, value {tuple(value.shape)}"
            )
        if key.shape[batch_dim] != batch:
            raise ValueError(
                f"query and key must have the same batch size, got query {batch}, key {key.shape[batch_dim]}"
            )

        q = self._split_heads(self.q_proj(query), self.num_heads)
        k = self._split_heads(self.k_proj(key), self.num_kv_heads)
        v = self._split_heads(self.v_proj(value), self.num_kv_heads)
        bias = self._attention_bias(key_padding_mask, attn_mask, batch, seqlen_q, seqlen_k)
        dropout_p = self.dropout if self.training else 0.0
        out = flash_attention(q, k, v, causal=self.causal or bool(is_causal), attn_bias=bias, dropout_p=dropout_p)
        out = rearrange(out, f"b h s d -> {self._sequence_layout} (h d)")
        return self.out_proj(out), None

    def _attention_bias(self, key_padding_mask, attn_mask, batch: int, seqlen_q: int, seqlen_k: int):
        """One bias for the kernels, bool True = keep or float added, broadcastable to ``(B, H, Sq, Sk)``."""
        masks = []
        if key_padding_mask is not None:
            _check_mask_dtype("key_padding_mask", key_padding_mask)
            if tuple(key_padding_mask.shape) != (batch, seqlen_k):
                raise ValueError(
                    f"key_padding_mask must have shape (B, Sk) = {(batch, seqlen_k)}, "
                    f"got {tuple(key_padding_mask.shape)}"
                )
            masks.append(rearrange(key_padding_mask, "b k -> b 1 1 k"))
        if attn_mask is not None:
            _check_mask_dtype("attn_mask", attn_mask)
            per_head = (batch * self.num_heads, seqlen_q, seqlen_k)
            if tuple(attn_mask.shape) == (seqlen_q, seqlen_k):
                masks.append(attn_mask)
            elif tuple(attn_mask.shape) == per_head:
                masks.append(rearrange(attn_mask, "(b h) q k -> b h q k", b=batch))
            else:
                raise ValueError(
                    f"attn_mask must have shape (Sq, Sk) = {(seqlen_q, seqlen_k)} or (B * num_heads, Sq, Sk) = "
                    f"{per_head}, got {tuple(attn_mask.shape)}"
                )
        if not masks:
            return None
        if all(mask.dtype == torch.bool for mask in masks):
            # torch's bool masks say True = ignore; the kernels keep True.
            keep = ~masks[0]
            for mask in masks[1:]:
                keep = keep & ~mask
            return keep
        float_dtype = next(mask.dtype for mask in masks if mask.dtype != torch.bool)
        bias = None
        for mask in masks:
            if mask.dtype == torch.bool:
                ignored = mask
                mask = torch.zeros(ignored.shape, dtype=float_dtype, device=ignored.device)
                mask = mask.masked_fill(ignored, float("-inf"))
            bias = mask if bias is None else bias + mask
        return bias

    @classmethod
    def from_torch(cls, module: nn.MultiheadAttention, causal: bool = False) -> "MultiheadAttention":
        """A ``MultiheadAttention`` holding copies of ``module``'s weights, on its device and in its dtype.

        Raises ``ValueError`` for what the fused module does not have: ``add_bias_kv`` and ``add_zero_attn``.
        The dropout probability is copied (the dropped elements differ from torch's: another generator).
        """
        if not isinstance(module, nn.MultiheadAttention):
            raise TypeError(f"module must be a torch.nn.MultiheadAttention, got {type(module).__name__}")
        if module.bias_k is not None or module.add_zero_attn:
            raise ValueError("module uses add_bias_kv or add_zero_attn, which MultiheadAttention does not support")
        weight = module.out_proj.weight
        fused = cls(
            module.embed_dim, module.num_heads, bias=module.in_proj_bias is not None,
            batch_first=module.batch_first, causal=causal, kdim=module.kdim, vdim=module.vdim,
            dropout=module.dropout, device=weight.device, dtype=weight.dtype,
        )
        if module._qkv_same_embed_dim:
            weights = module.in_proj_weight.chunk(3)
        else:
            weights = (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)
        biases = module.in_proj_bias.chunk(3) if module.in_proj_bias is not None else (None,) * 3
        with torch.no_grad():
            for projection, projection_weight, projection_bias in zip(
                (fused.q_proj, fused.k_proj, fused.v_proj), weights, biases
            ):
                projection.weight.copy_(projection_weight)
                if projection_bias is not None:
                    projection.bias.copy_(projection_bias)
            fused.out_proj.weight.copy_(module.out_proj.weight)
            if module.out_proj.bias is not None:
                fused.out_proj.bias.copy_(module.out_proj.bias)
        return fused

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
            f"batch_first={self.batch_first}, causal={self.causal}, dropout={self.dropout}"
        )


def _check_mask_dtype(name: str, mask) -> None:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
        raise TypeError(f"{name} must be a bool or floating tensor, got {mask.dtype}")
