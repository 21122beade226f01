"""The implementations ``flash-softmax bench`` times, by name.

A provider turns a configuration and its input tensors into a forward callable. The sweep times every
provider on the very same tensors, in one process. A provider that cannot run a configuration raises
:class:`Unsupported` (from ``build`` or from the first call), which becomes a row with status
``unsupported`` instead of an error.

The registries :data:`ATTENTION_PROVIDERS`, :data:`VARLEN_PROVIDERS` (``--varlen``), :data:`DECODE_PROVIDERS`
(``--decode``) and :data:`SOFTMAX_PROVIDERS` are looked up at run time, so a provider added to them is benchmarked
like the others.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F


class Unsupported(Exception):
    """The provider cannot run this configuration on this device (not a failure of the provider)."""


@dataclass(frozen=True)
class Provider:
    """One implementation under test.

    Attributes:
        name: the name used by ``--providers`` and in the CSV.
        build: ``build(config, *inputs) -> forward`` where ``forward()`` returns the output. Attention
            gets ``(q, k, v)`` of shape ``(B, H, S, D)``, softmax gets ``(x,)``; ``config`` is the
            benchmark's configuration (``causal``, ``seqlen_q``, ... for attention). Packed attention
            (``--varlen``) gets ``(q, k, v, packing)``: the packed ``(T, H, D)`` tensors, or the padded ``(N, H,
            S, D)`` ones where ``padded``, and the :class:`~flash_softmax.bench.varlen.Packing`; its
            ``forward()`` returns the output in the layout of its q. A decoding step (``--decode``) gets
            ``(inputs,)``, a :class:`~flash_softmax.bench.decode.DecodeInputs` (q, the caches and their lengths).
        context: a context manager factory entered around the warm-up and all timed calls, e.g. to force
            an SDPA backend, so that entering it is not timed.
        on_cpu: whether the provider is part of the default set on a CPU-only machine.
        takes_modifiers: whether an attention ``build`` also takes a score modifier's keyword arguments
            (``sinks``, ``alibi_slopes``, ``dropout_p``, ``attn_bias``, as ``flash_attention`` names them);
            only such providers are timed with ``--modifiers``.
        padded: for ``--varlen``, whether ``build`` takes the sequences padded to the longest, one per batch
            row, instead of packed along dim 0.
        paged: for ``--decode``, whether ``build`` reads the paged cache (its rows record the page size).
    """

    name: str
    build: Callable[..., Callable[[], torch.Tensor]]
    context: Callable[[], contextlib.AbstractContextManager[Any]] = field(default=contextlib.nullcontext)
    on_cpu: bool = True
    takes_modifiers: bool = False
    padded: bool = False
    paged: bool = False


def _flash_softmax_attention(config, q, k, v, **modifiers):
    import flash_softmax as fs

    return lambda: fs.flash_attention(q, k, v, causal=config.causal, window_size=config.window_size(), **modifiers)


# Messages torch raises when the forced SDPA backend cannot take the inputs (CUDA and CPU builds word it
# differently); they mean "unsupported", not "broken".
_SDPA_NO_KERNEL = ("No available kernel", "No viable backend")


def _band_mask(config, device) -> torch.Tensor:
    """Bool (Sq, Sk) keep-mask of the configuration's causal / window band, for providers that need one."""
    from flash_softmax.reference import band_mask

    return band_mask(config.seqlen_q, config.seqlen_k, config.causal, config.window_size(), device)


def _sdpa(backend_name: str, q, k, v, **options):
    """``F.scaled_dot_product_attention`` under the forced backend; its refusal of the inputs is Unsupported."""
    try:
        return F.scaled_dot_product_attention(q, k, v, **options)
    except RuntimeError as error:
        if any(message in str(error) for message in _SDPA_NO_KERNEL):
            raise Unsupported(f"SDPA backend {backend_name} cannot run these inputs") from None
        raise


def _sdpa_builder(backend_name: str):
    def build(config, q, k, v):
        mask = None
        if config.window >= 0:
            # SDPA has no window: a materialised mask, built here so that building it is not timed.
            mask = _band_mask(config, q.device)
        elif config.causal and config.seqlen_q != config.seqlen_k:
            # SDPA's is_causal is aligned to the top-left corner, ours to the bottom-right: they only agree
            # for square score matrices.
            raise Unsupported("SDPA's is_causal is top-left aligned; differs from bottom-right when Sq != Sk")
        is_causal = config.causal and mask is None
        enable_gqa = config.group_size > 1
        return lambda: _sdpa(backend_name, q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=enable_gqa)

    return build


