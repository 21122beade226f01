"""``nn.Module`` wrappers of the softmax functionals: they hold ``dim`` and call the function."""

from __future__ import annotations

import torch
from torch import nn

from flash_softmax.softmax.function import log_softmax, softmax


class _Normalization(nn.Module):
    """A module over one of the functionals, along ``dim``."""

    function = staticmethod(softmax)

    def __init__(self, dim: int = -1):
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.function(x, self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class Softmax(_Normalization):
    """``flash_softmax.softmax`` along ``dim``; a drop-in for ``torch.nn.Softmax``."""

    function = staticmethod(softmax)


class LogSoftmax(_Normalization):
    """``flash_softmax.log_softmax`` along ``dim``; a drop-in for ``torch.nn.LogSoftmax``."""

    function = staticmethod(log_softmax)
