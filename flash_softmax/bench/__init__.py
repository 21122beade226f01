"""``flash-softmax bench``: time flash_softmax against other providers and record everything.

The sweep itself lives in :mod:`~flash_softmax.bench.attention`, :mod:`~flash_softmax.bench.varlen`
(``--varlen``: one packed batch of mixed lengths), :mod:`~flash_softmax.bench.decode` (``--decode``: one decoding
step over a key/value cache) and :mod:`~flash_softmax.bench.softmax` (configurations and what is timed),
:mod:`~flash_softmax.bench.providers` (the implementations),
:mod:`~flash_softmax.bench.sweep` and :mod:`~flash_softmax.bench.timing` (measuring without stopping on
failures), and :mod:`~flash_softmax.bench.output` (table, CSV, ``env.json``, plots).
:mod:`~flash_softmax.bench.host_overhead` (``--host-overhead``) times the Python work of one attention call
with the kernel launches removed instead. This module ties them to the command line, pins torch's thread
count for the run, adds each attention modifier row's overhead over plain attention (``--modifiers``), and,
without a GPU, marks every table and figure as no speed claim and leaves the speed-up comparison out. It
needs the ``bench`` extra (rich and matplotlib).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from flash_softmax.bench import attention, decode, host_overhead, output, providers, softmax, varlen
from flash_softmax.bench.sweep import Result, run_sweep, speedups
from flash_softmax.info import device_name, device_slug, environment

#: Flags that only make sense for one op; giving them to the other is an error rather than ignored.
_ATTENTION_ONLY_FLAGS = {"seqlens": "--seqlens", "head_dims": "--head-dims", "causal": "--causal",
                         "batch": "--batch", "heads": "--heads", "gqa": "--gqa", "window": "--window",
                         "modifiers": "--modifiers"}
_SOFTMAX_ONLY_FLAGS = {"cols": "--cols", "rows": "--rows"}
#: Flags of ``--varlen`` only, and the attention flags it has no use for (its lengths are drawn, not swept).
_VARLEN_ONLY_FLAGS = {"varlen_tokens": "--varlen-tokens", "varlen_sequences": "--varlen-sequences",
                      "varlen_lengths": "--varlen-lengths", "varlen_seed": "--varlen-seed"}
_NOT_VARLEN_FLAGS = {"seqlens": "--seqlens", "batch": "--batch", "window": "--window", "modifiers": "--modifiers",
                     **_SOFTMAX_ONLY_FLAGS}
#: Flags of ``--decode`` only, and those it has no use for (one query per sequence, one mode, lengths of its own).
_DECODE_ONLY_FLAGS = {"decode_batches": "--decode-batches", "decode_lengths": "--decode-lengths",
                      "decode_page_size": "--decode-page-size"}
_NOT_DECODE_FLAGS = {"seqlens": "--seqlens", "batch": "--batch", "causal": "--causal", "modes": "--modes",
                     "window": "--window", "modifiers": "--modifiers", **_SOFTMAX_ONLY_FLAGS, **_VARLEN_ONLY_FLAGS}

#: The column of the printed table (and, on a GPU, of the CSV) that compares each provider with ours.
SPEEDUP_COLUMN = "fs speed-up"
SPEEDUP_CAPTION = "fs speed-up: this provider's time over flash_softmax's (>1: flash_softmax is faster)"
#: The columns of the printed attention table for a run with ``--modifiers``, and what the second means.
MODIFIER_COLUMNS = ["modifier", "overhead"]
OVERHEAD_CAPTION = "overhead: this row's time over the same provider's plain time (same shape, mode and dtype)"
#: What the bandwidth columns of a ``--decode`` table mean.
DECODE_CAPTION = ("K/V GB/s: cache bytes read per second, sum_b L_b*Hkv*(D+Dv)*element size / time; copy GB/s: a "
                  "device-to-device copy of those bytes, (read + written) / time; of copy: the first over the second")


def default_output_dir() -> Path:
    """``benchmarks/results/<device-slug>`` under the current directory (``interpreter`` on the CPU)."""
    return Path("benchmarks") / "results" / device_slug()


def default_threads() -> int:
    """The cores this process may run on (its CPU affinity, which a container or ``taskset`` narrows),
    falling back to the machine's count where the platform has no affinity."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_banner() -> str:
    """What every table and figure of a run without CUDA says: its numbers are not GPU speed."""
    from flash_softmax._backend import INTERPRETED

    engine = ("Triton's interpreter running the kernels program by program" if INTERPRETED
              else "the PyTorch path (TRITON_INTERPRET is off)")
    return f"No GPU: these figures time {engine} on a CPU. They are not speed claims."


