"""Launch configurations of the softmax kernels: every tuning decision lives here.

A row is processed in one of two regimes:

* **single block**: the whole row (padded to a power of two) is one tile; x is read once and y written
  once. Short rows are packed several to a program so that a program still moves a useful amount of data.
* **tiled**: the row is longer than ``single_block_limit``; it is streamed in tiles of ``block_size``
  columns, twice (forward: online max and sum, then write; backward: row sum, then write). No row
  length is refused.

On the GPU the choice is a heuristic keyed on the row length rounded up to a power of two (a bucket), so
that every length in a bucket compiles to the same kernel. The interpreter uses one fixed rule: it runs
programs one after another in Python, so the only thing that matters there is to launch few programs.
"""

from __future__ import annotations

from dataclasses import dataclass

import triton

from flash_softmax._backend import INTERPRETED

#: Longest row (columns) handled as one tile on the GPU: 16384 float32 values held by 512 threads
#: is 32 registers each per tensor, which leaves room for the backward's two tensors without spilling.
GPU_SINGLE_BLOCK_LIMIT = 16384
#: Longest row handled as one tile in the interpreter. Kept small so the test suite reaches the tiled
#: regime with rows of modest length.
INTERPRETER_SINGLE_BLOCK_LIMIT = 4096

#: Elements a program aims to hold in one tile when rows are short (single block) on the GPU.
GPU_TILE_ELEMENTS = 4096
#: Elements per tile in the tiled regime on the GPU: large enough to keep many loads in flight per
#: thread, small enough to stay in registers.
GPU_TILED_TILE_ELEMENTS = 8192
#: Elements per tile in the interpreter, where a bigger tile only means fewer Python-level steps.
INTERPRETER_TILE_ELEMENTS = 16384


@dataclass(frozen=True)
class KernelConfig:
    """One launch of a softmax kernel.

    Attributes:
        tiled: stream each row in tiles (two passes) instead of holding it as one tile.
        block_size: columns per tile; in the single-block regime the whole padded row.
        rows_per_program: rows one program handles side by side (neighbouring inner rows).
        num_warps: warps per program (ignored by the interpreter).
    """

    tiled: bool
    block_size: int
    rows_per_program: int
    num_warps: int


def single_block_limit() -> int:
    """The longest row, in columns, that the kernels of this process handle as a single tile."""
    return INTERPRETER_SINGLE_BLOCK_LIMIT if INTERPRETED else GPU_SINGLE_BLOCK_LIMIT


def _num_warps_for(tile_elements: int) -> int:
    # About 16 elements per thread: enough independent loads in flight to cover memory latency.
    return max(4, min(16, triton.next_power_of_2(tile_elements) // (16 * 32)))


def choose_config(n_cols: int, n_inner: int, columns_contiguous: bool) -> KernelConfig:
    """The launch configuration for rows of ``n_cols`` columns, ``n_inner`` of them side by side.

    Args:
        n_cols: the row length.
        n_inner: the number of inner rows (see ``layout.py``). A program only packs rows that are
            neighbours in the inner index, so packing more than ``n_inner`` would only add masked lanes.
        columns_contiguous: the columns of a row are adjacent in memory (a reduction along the last dim
            of a row-major tensor). Otherwise the neighbouring inner rows usually are, and a tile must span
            several rows for its loads to be contiguous.
    """
    columns = triton.next_power_of_2(max(n_cols, 1))
    inner = triton.next_power_of_2(max(n_inner, 1))
    if INTERPRETED:
        tile_elements = INTERPRETER_TILE_ELEMENTS
        if columns <= INTERPRETER_SINGLE_BLOCK_LIMIT:
            rows = min(inner, max(1, tile_elements // columns))
            return KernelConfig(False, columns, rows, 4)
        rows = min(inner, 4)
        return KernelConfig(True, tile_elements // rows, rows, 4)

    if columns <= GPU_SINGLE_BLOCK_LIMIT:
        rows = min(inner, max(1, GPU_TILE_ELEMENTS // columns))
        return KernelConfig(False, columns, rows, _num_warps_for(rows * columns))
    # A long row: one program per row when its columns are contiguous, so that a handful of long rows
    # still spreads over as many programs as there are rows. Rows strided in memory are read a few
    # neighbours at a time instead, which keeps the loads of a tile contiguous.
    rows = 1 if columns_contiguous else min(inner, 16)
    block_size = GPU_TILED_TILE_ELEMENTS // rows
    return KernelConfig(True, block_size, rows, _num_warps_for(GPU_TILED_TILE_ELEMENTS))
