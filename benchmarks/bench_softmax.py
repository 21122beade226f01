"""Memory bandwidth of the fused softmax / log_softmax kernels against torch, forward and backward.

Softmax moves every element a fixed number of times and does little arithmetic on it, so the figure of
merit is bandwidth: bytes the op must move (forward: read x, write y; backward: read y and dy, write dx)
over the median time of ``triton.testing.do_bench``. A kernel that streams a long row twice (the tiled
regime) moves more bytes than this count; that shows up as a lower figure, as it should.

The sweep keeps the number of elements fixed (``rows * cols``, 2**24 by default) and varies the row
length from 256 to 262144, so every case moves the same bytes and the rows change from many short ones to
a few vocabulary-sized ones. ``do_bench`` clears the L2 cache before each timed call, so the inputs are
read from memory every time without rotating copies.

Usage (needs a CUDA GPU; on a machine without one it says so and exits)::

    python benchmarks/bench_softmax.py                       # fwd and bwd, fp16/bf16/fp32, table
    python benchmarks/bench_softmax.py --op log_softmax --csv results/softmax.csv

The functions ``make_inputs``, ``time_case``, ``sweep``, ``format_table`` and ``write_csv`` are meant to be
imported by other tools (for example ``flash-softmax bench``).
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from dataclasses import asdict, dataclass

import torch

#: Columns of a result row, in CSV order.
CSV_COLUMNS = ["provider", "mode", "dtype", "rows", "cols", "ms_median", "ms_p20", "ms_p80", "gbps", "status"]
PROVIDERS = ["flash_softmax", "torch"]
MODES = ["fwd", "bwd"]
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
DEFAULT_TOTAL_ELEMENTS = 2**24
DEFAULT_COLS = [2**k for k in range(8, 19)]  # 256 .. 262144


@dataclass
class Result:
    """One timed case: a row of the table and of the CSV."""

    provider: str
    mode: str
    dtype: str
    rows: int
    cols: int
    ms_median: float
    ms_p20: float
    ms_p80: float
    gbps: float
    status: str


def _functions(op: str):
    """(kernel functional, torch functional) for ``op``."""
    import flash_softmax as fs

    if op == "softmax":
        return fs.softmax, torch.softmax
    if op == "log_softmax":
        return fs.log_softmax, torch.log_softmax
    raise ValueError(f"op must be 'softmax' or 'log_softmax', got {op!r}")


def make_inputs(rows: int, cols: int, dtype: torch.dtype, device: str = "cuda", seed: int = 0):
    """``x`` of shape ``(rows, cols)`` with standard normal values (never zeros) and a gradient ``dy``."""
    generator = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(rows, cols, generator=generator, device=device, dtype=torch.float32).to(dtype)
    dy = torch.randn(rows, cols, generator=generator, device=device, dtype=torch.float32).to(dtype)
    return x, dy


def bytes_moved(mode: str, rows: int, cols: int, dtype: torch.dtype) -> int:
    """Bytes the op must read and write at least: 2 tensors forward (x, y), 3 backward (y, dy, dx)."""
    tensors = {"fwd": 2, "bwd": 3}[mode]
    return tensors * rows * cols * torch.finfo(dtype).bits // 8


def _timed_callable(provider: str, mode: str, op: str, x: torch.Tensor, dy: torch.Tensor):
    """A no-argument function that runs the case once."""
    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    kernel_fn, torch_fn = _functions(op)
    fn = kernel_fn if provider == "flash_softmax" else torch_fn
    if mode == "fwd":
        return lambda: fn(x, -1)
    if mode == "bwd":
        leaf = x.detach().requires_grad_()
        y = fn(leaf, -1)
        # autograd.grad returns the gradient without accumulating it into leaf.grad, which would add a
        # read and a write of x's size to the timed work.
        return lambda: torch.autograd.grad(y, leaf, dy, retain_graph=True)
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _time_on_cpu(fn, repetitions: int = 5) -> tuple[float, float, float]:
    """Median, 20th and 80th percentile in ms by wall clock: only to exercise the harness without a GPU."""
    fn()
    times = []
    for _ in range(repetitions):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    quantiles = torch.tensor(times).quantile(torch.tensor([0.5, 0.2, 0.8])).tolist()
    return quantiles[0], quantiles[1], quantiles[2]


def time_case(
    provider: str,
    mode: str,
    dtype: torch.dtype,
    rows: int,
    cols: int,
    op: str = "softmax",
    device: str = "cuda",
) -> Result:
    """Time one case; failures (out of memory, a compilation error) are reported in ``status``, not raised.

    On CUDA the time is ``triton.testing.do_bench``'s (median, 20th, 80th percentile, in ms). On a CPU the
    kernels run in Triton's interpreter and the time is a wall-clock figure marked ``status="interpreter"``:
    it checks that the case runs, it is not a measurement.
    """
    import triton

    dtype_name = str(dtype).removeprefix("torch.")
    try:
        x, dy = make_inputs(rows, cols, dtype, device)
        fn = _timed_callable(provider, mode, op, x, dy)
        if torch.device(device).type == "cuda":
            median, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
            status = "ok"
        else:
            median, p20, p80 = _time_on_cpu(fn)
            status = "interpreter"
        gbps = bytes_moved(mode, rows, cols, dtype) / (median * 1e-3) / 1e9
        return Result(provider, mode, dtype_name, rows, cols, median, p20, p80, gbps, status)
    except (RuntimeError, ValueError, TypeError) as error:
        status = f"error: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
        nan = float("nan")
        return Result(provider, mode, dtype_name, rows, cols, nan, nan, nan, nan, status)


def sweep(
    op: str = "softmax",
    modes: list[str] = MODES,
    dtypes: list[torch.dtype] = list(DTYPES.values()),
    cols_list: list[int] = DEFAULT_COLS,
    total_elements: int = DEFAULT_TOTAL_ELEMENTS,
    providers: list[str] = PROVIDERS,
    device: str = "cuda",
    progress=None,
) -> list[Result]:
    """Every (mode, dtype, cols, provider) case at ``rows = max(1, total_elements // cols)``."""
    results = []
    for mode in modes:
        for dtype in dtypes:
            for cols in cols_list:
                rows = max(1, total_elements // cols)
                for provider in providers:
                    result = time_case(provider, mode, dtype, rows, cols, op=op, device=device)
                    results.append(result)
                    if progress is not None:
                        progress(result)
    return results


def format_table(results: list[Result]) -> str:
    """A fixed-width text table of ``results``, with each kernel row's speedup over torch."""
    torch_ms = {(r.mode, r.dtype, r.rows, r.cols): r.ms_median for r in results if r.provider == "torch"}
    header = (
        f"{'provider':<14}{'mode':<5}{'dtype':<9}{'rows':>8}{'cols':>8}{'ms':>10}{'GB/s':>9}{'vs torch':>9}  status"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        reference = torch_ms.get((r.mode, r.dtype, r.rows, r.cols))
        speedup = f"{reference / r.ms_median:.2f}x" if reference and r.provider != "torch" else ""
        lines.append(
            f"{r.provider:<14}{r.mode:<5}{r.dtype:<9}{r.rows:>8}{r.cols:>8}{r.ms_median:>10.4f}{r.gbps:>9.1f}"
            f"{speedup:>9}  {r.status}"
        )
    return "\n".join(lines)


def write_csv(results: list[Result], path: str) -> None:
    """Write ``results`` with the columns ``CSV_COLUMNS``."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for result in results:
            writer.writerow(asdict(result))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--op", choices=["softmax", "log_softmax"], default="softmax")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=MODES)
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--cols", nargs="+", type=int, default=DEFAULT_COLS, help="row lengths to sweep")
    parser.add_argument("--total-elements", type=int, default=DEFAULT_TOTAL_ELEMENTS, help="rows * cols per case")
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=PROVIDERS)
    parser.add_argument("--csv", help="also write the results to this CSV file")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print(
            "bench_softmax: no CUDA GPU found. This benchmark measures GPU memory bandwidth; on a CPU the "
            "kernels only run in Triton's interpreter, whose timings mean nothing. Nothing was measured."
        )
        return 0

    import triton

    device_name = torch.cuda.get_device_name()
    print(f"{args.op} on {device_name}, torch {torch.__version__}, triton {triton.__version__}, "
          f"{args.total_elements} elements per case")
    results = sweep(
        op=args.op,
        modes=args.modes,
        dtypes=[DTYPES[name] for name in args.dtypes],
        cols_list=args.cols,
        total_elements=args.total_elements,
        providers=args.providers,
    )
    print(format_table(results))
    if args.csv:
        write_csv(results, args.csv)
        print(f"wrote {args.csv}")
    return 0 if all(r.status == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
