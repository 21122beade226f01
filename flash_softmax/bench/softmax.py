"""``flash-softmax bench --op softmax``: a row-length sweep of softmax over providers.

Softmax is memory bound, so the figure of merit is bandwidth: bytes read plus bytes written per second.
By default the tensor holds a fixed number of elements (``rows * cols = 2**24``) so every point moves
the same amount of data; ``--rows`` fixes the row count instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from flash_softmax.bench.providers import Provider
from flash_softmax.bench.sweep import Result, common_fields, modes

ELEMENTS = 2**24
MODES = ("fwd", "bwd", "fwd_bwd")
#: Tensors of the input's size touched per mode: forward reads x and writes y; backward reads y and dy
#: and writes dx.
TENSORS_MOVED = {"fwd": 2, "bwd": 3, "fwd_bwd": 5}

GPU_DEFAULTS = {"cols": [2**power for power in range(8, 19)], "dtypes": ["bfloat16", "float16"], "rows": None}
# The interpreter runs one program per row in numpy: a few short rows, one of them past a single block.
CPU_DEFAULTS = {"cols": [256, 4096], "dtypes": ["float16"], "rows": 4}

CSV_COLUMNS = ("provider", "mode", "dtype", "rows", "cols", "ms_median", "ms_p20", "ms_p80", "gbps", "threads",
               "status")


@dataclass(frozen=True)
class SoftmaxConfig:
    """One softmax problem (along the last dim of a ``(rows, cols)`` tensor) and what is timed of it."""

    mode: str
    dtype: str
    rows: int
    cols: int

    def bytes_moved(self) -> int:
        element_size = torch.empty((), dtype=getattr(torch, self.dtype)).element_size()
        return TENSORS_MOVED[self.mode] * self.rows * self.cols * element_size


def record(result: Result, threads: int) -> dict[str, object]:
    """The CSV row of one result (also what the table and plots read); ``threads``: torch's thread count."""
    config, timing = result.config, result.measurement.timing
    bandwidth = config.bytes_moved() / (timing.median * 1e-3) / 1e9 if timing else None
    return {**common_fields(result, threads), **asdict(config), "gbps": bandwidth}


def resolve_sweep(args, on_gpu: bool) -> dict[str, object]:
    """The sweep's axes: each flag given, else the device's default."""
    defaults = GPU_DEFAULTS if on_gpu else CPU_DEFAULTS
    return {
        "cols": args.cols or defaults["cols"],
        "dtypes": args.dtypes or defaults["dtypes"],
        "modes": modes(args.modes, MODES),
        "rows": args.rows or defaults["rows"],
    }


def configurations(sweep: dict[str, object]) -> list[SoftmaxConfig]:
    configs = []
    for dtype in sweep["dtypes"]:
        for cols in sweep["cols"]:
            rows = sweep["rows"] or max(1, ELEMENTS // cols)
            for mode in sweep["modes"]:
                configs.append(SoftmaxConfig(mode, dtype, rows, cols))
    return configs


def runs(config: SoftmaxConfig, provider: Provider) -> bool:
    """Every provider runs every softmax configuration."""
    return True


def call_for_mode(config: SoftmaxConfig, provider: Provider, inputs: tuple[torch.Tensor, ...]) -> Callable[[], object]:
    """What is timed: the forward; the backward alone (its forward runs once, here, untimed); or both."""
    x, dy = inputs
    x = x.detach().requires_grad_(config.mode != "fwd")
    forward = provider.build(config, x)
    if config.mode == "fwd":
        return forward
    if config.mode == "bwd":
        y = forward()
        return lambda: torch.autograd.grad(y, (x,), dy, retain_graph=True)
    return lambda: torch.autograd.grad(forward(), (x,), dy)


def inputs_key(config: SoftmaxConfig) -> tuple:
    """Configurations that differ only in mode share inputs."""
    return (config.dtype, config.rows, config.cols)


def make_inputs(config: SoftmaxConfig, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random normal x and dy (never zeros)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    dtype = getattr(torch, config.dtype)
    return tuple(
        torch.randn(config.rows, config.cols, generator=generator, device=device, dtype=dtype) for _ in range(2)
    )
