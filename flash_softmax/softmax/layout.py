"""Viewing a tensor, reduced along one dim, as rows the kernels can address without a copy.

The kernels never see the tensor's own shape. They see three numbers per tensor::

    address of column c of row (outer, inner) = outer * stride_outer + c * stride_col + inner * stride_inner

so a softmax along any dim of any layout that can be written this way (contiguous, transposed, permuted,
sliced, expanded with stride 0) runs in place on the caller's memory. Every dim other than the reduced one
is a "row" dim; rows may be enumerated in any order, as long as every tensor of one call (input, output,
gradients) uses the same order, so the row dims are sorted by stride and merged wherever the strides of
*all* tensors allow it. What remains must be at most two groups: ``outer`` and ``inner``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RowLayout:
    """How the kernels walk the rows of tensors that share one shape.

    Attributes:
        n_outer: number of values of the outer row index.
        n_inner: number of values of the inner row index (rows are ``n_outer * n_inner``).
        n_cols: length of the reduced dim: the length of each row.
        strides: for each tensor, in the order given, ``(stride_outer, stride_col, stride_inner)``
            in elements.
    """

    n_outer: int
    n_inner: int
    n_cols: int
    strides: tuple[tuple[int, int, int], ...]

    @property
    def n_rows(self) -> int:
        return self.n_outer * self.n_inner


def row_layout(tensors: tuple[torch.Tensor, ...], dim: int) -> RowLayout | None:
    """The common row layout of ``tensors`` (same shape) reduced along ``dim``, or None if there is none.

    ``dim`` must already be normalised to ``0 <= dim < ndim`` (any value for a 0-d tensor, which is one
    row of one column). None means the row dims cannot be merged into two strided groups for all tensors
    at once (for example a tensor permuted one way and another permuted a different way); the caller
    then makes the tensors contiguous, for which a layout always exists.
    """
    shape = tensors[0].shape
    if len(shape) == 0:
        return RowLayout(1, 1, 1, tuple((0, 0, 0) for _ in tensors))

    row_dims = [d for d in range(len(shape)) if d != dim and shape[d] != 1]
    # Largest stride first, so that dims which are nested in memory end up next to each other.
    row_dims.sort(key=lambda d: abs(tensors[0].stride(d)), reverse=True)

    # Each group: [size, stride of its innermost dim in each tensor].
    groups: list[list] = []
    for d in row_dims:
        if groups and all(t.stride(d) * shape[d] == groups[-1][1][k] for k, t in enumerate(tensors)):
            groups[-1][0] *= shape[d]
            groups[-1][1] = [t.stride(d) for t in tensors]
        else:
            groups.append([shape[d], [t.stride(d) for t in tensors]])
    if len(groups) > 2:
        return None

    # A single group is placed in the inner index: the kernels give a program neighbouring inner rows,
    # which for a row-major tensor reduced along its last dim are neighbouring rows in memory.
    while len(groups) < 2:
        groups.insert(0, [1, [0 for _ in tensors]])
    (n_outer, outer_strides), (n_inner, inner_strides) = groups
    strides = tuple(
        (outer_strides[k], t.stride(dim), inner_strides[k]) for k, t in enumerate(tensors)
    )
    return RowLayout(n_outer, n_inner, shape[dim], strides)
