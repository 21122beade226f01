"""Launch configurations of the attention kernels, in one place.

By default every launch uses one fixed configuration per head-dim bucket (the first of its space that
fits the device's shared memory). Two processes then run the same tiles in the same order, so results
and gradients are bitwise reproducible across runs, and the first call of a training run pays no
tuning. ``FLASH_SOFTMAX_AUTOTUNE=1`` (read at import) autotunes instead over the bucket's space, keyed
on the head dims, the masks, the dtype and the *bucketed* lengths (the next power of two), so slowly
varying lengths do not re-tune; the choice then depends on timings and may differ between processes.
Triton's interpreter always gets one fixed configuration: it runs programs one after another on the
CPU, where tuning would only measure numpy.
"""

from __future__ import annotations

import os

import triton

from flash_softmax._backend import INTERPRETED

#: Autotune over the spaces below instead of using each bucket's default configuration.
AUTOTUNE = os.environ.get("FLASH_SOFTMAX_AUTOTUNE", "0").strip().lower() in {"1", "true", "yes", "on"}

#: Smallest tile side ``tl.dot`` accepts on tensor cores.
MIN_DOT_SIZE = 16
MAX_HEAD_DIM = 256

# Blocks of 32 keep the interpreter quick while still giving multi-block loops on small test shapes.
_INTERPRETER_BLOCK = 32

# A conservative shared-memory budget (bytes) used when no device can be queried: an A100's opt-in limit.
_DEFAULT_SHARED_MEMORY = 166_912


def padded_head_dim(head_dim: int) -> int:
    """Tile width for a head dim: the next power of two, at least ``MIN_DOT_SIZE`` (the tail is masked)."""
    return max(MIN_DOT_SIZE, triton.next_power_of_2(head_dim))


def length_bucket(length: int) -> int:
    """Autotune key for a sequence length: its next power of two (0 stays 0)."""
    return triton.next_power_of_2(length) if length > 0 else 0


def _shared_memory_limit() -> int:
    try:
        import torch

        if torch.cuda.is_available():
            props = triton.runtime.driver.active.utils.get_device_properties(torch.cuda.current_device())
            return int(props["max_shared_mem"])
    except Exception:  # pragma: no cover - only reached on unusual drivers
        pass
    return _DEFAULT_SHARED_MEMORY


def _estimated_shared_memory(
    block_rows: int, block_loop: int, head_dim: int, head_dim_v: int, stages: int, element_size: int
) -> int:
    """Upper estimate of the bytes of shared memory a kernel needs: its resident tiles plus ``stages``
    buffers of the tiles it streams."""
    width_qk, width_v = padded_head_dim(head_dim), padded_head_dim(head_dim_v)
    resident = block_rows * (width_qk + width_v)
    pipelined = stages * block_loop * (width_qk + width_v)
    return element_size * (resident + pipelined)


# The autotune spaces, per head-dim bucket (the padded head dim: <= 64, 128, 256), as
# (BLOCK_M, BLOCK_N, num_warps, num_stages). Every entry compiles without register spills for sm_80 and
# sm_90a in 16-bit dtypes (`flash-softmax compile-report`, checked in the test suite); notes/perf.md
# records the configurations that were dropped and why.
FORWARD_SPACES = {
    64: [(128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3)],
    128: [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3)],
    256: [(64, 64, 8, 2), (64, 32, 8, 2)],
}
BACKWARD_SPACES = {
    64: [(32, 64, 4, 3), (32, 64, 8, 2), (32, 128, 8, 2)],
    128: [(32, 64, 8, 2), (64, 64, 8, 2), (32, 64, 8, 3)],
    256: [(32, 32, 8, 2)],
}


def head_dim_bucket(head_dim: int, head_dim_v: int) -> int:
    """The spaces' key: the padded width of the wider head dim, at least 64."""
    return max(64, padded_head_dim(max(head_dim, head_dim_v)))


def _shape(config) -> tuple[int, int, int, int]:
    return config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages


def _configs(entries):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in entries]


def space_configs(spaces: dict) -> list:
    """Every configuration of the buckets of ``spaces``, each once."""
    entries = []
    for bucket_entries in spaces.values():
        entries += [entry for entry in bucket_entries if entry not in entries]
    return _configs(entries)


