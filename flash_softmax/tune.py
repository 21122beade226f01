"""``flash-softmax tune``: time every configuration of each attention kernel's space on this GPU and write
the winners to the device's tuned table (``flash_softmax/configs/<device-slug>.json``, see
:mod:`flash_softmax.attention.table`).

For each kernel, dtype, head-dim bucket, causality and length bucket, the problem is the benchmark's:
``batch * seqlen = 16k`` tokens and ``heads * head_dim = 2048`` hidden (:mod:`flash_softmax.bench.attention`),
on random normal inputs (zeros would let some tiles look faster than they are). Each configuration of the
bucket's space that fits the device's shared memory (``configs.prune``) is forced with ``configs.override``
and timed with ``triton.testing.do_bench`` (median):

- ``forward``: one ``flash_attention`` forward;
- ``backward_dkdv`` / ``backward_dq``: the whole backward op (its small preprocess, dK/dV and dQ) on a
  saved forward, with only the tuned kernel's configuration varying and the other two kernels held at
  their defaults, so differences between candidates are that kernel's alone.

A configuration that fails to compile or run (out of shared memory or registers, ...) is recorded as
failed and the run goes on. The fastest configuration is then run once more, at a smaller ragged size
(one batch of ``check_heads`` heads, at most ``CHECK_MAX_SEQLEN`` - ``CHECK_RAGGED`` rows, so masked
tails are exercised), against the float64 reference with the accuracy policy of :mod:`flash_softmax.testing`
(2x the low-precision reference's error for outputs, 3x for gradients); one that fails is dropped for
the next fastest.

Compiling dominates a run (every kernel x dtype x head dim x causality x configuration is a binary of its
own), so worker processes compile and run every candidate once, in parallel, before the timing starts
(``--compile-jobs``); the timing process then finds the binaries in Triton's cache. A candidate whose
compile fails or crashes a worker is recorded with that status and not tried again.

GPU sessions are short: ``--budget-seconds`` stops the run before the next measurement once exceeded (the
parallel compile gets at most ``PRECOMPILE_BUDGET_SHARE`` of it) and writes what is finished. An existing table for the same device is merged (entries measured again are
replaced, the others kept) unless ``--fresh``. ``--dry-run`` only lists what would be timed, and works on
a CPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flash_softmax.attention import configs
from flash_softmax.attention import table as tables
from flash_softmax.attention.configs import ConfigKey, KernelConfig
from flash_softmax.bench.attention import HIDDEN, TOKENS

DEFAULT_KERNELS = configs.KERNEL_NAMES
DEFAULT_DTYPES = ("bfloat16", "float16")
DEFAULT_HEAD_DIMS = (64, 128, 256)
DEFAULT_CAUSAL = (False, True)
DEFAULT_SEQLENS = (1024, 2048, 4096, 8192, 16384)
DEFAULT_BUDGET_SECONDS = 240.0
#: do_bench's warm-up and measuring time per candidate (ms). Shorter than the benchmark's 25/100 because a
#: GPU session has minutes, not hours; the table keeps the runner-up's time, so a win too close to call
#: shows, and --rep-ms buys precision where it matters.
DEFAULT_WARMUP_MS = 10
DEFAULT_REP_MS = 50

#: Size of the accuracy check of a winner: a float64 reference of the full score matrix stays cheap.
CHECK_MAX_SEQLEN = 2048
CHECK_RAGGED = 3

#: Share of the budget the parallel compile may take before timing starts regardless.
PRECOMPILE_BUDGET_SHARE = 0.6

TIMING_NOTE = ("triton.testing.do_bench median in ms, inputs of batch*seqlen = 16k tokens and heads*head_dim = "
               "2048; forward: flash_attention forward; backward_dkdv and backward_dq: the backward op "
               "(preprocess, dK/dV and dQ) with the other kernels at their default configurations")


@dataclass(frozen=True)
class Problem:
    """One timed shape: ``batch * seqlen`` = 16k tokens, ``heads * head_dim`` = 2048, Sq = Sk = seqlen."""

    dtype: str
    head_dim: int
    causal: bool
    seqlen: int

    @property
    def batch(self) -> int:
        return max(1, TOKENS // self.seqlen)

    @property
    def heads(self) -> int:
        return max(1, HIDDEN // self.head_dim)

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=getattr(torch, self.dtype)).element_size()

    def key(self, kernel: str) -> ConfigKey:
        return configs.config_key(kernel, self.dtype, self.head_dim, self.head_dim, self.causal,
                                  self.seqlen, self.seqlen)

    @property
    def label(self) -> str:
        causal = "causal" if self.causal else "full"
        return f"{self.dtype} D={self.head_dim} {causal} S={self.seqlen} (B={self.batch}, H={self.heads})"


@dataclass
class Candidate:
    """One configuration's outcome: ``ms`` when it ran, else ``status`` says why not."""

    config: KernelConfig
    ms: float | None = None
    status: str = "not run"