def _sdpa_context(backend_name: str):
    def context():
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(getattr(SDPBackend, backend_name))

    return context


_compiled_flex_attention = None


def _allow_a_graph_per_shape() -> None:
    """Every shape of a sweep is a new graph for ``torch.compile``; past dynamo's default limit of 8
    recompilations it would silently run the function eagerly, and the timings would no longer be those of
    the compiled provider. Raise the limit far beyond any sweep."""
    import torch._dynamo

    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 1024))


def _flex_attention_compiled():
    """``flex_attention`` under ``torch.compile``, compiled once per process (and per shape by dynamo)."""
    global _compiled_flex_attention
    if _compiled_flex_attention is None:
        from torch.nn.attention.flex_attention import flex_attention

        _allow_a_graph_per_shape()
        _compiled_flex_attention = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex_attention


def _flex_attention(config, q, k, v):
    try:
        from torch.nn.attention.flex_attention import create_block_mask
    except ImportError:
        raise Unsupported(f"torch {torch.__version__} has no FlexAttention") from None
    flex_attention = _flex_attention_compiled()
    block_mask = None
    if config.causal or config.window >= 0:
        offset = config.seqlen_k - config.seqlen_q
        left, right = config.window_size()
        right = 0 if config.causal else right

        def bottom_right_band(batch, head, q_index, kv_index):
            keep = kv_index <= q_index + offset + right if right >= 0 else kv_index >= 0
            if left >= 0:
                keep = keep & (kv_index >= q_index + offset - left)
            return keep

        block_mask = create_block_mask(
            bottom_right_band, None, None, config.seqlen_q, config.seqlen_k, device=q.device
        )
    enable_gqa = config.group_size > 1

    def forward():
        try:
            return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)
        except NotImplementedError as error:
            # FlexAttention's own word for inputs it does not handle, e.g. a backward on the CPU.
            raise Unsupported(f"FlexAttention: {error}") from None

    return forward


def _naive_attention(config, q, k, v):
    from flash_softmax import reference

    return lambda: reference.attention(q, k, v, causal=config.causal, window_size=config.window_size(),
                                       upcast=False)


#: Attention providers by name, in the order they appear in tables and plots.
ATTENTION_PROVIDERS: dict[str, Provider] = {
    provider.name: provider
    for provider in (
        Provider("flash_softmax", _flash_softmax_attention, takes_modifiers=True),
        Provider("sdpa_flash", _sdpa_builder("FLASH_ATTENTION"), _sdpa_context("FLASH_ATTENTION")),
        Provider("sdpa_cudnn", _sdpa_builder("CUDNN_ATTENTION"), _sdpa_context("CUDNN_ATTENTION"), on_cpu=False),
        Provider("sdpa_efficient", _sdpa_builder("EFFICIENT_ATTENTION"), _sdpa_context("EFFICIENT_ATTENTION"),
                 on_cpu=False),
        Provider("sdpa_math", _sdpa_builder("MATH"), _sdpa_context("MATH")),
        # Compiling FlexAttention for the CPU takes about half a minute per shape: asked for, not default.
        Provider("flex", _flex_attention, on_cpu=False),
        Provider("naive", _naive_attention),
    )
}


# ------------------------------------------------------------------------------- packed (--varlen)


def _flash_softmax_varlen(config, q, k, v, packing):
    import flash_softmax as fs

    return lambda: fs.flash_attention_varlen(q, k, v, packing.cu_seqlens, packing.cu_seqlens, packing.max_seqlen,
                                             packing.max_seqlen, causal=config.causal)


def _flash_softmax_padded(config, q, k, v, packing):
    import flash_softmax as fs

    # Each row's keys end at its sequence's length: with the (N, 1, 1, S) keep-mask the real rows are exact;
    # causal needs nothing more, as the padding comes after every real token.
    return lambda: fs.flash_attention(q, k, v, causal=config.causal, attn_bias=packing.key_padding)


def _sdpa_padded_builder(backend_name: str):
    def build(config, q, k, v, packing):
        mask = packing.key_padding
        if config.causal:
            # SDPA takes a mask or is_causal, not both: the (N, 1, S, S) combination, built here, untimed.
            longest = packing.max_seqlen
            mask = mask & torch.ones(longest, longest, dtype=torch.bool, device=q.device).tril()
        enable_gqa = config.group_size > 1
        return lambda: _sdpa(backend_name, q, k, v, attn_mask=mask, enable_gqa=enable_gqa)

    return build