def prune_for(configs, spaces: dict, head_dim: int, head_dim_v: int, element_size: int, shared_limit: int):
    """The configurations worth trying for these head dims: those of their bucket in ``spaces``
    (``FORWARD_SPACES`` or ``BACKWARD_SPACES``) whose tiles fit ``shared_limit`` bytes."""
    wanted = set(spaces[head_dim_bucket(head_dim, head_dim_v)])
    kept = [
        config for config in configs
        if _shape(config) in wanted
        and _estimated_shared_memory(*_shape(config)[:2], head_dim, head_dim_v, config.num_stages, element_size)
        <= shared_limit
    ]
    # Always leave one candidate: the smallest tiles of the bucket.
    return kept or sorted((c for c in configs if _shape(c) in wanted), key=lambda c: _shape(c)[:2])[:1] or configs[:1]


def _pruner(spaces: dict):
    def prune(configs, named_args, **kwargs):
        """Autotuner hook: ``prune_for`` with the call's head dims, element size and device."""
        return prune_for(
            configs, spaces, named_args["HEAD_DIM"], named_args["HEAD_DIM_V"], named_args["Q"].element_size(),
            _shared_memory_limit(),
        )

    return prune


def _interpreter_space():
    return _configs([(_INTERPRETER_BLOCK, _INTERPRETER_BLOCK, 4, 1)])


def gpu_forward_space():
    """Configurations of ``_attn_fwd_kernel`` on a GPU: BLOCK_M query rows per program, BLOCK_N keys per step."""
    return space_configs(FORWARD_SPACES)


def gpu_backward_space():
    """Configurations of the dK/dV and dQ kernels on a GPU (BLOCK_M query rows, BLOCK_N key rows per tile)."""
    return space_configs(BACKWARD_SPACES)


def forward_configs():
    """The forward's autotune space in this process (one fixed configuration in the interpreter)."""
    return _interpreter_space() if INTERPRETED else gpu_forward_space()


def backward_configs():
    """The backward kernels' autotune space in this process."""
    return _interpreter_space() if INTERPRETED else gpu_backward_space()


def default_config(spaces: dict, head_dim: int, head_dim_v: int, element_size: int) -> triton.Config:
    """The configuration a launch uses when not autotuning: the first of the bucket's space that fits."""
    if INTERPRETED:
        return _interpreter_space()[0]
    candidates = prune_for(space_configs(spaces), spaces, head_dim, head_dim_v, element_size, _shared_memory_limit())
    if element_size >= 8:
        # float64 (gradient checks): the smallest tiles; the spaces are only checked for 16-bit dtypes.
        return min(candidates, key=lambda config: _shape(config)[0] * _shape(config)[1])
    return candidates[0]


def kernel_and_launch_options(plain, tuned, spaces: dict, head_dim: int, head_dim_v: int, element_size: int):
    """``(kernel, options)`` for one launch: the autotuned kernel with no options when ``AUTOTUNE``, else
    the plain kernel with its default configuration's block sizes, warps and stages."""
    if AUTOTUNE and not INTERPRETED:
        return tuned, {}
    config = default_config(spaces, head_dim, head_dim_v, element_size)
    return plain, {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


PREPROCESS_BLOCK_M = _INTERPRETER_BLOCK if INTERPRETED else 64

#: Keys the autotuner separates results by (the seqlen ones are bucketed by the launchers).
AUTOTUNE_KEY = [
    "SEQLEN_Q_BUCKET", "SEQLEN_K_BUCKET", "HEAD_DIM", "HEAD_DIM_V",
    "HAS_LEFT", "HAS_RIGHT", "HAS_SOFTCAP", "BIAS_KIND",
]
FORWARD_PRUNE = {"early_config_prune": _pruner(FORWARD_SPACES)}
BACKWARD_PRUNE = {"early_config_prune": _pruner(BACKWARD_SPACES)}
#: Size arguments that may equal 1: Triton would otherwise turn them into compile-time constants,
#: recompiling per value and breaking code that treats them as runtime integers.
RUNTIME_SIZES = ["num_heads_q", "group_size", "seqlen_q", "seqlen_k"]
