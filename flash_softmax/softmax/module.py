"""``nn.Module`` wrappers of the softmax functionals: they hold ``dim`` and call the function."""

from __future__ import annotations

import torch
from torch import nn

from flash_softmax.softmax.function import log_softmax, softmax


class Softmax(nn.Module):
    """``flash_softmax.softmax`` along ``dim``; a drop-in for ``torch.nn.Softmax``."""

    def __init__(self, dim: int = -1):
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return softmax(x, self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class LogSoftmax(nn.Module):
    """``flash_softmax.log_softmax`` along ``dim``; a drop-in for ``torch.nn.LogSoftmax``."""

    def __init__(self, dim: int = -1):
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return log_softmax(x, self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"