def _refuse_given(args: argparse.Namespace, flags: dict[str, str], reason: str) -> None:
    """Raise ``ValueError`` for the first of ``flags`` (attribute -> flag) given on the command line:
    ``<flag> <reason>; it was given <value>``."""
    for attribute, flag in flags.items():
        value = getattr(args, attribute)
        if value is not None:
            raise ValueError(f"{flag} {reason}; it was given {value}")


def _reject_flags_of_other_op(args: argparse.Namespace) -> None:
    if args.decode:
        if args.varlen:
            raise ValueError("--decode and --varlen: give one of them")
        if args.op != "attention":
            raise ValueError(f"--decode times attention; it was given --op {args.op}")
        _refuse_given(args, _NOT_DECODE_FLAGS, "does not apply to --decode (one query per sequence over its cache: "
                      "--decode-batches, --decode-lengths, --decode-page-size)")
        return
    _refuse_given(args, _DECODE_ONLY_FLAGS, "applies to --decode only")
    if args.varlen:
        if args.op != "attention":
            raise ValueError(f"--varlen times attention; it was given --op {args.op}")
        _refuse_given(args, _NOT_VARLEN_FLAGS, "does not apply to --varlen (its lengths are drawn: --varlen-tokens, "
                      "--varlen-sequences, --varlen-lengths, --varlen-seed)")
        return
    _refuse_given(args, _VARLEN_ONLY_FLAGS, "applies to --varlen only")
    foreign = _SOFTMAX_ONLY_FLAGS if args.op == "attention" else _ATTENTION_ONLY_FLAGS
    _refuse_given(args, foreign, f"does not apply to --op {args.op}")


def _time_cell(record: dict[str, object]) -> str:
    """The median with the 20th-80th percentile range, e.g. ``1.23 (1.2-1.3)``."""
    cell = output.format_number(record["ms_median"])
    if record["ms_median"] is not None:
        cell += f" ({output.format_number(record['ms_p20'])}-{output.format_number(record['ms_p80'])})"
    return cell


def _attention_cells(record: dict[str, object]) -> list[str]:
    return [
        record["provider"], record["mode"], "yes" if record["causal"] else "no", record["dtype"],
        str(record["batch"]), str(record["heads"]), str(record["seqlen_q"]), str(record["head_dim"]),
        _time_cell(record), output.format_number(record["tflops"]), output.format_number(record["peak_mem_mib"], 4),
    ]


def _varlen_cells(record: dict[str, object]) -> list[str]:
    return [
        record["provider"], record["mode"], "yes" if record["causal"] else "no", record["dtype"],
        str(record["sequences"]), str(record["tokens"]), str(record["max_seqlen"]), str(record["heads"]),
        str(record["head_dim"]), _time_cell(record), output.format_number(record["tokens_per_s"]),
        output.format_number(record["tflops"]), output.format_number(record["peak_mem_mib"], 4),
    ]


def _decode_cells(record: dict[str, object]) -> list[str]:
    ratio, page_size = record["kv_vs_copy"], record["page_size"]
    return [
        record["provider"], record["dtype"], str(record["batch"]), str(record["heads"]), str(record["heads_kv"]),
        str(record["head_dim"]), str(record["cache_len"]), "-" if page_size is None else str(page_size),
        _time_cell(record), output.format_number(record["kv_gbps"]), output.format_number(record["copy_gbps"]),
        output.format_number(ratio), output.format_number(record["peak_mem_mib"], 4),
    ]


def _softmax_cells(record: dict[str, object]) -> list[str]:
    return [record["provider"], record["mode"], record["dtype"], str(record["rows"]), str(record["cols"]),
            _time_cell(record), output.format_number(record["gbps"])]


_SOFTMAX_COLUMNS = ["provider", "mode", "dtype", "rows", "cols", "ms (p20-p80)", "GB/s"]

