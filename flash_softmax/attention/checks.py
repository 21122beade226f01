"""Validation of attention inputs (docs/semantics.md, 'Errors').

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
    # This runs on every call: each group of checks first asks whether all is well in one expression, and
    # only looks for the argument to name when it is not. Each ``.shape`` builds a torch.Size: read once.
    tensor = torch.Tensor
    if not (isinstance(q, tensor) and isinstance(k, tensor) and isinstance(v, tensor)):
        for name, value in (("q", q), ("k", k), ("v", v)):
            if not isinstance(value, tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    q_shape, k_shape, v_shape = q.shape, k.shape, v.shape
    if not (len(q_shape) == len(k_shape) == len(v_shape) == 4):
        for name, shape in (("q", q_shape), ("k", k_shape), ("v", v_shape)):
            if len(shape) != 4:
                raise ValueError(
                    f"{name} must have 4 dims (batch, heads, seqlen, head_dim), got {len(shape)} dims "
                    f"with shape {tuple(shape)}"
                )
    dtype = q.dtype
    if not (dtype == k.dtype == v.dtype and dtype in SUPPORTED_DTYPES):
        for name, tensor in (("q", q), ("k", k), ("v", v)):
            if tensor.dtype not in SUPPORTED_DTYPES:
                raise TypeError(f"{name} must have dtype {_dtype_names()}, got {tensor.dtype}")
        raise TypeError(f"q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got q on {q.device}, k on {k.device}, v on {v.device}")

    batch, heads_q, _, head_dim = q_shape
    if k_shape[0] != batch or v_shape[0] != batch:
        raise ValueError(
            f"q, k and v must have the same batch size, got q {batch}, k {k_shape[0]}, v {v_shape[0]}"
        )
    heads_kv = k_shape[1]
    if heads_kv != v_shape[1]:
        raise ValueError(f"k and v must have the same number of heads, got k {heads_kv}, v {v_shape[1]}")
    if heads_kv == 0 and heads_q != 0:
        raise ValueError(f"k must have at least one head when q has {heads_q}, got 0")
    if heads_kv and heads_q % heads_kv != 0:
        raise ValueError(
            f"the number of query heads must be a multiple of the key/value heads (Hq % Hkv == 0), "
            f"got q with {heads_q} heads and k/v with {heads_kv}"
        )
    if k_shape[2] != v_shape[2]:
        raise ValueError(f"k and v must have the same sequence length, got k {k_shape[2]}, v {v_shape[2]}")
    if k_shape[3] != head_dim:
        raise ValueError(f"q and k must have the same head dim, got q {head_dim}, k {k_shape[3]}")
    if not (1 <= head_dim <= MAX_HEAD_DIM and 1 <= v_shape[3] <= MAX_HEAD_DIM):
        for name, size in (("q and k", head_dim), ("v", v_shape[3])):
            if not 1 <= size <= MAX_HEAD_DIM:
                raise ValueError(f"head dim of {name} must be between 1 and {MAX_HEAD_DIM}, got {size}")


def check_flag(name: str, value) -> bool:
    """``value`` must be a bool."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def _finite(value) -> bool:
    """``math.isfinite`` written as comparisons (NaN fails both), which ``torch.compile`` can also evaluate
    on a symbolic float (``dynamic=True`` makes float arguments symbolic; ``math.isfinite`` breaks the graph)."""
    return -math.inf < value < math.inf


def resolve_softmax_scale(softmax_scale, head_dim: int) -> float:
    """``1 / sqrt(head_dim)`` by default; otherwise a finite real number."""
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real):
        raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
    if not _finite(softmax_scale):
        raise ValueError(f"softmax_scale must be finite, got {softmax_scale}")
    return float(softmax_scale)


def resolve_window(window_size, causal: bool) -> tuple[int, int]:
    """``(left, right)`` with -1 for unbounded; causal sets ``right = 0`` (causal is the window ``(left, 0)``)."""
    # The usual call passes a pair of plain ints: accept it without the numbers.Integral checks, whose
    # abstract-class lookups cost more than the rest of this function.
    if type(window_size) is tuple and len(window_size) == 2:
        left, right = window_size
        if type(left) is int and type(right) is int and left >= -1 and right >= -1:
            return left, 0 if causal else right
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
    if type(softcap) is float and 0.0 <= softcap < math.inf:  # the usual call, without numbers.Real
        return softcap
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"softcap must be a float, got {type(softcap).__name__}")
    if not _finite(softcap) or softcap < 0:
        raise ValueError(f"softcap must be 0 (off) or a finite positive number, got {softcap}")
    return float(softcap)