@dataclass
class Outcome:
    """Everything measured for one key; ``winner`` None when nothing ran or passed the check."""

    problem: Problem
    kernel: str
    candidates: list[Candidate]
    winner: Candidate | None = None
    runner_up: Candidate | None = None
    rejected: list[str] = field(default_factory=list)  # winners dropped by the accuracy check

    @property
    def default(self) -> Candidate:
        return self.candidates[0]  # prune keeps the space's order, so its first entry is the default


# --- the plan --------------------------------------------------------------------------------------------

def problems(dtypes: Sequence[str], head_dims: Sequence[int], causal: Sequence[bool],
             seqlens: Sequence[int]) -> list[Problem]:
    """Every shape, in the order they are timed (so a budget cut leaves whole dtypes and head dims done).

    Raises:
        ValueError: two head dims or two lengths that fall in the same bucket (they would write one entry
            twice), or a head dim outside 1..256.
    """
    for head_dim in head_dims:
        if not 1 <= head_dim <= configs.MAX_HEAD_DIM:
            raise ValueError(f"--head-dims: expected values from 1 to {configs.MAX_HEAD_DIM}, got {head_dim}")
    _reject_shared_buckets("--head-dims", head_dims, lambda d: configs.head_dim_bucket(d, d))
    _reject_shared_buckets("--seqlens", seqlens, lambda s: configs.table_length_bucket(s, s))
    return [Problem(dtype, head_dim, flag, seqlen)
            for dtype in dict.fromkeys(dtypes) for head_dim in dict.fromkeys(head_dims)
            for flag in dict.fromkeys(causal) for seqlen in dict.fromkeys(seqlens)]


def _reject_shared_buckets(flag: str, values: Iterable[int], bucket: Callable[[int], int]) -> None:
    seen: dict[int, int] = {}
    for value in dict.fromkeys(values):
        other = seen.setdefault(bucket(value), value)
        if other != value:
            raise ValueError(f"{flag}: expected values in distinct buckets, got {other} and {value}, both in "
                             f"bucket {bucket(value)}")


def candidates(kernel: str, problem: Problem, shared_limit: int, arch: str) -> list[KernelConfig]:
    """The configurations timed for ``kernel`` on ``problem``: its pruned space, default first."""
    return configs.prune(kernel, problem.head_dim, problem.head_dim, problem.element_size, shared_limit, arch)


def plan(kernels: Sequence[str], shapes: Sequence[Problem], shared_limit: int,
         arch: str) -> list[tuple[Problem, str, list[KernelConfig]]]:
    """``(problem, kernel, candidates)`` in timing order: per shape, every kernel."""
    return [(problem, kernel, candidates(kernel, problem, shared_limit, arch))
            for problem in shapes for kernel in dict.fromkeys(kernels)]


# --- measuring (GPU) -------------------------------------------------------------------------------------

def _isolated(kernel: str, config: KernelConfig, problem: Problem, shared_limit: int, arch: str) -> dict:
    """Overrides forcing ``config`` on ``kernel`` and each other kernel's default: only one thing varies."""
    forced = {name: candidates(name, problem, shared_limit, arch)[0] for name in configs.KERNEL_NAMES}
    forced[kernel] = config
    return forced


def _random_inputs(problem: Problem, batch: int, heads: int, seqlen: int, device, seed: int):
    """q, k, v and dout, normal. Drawn on ``device`` itself: drawing the 16k x 2048 tensors on the CPU
    would cost about a second per shape of the budget."""
    generator = torch.Generator(device=device).manual_seed(seed)
    dtype = getattr(torch, problem.dtype)
    shape = (batch, heads, seqlen, problem.head_dim)
    return tuple(torch.randn(shape, generator=generator, device=device, dtype=dtype) for _ in range(4))


