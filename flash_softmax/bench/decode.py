"""``flash-softmax bench --decode``: one decoding step, a query per sequence attending its key/value cache.

What is timed is attention alone, ``Sq = 1`` over caches that already hold ``L`` tokens per sequence: appending
the step's own key and value is a separate, tiny write and is not part of the timed call (``k = v = None``).
Providers, on the same caches:

- ``flash_softmax``: ``flash_attention_with_kvcache`` on a contiguous ``(B, Hkv, L, D)`` cache (the layout of
  Hugging Face's static cache) with ``cache_seqlens``, split-KV count chosen by the kernel;
- ``flash_softmax_paged``: the same call on a paged copy of the cache, ``--decode-page-size`` tokens a page
  (default 256), the pages of each sequence in a shuffled order of the pool;
- torch's SDPA with each backend (``sdpa_flash``, ``sdpa_efficient``, ``sdpa_cudnn``, ``sdpa_math``) on the cache
  sliced to the length (all sequences have the same one); FlexAttention (``flex``) on the whole cache with a
  ``BlockMask`` of each sequence's valid length;
- ``copy``: a device-to-device copy of the same K/V bytes, timed the same way, always measured: what moving the
  cache through memory costs on this device.

Every configuration has ``B`` sequences of the same length ``L`` in caches that hold exactly ``L`` tokens, for
each batch of ``--decode-batches`` (default 1 8 64) and length of ``--decode-lengths`` (default 1k to 128k in
powers of 2), ``--heads`` query heads (default 32) in groups of ``--gqa`` (default 4, so 8 K/V heads),
``--head-dims`` (default 128) and ``--dtypes`` (default bfloat16). A configuration whose caches would not fit in
the GPU's memory (three copies: contiguous, paged, and the copy's destination) is left out and said so.

Throughput is what decoding is bound by, the K/V bytes read: ``kv_bytes = sum_b L_b * Hkv * (D + Dv) *
element size``, ``kv_gbps = kv_bytes / time`` (1e9 bytes a second). ``copy_gbps`` is the copy's bytes read and
written, ``2 * kv_bytes / time``: the memory bandwidth a plain copy attains here, by the STREAM convention.
``kv_vs_copy = kv_gbps / copy_gbps`` is the share of that bandwidth a provider's reads use (the copy's own row:
0.5). On CUDA, as for the other sweeps, each repetition starts from a flushed L2 cache, and a call's time includes
whatever host work does not overlap the GPU's (no CUDA graph).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from flash_softmax.bench.providers import DECODE_PROVIDERS, Provider
from flash_softmax.bench.sweep import Result, common_fields

GPU_DEFAULTS = {"batches": [1, 8, 64], "lengths": [1024 * 2**power for power in range(8)], "head_dims": [128],
                "dtypes": ["bfloat16"], "heads": 32, "group_size": 4, "page_size": 256}
# The interpreter runs every program one after another: a few short caches, pages small enough that a sequence
# spans several.
CPU_DEFAULTS = {"batches": [1, 2], "lengths": [32, 64], "head_dims": [32], "dtypes": ["float16"], "heads": 4,
                "group_size": 2, "page_size": 16}

CSV_COLUMNS = ("provider", "dtype", "batch", "heads", "heads_kv", "head_dim", "cache_len", "page_size", "kv_bytes",
               "ms_median", "ms_p20", "ms_p80", "kv_gbps", "copy_gbps", "kv_vs_copy", "peak_mem_mib", "threads",
               "status")

#: The provider whose rows give every row of their configuration ``copy_gbps``.
COPY_PROVIDER = "copy"
#: The share of the GPU's memory the caches of one configuration may take; the rest is for what the providers
#: allocate (SDPA's math backend materialises the scores).
MEMORY_FRACTION = 0.9


@dataclass(frozen=True)
class DecodeConfig:
    """One decoding step: ``batch`` sequences of ``cache_len`` cached tokens each, one query each."""

    dtype: str
    batch: int
    heads: int
    heads_kv: int
    head_dim: int
    cache_len: int
    page_size: int  # of flash_softmax_paged's cache

    @property
    def mode(self) -> str:
        return "decode"

    @property
    def group_size(self) -> int:
        return self.heads // self.heads_kv

    @property
    def lengths(self) -> tuple[int, ...]:
        """``L_b``: the keys each sequence attends."""
        return (self.cache_len,) * self.batch

    @property
    def pages_per_sequence(self) -> int:
        return -(-self.cache_len // self.page_size)

    def element_size(self) -> int:
        return torch.empty((), dtype=getattr(torch, self.dtype)).element_size()

    def kv_bytes(self) -> int:
        """The K and V bytes one step reads: ``sum_b L_b * Hkv * (D + Dv)`` elements (``Dv = D`` here)."""
        return sum(self.lengths) * self.heads_kv * (self.head_dim + self.head_dim) * self.element_size()

    def cache_bytes(self) -> int:
        """Bytes of every cache a configuration holds: contiguous, paged (whole pages) and the copy's destination."""
        paged = self.batch * self.pages_per_sequence * self.page_size * self.heads_kv * 2 * self.head_dim
        return 2 * self.kv_bytes() + paged * self.element_size()

    @property
    def label(self) -> str:
        return f"{self.dtype} B{self.batch} H{self.heads}/{self.heads_kv} D{self.head_dim} L{self.cache_len}"