def check_attn_bias(attn_bias, q: torch.Tensor, k: torch.Tensor) -> None:
    """Raise unless ``attn_bias`` is None or a bool / floating tensor on q's device that broadcasts to
    ``(B, Hq, Sq, Sk)``."""
    if attn_bias is None:
        return
    if not isinstance(attn_bias, torch.Tensor):
        raise TypeError(f"attn_bias must be a torch.Tensor or None, got {type(attn_bias).__name__}")
    if attn_bias.dtype != torch.bool and not attn_bias.dtype.is_floating_point:
        raise TypeError(f"attn_bias must be a bool mask or a floating tensor, got {attn_bias.dtype}")
    if attn_bias.device != q.device:
        raise ValueError(f"attn_bias must be on q's device {q.device}, got {attn_bias.device}")
    shape = attn_bias.shape
    q_shape = q.shape
    target = (q_shape[0], q_shape[1], q_shape[2], k.shape[2])
    # Broadcasting to exactly ``target`` (never enlarging it): every trailing dim is 1 or the target's.
    # Written out rather than through torch.broadcast_shapes, which costs tens of microseconds per call.
    fits = len(shape) <= 4
    for size, want in zip(shape[::-1], target[::-1]):
        fits = fits and (size == 1 or size == want)
    if not fits:
        raise ValueError(
            f"attn_bias of shape {tuple(shape)} does not broadcast to (B, Hq, Sq, Sk) = {target}"
        )


def broadcast_attn_bias(attn_bias: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """An already checked (``check_attn_bias``) bias as a ``(B, Hq, Sq, Sk)`` view: broadcast dims get
    stride 0, nothing is copied and nothing is validated again."""
    if attn_bias is None:
        return None
    return attn_bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])


def expand_attn_bias(attn_bias, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """``check_attn_bias`` then ``broadcast_attn_bias``: the bias as a ``(B, Hq, Sq, Sk)`` view."""
    check_attn_bias(attn_bias, q, k)
    return broadcast_attn_bias(attn_bias, q, k)


def _check_per_head(name: str, tensor, q: torch.Tensor, shapes: dict[str, tuple[int, ...]]) -> None:
    """Raise unless ``tensor`` is a floating tensor on q's device with one of ``shapes`` (named, e.g.
    ``{"(Hq,)": (4,)}``): the checks shared by the per-head modifiers."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(tensor).__name__}")
    if not tensor.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating tensor, got {tensor.dtype}")
    if tuple(tensor.shape) not in shapes.values():
        wanted = " or ".join(f"{label} = {shape}" for label, shape in shapes.items())
        raise ValueError(f"{name} must have shape {wanted}, got {tuple(tensor.shape)}")
    if tensor.device != q.device:
        raise ValueError(f"{name} must be on q's device {q.device}, got {tensor.device}")


def check_sinks(sinks, q: torch.Tensor) -> None:
    """Raise unless ``sinks`` is None or a floating ``(Hq,)`` tensor on q's device (any float dtype)."""
    if sinks is not None:
        _check_per_head("sinks", sinks, q, {"(Hq,)": (q.shape[1],)})


def check_alibi_slopes(alibi_slopes, q: torch.Tensor, num_seqs: int | None = None) -> None:
    """Raise unless ``alibi_slopes`` is None or a floating ``(Hq,)`` or ``(B, Hq)`` tensor on q's device that
    does not require grad (the slopes are constants of the model, not parameters). For a packed batch of
    ``num_seqs`` sequences (q ``(T, Hq, D)``), ``(Hq,)`` or ``(N, Hq)``."""
    if alibi_slopes is None:
        return
    heads_q = q.shape[1]
    per_batch = {"(B, Hq)": (q.shape[0], heads_q)} if num_seqs is None else {"(N, Hq)": (num_seqs, heads_q)}
    _check_per_head("alibi_slopes", alibi_slopes, q, {"(Hq,)": (heads_q,), **per_batch})
    if alibi_slopes.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "alibi_slopes must not require grad: ALiBi slopes receive no gradient (pass alibi_slopes.detach())"
        )


