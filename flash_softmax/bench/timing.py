"""Timing and peak memory of one benchmark call.

On CUDA the time comes from ``triton.testing.do_bench``, which synchronises, flushes the L2 cache
before every repetition and reports quantiles. It needs a GPU, so on the CPU a plain
``time.perf_counter`` loop reports the same quantiles. Either way the caller makes one call first, so
compilation and autotuning stay out of the measurement.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

#: Quantiles reported for every measurement, in this order: median, 20th and 80th percentile.
QUANTILES = (0.5, 0.2, 0.8)


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call."""

    median: float
    p20: float
    p80: float


def _quantiles(samples_ms: list[float]) -> Timing:
    values = torch.tensor(samples_ms, dtype=torch.float64).quantile(torch.tensor(QUANTILES, dtype=torch.float64))
    return Timing(*(float(v) for v in values))


def time_cpu(fn: Callable[[], object], *, min_repetitions: int = 5, min_seconds: float = 0.2,
             max_repetitions: int = 100) -> Timing:
    """Quantiles of wall-clock time per call of ``fn`` (already warmed up) on the CPU.

    Repeats at least ``min_repetitions`` times and until ``min_seconds`` have passed, at most
    ``max_repetitions`` times.
    """
    samples_ms: list[float] = []
    started = time.perf_counter()
    while len(samples_ms) < max_repetitions:
        begin = time.perf_counter()
        fn()
        samples_ms.append((time.perf_counter() - begin) * 1e3)
        if len(samples_ms) >= min_repetitions and time.perf_counter() - started >= min_seconds:
            break
    return _quantiles(samples_ms)


def time_cuda(fn: Callable[[], object]) -> Timing:
    """Quantiles of GPU time per call of ``fn`` (already warmed up) from ``triton.testing.do_bench``."""
    import triton.testing

    median, p20, p80 = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=list(QUANTILES))
    return Timing(median, p20, p80)


def measure_time(fn: Callable[[], object], device: torch.device) -> Timing:
    """Time ``fn`` on ``device`` with the method that device allows."""
    if device.type == "cuda":
        return time_cuda(fn)
    return time_cpu(fn)


def peak_memory_mib(fn: Callable[[], object], device: torch.device) -> float:
    """Peak allocated CUDA memory (MiB) during one call of ``fn``, everything live included; NaN off CUDA.

    The counter is reset right before the call, so each provider's figure is its own. Tensors alive
    before the call (the inputs, a retained graph for a backward) count too: that is what the call needs.
    """
    if device.type != "cuda":
        return math.nan
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20