def _flex_attention_documents(config, q, k, v, packing):
    """FlexAttention on the packed tokens seen as a batch of one, ``(1, H, T, D)``, with a document mask: a
    ``BlockMask`` built once from each token's sequence id, so key blocks of other documents are skipped."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask
    except ImportError:
        raise Unsupported(f"torch {torch.__version__} has no FlexAttention") from None
    flex_attention = _flex_attention_compiled()
    document = packing.document
    if config.causal:
        def same_document(batch, head, q_index, kv_index):
            # Queries and keys are the same tokens: within a document, causal is kv_index <= q_index.
            return (document[q_index] == document[kv_index]) & (kv_index <= q_index)
    else:
        def same_document(batch, head, q_index, kv_index):
            return document[q_index] == document[kv_index]
    tokens = q.shape[0]
    block_mask = create_block_mask(same_document, None, None, tokens, tokens, device=q.device)
    q, k, v = (tensor.transpose(0, 1).unsqueeze(0) for tensor in (q, k, v))
    enable_gqa = config.group_size > 1

    def forward():
        try:
            out = flex_attention(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)
        except NotImplementedError as error:
            raise Unsupported(f"FlexAttention: {error}") from None
        return out[0].transpose(0, 1)  # back to the packed (T, H, D) layout, a view

    return forward


#: Providers of ``--varlen`` by name: flash_softmax is ``flash_attention_varlen`` on the packed tokens.
VARLEN_PROVIDERS: dict[str, Provider] = {
    provider.name: provider
    for provider in (
        Provider("flash_softmax", _flash_softmax_varlen),
        Provider("flash_softmax_padded", _flash_softmax_padded, padded=True),
        Provider("sdpa_cudnn", _sdpa_padded_builder("CUDNN_ATTENTION"), _sdpa_context("CUDNN_ATTENTION"), on_cpu=False,
                 padded=True),
        Provider("sdpa_efficient", _sdpa_padded_builder("EFFICIENT_ATTENTION"), _sdpa_context("EFFICIENT_ATTENTION"),
                 on_cpu=False, padded=True),
        Provider("sdpa_math", _sdpa_padded_builder("MATH"), _sdpa_context("MATH"), padded=True),
        # Compiling FlexAttention for the CPU takes tens of seconds per shape: asked for, not default.
        Provider("flex", _flex_attention_documents, on_cpu=False),
    )
}


# ------------------------------------------------------------------------------- decoding (--decode)


def _flash_softmax_decode(config, inputs):
    import flash_softmax as fs

    return lambda: fs.flash_attention_with_kvcache(inputs.q, inputs.k_cache, inputs.v_cache,
                                                   cache_seqlens=inputs.cache_seqlens)


def _flash_softmax_decode_paged(config, inputs):
    import flash_softmax as fs

    return lambda: fs.flash_attention_with_kvcache(inputs.q, inputs.k_pages, inputs.v_pages,
                                                   cache_seqlens=inputs.cache_seqlens, block_table=inputs.block_table)


def sdpa_takes_enable_gqa() -> bool:
    """Whether this torch's SDPA has ``enable_gqa`` (torch 2.5 and later)."""
    return torch.torch_version.TorchVersion(torch.__version__) >= "2.5"


def _sdpa_decode_builder(backend_name: str):
    def build(config, inputs):
        # SDPA takes no per-sequence lengths: the cache sliced to the one length every sequence of the sweep has
        # (a view, no copy). Sq = 1 sees every key, so no mask and no is_causal.
        length = config.cache_len
        k, v = inputs.k_cache[:, :, :length], inputs.v_cache[:, :, :length]
        if config.group_size == 1 or sdpa_takes_enable_gqa():
            # Grouped heads through enable_gqa: each K/V head is read in place for its group of query heads.
            options = {"enable_gqa": config.group_size > 1}
        else:
            # A torch without enable_gqa: the K/V heads repeated once per query head, here (untimed); the timed
            # call then reads group_size times the bytes kv_gbps counts.
            k, v = (tensor.repeat_interleave(config.group_size, dim=1) for tensor in (k, v))
            options = {}
        return lambda: _sdpa(backend_name, inputs.q, k, v, **options)

    return build