def _timed_call(kernel: str, problem: Problem, inputs, saved) -> Callable[[], object]:
    import flash_softmax as fs
    from flash_softmax.attention.ops import attention_backward_op

    q, k, v, dout = inputs
    if kernel == "forward":
        return lambda: fs.flash_attention(q, k, v, causal=problem.causal)
    out, lse = saved
    scale = 1.0 / math.sqrt(problem.head_dim)
    right = 0 if problem.causal else -1
    return lambda: attention_backward_op(dout, None, q, k, v, out, lse, None, None, None, None, scale, -1, right, 0.0,
                                         0.0, False)


def _saved_forward(problem: Problem, inputs, shared_limit: int, arch: str):
    """``out, lse`` of the forward op (with the default forward configuration), as the backward op saves them."""
    from flash_softmax.attention.ops import attention_forward_op

    q, k, v, _ = inputs
    with configs.override(**_isolated("forward", candidates("forward", problem, shared_limit, arch)[0],
                                      problem, shared_limit, arch)):
        return attention_forward_op(q, k, v, None, None, None, None, 1.0 / math.sqrt(problem.head_dim), -1,
                                    0 if problem.causal else -1, 0.0, 0.0)


def _short(error: BaseException) -> str:
    from flash_softmax.bench.sweep import short_error

    return short_error(error)


def cuda_usable(device=None) -> bool:
    """Whether the CUDA context still runs work: an illegal memory access poisons it for the process
    (always true for a CPU ``device``: the interpreter has no such state)."""
    if device is not None and torch.device(device).type != "cuda":
        return True
    try:
        torch.ones(1, device="cuda").add_(1).item()
        torch.cuda.synchronize()
        return True
    except Exception:  # noqa: BLE001 - any failure here means the context is gone
        return False


def measure(call: Callable[[], object], config: KernelConfig, overrides: dict, warmup_ms: int,
            rep_ms: int) -> Candidate:
    """Compile and run ``call`` once under ``overrides`` (which force ``config``), then time it; failures
    become a status."""
    import triton.testing

    try:
        with configs.override(**overrides):
            call()
            torch.cuda.synchronize()
            ms = triton.testing.do_bench(call, warmup=warmup_ms, rep=rep_ms, return_mode="median")
        return Candidate(config, float(ms), "ok")
    except torch.OutOfMemoryError:
        return Candidate(config, None, "oom")
    except Exception as error:  # noqa: BLE001 - out of resources, compile errors, ...: recorded, never fatal
        return Candidate(config, None, _short(error))


def check_heads(problem: Problem) -> int:
    """Heads of the accuracy check (batch 1): 16 when the timed problem's ``batch * heads`` is a multiple
    of 16, else that product. Triton specialises a binary on which integer arguments are multiples of 16
    (``batch * heads`` among them), so this reuses the timed binaries instead of compiling new ones."""
    total = problem.batch * problem.heads
    return 16 if total % 16 == 0 else total


def accuracy_check(kernel: str, problem: Problem, overrides: dict, device, seed: int):
    """The comparisons (``flash_softmax.testing.compare``) of ``kernel``'s results under ``overrides`` with the
    float64 reference, on a ragged problem of ``check_heads`` heads: out and lse for the forward, dK and
    dV for ``backward_dkdv``, dQ for ``backward_dq``."""
    import flash_softmax as fs
    from flash_softmax import reference
    from flash_softmax.testing import GRADIENT_FACTOR, OUTPUT_FACTOR, compare

    seqlen = max(1, min(problem.seqlen, CHECK_MAX_SEQLEN) - CHECK_RAGGED)
    q, k, v, dout = _random_inputs(problem, 1, check_heads(problem), seqlen, device, seed + 1)

    def run(function, dtype, **extra):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out, lse = function(*leaves, causal=problem.causal, return_lse=True, **extra)
        grads = torch.autograd.grad(out, leaves, dout.to(dtype)) if kernel != "forward" else (None,) * 3
        return out.detach(), lse.detach(), grads

    with configs.override(**overrides):
        actual = run(fs.flash_attention, q.dtype)
    truth = run(reference.attention, torch.float64)
    lowp = (run(reference.attention, q.dtype, upcast=False) if q.dtype != torch.float32
            else (None, None, (None,) * 3))
    if kernel == "forward":
        return [compare("out", actual[0], truth[0], lowp[0], factor=OUTPUT_FACTOR),
                compare("lse", actual[1], truth[1], lowp[1], factor=OUTPUT_FACTOR)]
    wanted = ("dk", "dv") if kernel == "backward_dkdv" else ("dq",)
    return [compare(name, actual[2][index], truth[2][index], lowp[2][index], factor=GRADIENT_FACTOR)
            for index, name in enumerate(("dq", "dk", "dv")) if name in wanted]