_OPS = {
    "attention": {
        "module": attention,
        "registry": lambda: providers.ATTENTION_PROVIDERS,
        "columns": ["provider", "mode", "causal", "dtype", "B", "H", "S", "D", "ms (p20-p80)", "TFLOP/s",
                    "peak MiB"],
        "cells": _attention_cells,
    },
    # --varlen: one packed batch (written to attention_varlen.csv).
    "attention_varlen": {
        "module": varlen,
        "registry": lambda: providers.VARLEN_PROVIDERS,
        "columns": ["provider", "mode", "causal", "dtype", "N", "tokens", "max S", "H", "D", "ms (p20-p80)",
                    "tokens/s", "TFLOP/s", "peak MiB"],
        "cells": _varlen_cells,
    },
    # --decode: one decoding step over a key/value cache (written to attention_decode.csv).
    "attention_decode": {
        "module": decode,
        "registry": lambda: providers.DECODE_PROVIDERS,
        "columns": ["provider", "dtype", "B", "H", "Hkv", "D", "L", "page", "ms (p20-p80)", "K/V GB/s", "copy GB/s",
                    "of copy", "peak MiB"],
        "cells": _decode_cells,
    },
    "softmax": {
        "module": softmax,
        "registry": lambda: providers.SOFTMAX_PROVIDERS,
        "columns": _SOFTMAX_COLUMNS,
        "cells": _softmax_cells,
    },
    # The same sweep and CSV columns as softmax, over the log_softmax providers (written to log_softmax.csv).
    "log_softmax": {
        "module": softmax,
        "registry": lambda: providers.LOG_SOFTMAX_PROVIDERS,
        "columns": _SOFTMAX_COLUMNS,
        "cells": _softmax_cells,
    },
}


def csv_columns(columns: tuple[str, ...], on_gpu: bool) -> tuple[str, ...]:
    """An op's CSV columns for this device: on a GPU ``fs_speedup`` joins them (before ``threads`` and
    ``status``, which stays last); without one there is no speed to compare."""
    if not on_gpu:
        return columns
    where = columns.index("threads")
    return (*columns[:where], "fs_speedup", *columns[where:])


def _ratio_cell(value: float | None) -> str:
    return "-" if value is None else f"{output.format_number(value)}x"


def has_modifiers(records: list[dict[str, object]]) -> bool:
    """Whether any row times a score modifier (attention with ``--modifiers``)."""
    return any(record.get("modifier", "none") != "none" for record in records)


def table_rows(op: str, records: list[dict[str, object]], details: list[str], on_gpu: bool) -> tuple[list, list]:
    """The printed table's columns and rows: the op's cells, the modifier and its overhead when the run has
    modifiers, the speed-up on a GPU, and the status with its detail."""
    spec = _OPS[op]
    modifiers = has_modifiers(records)
    columns = [*spec["columns"], *(MODIFIER_COLUMNS if modifiers else []), *([SPEEDUP_COLUMN] if on_gpu else []),
               "status"]
    rows = []
    for record, detail in zip(records, details):
        modifier_cells = [record["modifier"], _ratio_cell(record["overhead_vs_plain"])] if modifiers else []
        speedup_cells = [_ratio_cell(record.get("fs_speedup"))] if on_gpu else []
        status = record["status"] + (f" ({detail})" if detail else "")
        rows.append([*spec["cells"](record), *modifier_cells, *speedup_cells, status])
    return columns, rows


def table_caption(records: list[dict[str, object]], on_gpu: bool) -> str | None:
    """What the table's ratio columns mean, for those it has."""
    lines = [*([OVERHEAD_CAPTION] if has_modifiers(records) else []),
             *([DECODE_CAPTION] if any("kv_vs_copy" in record for record in records) else []),
             *([SPEEDUP_CAPTION] if on_gpu else [])]
    return "\n".join(lines) or None


def plot_records(records: list[dict[str, object]]) -> list[dict[str, object]]:
    """The rows as the plots draw them: a modifier's rows under a provider name of their own, e.g.
    ``flash_softmax +sinks``, so that they make a line beside the plain one instead of joining it."""
    return [record if record.get("modifier", "none") == "none"
            else {**record, "provider": f"{record['provider']} +{record['modifier']}"} for record in records]


