"""Fused softmax and log_softmax along any dim, forward and backward (see README.md in this folder)."""

from flash_softmax.softmax.function import log_softmax, softmax
from flash_softmax.softmax.module import LogSoftmax, Softmax

__all__ = ["softmax", "log_softmax", "Softmax", "LogSoftmax"]
