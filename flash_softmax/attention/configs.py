"""Launch configurations of the attention kernels, in one place.

Three kernels take a tile configuration: ``forward`` (``_attn_fwd_kernel``), ``backward_dkdv`` and
``backward_dq``. Each has its own space per head-dim bucket, because they want different shapes: the
forward and dQ kernels own many query rows and walk keys, the dK/dV kernel owns many key rows and walks
queries. On Hopper, Triton emits wgmma only when the M of a ``tl.dot`` (the rows a warpgroup owns) is a
multiple of 64, so the row tile of every kernel (BLOCK_M for forward and dQ, BLOCK_N for dK/dV) is 64 or
128, and its loop tile is kept at 32 or more so that no warpgroup is left with a sliver of a product.

A configuration (``KernelConfig``) is a tile shape, warps and stages, and the Hopper variants the kernels
switch on at compile time: loads through tensor descriptors (TMA), a warp-specialised loop, and a
persistent grid that walks tiles heaviest-first.

Which configuration a launch uses (``select_config``), first match wins:

1. a configuration forced by ``override`` (tests run the GPU tiles in the interpreter this way);
2. Triton's interpreter: one small fixed tile (it runs programs one after another on the CPU);
3. the tuned table of the current device (``flash_softmax/configs/<device-slug>.json``, written by
   ``flash-softmax tune``; see ``table.py``);
4. the first configuration of the bucket's space that fits the device's shared memory (the default).

The choice is cached per (kernel, dtype, head dims, causal, length bucket, device): a launch pays one
dictionary lookup. Results are then fixed per shape, so two processes run the same tiles in the same
order and gradients are bitwise reproducible across runs. ``FLASH_SOFTMAX_AUTOTUNE=1`` (read at import)
autotunes over the bucket's space instead, keyed on the bucketed lengths (next power of two); the choice
then depends on timings and may differ between processes.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass, fields

import triton

from flash_softmax._backend import INTERPRETED

#: Autotune over the spaces below instead of using the table or each bucket's default configuration.
AUTOTUNE = os.environ.get("FLASH_SOFTMAX_AUTOTUNE", "0").strip().lower() in {"1", "true", "yes", "on"}

#: Smallest tile side ``tl.dot`` accepts on tensor cores.
MIN_DOT_SIZE = 16
MAX_HEAD_DIM = 256

#: The kernels that take a ``KernelConfig`` from a space, a table and ``tune``.
KERNEL_NAMES = ("forward", "backward_dkdv", "backward_dq")
#: What ``override`` can force: those, and the decode kernel's tile (decode.py, not tuned yet).
OVERRIDABLE_KERNELS = KERNEL_NAMES + ("decode",)

# Blocks of 32 keep the interpreter quick while still giving multi-block loops on small test shapes.
_INTERPRETER_BLOCK = 32

# A conservative shared-memory budget (bytes) used when no device can be queried: an A100's opt-in limit.
_DEFAULT_SHARED_MEMORY = 166_912


@dataclass(frozen=True)
class KernelConfig:
    """One launch configuration of an attention kernel.

    ``block_m`` query rows and ``block_n`` key rows per tile; ``num_warps`` and ``num_stages`` as in
    ``triton.Config``. The variants (compile-time switches of the same kernels):

    - ``tma``: Q/K/V/dO tiles are loaded through tensor descriptors (TMA on Hopper) instead of pointer
      tiles; the launcher keeps the pointer path for layouts a descriptor cannot describe.
    - ``warp_specialize``: the loop over the streamed tiles is ``tl.range(..., warp_specialize=True)``
      (producer warps load, consumer warps compute); the kernels' constexpr for it is ``PARTITION_WARPS``.
    - ``persistent``: one program per SM (or fewer), each walking a share of the tiles, heaviest first.
    - ``split_dkdv`` (dK/dV kernel only): dV and dK are computed by two launches that each hold one
      accumulator, so a 256-wide head fits the registers with wgmma-sized tiles.
    """

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    tma: bool = False
    warp_specialize: bool = False
    persistent: bool = False
    split_dkdv: bool = False

    @property
    def label(self) -> str:
        """``128x64 w8 s3`` followed by the variants that are on, e.g. ``tma ws persistent``."""
        flags = [name for name, on in (("tma", self.tma), ("ws", self.warp_specialize),
                                       ("persistent", self.persistent), ("split", self.split_dkdv)) if on]
        return " ".join([f"{self.block_m}x{self.block_n} w{self.num_warps} s{self.num_stages}", *flags])

    def constexprs(self) -> dict:
        """The kernel's compile-time arguments for this configuration."""
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, USE_TMA=self.tma,
                    PARTITION_WARPS=self.warp_specialize, PERSISTENT=self.persistent)

    def launch_options(self) -> dict:
        """Keyword arguments of a launch: the constexprs, ``num_warps`` and ``num_stages``."""
        return {**self.constexprs(), "num_warps": self.num_warps, "num_stages": self.num_stages}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "KernelConfig":
        """Inverse of ``to_dict``; unknown keys are an error, so a table from a newer version is not misread."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown KernelConfig fields {sorted(unknown)}; expected some of {sorted(known)}")
        return cls(**data)

    def as_triton_config(self) -> triton.Config:
        return triton.Config(self.constexprs(), num_warps=self.num_warps, num_stages=self.num_stages)


@dataclass(frozen=True)
class ConfigKey:
    """What a configuration is chosen by (the tuned table's key): the kernel, the dtype name
    (``"bfloat16"``), the head-dim bucket (``head_dim_bucket``), whether the band is causal, and the
    length bucket (the next power of two of ``max(Sq, Sk)``, at least 128)."""

    kernel: str
    dtype: str
    head_dim_bucket: int
    causal: bool
    seqlen_bucket: int


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= ``n`` (1 for ``n <= 1``). Host-side: ``triton.next_power_of_2`` and
    ``triton.cdiv`` are Triton ``constexpr_function``s since 3.6, over a microsecond per call, and every
    launch needs several."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for integers (see ``next_power_of_2`` for why not ``triton.cdiv``)."""
    return -(-a // b)


def padded_head_dim(head_dim: int) -> int:
    """Tile width for a head dim: the next power of two, at least ``MIN_DOT_SIZE`` (the tail is masked)."""
    return max(MIN_DOT_SIZE, next_power_of_2(head_dim))


def length_bucket(length: int) -> int:
    """Autotune key for a sequence length: its next power of two (0 stays 0)."""
    return next_power_of_2(length) if length > 0 else 0


def table_length_bucket(seqlen_q: int, seqlen_k: int) -> int:
    """The tuned table's length bucket: next power of two of the longer side, at least 128."""
    return max(128, length_bucket(max(seqlen_q, seqlen_k)))


def head_dim_bucket(head_dim: int, head_dim_v: int) -> int:
    """The spaces' key: the padded width of the wider head dim, at least 64."""
    return max(64, padded_head_dim(max(head_dim, head_dim_v)))


def shared_memory_limit() -> int:
    """The current device's opt-in shared memory per block (bytes), or an A100's without a device."""
    return _shared_memory_limit()


def _shared_memory_limit() -> int:
    try:
        import torch

        if torch.cuda.is_available():
            props = triton.runtime.driver.active.utils.get_device_properties(torch.cuda.current_device())
            return int(props["max_shared_mem"])
    except Exception:  # pragma: no cover - only reached on unusual drivers
        pass
    return _DEFAULT_SHARED_MEMORY


def estimated_shared_memory(kernel: str, config: KernelConfig, head_dim: int, head_dim_v: int,
                            element_size: int) -> int:
    """Upper estimate of the bytes of shared memory a kernel needs: its resident tiles plus ``num_stages``
    buffers of the tiles it streams (K and V for forward and dQ, Q and dO for dK/dV)."""
    width_qk, width_v = padded_head_dim(head_dim), padded_head_dim(head_dim_v)
    rows, streamed = ((config.block_n, config.block_m) if kernel == "backward_dkdv"
                      else (config.block_m, config.block_n))
    resident = rows * (width_qk + width_v)
    pipelined = config.num_stages * streamed * (width_qk + width_v)
    return element_size * (resident + pipelined)


def _space(*entries, **variant) -> list[KernelConfig]:
    return [KernelConfig(*entry, **variant) for entry in entries]


def _hopper_variants(*entry, kinds=("tma", "persistent", "ws"), **variant) -> list[KernelConfig]:
    """The Hopper variants of one tile shape, among ``tma`` (TMA loads), ``persistent`` (TMA with a
    persistent grid) and ``ws`` (TMA with a warp-specialised loop). Where a kernel leaves one out, it
    spills or overflows shared memory (notes/perf.md). Triton 3.6's Hopper warp-specialisation pass
    aborts the compiler on these loops at 4 warps, so the variants keep the 8-warp shapes."""
    flags = {"tma": dict(tma=True), "persistent": dict(tma=True, persistent=True),
             "ws": dict(tma=True, warp_specialize=True)}
    return [KernelConfig(*entry, **flags[kind], **variant) for kind in kinds]


#: Architectures with a space of their own: Hopper (wgmma, TMA) and Ampere (mma.sync, cp.async). Other
#: GPUs use the space of the closest one below them (sm_89 Ada: Ampere's; sm_100 and up: Hopper's).
ARCHITECTURES = ("sm_90a", "sm_80")

# The spaces, per architecture, kernel and head-dim bucket (the padded head dim: <= 64, 128, 256), as
# (BLOCK_M, BLOCK_N, num_warps, num_stages) and variants. The first entry of a bucket that fits the
# device's shared memory is the default. Every entry compiles without register spills for its
# architecture in 16-bit dtypes, and the Hopper ones to wgmma with tiles of 32 or more along N
# (`flash-softmax compile-report`, checked in the test suite); notes/perf.md records what was dropped.
# Hopper's variants come after its plain configurations: they have never been timed, and
# `flash-softmax tune` on a GPU decides whether they win.
SPACES: dict[str, dict[str, dict[int, list[KernelConfig]]]] = {
    "sm_90a": {
        "forward": {
            64: _space((128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3)) + _hopper_variants(128, 128, 8, 3),
            128: _space((128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3)) + _hopper_variants(128, 64, 8, 3),
            256: _space((64, 64, 8, 2)) + _hopper_variants(64, 64, 8, 2),
        },
        "backward_dkdv": {
            64: _space((32, 128, 8, 2), (32, 64, 4, 2)) + _hopper_variants(32, 128, 8, 2),
            128: _space((32, 128, 8, 2)) + _hopper_variants(32, 128, 8, 2, kinds=("tma", "ws")),
            # dK and dV accumulators of 128 x 256 floats do not fit one program's registers: two passes.
            256: _space((32, 128, 8, 2), split_dkdv=True),
        },
        "backward_dq": {
            64: _space((128, 64, 8, 2), (64, 64, 4, 2)) + _hopper_variants(128, 64, 8, 2),
            128: _space((128, 32, 8, 2), (128, 64, 8, 2), (64, 32, 4, 2)) + _hopper_variants(128, 32, 8, 2),
            256: _space((128, 32, 8, 2)) + _hopper_variants(128, 32, 8, 2, kinds=("tma", "ws")),
        },
    },
    "sm_80": {
        "forward": {
            64: _space((128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3)),
            128: _space((128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3)),
            256: _space((64, 64, 8, 2), (64, 32, 8, 2)),
        },
        "backward_dkdv": {
            64: _space((32, 64, 4, 3), (32, 64, 8, 2), (32, 128, 8, 2)),
            128: _space((32, 64, 8, 2), (64, 64, 8, 2), (32, 64, 8, 3)),
            256: _space((32, 32, 8, 2)),
        },
        "backward_dq": {
            64: _space((32, 64, 4, 3), (32, 64, 8, 2), (32, 128, 8, 2)),
            128: _space((32, 64, 8, 2), (64, 64, 8, 2), (32, 64, 8, 3)),
            256: _space((32, 32, 8, 2)),
        },
    },
}


def device_arch() -> str:
    """The entry of ``ARCHITECTURES`` whose space the current CUDA device uses (Hopper's without one)."""
    try:
        import torch

        if torch.cuda.is_available():
            major, _ = torch.cuda.get_device_capability()
            return "sm_90a" if major >= 9 else "sm_80"
    except Exception:  # pragma: no cover - only reached on unusual drivers
        pass
    return "sm_90a"


def _arch(arch: str | None) -> str:
    if arch is None:
        return device_arch()
    if arch not in SPACES:
        raise ValueError(f"arch must be one of {ARCHITECTURES}, got {arch!r}")
    return arch


def space(kernel: str, head_dim: int, head_dim_v: int, arch: str | None = None) -> list[KernelConfig]:
    """The configurations of ``kernel``'s space for these head dims (their bucket) on ``arch`` (default:
    the current device's), default first."""
    return SPACES[_arch(arch)][kernel][head_dim_bucket(head_dim, head_dim_v)]


def all_configs(kernel: str, arch: str | None = None) -> list[KernelConfig]:
    """Every configuration of ``kernel``'s buckets on ``arch``, each once, in order."""
    entries: list[KernelConfig] = []
    for bucket_entries in SPACES[_arch(arch)][kernel].values():
        entries += [entry for entry in bucket_entries if entry not in entries]
    return entries


def fits(kernel: str, config: KernelConfig, head_dim: int, head_dim_v: int, element_size: int,
         shared_limit: int) -> bool:
    """Whether ``config``'s estimated shared memory fits ``shared_limit`` bytes."""
    return estimated_shared_memory(kernel, config, head_dim, head_dim_v, element_size) <= shared_limit


def prune(kernel: str, head_dim: int, head_dim_v: int, element_size: int, shared_limit: int,
          arch: str | None = None) -> list[KernelConfig]:
    """The configurations worth trying on ``arch``: those of the bucket whose tiles fit ``shared_limit``
    bytes. Never empty: when none fits, the one with the smallest tiles is kept."""
    candidates = space(kernel, head_dim, head_dim_v, arch)
    kept = [c for c in candidates if fits(kernel, c, head_dim, head_dim_v, element_size, shared_limit)]
    return kept or [small_config(kernel, head_dim, head_dim_v)]


def small_config(kernel: str, head_dim: int, head_dim_v: int) -> KernelConfig:
    """The configuration for what no space entry fits (float32 and float64 at wide heads, small shared
    memories): 32 x 32 tiles, single-buffered."""
    wide = head_dim_bucket(head_dim, head_dim_v) > 128
    return KernelConfig(32, 32, 8 if wide else 4, 1)


def default_config(kernel: str, head_dim: int, head_dim_v: int, element_size: int,
                   shared_limit: int | None = None, arch: str | None = None) -> KernelConfig:
    """The configuration a launch uses without a table entry: the first of the bucket's space on ``arch``
    (default: the current device's) that fits ``shared_limit`` (default: the device's)."""
    limit = _shared_memory_limit() if shared_limit is None else shared_limit
    if element_size >= 8:
        # float64 (gradient checks): small plain tiles; the spaces are only checked for 16-bit dtypes.
        return small_config(kernel, head_dim, head_dim_v)
    return prune(kernel, head_dim, head_dim_v, element_size, limit, arch)[0]


def interpreter_config(kernel: str) -> KernelConfig:
    """The one configuration Triton's interpreter runs (the dK/dV kernel splits for 256-wide heads on a
    GPU; the interpreter keeps the fused form, the split being exercised through ``override``)."""
    return KernelConfig(_INTERPRETER_BLOCK, _INTERPRETER_BLOCK, 4, 1)


# --- selection ------------------------------------------------------------------------------------------

_overrides: dict[str, KernelConfig] = {}
_cache: dict[tuple, KernelConfig] = {}


@contextlib.contextmanager
def override(**configs: KernelConfig):
    """Force configurations inside a ``with`` block, e.g. ``override(forward=KernelConfig(128, 64, 8, 3))``.

    Keyword names are ``OVERRIDABLE_KERNELS`` (``forward``, ``backward_dkdv``, ``backward_dq``, ``decode``).
    Used by tests to run the GPU tiles in the interpreter and by ``flash-softmax tune`` to time each
    candidate. A forced ``forward`` also keeps ``flash_attention`` off the decode kernels.
    """
    for name, config in configs.items():
        if name not in OVERRIDABLE_KERNELS:
            raise ValueError(f"override() takes kernel names {OVERRIDABLE_KERNELS}, got {name!r}")
        if not isinstance(config, KernelConfig):
            raise TypeError(f"override({name}=...) must be a KernelConfig, got {type(config).__name__}")
    saved = dict(_overrides)
    _overrides.update(configs)
    _cache.clear()
    try:
        yield
    finally:
        _overrides.clear()
        _overrides.update(saved)
        _cache.clear()


def forced_config(kernel: str) -> KernelConfig | None:
    """The configuration ``override`` forces for ``kernel`` right now, or None."""
    return _overrides.get(kernel)


def config_key(kernel: str, dtype_name: str, head_dim: int, head_dim_v: int, causal: bool,
               seqlen_q: int, seqlen_k: int) -> ConfigKey:
    return ConfigKey(kernel, dtype_name, head_dim_bucket(head_dim, head_dim_v), causal,
                     table_length_bucket(seqlen_q, seqlen_k))


#: Largest forward tile (BLOCK_M x BLOCK_N) for a call with score modifiers (dropout, a float bias, ALiBi,
#: sinks). Each adds live state per score tile (Philox counters, a bias tile, distances): with all of them,
#: the 128 x 128 default of 64-wide heads spills 10.9 KB on sm_90a where 128 x 64 needs 184 registers and
#: none (notes/perf.md, 'Score modifiers'). The tables are timed on plain calls, so this applies to them too.
MODIFIED_FORWARD_MAX_TILE = 128 * 64


def select_config(kernel: str, dtype_name: str, element_size: int, head_dim: int, head_dim_v: int,
                  causal: bool, seqlen_q: int, seqlen_k: int, device_index: int = 0, *,
                  modified: bool = False) -> tuple[KernelConfig, str]:
    """``(config, source)`` for one launch; ``source`` is ``"override"``, ``"interpreter"``, ``"table"`` or
    ``"default"`` (what ``flash-softmax info`` reports). Cached per shape bucket. ``modified``: the call
    has score modifiers, and a forward tile larger than ``MODIFIED_FORWARD_MAX_TILE`` gives way to the
    first configuration of the space within it."""
    if kernel in _overrides:
        return _overrides[kernel], "override"
    if INTERPRETED:
        return interpreter_config(kernel), "interpreter"
    cache_key = (kernel, dtype_name, element_size, head_dim, head_dim_v, causal,
                 table_length_bucket(seqlen_q, seqlen_k), device_index, modified)
    hit = _cache.get(cache_key)
    if hit is None:
        hit = _select_uncached(kernel, dtype_name, element_size, head_dim, head_dim_v, causal, seqlen_q, seqlen_k)
        if modified and kernel == "forward":
            hit = _within_modified_tile(hit, head_dim, head_dim_v, element_size)
        _cache[cache_key] = hit
    return hit


def _within_modified_tile(choice: tuple[KernelConfig, str], head_dim: int, head_dim_v: int,
                          element_size: int) -> tuple[KernelConfig, str]:
    """``choice``, or the first fitting configuration of the forward's space whose tile is at most
    ``MODIFIED_FORWARD_MAX_TILE`` (its source then ``"default"``)."""
    config, source = choice
    if config.block_m * config.block_n <= MODIFIED_FORWARD_MAX_TILE or element_size >= 8:
        return choice
    smaller = [c for c in prune("forward", head_dim, head_dim_v, element_size, _shared_memory_limit())
               if c.block_m * c.block_n <= MODIFIED_FORWARD_MAX_TILE]
    return (smaller[0], "default") if smaller else choice


def _select_uncached(kernel, dtype_name, element_size, head_dim, head_dim_v, causal, seqlen_q, seqlen_k):
    if element_size < 8:
        from flash_softmax.attention import table

        tuned = table.current_table()
        if tuned is not None:
            entry = tuned.lookup(config_key(kernel, dtype_name, head_dim, head_dim_v, causal, seqlen_q, seqlen_k))
            if entry is not None and fits(kernel, entry, head_dim, head_dim_v, element_size,
                                          _shared_memory_limit()):
                return entry, "table"
    return default_config(kernel, head_dim, head_dim_v, element_size), "default"


def clear_cache() -> None:
    """Forget cached choices (after writing a new table, or in tests)."""
    _cache.clear()


# --- autotuning (opt-in) --------------------------------------------------------------------------------

def _pruner(kernel: str):
    def prune_hook(configs, named_args, **kwargs):
        """Triton's ``early_config_prune`` hook. Triton 3.6's autotuner passes the positional arguments in
        ``named_args`` and the keyword ones in ``kwargs``; the launchers pass HEAD_DIM by keyword."""
        arguments = {**named_args, **kwargs}
        head_dim, head_dim_v = arguments["HEAD_DIM"], arguments["HEAD_DIM_V"]
        wanted = set(prune(kernel, head_dim, head_dim_v, arguments["Q"].element_size(), _shared_memory_limit(),
                           device_arch()))
        if not tma_layout_ok(*(arguments[name] for name in TMA_OPERANDS[kernel])):
            wanted = {c for c in wanted if not c.tma}
        kept = [c for c in configs if _from_triton(c) in wanted]
        return kept or configs[:1]

    return prune_hook


#: The kernel arguments each kernel reads through tensor descriptors when ``tma`` is on.
TMA_OPERANDS = {"forward": ("Q", "K", "V", "Out"), "backward_dkdv": ("Q", "K", "V", "DOut"),
                "backward_dq": ("Q", "K", "V", "DOut", "DQ")}


def _from_triton(config: triton.Config) -> KernelConfig:
    kwargs = config.kwargs
    return KernelConfig(kwargs["BLOCK_M"], kwargs["BLOCK_N"], config.num_warps, config.num_stages,
                        tma=kwargs["USE_TMA"], warp_specialize=kwargs["PARTITION_WARPS"],
                        persistent=kwargs["PERSISTENT"])


def autotune(kernel: str, jit_function):
    """``jit_function`` wrapped in ``triton.autotune`` over ``kernel``'s space (one config in the
    interpreter). Split and persistent configurations change the launch itself, so they are left to the
    table and ``override``; the autotuner times the rest."""
    if INTERPRETED:
        candidates = [interpreter_config(kernel)]
    else:
        candidates = [c for c in all_configs(kernel, device_arch()) if not c.split_dkdv and not c.persistent]
    return triton.autotune(
        configs=[c.as_triton_config() for c in candidates], key=AUTOTUNE_KEY,
        prune_configs_by={"early_config_prune": _pruner(kernel)},
    )(jit_function)


def launch(kernel: str, plain, tuned, dtype_name: str, element_size: int, head_dim: int, head_dim_v: int,
           causal: bool, seqlen_q: int, seqlen_k: int, device_index: int = 0, *, modified: bool = False):
    """``(jit kernel, config or None, launch keyword arguments)``: the autotuned kernel with no options
    when ``AUTOTUNE`` (and nothing overrides it), else the plain kernel with the selected configuration
    (``modified``: see ``select_config``)."""
    if AUTOTUNE and not INTERPRETED and kernel not in _overrides:
        return tuned, None, {}
    config, _ = select_config(kernel, dtype_name, element_size, head_dim, head_dim_v, causal,
                              seqlen_q, seqlen_k, device_index, modified=modified)
    return plain, config, config.launch_options()


# --- what a configuration needs of the launch ----------------------------------------------------------

#: Bytes a tensor descriptor's base address and row strides must be multiples of.
TMA_ALIGNMENT = 16


def tma_layout_ok(*tensors) -> bool:
    """Whether every ``(..., rows, head dim)`` tensor can be read through tensor descriptors: 16-byte
    aligned start and every stride but the last (which is 1) a multiple of 16 bytes, so that the start of
    each head's matrix and each of its rows is aligned too."""
    for tensor in tensors:
        size = tensor.element_size()
        if tensor.data_ptr() % TMA_ALIGNMENT or tensor.stride(-1) != 1:
            return False
        if any((stride * size) % TMA_ALIGNMENT for stride in tensor.stride()[:-1]):
            return False
    return True


_sm_counts: dict[int, int] = {}
#: The SM count the interpreter acts as if it had. Persistent grids and grouped-query head splits depend
#: on it, results never do; tests vary it to reach those paths on small shapes.
INTERPRETER_SM_COUNT = 3


def sm_count(device_index: int = 0) -> int:
    """Streaming multiprocessors of the device (``INTERPRETER_SM_COUNT`` under the interpreter), cached."""
    if INTERPRETED:
        return INTERPRETER_SM_COUNT
    count = _sm_counts.get(device_index)
    if count is None:
        import torch

        count = _sm_counts[device_index] = torch.cuda.get_device_properties(device_index).multi_processor_count
    return count


def persistent_programs(total_tiles: int, device_index: int = 0) -> int:
    """Programs of a persistent grid: one per SM (never more than there are tiles)."""
    return max(1, min(total_tiles, sm_count(device_index)))


def gqa_head_splits(key_programs: int, group_size: int, device_index: int = 0) -> int:
    """Into how many shares the dK/dV kernel splits each group of query heads.

    The kernel gives each (key block, K/V head) to one program, which sums over the group's query heads;
    with few K/V heads (MQA) or short keys that is fewer programs than SMs (MQA, B=1, S=2k: 32 programs
    on 132 SMs). Splitting the group into shares, each summed by its own program into a float32 buffer and
    the shares added in a fixed order afterwards, fills the device and keeps gradients deterministic.
    """
    count = sm_count(device_index)
    if group_size <= 1 or key_programs >= count:
        return 1
    return min(group_size, cdiv(count, key_programs))


_allocator_installed = False


def ensure_descriptor_allocator() -> None:
    """Tensor descriptors built inside a kernel need global scratch memory, which Triton obtains from the
    allocator set with ``triton.set_allocator``; install one backed by torch's caching allocator."""
    global _allocator_installed
    if _allocator_installed:
        return
    import torch

    def allocate(size: int, alignment: int, stream):
        return torch.empty(size, dtype=torch.int8, device="cuda")

    triton.set_allocator(allocate)
    _allocator_installed = True


def packed_tiles(total_rows: int, num_seqs: int, block: int) -> int:
    """The tiles of a packed grid per head: a bound of ``sum(cdiv(len_n, block))`` over ``num_seqs``
    sequences of ``total_rows`` rows in all, as the kernels compute it (``common.packed_tile_count``). It
    exceeds the exact count by fewer than ``num_seqs``, and needs no lengths from the device."""
    return (total_rows + num_seqs * (block - 1)) // block


def grid_and_arguments(config: KernelConfig | None, launch_options: dict, rows: int, batch_heads: int,
                       block_key: str, tensors: tuple, device_index: int = 0, num_seqs: int | None = None):
    """``(grid, (batch_heads, num_programs), launch options)`` of one launch of a kernel with ``rows`` rows
    per head (queries for forward and dQ, keys for dK/dV) in blocks of ``block_key`` (``"BLOCK_M"`` or
    ``"BLOCK_N"``), over ``batch_heads`` heads. Turns TMA off where ``tensors`` (the ones the kernel reads
    through descriptors) do not allow it; a persistent configuration gets one program per SM.

    ``num_seqs``: the ``rows`` are a packed batch of that many sequences (``VARLEN``): one program per tile
    of ``packed_tiles`` and head, never persistent (a program finds its own tile, see
    ``common.packed_tile``)."""
    if config is None:  # autotuning: any candidate may use descriptors
        if not INTERPRETED:
            ensure_descriptor_allocator()
    elif config.tma:
        if not tma_layout_ok(*tensors):
            launch_options = {**launch_options, "USE_TMA": False}
        elif not INTERPRETED:
            ensure_descriptor_allocator()
    if config is not None and config.persistent and num_seqs is not None:
        launch_options = {**launch_options, "PERSISTENT": False}
    elif config is not None and config.persistent:
        tiles = cdiv(rows, launch_options[block_key]) * batch_heads
        programs = persistent_programs(tiles, device_index)
        return (lambda meta: (programs,)), (batch_heads, programs), launch_options

    if num_seqs is not None:
        def grid(meta):
            return (packed_tiles(rows, num_seqs, meta[block_key]) * batch_heads,)
    else:
        def grid(meta):
            return (cdiv(rows, meta[block_key]) * batch_heads,)

    return grid, (batch_heads, 1), launch_options


PREPROCESS_BLOCK_M = _INTERPRETER_BLOCK if INTERPRETED else 64


def dbias_config(head_dim: int, head_dim_v: int) -> KernelConfig:
    """The tile of the bias-gradient kernel (``_attn_bwd_dbias_kernel``), which runs only for a float bias
    that requires grad; the interpreter's small tile on the CPU. Not tuned yet: the largest tiles that
    compile to wgmma on sm_90a without spilling for a full or key-broadcast bias, with or without the
    other modifiers (notes/perf.md, 'Score modifiers'), over 8 warps, which halved the registers 4 warps
    needed."""
    if INTERPRETED:
        return interpreter_config("backward_dq")
    widest = max(head_dim, head_dim_v)
    if widest <= 64:
        return KernelConfig(64, 64, 8, 2)
    if widest <= 128:
        return KernelConfig(128, 32, 8, 2)
    return KernelConfig(64, 32, 8, 2)

#: Keys the autotuner separates results by (the seqlen ones are bucketed by the launchers).
AUTOTUNE_KEY = [
    "SEQLEN_Q_BUCKET", "SEQLEN_K_BUCKET", "HEAD_DIM", "HEAD_DIM_V",
    "HAS_LEFT", "HAS_RIGHT", "HAS_SOFTCAP", "BIAS_KIND", "VARLEN",
]
#: Size arguments that may equal 1: Triton would otherwise turn them into compile-time constants,
#: recompiling per value and breaking code that treats them as runtime integers.
RUNTIME_SIZES = ["num_heads_q", "group_size", "seqlen_q", "seqlen_k", "batch_heads", "num_programs",
                 "head_splits", "num_seqs", "total_q", "total_k"]
