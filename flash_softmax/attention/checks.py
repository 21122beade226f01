"""Validation of attention inputs (SPEC section 6).

Everything here reads only shapes, dtypes and devices: no check ever touches tensor data, so none
synchronises with the GPU. Every error names the argument, what was expected and what was given.
"""

from __future__ import annotations

import math
import numbers

import torch

from flash_softmax.attention.configs import MAX_HEAD_DIM

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _dtype_names() -> str:
    return ", ".join(str(d).replace("torch.", "") for d in SUPPORTED_DTYPES)


def check_attention_inputs(q, k, v) -> None:
    """Raise ``TypeError``/``ValueError`` unless q ``(B, Hq, Sq, D)``, k ``(B, Hkv, Sk, D)``,
    v ``(B, Hkv, Sk, Dv)`` form a valid attention call."""
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if tensor.dim() != 4:
            raise ValueError(
                f"{name} must have 4 dims (batch, heads, seqlen, head_dim), got {tensor.dim()} dims "
                f"with shape {tuple(tensor.shape)}"
            )
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if tensor.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} must have dtype {_dtype_names()}, got {tensor.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got q on {q.device}, k on {k.device}, v on {v.device}")

    batch, heads_q, _, head_dim = q.shape
    if k.shape[0] != batch or v.shape[0] != batch:
        raise ValueError(
            f"q, k and v must have the same batch size, got q {batch}, k {k.shape[0]}, v {v.shape[0]}"
        )
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"k and v must have the same number of heads, got k {k.shape[1]}, v {v.shape[1]}")
    heads_kv = k.shape[1]
    if heads_kv == 0 and heads_q != 0:
        raise ValueError(f"k must have at least one head when q has {heads_q}, got 0")
    if heads_kv and heads_q % heads_kv != 0:
        raise ValueError(
            f"the number of query heads must be a multiple of the key/value heads (Hq % Hkv == 0), "
            f"got q with {heads_q} heads and k/v with {heads_kv}"
        )
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have the same sequence length, got k {k.shape[2]}, v {v.shape[2]}")
    if k.shape[3] != head_dim:
        raise ValueError(f"q and k must have the same head dim, got q {head_dim}, k {k.shape[3]}")
    for name, size in (("q and k", head_dim), ("v", v.shape[3])):
        if not 1 <= size <= MAX_HEAD_DIM:
            raise ValueError(f"head dim of {name} must be between 1 and {MAX_HEAD_DIM}, got {size}")


def check_flag(name: str, value) -> bool:
    """``value`` must be a bool."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def resolve_softmax_scale(softmax_scale, head_dim: int) -> float:
    """``1 / sqrt(head_dim)`` by default; otherwise a finite real number."""
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real):
        raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
    if not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale must be finite, got {softmax_scale}")
    return float(softmax_scale)


def resolve_window(window_size, causal: bool) -> tuple[int, int]:
    """``(left, right)`` with -1 for unbounded; causal sets ``right = 0`` (SPEC: causal is ``(left, 0)``)."""
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise TypeError(f"window_size must be a (left, right) pair of ints, got {window_size!r}")
    for side, value in zip(("left", "right"), window_size):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"window_size {side} must be an int, got {type(value).__name__} {value!r}")
        if value < -1:
            raise ValueError(f"window_size {side} must be -1 (unbounded) or >= 0, got {value}")
    left, right = int(window_size[0]), int(window_size[1])
    return left, 0 if causal else right


def resolve_softcap(softcap) -> float:
    """0 disables the cap; otherwise a finite positive number."""
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"softcap must be a float, got {type(softcap).__name__}")
    if not math.isfinite(softcap) or softcap < 0:
        raise ValueError(f"softcap must be 0 (off) or a finite positive number, got {softcap}")
    return float(softcap)


def expand_attn_bias(attn_bias, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """The bias as a ``(B, Hq, Sq, Sk)`` view: broadcast dims get stride 0, nothing is copied."""
    if attn_bias is None:
        return None
    if not isinstance(attn_bias, torch.Tensor):
        raise TypeError(f"attn_bias must be a torch.Tensor or None, got {type(attn_bias).__name__}")
    if attn_bias.dtype != torch.bool and not attn_bias.dtype.is_floating_point:
        raise TypeError(f"attn_bias must be a bool mask or a floating tensor, got {attn_bias.dtype}")
    if attn_bias.device != q.device:
        raise ValueError(f"attn_bias must be on q's device {q.device}, got {attn_bias.device}")
    target = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    if attn_bias.dim() > 4 or not _broadcasts_to(attn_bias.shape, target):
        raise ValueError(
            f"attn_bias of shape {tuple(attn_bias.shape)} does not broadcast to (B, Hq, Sq, Sk) = {target}"
        )
    return attn_bias.expand(target)


def _broadcasts_to(shape, target) -> bool:
    """Whether ``shape`` broadcasts to exactly ``target`` (never enlarging it)."""
    try:
        return tuple(torch.broadcast_shapes(shape, target)) == tuple(target)
    except RuntimeError:
        return False