def _write_plots(op: str, records: list[dict[str, object]], out_dir: Path, banner: str | None) -> tuple[list, list]:
    """Per dtype: time per call and TFLOP/s (attention) or GB/s (softmax) against the length, and peak
    memory where it was measured. Returns the files written and a line for each figure left out."""
    device = device_name() if torch.cuda.is_available() else "CPU"
    records = plot_records(records)
    written, left_out = [], []
    for dtype in dict.fromkeys(record["dtype"] for record in records):
        subset = [record for record in records if record["dtype"] == dtype]
        if op == "attention_decode":
            common = dict(x="cache_len", x_label="cache length (tokens)", panel_rows=("head_dim",),
                          panel_column="batch", banner=banner)
            # The copy is drawn beside the attention times; its GB/s counts other bytes (read and written).
            attended = [record for record in subset if record["provider"] != decode.COPY_PROVIDER]
            figures = [
                ("time", dict(metric="ms_median", metric_label="ms per decode step",
                              title=f"decode step time {dtype}, {device}")),
                ("kv_gbps", dict(metric="kv_gbps", metric_label="K/V GB/s read",
                                 title=f"decode K/V bandwidth {dtype}, {device}"), attended),
            ]
        elif op == "attention":
            common = dict(x="seqlen_q", x_label="sequence length", panel_rows=("head_dim", "causal"),
                          panel_column="mode", banner=banner)
            figures = [
                ("time", dict(metric="ms_median", metric_label="ms per call", title=f"attention time {dtype}, {device}")),
                ("tflops", dict(metric="tflops", metric_label="TFLOP/s", title=f"attention {dtype}, {device}")),
                ("memory", dict(metric="peak_mem_mib", metric_label="peak memory (MiB)",
                                title=f"attention peak memory {dtype}, {device}")),
            ]
        else:
            common = dict(x="cols", x_label="row length (cols)", panel_rows=(), panel_column="mode", banner=banner)
            figures = [
                ("time", dict(metric="ms_median", metric_label="ms per call", title=f"{op} time {dtype}, {device}")),
                ("gbps", dict(metric="gbps", metric_label="GB/s", title=f"{op} {dtype}, {device}")),
            ]
        for name, options, *rows in figures:
            path = output.plot_metric(rows[0] if rows else subset, out_dir / f"{op}_{name}_{dtype}.png", **common,
                                      **options)
            if path is not None:
                written.append(path)
            elif name == "memory":
                left_out.append(f"no {op}_{name}_{dtype}.png: peak memory is measured on CUDA only")
            else:
                left_out.append(f"no {op}_{name}_{dtype}.png: no successful measurement to draw")
    return written, left_out


#: Sweep flags that mean nothing to ``--host-overhead`` (which times one fixed attention call per case).
_NOT_HOST_OVERHEAD_FLAGS = {"providers": "--providers", "gqa": "--gqa", "window": "--window", "cols": "--cols",
                            "rows": "--rows", "modifiers": "--modifiers", **_VARLEN_ONLY_FLAGS,
                            **_DECODE_ONLY_FLAGS}


def _run_host_overhead(args: argparse.Namespace, on_gpu: bool, threads: int) -> int:
    if args.op != "attention":
        raise ValueError(f"--host-overhead times attention calls only; it was given --op {args.op}")
    for flag, given in (("--varlen", args.varlen), ("--decode", args.decode)):
        if given:
            raise ValueError(f"{flag} does not apply to --host-overhead; give one of them")
    _refuse_given(args, _NOT_HOST_OVERHEAD_FLAGS, "does not apply to --host-overhead")
    out_dir = Path(args.out) if args.out else default_output_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    return host_overhead.run(args, on_gpu=on_gpu, out_dir=out_dir, threads=threads)


def run(args: argparse.Namespace, *, on_gpu: bool, command_line: str) -> int:
    """Run ``flash-softmax bench``; return 1 when a flash_softmax measurement raised an error, else 0.

    Out-of-memory and unsupported rows of any provider, and errors of the other providers, are reported
    in the table and the CSV but do not change the exit status. torch runs on ``--threads`` threads
    (default: the cores available to the process) for the whole run, and gets its previous count back
    afterwards.

    Raises:
        MissingExtraError: rich or matplotlib is not installed (``pip install 'flash-softmax[bench]'``).
        ValueError: flags that contradict each other or name unknown providers.
    """
    for module_name in ("rich", "matplotlib"):
        output.require(module_name, "bench", "flash-softmax bench")
    threads = default_threads() if args.threads is None else args.threads
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if args.host_overhead:
            return _run_host_overhead(args, on_gpu, threads)
        if args.calls is not None:
            raise ValueError(f"--calls applies to --host-overhead only; it was given {args.calls}")
        return _run_sweep(args, on_gpu, command_line, threads)
    finally:
        torch.set_num_threads(previous_threads)


