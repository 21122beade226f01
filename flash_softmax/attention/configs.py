"""Launch configurations of the attention kernels, in one place.

On a GPU the kernels are autotuned over a small, pruned space keyed on the head dims, the causal flag,
the dtype and the *bucketed* lengths (the next power of two), so a training run with slowly varying
lengths does not re-tune on every new length. Triton's interpreter gets one fixed configuration: it
runs programs one after another on the CPU, where tuning would only measure numpy.
"""

from __future__ import annotations

import triton

from flash_softmax._backend import INTERPRETED

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


def _prune(configs, named_args, **kwargs):
    """Drop configurations whose tiles cannot fit the device's shared memory or whose blocks dwarf the lengths."""
    head_dim, head_dim_v = named_args["HEAD_DIM"], named_args["HEAD_DIM_V"]
    element_size = named_args["Q"].element_size()
    limit = _shared_memory_limit()
    kept = []
    for config in configs:
        rows, loop = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
        needed = _estimated_shared_memory(rows, loop, head_dim, head_dim_v, config.num_stages, element_size)
        if needed > limit:
            continue
        # Wide head dims need narrow tiles to keep the float32 accumulators in registers.
        if max(head_dim, head_dim_v) > 128 and rows * loop > 64 * 64:
            continue
        kept.append(config)
    return kept or configs[-1:]


def _space(block_pairs, stages, warps):
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_stages=s, num_warps=w)
        for m, n in block_pairs
        for s in stages
        for w in warps
    ]


def _interpreter_space():
    return [triton.Config({"BLOCK_M": _INTERPRETER_BLOCK, "BLOCK_N": _INTERPRETER_BLOCK}, num_stages=1, num_warps=4)]


def forward_configs():
    """Configurations of ``_attn_fwd_kernel``: BLOCK_M query rows per program, BLOCK_N keys per step."""
    if INTERPRETED:
        return _interpreter_space()
    return _space([(128, 64), (128, 128), (64, 64), (64, 32)], stages=(2, 3, 4), warps=(4, 8))


def backward_configs():
    """Configurations of the dK/dV and dQ kernels (BLOCK_M query rows, BLOCK_N key rows per tile)."""
    if INTERPRETED:
        return _interpreter_space()
    return _space([(64, 64), (32, 64), (64, 128), (32, 32)], stages=(2, 3), warps=(4, 8))


PREPROCESS_BLOCK_M = _INTERPRETER_BLOCK if INTERPRETED else 64

#: Keys the autotuner separates results by (the seqlen ones are bucketed by the launchers).
AUTOTUNE_KEY = [
    "SEQLEN_Q_BUCKET", "SEQLEN_K_BUCKET", "HEAD_DIM", "HEAD_DIM_V",
    "HAS_LEFT", "HAS_RIGHT", "HAS_SOFTCAP", "BIAS_KIND",
]
PRUNE = {"early_config_prune": _prune}
#: Size arguments that may equal 1: Triton would otherwise turn them into compile-time constants,
#: recompiling per value and breaking code that treats them as runtime integers.
RUNTIME_SIZES = ["num_heads_q", "group_size", "seqlen_q", "seqlen_k"]
