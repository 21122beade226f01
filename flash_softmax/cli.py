"""The ``flash-softmax`` command line: ``verify``, ``bench``, ``info``, ``tune`` and ``compile-report``
(docs/semantics.md, "Command line").

This module only parses arguments; the work lives in :mod:`flash_softmax.verify`,
:mod:`flash_softmax.bench` and :mod:`flash_softmax.info`. Those are imported lazily, after deciding
how Triton runs: ``@triton.jit`` chooses compiled or interpreted kernels when the package is imported,
so on a machine without a GPU ``TRITON_INTERPRET=1`` has to be in the environment before anything
imports triton. That is why this module imports torch only, and not ``flash_softmax`` itself.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import sys
from collections.abc import Sequence

import torch

DTYPE_NAMES = ("float16", "bfloat16", "float32")
ATTENTION_MODES = ("fwd", "bwd", "fwd_bwd")
#: The score modifiers ``bench`` times (and ``verify --seqlens`` checks) beside plain attention.
MODIFIER_NAMES = ("sinks", "alibi", "dropout", "bias")
#: What ``verify --ops`` checks: flash_attention, flash_attention_varlen, flash_attention_with_kvcache and the
#: softmaxes.
VERIFY_OPS = ("attention", "varlen", "kvcache", "softmax")
#: The attention kernels, as ``tune --kernels`` and ``compile-report --kernels`` name them.
KERNEL_NAMES = ("forward", "backward_dkdv", "backward_dq")
#: What ``compile-report --kernels`` also takes: the decode kernel (``flash_attention_with_kvcache``), untuned.
REPORT_KERNEL_NAMES = KERNEL_NAMES + ("decode",)

_TRUE_WORDS = {"true", "on", "yes", "1"}
_FALSE_WORDS = {"false", "off", "no", "0"}

CPU_BANNER = (
    "No CUDA GPU found: the kernels run in Triton's interpreter on the CPU (TRITON_INTERPRET=1), on tiny\n"
    "sizes only. Timings from this machine say nothing about GPU speed."
)
CPU_BANNER_WITHOUT_INTERPRETER = (
    "No CUDA GPU found, and TRITON_INTERPRET is off: CPU tensors take the plain PyTorch path, not the\n"
    "Triton kernels. Timings from this machine say nothing about GPU speed."
)
NO_NUMPY_NOTE = (
    "Triton's interpreter needs numpy, which is not installed: pip install 'flash-softmax[interpreter]'\n"
    "runs the Triton kernels on the CPU."
)


def _int_at_least(minimum: int, expected: str):
    """An argparse type: an integer >= ``minimum``; argparse puts the flag's name before the message."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_non_negative_int = _int_at_least(0, "an integer >= 0")


