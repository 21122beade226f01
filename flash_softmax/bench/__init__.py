"""``flash-softmax bench``: time flash_softmax against other providers and record everything.

The sweep itself lives in :mod:`~flash_softmax.bench.attention` and :mod:`~flash_softmax.bench.softmax`
(configurations and what is timed), :mod:`~flash_softmax.bench.providers` (the implementations),
:mod:`~flash_softmax.bench.sweep` and :mod:`~flash_softmax.bench.timing` (measuring without stopping on
failures), and :mod:`~flash_softmax.bench.output` (table, CSV, ``env.json``, plots).
:mod:`~flash_softmax.bench.host_overhead` (``--host-overhead``) times the Python work of one attention call
with the kernel launches removed instead. This module ties them to the command line.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from flash_softmax.bench import attention, host_overhead, output, providers, softmax
from flash_softmax.bench.sweep import Result, speedups
from flash_softmax.info import device_name, device_slug, environment

#: Flags that only make sense for one op; giving them to the other is an error rather than ignored.
_ATTENTION_ONLY_FLAGS = {"seqlens": "--seqlens", "head_dims": "--head-dims", "causal": "--causal",
                         "batch": "--batch", "heads": "--heads", "gqa": "--gqa", "window": "--window"}
_SOFTMAX_ONLY_FLAGS = {"cols": "--cols", "rows": "--rows"}


def default_output_dir() -> Path:
    """``benchmarks/results/<device-slug>`` under the current directory (``interpreter`` on the CPU)."""
    return Path("benchmarks") / "results" / device_slug()


def _reject_flags_of_other_op(args: argparse.Namespace) -> None:
    foreign = _SOFTMAX_ONLY_FLAGS if args.op == "attention" else _ATTENTION_ONLY_FLAGS
    for attribute, flag in foreign.items():
        if getattr(args, attribute) is not None:
            raise ValueError(f"{flag} does not apply to --op {args.op}; it was given {getattr(args, attribute)}")


def _format_speedup(speedup: float | None) -> str:
    return "-" if speedup is None else f"{output.format_number(speedup)}x"


def _attention_table_row(record: dict[str, object], speedup: float | None, detail: str) -> list[str]:
    ms = output.format_number(record["ms_median"])
    if record["ms_median"] is not None:
        ms += f" ({output.format_number(record['ms_p20'])}-{output.format_number(record['ms_p80'])})"
    return [
        record["provider"], record["mode"], "yes" if record["causal"] else "no", record["dtype"],
        str(record["batch"]), str(record["heads"]), str(record["seqlen_q"]), str(record["head_dim"]), ms,
        output.format_number(record["tflops"]), output.format_number(record["peak_mem_mib"], 4),
        _format_speedup(speedup),
        record["status"] + (f" ({detail})" if detail else ""),
    ]


def _softmax_table_row(record: dict[str, object], speedup: float | None, detail: str) -> list[str]:
    ms = output.format_number(record["ms_median"])
    if record["ms_median"] is not None:
        ms += f" ({output.format_number(record['ms_p20'])}-{output.format_number(record['ms_p80'])})"
    return [
        record["provider"], record["mode"], record["dtype"], str(record["rows"]), str(record["cols"]), ms,
        output.format_number(record["gbps"]), _format_speedup(speedup),
        record["status"] + (f" ({detail})" if detail else ""),
    ]


_OPS = {
    "attention": {
        "module": attention,
        "registry": lambda: providers.ATTENTION_PROVIDERS,
        "columns": ["provider", "mode", "causal", "dtype", "B", "H", "S", "D", "ms (p20-p80)", "TFLOP/s",
                    "peak MiB", "fs speed-up", "status"],
        "table_row": _attention_table_row,
    },
    "softmax": {
        "module": softmax,
        "registry": lambda: providers.SOFTMAX_PROVIDERS,
        "columns": ["provider", "mode", "dtype", "rows", "cols", "ms (p20-p80)", "GB/s", "fs speed-up", "status"],
        "table_row": _softmax_table_row,
    },
    # The same sweep and CSV columns as softmax, over the log_softmax providers (written to log_softmax.csv).
    "log_softmax": {
        "module": softmax,
        "registry": lambda: providers.LOG_SOFTMAX_PROVIDERS,
        "columns": ["provider", "mode", "dtype", "rows", "cols", "ms (p20-p80)", "GB/s", "fs speed-up", "status"],
        "table_row": _softmax_table_row,
    },
}


def _write_plots(op: str, records: list[dict[str, object]], out_dir: Path) -> list[Path]:
    """TFLOP/s and peak memory against seqlen (attention) or GB/s against cols (softmax), one PNG per dtype."""
    device = device_name() if torch.cuda.is_available() else "Triton interpreter on CPU, not GPU speed"
    paths = []
    for dtype in dict.fromkeys(record["dtype"] for record in records):
        subset = [record for record in records if record["dtype"] == dtype]
        if op == "attention":
            common = dict(x="seqlen_q", x_label="sequence length", panel_rows=("head_dim", "causal"),
                          panel_column="mode")
            paths.append(output.plot_metric(
                subset, out_dir / f"attention_tflops_{dtype}.png", metric="tflops", metric_label="TFLOP/s",
                title=f"attention {dtype}, {device}", **common))
            paths.append(output.plot_metric(
                subset, out_dir / f"attention_memory_{dtype}.png", metric="peak_mem_mib",
                metric_label="peak memory (MiB)", title=f"attention peak memory {dtype}, {device}",
                empty_note="peak memory is measured on CUDA only", **common))
        else:
            paths.append(output.plot_metric(
                subset, out_dir / f"{op}_gbps_{dtype}.png", metric="gbps", metric_label="GB/s",
                x="cols", x_label="row length (cols)", panel_rows=(), panel_column="mode",
                title=f"{op} {dtype}, {device}"))
    return paths


#: Sweep flags that mean nothing to ``--host-overhead`` (which times one fixed attention call per case).
_NOT_HOST_OVERHEAD_FLAGS = {"providers": "--providers", "gqa": "--gqa", "window": "--window", "cols": "--cols",
                            "rows": "--rows"}


def _run_host_overhead(args: argparse.Namespace, on_gpu: bool) -> int:
    if args.op != "attention":
        raise ValueError(f"--host-overhead times attention calls only; it was given --op {args.op}")
    for attribute, flag in _NOT_HOST_OVERHEAD_FLAGS.items():
        if getattr(args, attribute) is not None:
            raise ValueError(f"{flag} does not apply to --host-overhead; it was given {getattr(args, attribute)}")
    out_dir = Path(args.out) if args.out else default_output_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    return host_overhead.run(args, on_gpu=on_gpu, out_dir=out_dir)


def run(args: argparse.Namespace, *, on_gpu: bool, command_line: str) -> int:
    """Run ``flash-softmax bench``; return 1 when a flash_softmax measurement raised an error, else 0.

    Out-of-memory and unsupported rows of any provider, and errors of the other providers, are reported
    in the table and the CSV but do not change the exit status.
    """
    if args.host_overhead:
        return _run_host_overhead(args, on_gpu)
    if args.calls is not None:
        raise ValueError(f"--calls applies to --host-overhead only; it was given {args.calls}")
    _reject_flags_of_other_op(args)
    spec = _OPS[args.op]
    module = spec["module"]
    selected = providers.select(spec["registry"](), args.providers, on_gpu)
    configs = module.configurations(module.resolve_sweep(args, on_gpu))
    device = torch.device("cuda" if on_gpu else "cpu")
    out_dir = Path(args.out) if args.out else default_output_dir()
    out_dir.mkdir(parents=True, exist_ok=True)

    console = output.make_console()
    console.print(f"bench {args.op}: {len(configs)} configurations x {len(selected)} providers on {device_name()}")
    results: list[Result] = []
    with warnings.catch_warnings(), Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=True,
    ) as progress:
        # The interpreter computes log(0) for masked scores on purpose; numpy's warning about it is noise.
        warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton.runtime.interpreter")
        task = progress.add_task(args.op, total=len(configs) * len(selected))

        def advance(result: Result) -> None:
            progress.update(task, advance=1, description=f"{args.op} {result.provider} {result.config.mode}")

        results = module.sweep(configs, selected, device, on_result=advance)

    records = [module.record(result) for result in results]
    ratio = speedups(results)
    rows = [spec["table_row"](record, ratio.get(index), results[index].measurement.detail)
            for index, record in enumerate(records)]
    output.print_table(console, f"{args.op} on {device_name()}", spec["columns"], rows,
                       caption="fs speed-up: this provider's time over flash_softmax's (>1: flash_softmax is faster)")

    written = [output.write_csv(out_dir / f"{args.op}.csv", module.CSV_COLUMNS, records),
               output.write_json(out_dir / "env.json", environment(command_line))]
    if args.plots:
        written += _write_plots(args.op, records, out_dir)
    for path in written:
        console.print(f"wrote {path}")
    flash_errors = [r for r in records if r["provider"] == "flash_softmax" and r["status"].startswith("error")]
    return 1 if flash_errors else 0
