"""``flash-softmax bench --host-overhead``: the Python time of one attention call with its launches removed.

What a training step pays on the host per attention call is validation, option building, the custom op's
dispatch, the autograd setup and the launchers' argument packing, before and between the kernel launches.
Once the GPU is fast, that time decides how small a shape can be before the GPU waits on Python. This
module measures it by running ``flash_attention`` (and its ``.backward()``) on the compiled-GPU path with
every Triton launch replaced by a no-op (``noop_launches``), so what is timed is everything except Triton's
own launch and the kernels.

On a machine with CUDA the inputs are CUDA tensors and the path is the real one. Without CUDA the same
path is taken by CPU tensors (``gpu_path``): the dispatch that sends CUDA tensors to the Triton kernels
sends them there too, and the launchers select configurations as they do for a GPU rather than the
interpreter's fixed tile. The one step of the CUDA path a CPU cannot take is ``torch.cuda.device``, which
the ops enter only when the input is not on the current device, so not in these measurements either.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch

#: The Triton classes a launch ``kernel[grid](...)`` ends in: ``KernelInterface.__getitem__`` returns a
#: lambda calling ``self.run(..., grid=grid, warmup=False)``, and every kernel object defines ``run``.
_LAUNCHABLE = (
    ("triton.runtime.jit", "JITFunction"),
    ("triton.runtime.interpreter", "InterpretedFunction"),
    ("triton.runtime.autotuner", "Autotuner"),
)

#: Module globals read at call time that make the launchers take the interpreter's path; ``gpu_path``
#: turns them off so a CPU run selects configurations as a GPU run does.
_INTERPRETER_SWITCHES = ("flash_softmax.attention.configs", "flash_softmax._triton_helpers")

CSV_COLUMNS = ("path", "launches", "mode", "dtype", "batch", "heads", "seqlen", "head_dim", "causal", "bias",
               "calls", "threads", "us_median", "us_p20", "us_p80")
MODES = ("fwd", "fwd_bwd")
DEFAULTS = {"dtypes": ["bfloat16"], "batch": 2, "heads": 16, "seqlens": [1024], "head_dims": [128],
            "causal": [False, True]}
DEFAULT_CALLS = 2000
#: SMs of the GPU a CPU run stands in for (an H100 SXM / H200), for launchers that size grids by it.
SIMULATED_SM_COUNT = 132


class LaunchCounter:
    """How many launches were made, and of which kernels, while ``noop_launches`` was active."""

    def __init__(self) -> None:
        self.count = 0
        self.kernels: dict[str, int] = {}

    def record(self, kernel) -> None:
        self.count += 1
        name = getattr(getattr(kernel, "fn", None), "__name__", type(kernel).__name__)
        self.kernels[name] = self.kernels.get(name, 0) + 1


@contextlib.contextmanager
def noop_launches() -> Iterator[LaunchCounter]:
    """Replace ``run`` of every Triton kernel class with a function that only counts the launch.

    ``run`` is where Triton binds the arguments, looks up (or compiles) the kernel and launches it; the
    replacement does none of that, so its cost is a counter increment. The original methods are restored
    on exit, also when the body raises.
    """
    counter = LaunchCounter()

    def run(self, *args, grid, warmup, **kwargs):
        counter.record(self)
        return None

    with contextlib.ExitStack() as stack:
        for module_name, class_name in _LAUNCHABLE:
            cls = getattr(importlib.import_module(module_name), class_name)
            stack.enter_context(mock.patch.object(cls, "run", run))
        yield counter


@contextlib.contextmanager
def gpu_path() -> Iterator[None]:
    """Send CPU tensors down the compiled-GPU path of ``flash_attention``.

    The public function asks ``backend_for`` which engine runs a device's tensors; here it answers
    ``"triton"``, the answer for CUDA. The interpreter switches of the launchers' helpers (configuration
    selection, the bfloat16 upcast) are turned off. Only meaningful together with ``noop_launches``: no
    kernel can actually run on CPU pointers.
    """
    function = importlib.import_module("flash_softmax.attention.function")
    configs = importlib.import_module("flash_softmax.attention.configs")
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(function, "backend_for", lambda device: "triton"))
        for module_name in _INTERPRETER_SWITCHES:
            stack.enter_context(mock.patch.object(importlib.import_module(module_name), "INTERPRETED", False))
        # Grid sizes that depend on the number of SMs read it from this cache, filled from the CUDA device
        # on first use; a CPU has none, so it holds an H100's count (what the GPU path looks up is a hit).
        stack.enter_context(mock.patch.dict(configs._sm_counts, {0: SIMULATED_SM_COUNT}))
        yield


@dataclass(frozen=True)
class HostCase:
    """One measured call: ``flash_attention`` on ``(B, H, S, D)`` q, k, v, optionally with a padding mask."""

    mode: str
    dtype: str
    batch: int
    heads: int
    seqlen: int
    head_dim: int
    causal: bool
    bias: bool


def cases(args: argparse.Namespace) -> list[HostCase]:
    """The cases of one run: the shape flags given, else ``DEFAULTS``; each without and with a bias."""
    modes = list(dict.fromkeys(args.modes)) if args.modes else list(MODES)
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"--modes for --host-overhead must be some of {', '.join(MODES)}, got {mode}")
    result = []
    for dtype in args.dtypes or DEFAULTS["dtypes"]:
        for head_dim in args.head_dims or DEFAULTS["head_dims"]:
            for seqlen in args.seqlens or DEFAULTS["seqlens"]:
                for causal in list(dict.fromkeys(args.causal)) if args.causal else DEFAULTS["causal"]:
                    for bias in (False, True):
                        for mode in modes:
                            result.append(HostCase(mode, dtype, args.batch or DEFAULTS["batch"],
                                                   args.heads or DEFAULTS["heads"], seqlen, head_dim, causal, bias))
    return result


def _call(case: HostCase, device: torch.device):
    """``(prepare, call)``: ``prepare`` resets what must not carry over between calls (untimed), ``call``
    makes one attention call (timed)."""
    from flash_softmax import flash_attention

    dtype = getattr(torch, case.dtype)
    shape = (case.batch, case.heads, case.seqlen, case.head_dim)
    # Uninitialised inputs: no kernel reads them, and filling large CPU tensors would only slow the setup.
    q, k, v = (torch.empty(shape, dtype=dtype, device=device, requires_grad=True) for _ in range(3))
    dout = torch.empty(shape, dtype=dtype, device=device)
    # A (B, 1, 1, Sk) keep-mask, the padding mask of a batch of unequal lengths.
    bias = torch.ones((case.batch, 1, 1, case.seqlen), dtype=torch.bool, device=device) if case.bias else None

    def prepare() -> None:
        # Accumulating into an existing .grad would add a tensor sum per call that is not attention's.
        q.grad = k.grad = v.grad = None

    if case.mode == "fwd":
        def call() -> None:
            flash_attention(q, k, v, causal=case.causal, attn_bias=bias)
    else:
        def call() -> None:
            flash_attention(q, k, v, causal=case.causal, attn_bias=bias).backward(dout)
    return prepare, call


@dataclass(frozen=True)
class HostTiming:
    """Microseconds per call, and the launches one call made (each a no-op)."""

    median: float
    p20: float
    p80: float
    launches: int
    calls: int


def measure(case: HostCase, device: torch.device, calls: int = DEFAULT_CALLS, warmup: int | None = None) -> HostTiming:
    """Time ``calls`` calls of ``case`` one by one, after ``warmup`` untimed ones (default ``calls // 10``,
    at least 10), with launches as no-ops and, without CUDA, CPU tensors on the GPU path."""
    if calls < 1:
        raise ValueError(f"calls must be at least 1, got {calls}")
    warmup = max(10, calls // 10) if warmup is None else warmup
    prepare, call = _call(case, device)
    samples: list[float] = []
    with contextlib.ExitStack() as stack:
        counter = stack.enter_context(noop_launches())
        if device.type != "cuda":
            stack.enter_context(gpu_path())
        prepare()
        call()
        launches = counter.count
        if launches == 0:
            raise RuntimeError(f"{case} made no kernel launch: the path measured is not the GPU path")
        for _ in range(warmup):
            prepare()
            call()
        # A collection in the middle of a call would land on one sample; collect before, not during.
        gc.collect()
        gc.disable()
        try:
            for _ in range(calls):
                prepare()
                begin = time.perf_counter_ns()
                call()
                samples.append((time.perf_counter_ns() - begin) / 1e3)
        finally:
            gc.enable()
    quantiles = statistics.quantiles(samples, n=10, method="inclusive") if len(samples) > 1 else samples * 9
    return HostTiming(statistics.median(samples), quantiles[1], quantiles[7], launches, calls)


def path_description(device: torch.device) -> str:
    """Which path was measured, for the output."""
    if device.type == "cuda":
        return f"compiled-GPU path on {torch.cuda.get_device_name(device)}, every Triton launch a no-op"
    return "compiled-GPU (CUDA) path taken by CPU tensors, every Triton launch a no-op"


def run(args: argparse.Namespace, *, on_gpu: bool, out_dir: Path, threads: int) -> int:
    """Measure every case, print a table and write ``host_overhead.csv`` to ``out_dir``; return 0.
    ``threads`` is torch's thread count, pinned by the caller, recorded in every row."""
    from flash_softmax.bench import output

    device = torch.device("cuda" if on_gpu else "cpu")
    calls = args.calls or DEFAULT_CALLS
    selected = cases(args)
    path = path_description(device)
    console = output.make_console()
    console.print(f"bench --host-overhead: Python time per call of the {path}; {calls} calls per case, "
                  f"{threads} torch threads", markup=False)
    records, rows = [], []
    for case in selected:
        timing = measure(case, device, calls)
        records.append({"path": path, "launches": timing.launches, "mode": case.mode, "dtype": case.dtype,
                        "batch": case.batch, "heads": case.heads, "seqlen": case.seqlen,
                        "head_dim": case.head_dim, "causal": case.causal, "bias": case.bias, "calls": calls,
                        "threads": threads,
                        "us_median": round(timing.median, 2), "us_p20": round(timing.p20, 2),
                        "us_p80": round(timing.p80, 2)})
        rows.append([case.mode, case.dtype, str(case.batch), str(case.heads), str(case.seqlen), str(case.head_dim),
                     "yes" if case.causal else "no", "(B,1,1,S) bool" if case.bias else "none",
                     str(timing.launches), f"{timing.median:.1f} ({timing.p20:.1f}-{timing.p80:.1f})", "ok"])
    output.print_table(console, f"host overhead per call, {path}",
                       ["mode", "dtype", "B", "H", "S", "D", "causal", "bias", "launches", "µs (p20-p80)",
                        "status"], rows,
                       caption="launches: kernel launches per call, each replaced by a no-op; "
                               "fwd = flash_attention forward, fwd_bwd = forward plus .backward()")
    written = output.write_csv(out_dir / "host_overhead.csv", CSV_COLUMNS, records)
    console.print(f"wrote {written}", markup=False)
    return 0