# --- compiling in worker processes ----------------------------------------------------------------------
#
# Compiling is most of a tuning run's time (each kernel x dtype x head dim x causality x configuration is
# a separate binary, a few seconds each), and it runs on one CPU core per process while the GPU idles. So
# before timing, worker processes run every candidate once, in parallel; the timing process then loads the
# binaries from Triton's on-disk cache. Each task is a candidate on its real problem, because Triton also
# specialises a binary on which integer arguments (strides, batch x heads, the persistent grid) are
# multiples of 16; the tasks of one binary (its lengths) go to one worker, in order, so the first compiles
# and the others find it cached. A compiler that aborts (as Triton's warp-specialisation pass can) only
# ends its worker: that binary is recorded as crashed for all its lengths and never compiled in the
# timing process, and a new worker takes the rest of the list.

#: How a worker is started (a module-level list so that the chain's crash handling can be tested with a
#: stand-in worker).
WORKER_COMMAND = [sys.executable, "-m", "flash_softmax.tune", "--compile-worker"]


def compile_task(problem: Problem, kernel: str, config: KernelConfig, shared_limit: int, arch: str) -> dict:
    """A worker's unit of work: one candidate on one problem."""
    return {"kernel": kernel, "dtype": problem.dtype, "head_dim": problem.head_dim, "causal": problem.causal,
            "seqlen": problem.seqlen, "config": config.to_dict(), "shared_limit": shared_limit, "arch": arch}


def _task_id(task: dict) -> str:
    return json.dumps(task, sort_keys=True)


def _binary_id(task: dict) -> str:
    """What decides the binary, but for the length: tasks that (almost always) share one compile."""
    return json.dumps({name: value for name, value in task.items() if name != "seqlen"}, sort_keys=True)


_worker_inputs: dict[Problem, tuple] = {}


def run_compile_task(task: dict, device) -> str:
    """Compile and run one candidate once on its problem; ``"ok"`` or the error, never raises."""
    try:
        problem = Problem(task["dtype"], task["head_dim"], task["causal"], task["seqlen"])
        kernel, config = task["kernel"], KernelConfig.from_dict(task["config"])
        if problem not in _worker_inputs:
            _worker_inputs.clear()  # one problem's tensors at a time
            inputs = _random_inputs(problem, problem.batch, problem.heads, problem.seqlen, device, 0)
            _worker_inputs[problem] = (inputs, {})
        inputs, saved = _worker_inputs[problem]
        if kernel != "forward" and "forward" not in saved:
            saved["forward"] = _saved_forward(problem, inputs, task["shared_limit"], task["arch"])
        call = _timed_call(kernel, problem, inputs, saved.get("forward"))
        with configs.override(**_isolated(kernel, config, problem, task["shared_limit"], task["arch"])):
            call()
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()  # an error of the launch surfaces here, not in the next task
        return "ok"
    except torch.OutOfMemoryError:
        return "oom"
    except Exception as error:  # noqa: BLE001 - reported to the timing process as the candidate's status
        return _short(error)


def _worker_main() -> int:
    """``python -m flash_softmax.tune --compile-worker``: tasks as JSON lines on stdin; prints ``start N``
    before task N and ``done N <status>`` after it, so a crash is pinned on the task that caused it."""
    device = torch.device("cuda")
    for index, line in enumerate(sys.stdin):
        print(f"start {index}", flush=True)
        status = run_compile_task(json.loads(line), device)
        print(f"done {index} {json.dumps(status)}", flush=True)
        if status != "ok" and not cuda_usable(device):
            return 3  # the rest of this list needs a fresh process
    return 0


