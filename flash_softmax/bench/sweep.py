"""Run a sweep: every provider on every configuration, on shared inputs, never stopping on a failure.

Whatever happens to one measurement is turned into a status: ``ok``, ``oom`` (CUDA out of memory; memory is freed and the
sweep goes on), ``unsupported`` (see :class:`~flash_softmax.bench.providers.Unsupported`), or
``error: <type>: <message>`` for anything else.
"""

from __future__ import annotations

import gc
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from flash_softmax.bench.providers import Provider, Unsupported
from flash_softmax.bench.timing import Timing, measure_time, peak_memory_mib

_ERROR_MESSAGE_LENGTH = 120


@dataclass(frozen=True)
class Measurement:
    """The outcome of one provider on one configuration; ``timing`` is None unless ``status == "ok"``."""

    status: str
    timing: Timing | None = None
    peak_mem_mib: float = math.nan
    detail: str = ""  # why a provider is unsupported, for the terminal

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def short_error(error: BaseException) -> str:
    """``error: <type>: <first line of the message>``, cut to a length that fits in a table cell."""
    lines = str(error).strip().splitlines()
    message = f"{type(error).__name__}: {lines[0] if lines else ''}".strip().rstrip(":")
    if len(message) > _ERROR_MESSAGE_LENGTH:
        message = message[: _ERROR_MESSAGE_LENGTH - 3] + "..."
    return f"error: {message}"


def free_memory(device: torch.device) -> None:
    """Drop cached allocations so the next provider starts from the same free memory."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _warm_up_and_measure(
    provider: Provider, make_call: Callable[[Provider], Callable[[], object]], device: torch.device
) -> Measurement:
    with provider.context(), warnings.catch_warnings():
        # Backends explain in warnings why they decline inputs; the status column says it once.
        warnings.simplefilter("ignore")
        call = make_call(provider)
        call()
        peak = peak_memory_mib(call, device)
        timing = measure_time(call, device)
    return Measurement("ok", timing, peak)


def measure(
    provider: Provider,
    make_call: Callable[[Provider], Callable[[], object]],
    device: torch.device,
) -> Measurement:
    """Warm up, then measure peak memory and time of ``make_call(provider)()``; never raises.

    ``make_call`` builds the provider's callable for the benchmark mode (forward, backward only, or
    both); building and the first call happen inside the provider's context and count as warm-up, so
    compilation and autotuning stay out of the timings.
    """
    try:
        measurement = _warm_up_and_measure(provider, make_call, device)
    except Unsupported as reason:
        measurement = Measurement("unsupported", detail=str(reason))
    except torch.OutOfMemoryError:
        measurement = Measurement("oom")
    except Exception as error:  # noqa: BLE001 - any failure of one provider becomes a row, never a crash
        measurement = Measurement(short_error(error))
    # Out here the failed call's frames (and the tensors they held) are gone, so the memory really frees.
    free_memory(device)
    return measurement


@dataclass(frozen=True)
class Result:
    """One row of a benchmark: a provider, the configuration (a frozen dataclass) and what was measured."""

    provider: str
    config: Any
    measurement: Measurement


def modes(given: Sequence[str] | None, every: Sequence[str]) -> list[str]:
    """The modes of a sweep: those of ``--modes`` in their order, each once, else ``every`` mode."""
    return list(dict.fromkeys(given)) if given else list(every)


def common_fields(result: Result, threads: int) -> dict[str, object]:
    """The CSV fields every op's row has: the provider, the time per call in milliseconds (None where it
    did not run), torch's thread count and the status."""
    timing = result.measurement.timing
    return {"provider": result.provider, "ms_median": timing.median if timing else None,
            "ms_p20": timing.p20 if timing else None, "ms_p80": timing.p80 if timing else None,
            "threads": threads, "status": result.measurement.status}


def run_sweep(
    op: Any,
    configs: Sequence[Any],
    providers: Sequence[Provider],
    device: torch.device,
    on_result: Callable[[Result], None] = lambda result: None,
) -> list[Result]:
    """Measure every provider on every configuration of ``op``; ``on_result`` sees each row as it is done.

    ``op`` is the module of one benchmarked op (:mod:`~flash_softmax.bench.attention` or
    :mod:`~flash_softmax.bench.softmax`), which provides ``inputs_key(config)``, ``make_inputs(config,
    device)``, ``call_for_mode(config, provider, inputs)`` (what is timed) and ``runs(config, provider)``
    (whether that pair is measured at all; a pair that is not gets no row). Consecutive configurations
    with the same ``inputs_key`` share one set of inputs, so all providers (and all modes) are timed on the
    very same tensors.
    """
    results = []
    current_key, inputs = object(), None
    for config in configs:
        if op.inputs_key(config) != current_key:
            inputs = None
            free_memory(device)
            try:
                inputs = op.make_inputs(config, device)
            except torch.OutOfMemoryError:
                free_memory(device)
            current_key = op.inputs_key(config)
        for provider in providers:
            if not op.runs(config, provider):
                continue
            if inputs is None:
                measurement = Measurement("oom", detail="the inputs alone do not fit")
            else:
                measurement = measure(provider, lambda p, c=config: op.call_for_mode(c, p, inputs), device)
            result = Result(provider.name, config, measurement)
            results.append(result)
            on_result(result)
    return results


def speedups(results: Sequence[Result], reference_provider: str = "flash_softmax") -> dict[int, float]:
    """For each other provider's row (by index): its median time over ``reference_provider``'s on that config.

    Above 1 means ``reference_provider`` is that many times faster.
    """
    reference_ms = {
        result.config: result.measurement.timing.median
        for result in results
        if result.provider == reference_provider and result.measurement.ok
    }
    return {
        index: result.measurement.timing.median / reference_ms[result.config]
        for index, result in enumerate(results)
        if result.provider != reference_provider and result.measurement.ok and result.config in reference_ms
    }