def _boolean(text: str) -> bool:
    """argparse type: true/false (also on/off, yes/no, 1/0)."""
    word = text.strip().lower()
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _add_shape_flags(parser: argparse.ArgumentParser) -> None:
    """Flags shared by ``verify`` and ``bench``; None means "the default for this device"."""
    parser.add_argument("--seqlens", type=_positive_int, nargs="+", metavar="N",
                        help="sequence lengths (seqlen_q = seqlen_k) of the attention sweep")
    parser.add_argument("--head-dims", type=_positive_int, nargs="+", metavar="D", help="attention head dims")
    parser.add_argument("--causal", type=_boolean, nargs="+", metavar="BOOL",
                        help="causal settings to run, e.g. --causal false true")
    parser.add_argument("--dtypes", nargs="+", choices=DTYPE_NAMES, metavar="DTYPE",
                        help=f"dtypes to run, some of {', '.join(DTYPE_NAMES)}")
    parser.add_argument("--batch", type=_positive_int, help="fix the batch size instead of the default")
    parser.add_argument("--heads", type=_positive_int, help="fix the number of heads instead of the default")
    parser.add_argument("--modifiers", nargs="+", choices=MODIFIER_NAMES, metavar="NAME",
                        help=f"score modifiers, some of {', '.join(MODIFIER_NAMES)}: sinks (Hq,), ALiBi slopes "
                        "(Hq,), dropout p=0.1, a float (B, 1, S, S) bias requiring grad. Each adds a run of every "
                        "attention shape with it: bench times it on flash_softmax (CSV column overhead_vs_plain), "
                        "verify (with --seqlens) checks it")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``flash-softmax`` with its three subcommands."""
    parser = argparse.ArgumentParser(
        prog="flash-softmax",
        description="Check and benchmark the flash_softmax attention and softmax kernels.",
        epilog="Without a CUDA GPU everything runs in Triton's CPU interpreter, on tiny sizes.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{verify,bench,info,tune,compile-report}")

    verify = commands.add_parser(
        "verify",
        help="compare the kernels with the reference over a grid of cases; exit 1 on any failure",
        description="Run the kernels against the float64 reference and print one line per case, judged by "
        "the accuracy policy (docs/semantics.md, \"Accuracy policy\"). Exits 1 if any case fails or raises, "
        "0 otherwise. Prints plain text where rich is not installed.",
    )
    size = verify.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="grid", action="store_const", const="quick",
                      help="a small grid of boundary cases (the default without a GPU)")
    size.add_argument("--full", dest="grid", action="store_const", const="full",
                      help="the full grid: every length x head dim x causal x dtype (the default on a GPU)")
    _add_shape_flags(verify)
    verify.add_argument("--ops", nargs="+", choices=VERIFY_OPS, default=list(VERIFY_OPS),
                        help="which ops to verify: attention, varlen (flash_attention_varlen on packed sequences), "
                        "kvcache (flash_attention_with_kvcache on contiguous and paged caches, appending; varlen and "
                        "kvcache in the quick and full grids only) and softmax (default: all four)")
    verify.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")

    bench = commands.add_parser(
        "bench",
        help="time the kernels against other providers; write CSV, env.json and PNG plots",
        description="Sweep shapes over providers, print a table and write <op>.csv, env.json and plots to "
        "benchmarks/results/<device>/ (or --out). Needs rich and matplotlib: pip install 'flash-softmax[bench]'. "
        "Without a GPU the figures time Triton's interpreter (or the PyTorch path) on the CPU and are not speed "
        "claims.",
    )
    bench.add_argument("--op", choices=("attention", "softmax", "log_softmax"), default="attention",
                       help="which op to time")
    _add_shape_flags(bench)
    bench.add_argument("--modes", nargs="+", choices=ATTENTION_MODES, metavar="MODE",
                       help="fwd, bwd (backward only) and/or fwd_bwd")
    bench.add_argument("--providers", nargs="+", metavar="NAME", help="providers to time (default: all that fit)")
    bench.add_argument("--gqa", type=_positive_int, metavar="G",
                       help="query heads per key/value head (grouped-query attention; default 1)")
    bench.add_argument("--window", type=_non_negative_int, metavar="W",
                       help="sliding window: W keys on each side of the diagonal (left only when causal)")
    bench.add_argument("--varlen", action="store_true",
                       help="time attention over one packed batch of sequences of mixed lengths: "
                       "flash_attention_varlen against flash_attention and SDPA on the batch padded to the longest "
                       "sequence, and FlexAttention with a document mask; TFLOP/s and tokens/s count the real tokens "
                       "only; writes attention_varlen.csv")
    bench.add_argument("--varlen-tokens", type=_positive_int, metavar="T",
                       help="with --varlen: draw sequences until their lengths add up to T tokens (default 32768; 64 "
                       "without a GPU)")
    bench.add_argument("--varlen-sequences", type=_positive_int, metavar="N",
                       help="with --varlen: draw exactly N sequences instead of a token total")
    bench.add_argument("--varlen-lengths", type=_positive_int, nargs=2, metavar=("MIN", "MAX"),
                       help="with --varlen: the range the lengths are drawn from, uniformly (default 128 8192; 8 32 "
                       "without a GPU)")
    bench.add_argument("--varlen-seed", type=_non_negative_int, metavar="S",
                       help="with --varlen: the seed of the lengths (default 0)")
    bench.add_argument("--decode", action="store_true",
                       help="time one decoding step (a query per sequence, nothing appended) over a key/value "
                       "cache of L tokens per sequence: flash_attention_with_kvcache on a contiguous cache "
                       "(flash_softmax) and a paged one (flash_softmax_paged), SDPA on the cache sliced to L, "
                       "FlexAttention with a length BlockMask, and a device-to-device copy of the same bytes; latency "
                       "and K/V bytes read per second against the copy's bandwidth; writes attention_decode.csv. "
                       "--heads (default 32) and --gqa (default 4) set the heads, --head-dims and --dtypes apply")
    bench.add_argument("--decode-batches", type=_positive_int, nargs="+", metavar="B",
                       help="with --decode: batch sizes (default 1 8 64; 1 2 without a GPU)")
    bench.add_argument("--decode-lengths", type=_positive_int, nargs="+", metavar="L",
                       help="with --decode: tokens cached per sequence (default 1024 2048 ... 131072, leaving out "
                       "what does not fit the GPU's memory; 32 64 without a GPU)")
    bench.add_argument("--decode-page-size", type=_positive_int, metavar="P",
                       help="with --decode: tokens per page of flash_softmax_paged's cache (default 256; 16 without "
                       "a GPU)")
    bench.add_argument("--cols", type=_positive_int, nargs="+", metavar="N",
                       help="softmax row lengths (--op softmax / log_softmax)")
    bench.add_argument("--rows", type=_positive_int, help="fix the row count (--op softmax / log_softmax)")
    bench.add_argument("--out", metavar="DIR", help="output folder (default benchmarks/results/<device-slug>)")
    bench.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNG plots")
    bench.add_argument("--threads", type=_positive_int, metavar="N",
                       help="torch threads for the run, recorded in env.json and the CSV (default: the cores "
                       "available to this process)")
    bench.add_argument("--host-overhead", action="store_true",
                       help="instead of timing kernels, time the Python work per attention call (fwd, fwd_bwd) "
                       "on the compiled-GPU path with every kernel launch a no-op; writes host_overhead.csv")
    bench.add_argument("--calls", type=_positive_int, metavar="N",
                       help="timed calls per case of --host-overhead (default 2000)")

    commands.add_parser("info", help="versions, device and the backend each path uses",
                        description="Print versions, the device, and which backend each path will use.")

    _add_tune_parser(commands)

    report = commands.add_parser(
        "compile-report",
        help="compile every kernel configuration for sm_80/sm_90a (no GPU needed); registers, spills, shared "
        "memory, wgmma / mma.sync / TMA / cp.async instructions",
        description="Compile each attention kernel's configurations with Triton, and print per compiled launch "
        "the registers and spilled bytes (bundled ptxas), the shared memory, and the instruction mix of the SASS "
        "(bundled cuobjdump): HGMMA (wgmma) with its MxNxK shapes, HMMA (mma.sync), UTMALDG/UTMASTG (TMA) and "
        "LDGSTS (cp.async). Exits 1 if a configuration kept in a space fails to compile, spills, exceeds the "
        "architecture's shared memory, or, on sm_90a in a 16-bit dtype, lacks wgmma or is mostly wgmma with "
        "N <= 16.",
    )
    report.add_argument("--archs", nargs="+", choices=("sm_80", "sm_90a"), default=["sm_80", "sm_90a"])
    report.add_argument("--dtypes", nargs="+", choices=DTYPE_NAMES, default=["bfloat16"], metavar="DTYPE",
                        help="dtypes to compile (default bfloat16)")
    report.add_argument("--head-dims", type=_positive_int, nargs="+", default=[64, 128, 256], metavar="D")
    report.add_argument("--kernels", nargs="+", metavar="NAME", choices=REPORT_KERNEL_NAMES,
                        help=f"kernels to compile: {', '.join(REPORT_KERNEL_NAMES)} (default: the first three; decode, "
                        "the kernel of flash_attention_with_kvcache, is compiled for its 16/32/64-row tiles over "
                        "contiguous and paged caches, split or not, and is held to no spills, not to wgmma)")
    report.add_argument("--causal", type=_boolean, nargs="+", default=[True], metavar="BOOL",
                        help="causal settings to compile, e.g. --causal false true (default true)")
    selection = report.add_mutually_exclusive_group()
    selection.add_argument("--defaults-only", action="store_true",
                           help="only the default configuration of each kernel and head-dim bucket (the fast check)")
    selection.add_argument("--unpruned", action="store_true",
                           help="report the whole space, including configurations the pruning removes")
    return parser


def _add_tune_parser(commands) -> None:
    """``flash-softmax tune``: its defaults live in :mod:`flash_softmax.tune` (imported lazily, see above)."""
    tune = commands.add_parser(
        "tune",
        help="time each attention kernel's configurations on this GPU; write the tuned table",
        description="For each kernel, dtype, head-dim bucket, causality and length bucket, time every "
        "configuration of the kernel's space that fits the GPU's shared memory, check the fastest against the "
        "reference, and write the winners to flash_softmax/configs/<device-slug>.json (or --out). Defaults: "
        "all three kernels, bfloat16 and float16, head dims 64 128 256, causal false and true, lengths "
        "1024..16384 at 16k tokens per batch and 2048 hidden.",
    )
    tune.add_argument("--kernels", nargs="+", choices=KERNEL_NAMES, metavar="NAME",
                      help=f"kernels to tune: {', '.join(KERNEL_NAMES)} (default: all)")
    tune.add_argument("--dtypes", nargs="+", choices=DTYPE_NAMES, metavar="DTYPE",
                      help="dtypes to tune (default: bfloat16 float16)")
    tune.add_argument("--head-dims", type=_positive_int, nargs="+", metavar="D",
                      help="head dims, one per bucket (default: 64 128 256)")
    tune.add_argument("--seqlens", type=_positive_int, nargs="+", metavar="N",
                      help="sequence lengths, one per power-of-two bucket (default: 1024 2048 4096 8192 16384)")
    tune.add_argument("--causal", type=_boolean, nargs="+", metavar="BOOL",
                      help="causal settings to tune (default: false true)")
    tune.add_argument("--budget-seconds", type=_positive_float, default=240.0, metavar="S",
                      help="stop before the next measurement once S seconds are spent, and write what is done "
                      "(default 240)")
    tune.add_argument("--out", metavar="PATH",
                      help="table file to write, or a folder (ending in /) to write <device-slug>.json in (default "
                      "flash_softmax/configs/<device-slug>.json); an existing table of the same device is merged into")
    tune.add_argument("--fresh", action="store_true", help="overwrite an existing table instead of merging")
    tune.add_argument("--candidates-csv", metavar="PATH", help="also write every candidate's time or failure")
    tune.add_argument("--warmup-ms", type=_positive_int, default=10, metavar="MS",
                      help="do_bench warm-up per candidate (default 10)")
    tune.add_argument("--rep-ms", type=_positive_int, default=50, metavar="MS",
                      help="do_bench measuring time per candidate (default 50)")
    tune.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    tune.add_argument("--compile-jobs", type=_non_negative_int, metavar="N",
                      help="processes compiling the candidates before timing (default: half the cores, at most 8; "
                      "0: compile in the timing process)")
    tune.add_argument("--dry-run", action="store_true",
                      help="list every (key, candidate configuration) that would be timed and the count; no GPU needed")
    tune.add_argument("--arch", choices=("sm_90a", "sm_80"),
                      help="with --dry-run: the architecture whose spaces to list (default: this device's)")
    tune.add_argument("--shared-memory", type=_positive_int, metavar="BYTES",
                      help="with --dry-run: the shared memory to prune for (default: this device's; 232448 on "
                      "H100/H200)")


def _positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _interpreter_requested() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for the interpreter, read the way triton reads it."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in {"1", "true", "yes", "on", "y"}


def _numpy_installed() -> bool:
    """Whether numpy can be imported: Triton's interpreter runs every kernel program in numpy."""
    try:
        return importlib.util.find_spec("numpy") is not None
    except ImportError:  # an import hook that refuses it
        return False