@dataclass(frozen=True)
class DecodeInputs:
    """The tensors of one configuration, on its device.

    Attributes:
        q: ``(B, Hq, 1, D)``.
        k_cache, v_cache: ``(B, Hkv, L, D)``, contiguous: the two halves of ``copy_source``.
        cache_seqlens: int32 ``(B,)``, all ``L``.
        k_pages, v_pages: ``(B * pages_per_sequence, Hkv, page_size, D)``: the same keys and values in pages,
            position ``p`` of sequence ``b`` in slot ``p % page_size`` of page ``block_table[b, p // page_size]``
            (the tail of a sequence's last page zero).
        block_table: int32 ``(B, pages_per_sequence)``, a random permutation of the pool.
        copy_source: ``(2, B, Hkv, L, D)``: every K/V byte a step reads, once.
        copy_destination: a tensor like ``copy_source`` for the copy to write.
    """

    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    cache_seqlens: torch.Tensor
    k_pages: torch.Tensor
    v_pages: torch.Tensor
    block_table: torch.Tensor
    copy_source: torch.Tensor
    copy_destination: torch.Tensor


def device_memory() -> int | None:
    """Bytes of memory of the current GPU, or None without one (the CPU sizes are tiny)."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory


def fits(config: DecodeConfig, memory: int | None) -> bool:
    """Whether the configuration's caches take at most :data:`MEMORY_FRACTION` of ``memory`` (None: no limit)."""
    return memory is None or config.cache_bytes() <= MEMORY_FRACTION * memory


def resolve_sweep(args, on_gpu: bool) -> dict[str, object]:
    """The run's axes: each flag given, else the device's default; ``memory``: the GPU's, for :func:`fits`.

    Raises:
        ValueError: ``--gqa`` that does not divide ``--heads``.
    """
    defaults = GPU_DEFAULTS if on_gpu else CPU_DEFAULTS
    heads = args.heads or defaults["heads"]
    group_size = args.gqa or defaults["group_size"]
    if heads % group_size:
        raise ValueError(f"--gqa {group_size} must divide the number of query heads, {heads}")
    return {
        "batches": list(dict.fromkeys(args.decode_batches or defaults["batches"])),
        "lengths": list(dict.fromkeys(args.decode_lengths or defaults["lengths"])),
        "head_dims": args.head_dims or defaults["head_dims"],
        "dtypes": args.dtypes or defaults["dtypes"],
        "heads": heads,
        "group_size": group_size,
        "page_size": args.decode_page_size or defaults["page_size"],
        "memory": device_memory() if on_gpu else None,
    }


def every_configuration(sweep: dict[str, object]) -> list[DecodeConfig]:
    """Each dtype x head dim x batch x length, in that order (lengths ascending within a batch)."""
    return [
        DecodeConfig(dtype, batch, sweep["heads"], sweep["heads"] // sweep["group_size"], head_dim, length,
                     sweep["page_size"])
        for dtype in sweep["dtypes"] for head_dim in sweep["head_dims"] for batch in sweep["batches"]
        for length in sorted(sweep["lengths"])
    ]


def configurations(sweep: dict[str, object]) -> list[DecodeConfig]:
    """The configurations whose caches fit the device's memory."""
    return [config for config in every_configuration(sweep) if fits(config, sweep["memory"])]


def left_out(sweep: dict[str, object]) -> list[DecodeConfig]:
    """The configurations :func:`configurations` leaves out: their caches alone would not fit."""
    return [config for config in every_configuration(sweep) if not fits(config, sweep["memory"])]