def _flex_attention_decode(config, inputs):
    """FlexAttention on the whole cache with a ``BlockMask`` of each sequence's length, built once (untimed): key
    blocks past a sequence's length are skipped, as ``cache_seqlens`` makes flash_softmax skip them."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask
    except ImportError:
        raise Unsupported(f"torch {torch.__version__} has no FlexAttention") from None
    flex_attention = _flex_attention_compiled()
    lengths = inputs.cache_seqlens

    def within_length(batch, head, q_index, kv_index):
        return kv_index < lengths[batch]

    block_mask = create_block_mask(within_length, config.batch, None, 1, inputs.k_cache.shape[2],
                                   device=inputs.q.device)
    enable_gqa = config.group_size > 1

    def forward():
        try:
            return flex_attention(inputs.q, inputs.k_cache, inputs.v_cache, block_mask=block_mask,
                                  enable_gqa=enable_gqa)
        except NotImplementedError as error:
            raise Unsupported(f"FlexAttention: {error}") from None

    return forward


def _device_copy(config, inputs):
    """Every K/V byte a step reads, copied once to another buffer on the same device."""
    return lambda: inputs.copy_destination.copy_(inputs.copy_source)


#: Providers of ``--decode`` by name: flash_softmax is ``flash_attention_with_kvcache`` on the contiguous cache.
#: ``copy`` is not attention: the sweep always measures it, for the bandwidth every row is compared with.
DECODE_PROVIDERS: dict[str, Provider] = {
    provider.name: provider
    for provider in (
        Provider("flash_softmax", _flash_softmax_decode),
        Provider("flash_softmax_paged", _flash_softmax_decode_paged, paged=True),
        Provider("sdpa_flash", _sdpa_decode_builder("FLASH_ATTENTION"), _sdpa_context("FLASH_ATTENTION")),
        Provider("sdpa_cudnn", _sdpa_decode_builder("CUDNN_ATTENTION"), _sdpa_context("CUDNN_ATTENTION"),
                 on_cpu=False),
        Provider("sdpa_efficient", _sdpa_decode_builder("EFFICIENT_ATTENTION"), _sdpa_context("EFFICIENT_ATTENTION"),
                 on_cpu=False),
        Provider("sdpa_math", _sdpa_decode_builder("MATH"), _sdpa_context("MATH")),
        # Compiling FlexAttention takes tens of seconds per shape (half a minute for the CPU): asked for there.
        Provider("flex", _flex_attention_decode, on_cpu=False),
        Provider("copy", _device_copy),
    )
}


_compiled_softmaxes: dict[bool, Callable] = {}


def _compiled_softmax(log: bool) -> Callable:
    """``torch.softmax`` (or ``log_softmax``) under ``torch.compile``: Inductor's generated kernel, the
    strongest non-handwritten baseline. Compiled once per process and op (and per shape by dynamo)."""
    if log not in _compiled_softmaxes:
        _allow_a_graph_per_shape()
        function = (lambda x: torch.log_softmax(x, dim=-1)) if log else (lambda x: torch.softmax(x, dim=-1))
        _compiled_softmaxes[log] = torch.compile(function, dynamic=False)
    return _compiled_softmaxes[log]


def _row_providers(log: bool) -> dict[str, Provider]:
    """The providers of softmax (``log=False``) or log_softmax (``log=True``) along the last dim, by name."""
    torch_op = torch.log_softmax if log else torch.softmax

    def flash_softmax(config, x):
        import flash_softmax as fs

        op = fs.log_softmax if log else fs.softmax
        return lambda: op(x, dim=-1)

    def eager(config, x):
        return lambda: torch_op(x, dim=-1)

    def compiled(config, x):
        function = _compiled_softmax(log)
        return lambda: function(x)

    providers = (
        Provider("flash_softmax", flash_softmax),
        Provider("torch", eager),
        # Compiling for the CPU needs a C++ toolchain and takes seconds per shape: asked for, not default.
        Provider("torch_compile", compiled, on_cpu=False),
    )
    return {provider.name: provider for provider in providers}


#: Softmax providers by name.
SOFTMAX_PROVIDERS: dict[str, Provider] = _row_providers(log=False)

#: log_softmax providers by name (``--op log_softmax``).
LOG_SOFTMAX_PROVIDERS: dict[str, Provider] = _row_providers(log=True)


def select(registry: dict[str, Provider], names: list[str] | None, on_gpu: bool) -> list[Provider]:
    """The providers named by ``--providers``, or the default set for the device.

    Raises:
        ValueError: a name that is not in ``registry``.
    """
    if names is None:
        return [provider for provider in registry.values() if on_gpu or provider.on_cpu]
    unknown = [name for name in names if name not in registry]
    if unknown:
        raise ValueError(f"--providers: unknown {', '.join(map(repr, unknown))}; expected some of {', '.join(registry)}")
    return [registry[name] for name in dict.fromkeys(names)]