def resolve_dropout_p(dropout_p) -> float:
    """A probability in [0, 1)."""
    if type(dropout_p) is float and 0.0 <= dropout_p < 1.0:  # the usual call, without numbers.Real
        return dropout_p
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}")
    if not 0 <= dropout_p < 1:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    return float(dropout_p)


def pad_to_four_dims(shape) -> tuple[int, ...]:
    """A broadcastable shape of at most four dims with leading 1s added to make four."""
    return (1,) * (4 - len(shape)) + tuple(shape)


CU_SEQLENS_DTYPES = (torch.int32, torch.int64)


def check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) -> None:
    """Raise ``TypeError``/``ValueError`` unless q ``(Tq, Hq, D)``, k ``(Tk, Hkv, D)``, v ``(Tk, Hkv, Dv)`` and
    the int32/int64 ``(N + 1,)`` cumulative lengths ``cu_seqlens_q`` / ``cu_seqlens_k`` on their device form
    a valid packed call, and each ``max_seqlen_*`` is None or an int >= 0. Only shapes, dtypes and devices
    are read: the values of ``cu_seqlens`` stay on the device (reading them would synchronise)."""
    for name, value in (("q", q), ("k", k), ("v", v)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if value.dim() != 3:
            raise ValueError(
                f"{name} must have 3 dims (total_tokens, heads, head_dim) for flash_attention_varlen, got "
                f"{value.dim()} dims with shape {tuple(value.shape)}"
            )
    # The remaining checks of q, k and v are those of a batch of one: (1, H, T, D).
    check_attention_inputs(*(t.unsqueeze(0).transpose(1, 2) for t in (q, k, v)))
    sequences = []
    for name, cu_seqlens in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu_seqlens, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(cu_seqlens).__name__}")
        if cu_seqlens.dtype not in CU_SEQLENS_DTYPES:
            raise TypeError(f"{name} must have dtype int32 or int64, got {cu_seqlens.dtype}")
        if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1:
            raise ValueError(
                f"{name} must have shape (N + 1,) for N sequences (at least one entry, 0), got shape "
                f"{tuple(cu_seqlens.shape)}"
            )
        if cu_seqlens.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {cu_seqlens.device}")
        sequences.append(cu_seqlens.shape[0] - 1)
    if sequences[0] != sequences[1]:
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, got "
            f"{sequences[0]} (shape ({sequences[0] + 1},)) and {sequences[1]} (shape ({sequences[1] + 1},))"
        )
    for name, bound in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if bound is None:
            continue
        if isinstance(bound, bool) or not isinstance(bound, (numbers.Integral, torch.SymInt)):
            raise TypeError(f"{name} must be an int or None, got {type(bound).__name__} {bound!r}")
        if bound < 0:
            raise ValueError(f"{name} must be >= 0, got {bound}")


def resolve_score_options(q, causal, return_lse, softmax_scale, window_size, softcap, sinks, alibi_slopes, dropout_p,
                          num_seqs: int | None = None) -> tuple:
    """The options ``flash_attention`` and ``flash_attention_varlen`` share, checked and resolved:
    ``(scale, window_left, window_right, softcap, alibi_slopes, dropout_p)``, the slopes detached and float32
    (``num_seqs``: a packed batch's sequence count, for the slopes' per-sequence shape)."""
    check_flag("causal", causal)
    check_flag("return_lse", return_lse)
    scale = resolve_softmax_scale(softmax_scale, q.shape[-1])
    left, right = resolve_window(window_size, causal)
    softcap = resolve_softcap(softcap)
    dropout_p = resolve_dropout_p(dropout_p)
    check_sinks(sinks, q)
    check_alibi_slopes(alibi_slopes, q, num_seqs)
    if alibi_slopes is not None:
        alibi_slopes = alibi_slopes.detach().to(torch.float32)
    return scale, left, right, softcap, alibi_slopes, dropout_p