def runs(config: DecodeConfig, provider: Provider) -> bool:
    """Every provider runs every configuration."""
    return True


def with_copy(selected: Sequence[Provider]) -> list[Provider]:
    """``selected`` and the copy, last, whether ``--providers`` named it or not: ``copy_gbps`` comes from it."""
    chosen = list(selected)
    if all(provider.name != COPY_PROVIDER for provider in chosen):
        chosen.append(DECODE_PROVIDERS[COPY_PROVIDER])
    return chosen


def make_inputs(config: DecodeConfig, device: torch.device, seed: int = 0) -> DecodeInputs:
    """Random normal q and caches (:class:`DecodeInputs`), the paged cache a copy of the contiguous one."""
    generator = torch.Generator(device=device).manual_seed(seed)
    dtype = getattr(torch, config.dtype)
    batch, heads_kv, length, head_dim = config.batch, config.heads_kv, config.cache_len, config.head_dim
    q = torch.randn(batch, config.heads, 1, head_dim, generator=generator, device=device, dtype=dtype)
    kv = torch.randn(2, batch, heads_kv, length, head_dim, generator=generator, device=device, dtype=dtype)
    pages, page_size = config.pages_per_sequence, config.page_size
    order = torch.randperm(batch * pages, generator=torch.Generator().manual_seed(seed))
    block_table = order.view(batch, pages).to(device=device, dtype=torch.int32)
    paged = kv.new_zeros(2, batch * pages, heads_kv, page_size, head_dim)
    for index in range(batch):  # one sequence at a time: no temporary the size of the whole cache
        rows = kv[:, index]
        if pages * page_size > length:
            rows = torch.nn.functional.pad(rows, (0, 0, 0, pages * page_size - length))
        paged[:, block_table[index].long()] = rows.view(2, heads_kv, pages, page_size, head_dim).transpose(1, 2)
    return DecodeInputs(
        q=q, k_cache=kv[0], v_cache=kv[1],
        cache_seqlens=torch.full((batch,), length, dtype=torch.int32, device=device),
        k_pages=paged[0], v_pages=paged[1], block_table=block_table,
        copy_source=kv, copy_destination=torch.empty_like(kv),
    )


def call_for_mode(config: DecodeConfig, provider: Provider, inputs: DecodeInputs) -> Callable[[], object]:
    """What is timed: the provider's attention over the caches (or the copy), nothing appended."""
    return provider.build(config, inputs)


def inputs_key(config: DecodeConfig) -> tuple:
    """Every configuration has inputs of its own."""
    return (config.dtype, config.batch, config.heads, config.heads_kv, config.head_dim, config.cache_len,
            config.page_size)


def record(result: Result, threads: int) -> dict[str, object]:
    """The CSV row of one result (also what the table reads); ``copy_gbps`` and ``kv_vs_copy`` are filled in by
    :func:`add_copy_bandwidth` once the copy of the configuration is measured."""
    config, timing = result.config, result.measurement.timing
    seconds = timing.median * 1e-3 if timing else None
    provider = DECODE_PROVIDERS.get(result.provider)
    return {**common_fields(result, threads), "dtype": config.dtype, "batch": config.batch, "heads": config.heads,
            "heads_kv": config.heads_kv, "head_dim": config.head_dim, "cache_len": config.cache_len,
            "page_size": config.page_size if provider is not None and provider.paged else None,
            "kv_bytes": config.kv_bytes(), "kv_gbps": config.kv_bytes() / seconds / 1e9 if seconds else None,
            "copy_gbps": None, "kv_vs_copy": None, "peak_mem_mib": result.measurement.peak_mem_mib}


def add_copy_bandwidth(results: Sequence[Result], records: list[dict[str, object]]) -> None:
    """Give each row of ``records`` (one per result) its configuration's ``copy_gbps`` (the copy's bytes read and
    written per second) and ``kv_vs_copy`` (its own ``kv_gbps`` over that), where the copy was measured."""
    copy_seconds = {result.config: result.measurement.timing.median * 1e-3 for result in results
                    if result.provider == COPY_PROVIDER and result.measurement.ok}
    for result, row in zip(results, records):
        seconds = copy_seconds.get(result.config)
        if seconds is None or seconds <= 0:
            continue
        row["copy_gbps"] = 2 * result.config.kv_bytes() / seconds / 1e9
        if row["kv_gbps"] is not None and math.isfinite(row["kv_gbps"]):
            row["kv_vs_copy"] = row["kv_gbps"] / row["copy_gbps"]