def _run_worker_chain(tasks: list[dict], results: dict[str, str], deadline: float, log_dir: Path,
                      live: set, stop: threading.Event) -> None:
    """Run ``tasks`` through worker processes, one after another, until all have a status, time is up or
    ``stop`` is set. Each running worker is in ``live``, so that an interrupted run can kill them."""
    pending = list(tasks)
    attempt = 0
    while pending and time.monotonic() < deadline and not stop.is_set():
        attempt += 1
        log_path = log_dir / f"worker-{id(tasks)}-{attempt}.log"
        with log_path.open("w") as log:
            process = subprocess.Popen(
                WORKER_COMMAND, stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=log, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
            live.add(process)
            timer = threading.Timer(max(0.0, deadline - time.monotonic()), process.kill)
            timer.start()
            # The whole list is written up front (a few kB; the worker reads as it goes) and stdin closed, so
            # the worker sees its end. A worker that died early leaves a broken pipe: its output says why.
            try:
                process.stdin.write("".join(json.dumps(task) + "\n" for task in pending))
                process.stdin.close()
            except BrokenPipeError:
                pass
            started = None
            for line in process.stdout:
                word, _, rest = line.strip().partition(" ")
                if word == "start":
                    started = int(rest)
                elif word == "done":
                    number, _, status = rest.partition(" ")
                    results[_task_id(pending[int(number)])] = json.loads(status)
                    started = None
            process.stdout.close()
            code = process.wait()
            timer.cancel()
            live.discard(process)
        if stop.is_set():
            return  # killed by the interrupted run, not by its task
        done_upto = max((i for i, task in enumerate(pending) if _task_id(task) in results), default=-1)
        if started is None and done_upto < 0:
            # Died before its first task (an import or CUDA initialisation failure): another try would too.
            # The tasks stay without a status, so the timing process compiles them itself.
            return
        if started is not None and time.monotonic() < deadline:
            # The worker died inside this task: the compiler (or the driver) crashed on its binary, which
            # the same binary's other lengths would meet again.
            tail = log_path.read_text().strip().splitlines()[-1:] or [f"exit status {code}"]
            crashed = _binary_id(pending[started])
            for task in pending[started:]:
                if _binary_id(task) == crashed:
                    results[_task_id(task)] = f"crashed: {tail[0][:100]}"
            done_upto = started
        pending = [task for task in pending[done_upto + 1:] if _task_id(task) not in results]


def precompile(tasks: list[dict], jobs: int, deadline: float) -> dict[str, str]:
    """Run ``tasks`` in ``jobs`` parallel worker chains; their statuses by task id (missing: not reached
    before ``deadline``). The tasks of one binary stay together, in their order, in one chain."""
    by_binary: dict[str, list[dict]] = {}
    for task in {_task_id(task): task for task in tasks}.values():
        by_binary.setdefault(_binary_id(task), []).append(task)
    groups = list(by_binary.values())
    results: dict[str, str] = {}
    live: set[subprocess.Popen] = set()
    stop = threading.Event()
    with tempfile.TemporaryDirectory(prefix="flash-softmax-tune-") as log_dir:
        # Round-robin over binaries keeps each chain's mix of kernels (and compile times) alike.
        chains = [[task for group in groups[index::jobs] for task in group] for index in range(min(jobs, len(groups)))]
        threads = [threading.Thread(target=_run_worker_chain, args=(chain, results, deadline, Path(log_dir), live, stop),
                                    daemon=True) for chain in chains]
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        finally:
            # Interrupted (KeyboardInterrupt): no worker may outlive the run, compiling on a GPU that the
            # next command (a benchmark, say) then shares.
            stop.set()
            for process in list(live):
                process.kill()
            for thread in threads:
                thread.join(timeout=10)  # before their log folder goes
    return results


def default_compile_jobs() -> int:
    """Half the CPU cores, at most 8: compiling is single-threaded, and the timing process needs a core too."""
    return max(1, min(8, (os.cpu_count() or 2) // 2))


# --- the command -----------------------------------------------------------------------------------------

def _resolve(args: argparse.Namespace) -> dict:
    return {
        "kernels": list(dict.fromkeys(args.kernels or DEFAULT_KERNELS)),
        "dtypes": list(dict.fromkeys(args.dtypes or DEFAULT_DTYPES)),
        "head_dims": list(dict.fromkeys(args.head_dims or DEFAULT_HEAD_DIMS)),
        "causal": list(dict.fromkeys(DEFAULT_CAUSAL if args.causal is None else args.causal)),
        "seqlens": list(dict.fromkeys(args.seqlens or DEFAULT_SEQLENS)),
    }


def _device_limits(args: argparse.Namespace, on_gpu: bool) -> tuple[str, int]:
    """``(arch, shared memory bytes)`` the plan is pruned for: the device's, or for a dry run the flags'."""
    if not args.dry_run and (args.arch is not None or args.shared_memory is not None):
        raise ValueError("--arch and --shared-memory only apply with --dry-run; a real run uses the device's, "
                         f"got --arch {args.arch} --shared-memory {args.shared_memory}")
    arch = args.arch or configs.device_arch()
    shared = args.shared_memory or configs._shared_memory_limit()
    return arch, shared


def _out_path(args: argparse.Namespace) -> Path:
    """``--out``: a file, or a folder (existing, or written with a trailing slash) to hold ``<slug>.json``."""
    if not args.out:
        return tables.default_table_path()
    if args.out.endswith(("/", os.sep)) or Path(args.out).is_dir():
        return Path(args.out) / tables.default_table_path().name
    return Path(args.out)


def run(args: argparse.Namespace, *, on_gpu: bool, command_line: str) -> int:
    """Run ``flash-softmax tune``; 0 when a table was written (or the dry run listed its plan), 1 when
    nothing could be measured. Raises ValueError for bad arguments (the command line prints it, exit 2)."""
    from flash_softmax.bench.output import make_console

    console = make_console()
    axes = _resolve(args)
    shapes = problems(axes["dtypes"], axes["head_dims"], axes["causal"], axes["seqlens"])
    arch, shared_limit = _device_limits(args, on_gpu)
    steps = plan(axes["kernels"], shapes, shared_limit, arch)
    total = sum(len(configs_) for _, _, configs_ in steps)
    if args.dry_run:
        return _print_plan(console, steps, total, arch, shared_limit, args)
    if not on_gpu:
        raise ValueError("tune times kernels on a CUDA GPU and there is none; --dry-run lists the plan without one")
    return _tune(console, args, steps, total, arch, shared_limit, command_line, torch.device("cuda"))


def _print_plan(console, steps, total: int, arch: str, shared_limit: int, args) -> int:
    console.print(f"tune --dry-run: {len(steps)} keys, {total} candidate configurations for {arch} with "
                  f"{shared_limit} bytes of shared memory; budget {args.budget_seconds:g} s; table -> {_out_path(args)}")
    for problem, kernel, configs_ in steps:
        key = problem.key(kernel)
        for index, config in enumerate(configs_):
            default = "  (default)" if index == 0 else ""
            console.print(f"{kernel:14} {key.dtype:9} D={key.head_dim_bucket:<3} causal={str(key.causal).lower():5} "
                          f"S={key.seqlen_bucket:<6} B={problem.batch:<3} H={problem.heads:<3} {config.label}{default}",
                          highlight=False)
    binaries = {_binary_id(compile_task(problem, kernel, config, shared_limit, arch))
                for problem, kernel, configs_ in steps for config in configs_}
    console.print(f"{total} candidates, {len(binaries)} distinct binaries to compile", highlight=False)
    return 0


def _tune(console, args, steps, total: int, arch: str, shared_limit: int, command_line: str, device) -> int:
    from flash_softmax.info import device_name

    out_path = _out_path(args)
    previous = _previous_table(out_path, device_name(), args.fresh)
    console.print(f"tune: {len(steps)} keys, {total} candidates on {device_name()} ({arch}, {shared_limit} bytes "
                  f"of shared memory), budget {args.budget_seconds:g} s", highlight=False)
    started = time.monotonic()
    deadline = started + args.budget_seconds
    outcomes: list[Outcome] = []
    stopped = ""
    jobs = default_compile_jobs() if args.compile_jobs is None else args.compile_jobs
    compiled: dict[str, str] = {}
    try:
        if jobs > 0:
            tasks = [compile_task(problem, kernel, config, shared_limit, arch)
                     for problem, kernel, configs_ in steps for config in configs_]
            compiled = precompile(tasks, jobs, started + PRECOMPILE_BUDGET_SHARE * args.budget_seconds)
            failed = sum(1 for status in compiled.values() if status != "ok")
            console.print(f"tune: {len(compiled)} of {len(tasks)} candidates compiled and run once in {jobs} worker "
                          f"processes in {time.monotonic() - started:.0f} s ({failed} failed)", highlight=False)
        stopped = _measure_all(console, args, steps, outcomes, deadline, device, shared_limit, arch, compiled)
    except KeyboardInterrupt:
        # `timeout -s INT` (scripts/gpu_check.sh) or Ctrl-C: keep and write what is finished.
        stopped = "interrupted"
    elapsed = time.monotonic() - started
    if stopped:
        console.print(f"tune: stopped early, {stopped}; {len(outcomes)} of {len(steps)} keys done", highlight=False)
    return _finish(console, args, outcomes, previous, out_path, arch, shared_limit, command_line, stopped, elapsed)


def _measure_all(console, args, steps, outcomes: list[Outcome], deadline: float, device, shared_limit: int,
                 arch: str, compiled: dict[str, str]) -> str:
    """Time every step into ``outcomes``; return why it stopped early, or "" when all were done. A candidate
    whose compile in a worker failed (``compiled``) is recorded with that status and not tried again."""
    over_budget = f"budget of {args.budget_seconds:g} s spent"
    inputs_for, inputs, saved = None, None, None
    for problem, kernel, configs_ in steps:
        if time.monotonic() > deadline:
            return over_budget
        if inputs_for != problem:
            inputs, saved = None, None
            torch.cuda.empty_cache()
            inputs = _random_inputs(problem, problem.batch, problem.heads, problem.seqlen, device, args.seed)
            inputs_for = problem
        if kernel != "forward" and saved is None:
            try:
                saved = _saved_forward(problem, inputs, shared_limit, arch)
            except Exception as error:  # noqa: BLE001 - the backward of this shape cannot be timed; go on
                console.print(f"  {kernel:14} {problem.label}: skipped, the forward failed: {_short(error)}",
                              highlight=False)
                if not cuda_usable(device):
                    return "the CUDA context is unusable after the default forward failed"
                outcomes.append(Outcome(problem, kernel, [Candidate(c, None, "forward failed") for c in configs_]))
                continue
        call = _timed_call(kernel, problem, inputs, saved)
        outcome = Outcome(problem, kernel, [])
        for config in configs_:
            if time.monotonic() > deadline:
                # A key whose candidates were not all timed is not written: its winner would be a guess.
                return over_budget
            status = compiled.get(_task_id(compile_task(problem, kernel, config, shared_limit, arch)), "ok")
            if status != "ok":
                candidate = Candidate(config, None, status)
            else:
                candidate = measure(call, config, _isolated(kernel, config, problem, shared_limit, arch),
                                    args.warmup_ms, args.rep_ms)
            outcome.candidates.append(candidate)
            shown = f"{candidate.ms:.4f} ms" if candidate.ms is not None else candidate.status
            console.print(f"  {kernel:14} {problem.label}: {config.label:28} {shown}", highlight=False)
            if candidate.ms is None and not cuda_usable(device):
                return f"the CUDA context is unusable after {kernel} {config.label} ({candidate.status})"
        _choose(outcome, device, args.seed, shared_limit, arch, console)
        outcomes.append(outcome)
    return ""


def _finish(console, args, outcomes: list[Outcome], previous, out_path: Path, arch: str, shared_limit: int,
            command_line: str, stopped: str, elapsed: float) -> int:
    from flash_softmax.info import device_name, device_slug

    _print_summary(console, outcomes)
    if args.candidates_csv:
        _write_candidates(Path(args.candidates_csv), outcomes)
        console.print(f"wrote {args.candidates_csv}", highlight=False)
    entries = [_entry(outcome) for outcome in outcomes if outcome.winner is not None]
    if not entries:
        console.print("tune: no configuration was measured and checked; no table written", highlight=False)
        return 1
    table = _merged(previous, entries, {
        "device": device_name(), "device_slug": device_slug(), "arch": arch, "shared_memory": shared_limit,
        **_versions(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line, "timing": TIMING_NOTE, "complete": not stopped,
        **({"stopped": stopped} if stopped else {}), "elapsed_seconds": round(elapsed, 1),
    })
    tables.write_table(table, out_path)
    tables.clear_cache()
    configs.clear_cache()
    kept = len(table) - len(entries)
    console.print(f"wrote {out_path}: {len(entries)} entries measured now" + (f", {kept} kept from before" if kept else ""),
                  highlight=False)
    return 0


def _choose(outcome: Outcome, device, seed: int, shared_limit: int, arch: str, console) -> None:
    """The fastest candidate that passes the accuracy check, and the next fastest that ran (runner-up)."""
    ran = sorted((c for c in outcome.candidates if c.ms is not None), key=lambda c: c.ms)
    for index, candidate in enumerate(ran):
        try:
            comparisons = accuracy_check(outcome.kernel, outcome.problem,
                                         _isolated(outcome.kernel, candidate.config, outcome.problem, shared_limit, arch),
                                         device, seed)
            failed = [str(c) for c in comparisons if not c.passed]
        except Exception as error:  # noqa: BLE001 - a check that cannot run rejects the candidate
            failed = [_short(error)]
        if failed:
            outcome.rejected.append(f"{candidate.config.label}: {'; '.join(failed)}")
            candidate.status = "wrong results"
            console.print(f"  {outcome.kernel:14} {outcome.problem.label}: {candidate.config.label} rejected: "
                          f"{'; '.join(failed)}", highlight=False)
            continue
        outcome.winner = candidate
        later = [c for c in ran[index + 1:] if c.status == "ok"]
        outcome.runner_up = later[0] if later else None
        return


def _entry(outcome: Outcome) -> tables.Entry:
    runner_up = outcome.runner_up
    return tables.Entry(outcome.problem.key(outcome.kernel), outcome.winner.config, outcome.winner.ms,
                        None if runner_up is None else runner_up.config,
                        None if runner_up is None else runner_up.ms)


def _versions() -> dict:
    import triton

    return {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda}


def _previous_table(path: Path, device: str, fresh: bool) -> tables.Table | None:
    """The table at ``path`` to merge into, checked before any time is spent measuring.

    Raises:
        ValueError: the file is invalid, or was measured on another device (``--fresh`` overwrites it).
    """
    if fresh or not path.exists():
        return None
    previous = tables.load_table(path)
    if previous.meta.get("device") != device:
        raise ValueError(f"--out {path}: expected a table measured on {device} to merge into, got one measured on "
                         f"{previous.meta.get('device')!r}; pass --fresh to overwrite it")
    return previous


def _merged(previous: tables.Table | None, entries: list[tables.Entry], meta: dict) -> tables.Table:
    kept = {} if previous is None else dict(previous.entries)
    for entry in entries:
        kept[entry.key] = entry
    return tables.Table(kept, meta)


def _print_summary(console, outcomes: list[Outcome]) -> None:
    from rich.table import Table

    from flash_softmax.bench.output import format_number

    summary = Table(title="tuned configurations", header_style="bold")
    for column in ("kernel", "dtype", "D", "causal", "S", "winner", "ms", "runner-up", "ms ", "default ms",
                   "speed-up vs default", "failed"):
        summary.add_column(column, justify="left" if column in ("kernel", "dtype", "winner", "runner-up") else "right")
    for outcome in outcomes:
        key, winner, runner_up = outcome.problem.key(outcome.kernel), outcome.winner, outcome.runner_up
        default_ms = outcome.default.ms
        speedup = default_ms / winner.ms if winner is not None and default_ms is not None else None
        failed = sum(1 for c in outcome.candidates if c.ms is None) + len(outcome.rejected)
        summary.add_row(
            outcome.kernel, key.dtype, str(key.head_dim_bucket), "yes" if key.causal else "no", str(key.seqlen_bucket),
            winner.config.label if winner else "none", format_number(winner.ms if winner else None, 4),
            runner_up.config.label if runner_up else "-", format_number(runner_up.ms if runner_up else None, 4),
            format_number(default_ms, 4), "-" if speedup is None else f"{speedup:.3f}x", str(failed),
            style=None if winner else "red",
        )
    console.print(summary)


def _write_candidates(path: Path, outcomes: list[Outcome]) -> None:
    """Every candidate's time or status, one CSV row each (what the table keeps only the top two of)."""
    from flash_softmax.bench.output import write_csv

    columns = ("kernel", "dtype", "head_dim", "causal", "seqlen", "batch", "heads", "config", "ms", "status", "chosen")
    rows = []
    for outcome in outcomes:
        for candidate in outcome.candidates:
            rows.append({
                "kernel": outcome.kernel, "dtype": outcome.problem.dtype, "head_dim": outcome.problem.head_dim,
                "causal": outcome.problem.causal, "seqlen": outcome.problem.seqlen, "batch": outcome.problem.batch,
                "heads": outcome.problem.heads, "config": candidate.config.label, "ms": candidate.ms,
                "status": candidate.status, "chosen": candidate is outcome.winner,
            })
    path.parent.mkdir(parents=True, exist_ok=True)
    write_csv(path, columns, rows)


if __name__ == "__main__":
    if sys.argv[1:] != ["--compile-worker"]:
        sys.exit(f"usage: python -m flash_softmax.tune --compile-worker (the flash-softmax tune command is "
                 f"`flash-softmax tune`), got {sys.argv[1:]}")
    sys.exit(_worker_main())