BLOCK_TABLE_DTYPES = (torch.int32, torch.int64)


def _check_tensor(name: str, value, dims: int, layout: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != dims:
        raise ValueError(f"{name} must have {dims} dims {layout}, got {value.dim()} dims with shape {tuple(value.shape)}")


def check_kvcache_inputs(q, k_cache, v_cache, k, v, cache_seqlens, block_table, num_splits) -> int:
    """Raise ``TypeError``/``ValueError`` unless the arguments form a valid ``flash_attention_with_kvcache``
    call; return the cache's capacity (tokens one sequence can hold).

    q ``(B, Hq, Sq, D)``; k_cache / v_cache ``(B, Hkv, Smax, D / Dv)``, or with ``block_table``
    ``(num_pages, Hkv, page_size, D / Dv)`` and ``block_table`` int32 (int64 accepted) ``(B, pages_per_seq)``;
    the caches' last dim contiguous (they are read and written in place); ``k`` / ``v`` both None or
    ``(B, Hkv, Sn, D / Dv)``; ``cache_seqlens`` None (the caches are full), an int, or an int32/int64 ``(B,)``
    tensor, and given whenever ``k`` is; ``num_splits`` an int >= 0. Only shapes, dtypes and devices are read
    (plus the value of an int ``cache_seqlens``): a tensor's values stay on the device."""
    _check_tensor("q", q, 4, "(batch, heads, seqlen, head_dim)")
    paged = block_table is not None
    cache_layout = "(num_pages, heads, page_size, head_dim)" if paged else "(batch, heads, max_seqlen, head_dim)"
    _check_tensor("k_cache", k_cache, 4, cache_layout)
    _check_tensor("v_cache", v_cache, 4, cache_layout)
    batch = q.shape[0]
    # q against the caches: dtypes, devices, heads and head dims as a (B, Hkv, S, D) call would be checked.
    outer = k_cache.shape[0]
    if not paged and outer != batch:
        raise ValueError(f"k_cache must have q's batch size {batch} in dim 0 (or pass block_table for a paged "
                         f"cache), got shape {tuple(k_cache.shape)}")
    if v_cache.shape[0] != outer or v_cache.shape[2] != k_cache.shape[2]:
        raise ValueError(f"k_cache and v_cache must agree in dims 0 and 2, got k_cache {tuple(k_cache.shape)} and "
                         f"v_cache {tuple(v_cache.shape)}")
    if outer == 0 and paged:
        raise ValueError(f"k_cache must hold at least one page, got shape {tuple(k_cache.shape)}")
    for name, tensor in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if tensor.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} must have dtype {_dtype_names()}, got {tensor.dtype}")
        if tensor.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {tensor.dtype}")
        if tensor.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {tensor.device}")
    heads_q, heads_kv = q.shape[1], k_cache.shape[1]
    if v_cache.shape[1] != heads_kv:
        raise ValueError(f"k_cache and v_cache must have the same number of heads, got {heads_kv} and "
                         f"{v_cache.shape[1]}")
    if heads_kv == 0 or heads_q % heads_kv:
        raise ValueError(f"the number of query heads must be a multiple of the key/value heads (Hq % Hkv == 0), "
                         f"got q with {heads_q} heads and the caches with {heads_kv}")
    if k_cache.shape[3] != q.shape[3]:
        raise ValueError(f"q and k_cache must have the same head dim, got q {q.shape[3]}, k_cache {k_cache.shape[3]}")
    for name, size in (("q and k_cache", q.shape[3]), ("v_cache", v_cache.shape[3])):
        if not 1 <= size <= MAX_HEAD_DIM:
            raise ValueError(f"head dim of {name} must be between 1 and {MAX_HEAD_DIM}, got {size}")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.stride(-1) != 1 and cache.shape[-1] != 1:
            raise ValueError(f"{name} must have a contiguous last dim (stride 1; it is written in place), got "
                             f"strides {tuple(cache.stride())}")
    if paged:
        if not isinstance(block_table, torch.Tensor):
            raise TypeError(f"block_table must be a torch.Tensor or None, got {type(block_table).__name__}")
        if block_table.dtype not in BLOCK_TABLE_DTYPES:
            raise TypeError(f"block_table must have dtype int32 or int64, got {block_table.dtype}")
        if block_table.dim() != 2 or block_table.shape[0] != batch:
            raise ValueError(f"block_table must have shape (B, pages_per_seq) with B = {batch}, got shape "
                             f"{tuple(block_table.shape)}")
        if block_table.device != q.device:
            raise ValueError(f"block_table must be on q's device {q.device}, got {block_table.device}")
        if k_cache.shape[2] < 1:
            raise ValueError(f"k_cache's page size (dim 2) must be >= 1, got shape {tuple(k_cache.shape)}")
    capacity = k_cache.shape[2] * (block_table.shape[1] if paged else 1)

    if (k is None) != (v is None):
        raise ValueError(f"k and v must be given together, got k {_describe(k)} and v {_describe(v)}")
    new_keys = 0
    if k is not None:
        _check_tensor("k", k, 4, "(batch, heads, new_seqlen, head_dim)")
        _check_tensor("v", v, 4, "(batch, heads, new_seqlen, head_dim)")
        heads_kv, head_dim, head_dim_v = k_cache.shape[1], k_cache.shape[3], v_cache.shape[3]
        for name, tensor, want in (("k", k, (batch, heads_kv, k.shape[2], head_dim)),
                                   ("v", v, (batch, heads_kv, k.shape[2], head_dim_v))):
            if tuple(tensor.shape) != want:
                raise ValueError(f"{name} must have shape (B, Hkv, Sn, {'D' if name == 'k' else 'Dv'}) = {want} to "
                                 f"match q and the caches, got {tuple(tensor.shape)}")
            if tensor.dtype != q.dtype:
                raise TypeError(f"{name} must have q's dtype {q.dtype}, got {tensor.dtype}")
            if tensor.device != q.device:
                raise ValueError(f"{name} must be on q's device {q.device}, got {tensor.device}")
        new_keys = k.shape[2]
        if cache_seqlens is None:
            raise ValueError("cache_seqlens is required with k and v: it says where in the cache they are written")
        if new_keys > capacity:
            raise ValueError(f"k and v append Sn = {new_keys} tokens to a cache that holds {capacity}")

    if isinstance(cache_seqlens, torch.Tensor):
        if cache_seqlens.dtype not in CU_SEQLENS_DTYPES:
            raise TypeError(f"cache_seqlens must have dtype int32 or int64, got {cache_seqlens.dtype}")
        if tuple(cache_seqlens.shape) != (batch,):
            raise ValueError(f"cache_seqlens must have shape (B,) = ({batch},), got {tuple(cache_seqlens.shape)}")
        if cache_seqlens.device != q.device:
            raise ValueError(f"cache_seqlens must be on q's device {q.device}, got {cache_seqlens.device}")
    elif cache_seqlens is not None:
        if isinstance(cache_seqlens, bool) or not isinstance(cache_seqlens, numbers.Integral):
            raise TypeError(f"cache_seqlens must be an int, a (B,) int32 tensor or None, got "
                            f"{type(cache_seqlens).__name__} {cache_seqlens!r}")
        if not 0 <= cache_seqlens <= capacity - new_keys:
            raise ValueError(f"cache_seqlens must be in [0, capacity - Sn] = [0, {capacity - new_keys}] (the cache "
                             f"holds {capacity} tokens, {new_keys} are appended), got {cache_seqlens}")
    if isinstance(num_splits, bool) or not isinstance(num_splits, numbers.Integral):
        raise TypeError(f"num_splits must be an int, got {type(num_splits).__name__} {num_splits!r}")
    if num_splits < 0:
        raise ValueError(f"num_splits must be >= 0 (0 chooses, 1 never splits), got {num_splits}")
    return capacity


def _describe(value) -> str:
    return "None" if value is None else f"{type(value).__name__}"


def check_inference_only(q: torch.Tensor, function: str) -> None:
    """Raise when q requires grad with grad mode on: ``function`` has no backward."""
    if q.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            f"{function} is inference only (it has no backward), but q requires grad with grad mode on: call it "
            "under torch.no_grad() / torch.inference_mode(), pass q.detach(), or use flash_attention for training"
        )