def _prepare_triton(argv: list[str], restart_allowed: bool) -> bool:
    """Put Triton in interpreter mode when there is no GPU; return whether a CUDA GPU is present.

    An explicit ``TRITON_INTERPRET`` in the environment is respected, and without numpy (which the
    interpreter needs, and the package does not) CPU tensors keep the PyTorch path. The switch only takes
    effect for kernels decorated after it is set, and importing ``flash_softmax.cli`` runs the package's
    ``__init__`` first, which may already have built them. So when triton is already loaded and this is
    the real entry point, the process restarts itself once with the variable set.
    """
    on_gpu = torch.cuda.is_available()
    if not on_gpu and "TRITON_INTERPRET" not in os.environ and _numpy_installed():
        triton_already_loaded = "triton" in sys.modules
        os.environ["TRITON_INTERPRET"] = "1"
        if triton_already_loaded and restart_allowed:
            sys.stdout.flush()
            os.execv(sys.executable, [sys.executable, "-m", "flash_softmax", *argv])
    return on_gpu


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``flash-softmax`` with ``argv`` (default ``sys.argv[1:]``); return the exit status.

    Called with an explicit ``argv`` (in-process use, tests), it never restarts the process: set
    ``TRITON_INTERPRET=1`` before importing triton there.
    """
    from_entry_point = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.command == "compile-report":
        return _compile_report(args, argv, restart_allowed=from_entry_point)
    if args.command == "info":
        # info describes the environment as the user's programs see it: switching the interpreter on
        # here, as the commands that run kernels do, would make it report a path they do not take.
        on_gpu = torch.cuda.is_available()
    else:
        on_gpu = _prepare_triton(argv, restart_allowed=from_entry_point)
    if not on_gpu:
        print(CPU_BANNER if _interpreter_requested() else CPU_BANNER_WITHOUT_INTERPRETER, flush=True)
        if not _numpy_installed():
            print(NO_NUMPY_NOTE, flush=True)
    command_line = shlex.join(["flash-softmax", *argv])
    try:
        if args.command == "verify":
            from flash_softmax import verify

            return verify.run(args, on_gpu=on_gpu)
        if args.command == "bench":
            from flash_softmax import bench

            return bench.run(args, on_gpu=on_gpu, command_line=command_line)
        if args.command == "tune":
            from flash_softmax import tune

            return tune.run(args, on_gpu=on_gpu, command_line=command_line)
        from flash_softmax import info

        return info.run()
    except ValueError as error:
        print(f"flash-softmax {args.command}: error: {error}", file=sys.stderr)
        return 2
    except ImportError as error:
        from flash_softmax.bench.output import MissingExtraError

        if not isinstance(error, MissingExtraError):
            raise
        print(f"{error}", file=sys.stderr)  # says what is missing and which extra brings it
        return 2


def _compile_report(args, argv: list[str], restart_allowed: bool) -> int:
    """``compile-report`` needs compiled kernels: never the interpreter, whatever the machine."""
    if _interpreter_requested():
        if not restart_allowed:
            print("flash-softmax compile-report: error: unset TRITON_INTERPRET; the report compiles kernels "
                  "for GPUs and cannot use interpreted ones", file=sys.stderr)
            return 2
        os.environ.pop("TRITON_INTERPRET")
        sys.stdout.flush()
        os.execv(sys.executable, [sys.executable, "-m", "flash_softmax", *argv])
    from flash_softmax import compile_report

    return compile_report.run(args)


if __name__ == "__main__":
    sys.exit(main())