def _run_sweep(args: argparse.Namespace, on_gpu: bool, command_line: str, threads: int) -> int:
    _reject_flags_of_other_op(args)
    op = "attention_varlen" if args.varlen else "attention_decode" if args.decode else args.op
    spec = _OPS[op]
    module = spec["module"]
    selected = providers.select(spec["registry"](), args.providers, on_gpu)
    if args.decode:
        selected = decode.with_copy(selected)
    if args.modifiers and not any(provider.takes_modifiers for provider in selected):
        takers = [provider.name for provider in spec["registry"]().values() if provider.takes_modifiers]
        raise ValueError(f"--modifiers {' '.join(args.modifiers)}: modifiers are timed on {', '.join(takers)} only, "
                         f"which --providers leaves out (given: {', '.join(provider.name for provider in selected)})")
    sweep = module.resolve_sweep(args, on_gpu)
    configs = module.configurations(sweep)
    too_large = decode.left_out(sweep) if args.decode else []
    if too_large and not configs:
        raise ValueError(f"--decode: no configuration's caches fit in the device's {sweep['memory'] / 2**30:.0f} GiB")
    measured = sum(module.runs(config, provider) for config in configs for provider in selected)
    device = torch.device("cuda" if on_gpu else "cpu")
    out_dir = Path(args.out) if args.out else default_output_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    banner = None if on_gpu else cpu_banner()

    console = output.make_console()
    console.print(f"bench {op}: {len(configs)} configurations x {len(selected)} providers "
                  f"({measured} measurements) on {device_name()}, {threads} torch threads", markup=False)
    if too_large:
        console.print(f"left out, their caches would not fit in {sweep['memory'] / 2**30:.0f} GiB: "
                      f"{', '.join(config.label for config in too_large)}", markup=False)
    if args.varlen:
        lengths = configs[0].lengths
        console.print(f"packed batch: {len(lengths)} sequences, {sum(lengths)} tokens, lengths (seed "
                      f"{configs[0].seed}): {' '.join(map(str, lengths))}", markup=False)
    with output.progress(console, op, measured) as step:
        results: list[Result] = run_sweep(
            module, configs, selected, device,
            on_result=lambda result: step(f"{op} {result.provider} {result.config.mode}"),
        )

    records = [module.record(result, threads) for result in results]
    if op == "attention":
        for index, overhead in attention.overheads(results).items():
            records[index]["overhead_vs_plain"] = overhead
    if op == "attention_decode":
        decode.add_copy_bandwidth(results, records)
    if on_gpu:
        ratio = speedups(results)
        for index, record in enumerate(records):
            # The copy is no attention: how much faster than it flash_softmax is would mean nothing.
            record["fs_speedup"] = None if record["provider"] == decode.COPY_PROVIDER else ratio.get(index)
    columns, rows = table_rows(op, records, [result.measurement.detail for result in results], on_gpu)
    if banner is not None:
        console.print(banner, style="bold red", markup=False)  # right above the table it is about
    output.print_table(console, f"{op} on {device_name()}", columns, rows,
                       caption=table_caption(records, on_gpu))

    environment_record = {**environment(command_line), "threads": threads}
    if banner is not None:
        environment_record["note"] = banner
    written = [output.write_csv(out_dir / f"{op}.csv", csv_columns(module.CSV_COLUMNS, on_gpu), records),
               output.write_json(out_dir / "env.json", environment_record)]
    if args.plots and args.varlen:
        console.print("no plots for --varlen: one packed batch per configuration, no length to draw against",
                      markup=False)
    elif args.plots:
        figures, left_out = _write_plots(op, records, out_dir, banner)
        written += figures
        for line in left_out:
            console.print(line, markup=False)
    for path in written:
        console.print(f"wrote {path}", markup=False)
    ours = {"flash_softmax", *(["flash_softmax_paged"] if op == "attention_decode" else [])}
    flash_errors = [r for r in records if r["provider"] in ours and r["status"].startswith("error")]
    return 1 if flash_errors else 0
