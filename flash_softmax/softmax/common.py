"""What the softmax forward and backward kernels share: how a program finds its rows, and the launch.

Every kernel takes a pointer per tensor, ``n_inner`` and ``n_cols``, then per tensor the tuple
``(stride_outer, stride_col, stride_inner)`` of its row layout (``layout.py``), and the same compile-time
switches: ``LOG`` (log_softmax), ``BLOCK_SIZE`` (columns per tile), ``ROWS_PER_PROGRAM`` and
``INTERPRETED_BFLOAT16`` (``flash_softmax._triton_helpers.interpreted_bfloat16``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flash_softmax._backend import device_guard
from flash_softmax._triton_helpers import interpreted_bfloat16
from flash_softmax.softmax.configs import KernelConfig, choose_config
from flash_softmax.softmax.layout import RowLayout, row_layout


@triton.jit
def program_rows(n_inner, strides, ROWS_PER_PROGRAM: tl.constexpr):
    """Offsets (in elements, int64) of column 0 of this program's rows in a tensor of ``strides``, and
    which of those rows exist.

    Program ``p`` handles rows ``(outer, inner)`` with ``outer = p // ceil(n_inner / ROWS_PER_PROGRAM)``
    and ``ROWS_PER_PROGRAM`` consecutive values of ``inner`` (see ``layout.py``).
    """
    inner_blocks = tl.cdiv(n_inner, ROWS_PER_PROGRAM)
    program = tl.program_id(0)
    outer = (program // inner_blocks).to(tl.int64)
    inner = (program % inner_blocks).to(tl.int64) * ROWS_PER_PROGRAM + tl.arange(0, ROWS_PER_PROGRAM)
    return outer * strides[0] + inner * strides[2], inner < n_inner


@triton.jit
def row_tile(pointer, rows, cols, strides):
    """Pointers to columns ``cols`` (int64) of the rows at offsets ``rows`` (``program_rows``): a
    ``ROWS_PER_PROGRAM x len(cols)`` tile."""
    return pointer + rows[:, None] + cols[None, :] * strides[1]


@triton.jit
def tile_mask(row_mask, cols, n_cols):
    """Which entries of a ``row_tile`` exist: rows that exist, columns below ``n_cols``."""
    return row_mask[:, None] & (cols < n_cols)[None, :]


def launch_by_rows(kernel, inputs: tuple[torch.Tensor, ...], output: torch.Tensor,
                   dim: int, log: bool, config: KernelConfig | None) -> None:
    """Run one softmax op's kernel over the rows of ``inputs`` along ``dim``, writing ``output``.

    ``output`` has the shape of the inputs and the layout of ``torch.empty_like(inputs[0])``, which is what
    the op's fake implementation promises. When the row dims of the tensors cannot share one row
    enumeration of two strided groups (a view that is both permuted and sliced, say, or dy laid out
    differently from y), the kernels run on contiguous copies: the only case in which inputs are copied,
    and a non-contiguous ``output`` is then filled by a copy.
    """
    if output.numel() == 0:
        return
    layout = row_layout((*inputs, output), dim)
    if layout is not None:
        _launch(kernel, (*inputs, output), layout, log, config)
        return
    inputs = tuple(tensor.contiguous() for tensor in inputs)
    written = output if output.is_contiguous() else torch.empty_like(inputs[0])
    tensors = (*inputs, written)
    _launch(kernel, tensors, row_layout(tensors, dim), log, config)
    if written is not output:
        output.copy_(written)


def _launch(kernel, tensors: tuple[torch.Tensor, ...], layout: RowLayout, log: bool,
            config: KernelConfig | None) -> None:
    """Launch ``kernel`` on ``tensors`` (the inputs, then the output) laid out as ``layout``, in the regime
    (single tile or ``TILED``) and with the tiles that ``config`` (or the heuristic) picks."""
    if config is None:
        config = choose_config(layout.n_cols, layout.n_inner, columns_contiguous=layout.strides[0][1] == 1)
    grid = (layout.n_outer * triton.cdiv(layout.n_inner, config.rows_per_program),)
    with device_guard(tensors[0]):
        kernel[grid](
            *tensors,
            layout.n_inner,
            layout.n_cols,
            *layout.strides,
            LOG=log,
            TILED=config.tiled,
            BLOCK_SIZE=config.block_size,
            ROWS_PER_PROGRAM=config.rows_per_program,
            INTERPRETED_BFLOAT16=interpreted_bfloat16(tensors[-1].dtype),
            num_warps=config.num_warps,
        )
