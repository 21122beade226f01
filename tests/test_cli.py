"""The ``flash-softmax`` command line end to end: verify, bench, info, and the pieces they stand on.

On a CPU everything runs the real kernels in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), on tiny shapes. ``cli.main`` is called in-process; only ``python -m flash_softmax``
itself needs a subprocess.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flash_softmax import bench, cli, reference, verify
from flash_softmax.bench import attention as bench_attention
from flash_softmax.bench import providers, sweep
from flash_softmax.bench.timing import time_cpu
from flash_softmax.info import device_slug

from conftest import DEVICE

REPO_ROOT = Path(__file__).resolve().parent.parent
ON_GPU = torch.cuda.is_available()
# On a GPU each row also compares the provider with flash_softmax; without one there is no speed to compare.
SPEEDUP = ["fs_speedup"] if ON_GPU else []
ATTENTION_COLUMNS = ["provider", "mode", "causal", "dtype", "batch", "heads", "seqlen_q", "seqlen_k", "head_dim",
                     "modifier", "ms_median", "ms_p20", "ms_p80", "tflops", "peak_mem_mib", "overhead_vs_plain",
                     *SPEEDUP, "threads", "status"]
SOFTMAX_COLUMNS = ["provider", "mode", "dtype", "rows", "cols", "ms_median", "ms_p20", "ms_p80", "gbps", *SPEEDUP,
                   "threads", "status"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames), list(reader)


# ------------------------------------------------------------------------------------- arguments


def test_parser_reads_every_flag():
    args = cli.build_parser().parse_args(
        ["bench", "--op", "attention", "--seqlens", "64", "128", "--head-dims", "32", "--causal", "false", "on",
         "--modes", "fwd", "fwd_bwd", "--dtypes", "float16", "--providers", "naive", "--batch", "3", "--heads", "4",
         "--out", "somewhere", "--modifiers", "sinks", "dropout"]
    )
    assert args.command == "bench" and args.op == "attention" and args.modifiers == ["sinks", "dropout"]
    assert args.seqlens == [64, 128] and args.head_dims == [32] and args.causal == [False, True]
    assert args.modes == ["fwd", "fwd_bwd"] and args.dtypes == ["float16"] and args.providers == ["naive"]
    assert (args.batch, args.heads, args.out, args.plots) == (3, 4, "somewhere", True)

    args = cli.build_parser().parse_args(["verify", "--full", "--ops", "softmax"])
    assert (args.command, args.grid, args.ops, args.seqlens) == ("verify", "full", ["softmax"], None)

    assert cli.build_parser().parse_args(["bench", "--threads", "3"]).threads == 3
    assert cli.build_parser().parse_args(["bench"]).threads is None  # the run picks the process's cores


def test_tune_and_compile_report_name_the_kernels_alike():
    kernels = ["forward", "backward_dkdv", "backward_dq"]
    for command in ("tune", "compile-report"):
        assert cli.build_parser().parse_args([command, "--kernels", *kernels]).kernels == kernels


@pytest.mark.parametrize(
    "argv,flag,expected",
    [
        (["bench", "--seqlens", "0"], "--seqlens", "positive integer"),
        (["bench", "--seqlens", "abc"], "--seqlens", "positive integer"),
        (["bench", "--causal", "maybe"], "--causal", "true or false"),
        (["bench", "--dtypes", "float64"], "--dtypes", "invalid choice"),
        (["bench", "--modes", "backward"], "--modes", "invalid choice"),
        (["verify", "--quick", "--full"], "--full", "not allowed"),
        (["bench", "--threads", "0"], "--threads", "positive integer"),
        (["bench", "--window", "-2"], "--window", "integer >= 0"),
        (["compile-report", "--kernels", "attention_forward"], "--kernels", "invalid choice"),
        (["bench", "--modifiers", "softcap"], "--modifiers", "invalid choice"),
        (["verify", "--modifiers", "lse"], "--modifiers", "invalid choice"),
    ],
)
def test_parser_rejects_bad_values_naming_the_flag(argv, flag, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.build_parser().parse_args(argv)
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert flag in message and expected in message


@pytest.mark.parametrize(
    "argv,message",
    [
        (["bench", "--op", "softmax", "--seqlens", "64"], "--seqlens does not apply to --op softmax"),
        (["bench", "--cols", "64"], "--cols does not apply to --op attention"),
        (["bench", "--providers", "nonexistent"], "--providers: unknown 'nonexistent'"),
        (["verify", "--batch", "2"], "--batch applies to the --seqlens sweep only"),
        (["verify", "--ops", "attention", "--head-dims", "7"], "leave no case to run"),
        (["verify", "--modifiers", "sinks"], "--modifiers applies to the --seqlens sweep only"),
        (["bench", "--op", "softmax", "--modifiers", "alibi"], "--modifiers does not apply to --op softmax"),
        (["bench", "--host-overhead", "--modifiers", "dropout"], "--modifiers does not apply to --host-overhead"),
        (["bench", "--modifiers", "sinks", "--providers", "naive", "sdpa_math"],
         "--modifiers sinks: modifiers are timed on flash_softmax only, which --providers leaves out (given: naive, "
         "sdpa_math)"),
    ],
)
def test_semantic_errors_exit_2_with_an_actionable_message(argv, message, capsys):
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ bench


def test_bench_attention_writes_csv_env_and_plots(tmp_path, capsys):
    argv = ["bench", "--seqlens", "16", "40", "--head-dims", "16", "--causal", "true", "--modes", "fwd", "bwd",
            "--providers", "flash_softmax", "sdpa_math", "naive", "--threads", "1", "--out", str(tmp_path)]
    threads_before = torch.get_num_threads()
    assert cli.main(argv) == 0
    assert torch.get_num_threads() == threads_before  # pinned for the run, then given back
    printed = capsys.readouterr().out

    columns, rows = read_csv(tmp_path / "attention.csv")
    assert columns == ATTENTION_COLUMNS
    assert len(rows) == 2 * 2 * 3  # seqlens x modes x providers
    assert {row["provider"] for row in rows} == {"flash_softmax", "sdpa_math", "naive"}
    for row in rows:
        assert row["status"] == "ok", row
        assert row["threads"] == "1"
        median, p20, p80 = float(row["ms_median"]), float(row["ms_p20"]), float(row["ms_p80"])
        assert 0 < p20 <= median <= p80
        config = bench_attention.AttentionConfig(
            row["mode"], row["causal"] == "true", row["dtype"], int(row["batch"]), int(row["heads"]),
            int(row["seqlen_q"]), int(row["seqlen_k"]), int(row["head_dim"]))
        assert float(row["tflops"]) == pytest.approx(config.flops() / (median * 1e-3) / 1e12, rel=1e-9)
        if not ON_GPU:
            assert config.causal and (config.batch, config.heads) == (1, 2)  # the CPU defaults
            assert row["peak_mem_mib"] == ""  # measured on CUDA only

    env = json.loads((tmp_path / "env.json").read_text())
    for key in ("gpu", "driver", "cuda", "torch", "triton", "git", "date", "command", "threads"):
        assert key in env
    assert env["torch"] == torch.__version__ and env["command"].startswith("flash-softmax bench --seqlens 16 40")
    assert env["threads"] == 1
    assert socket.gethostname() not in (tmp_path / "env.json").read_text()

    plots = sorted(p.name for p in tmp_path.glob("*.png"))
    if ON_GPU:
        assert plots == ["attention_memory_float16.png", "attention_tflops_float16.png", "attention_time_float16.png"]
        assert "fs speed-up" in printed
    else:
        # No memory figure where memory is not measured, and no speed comparison: the banner says why.
        assert plots == ["attention_tflops_float16.png", "attention_time_float16.png"]
        assert "no attention_memory_float16.png: peak memory is measured on CUDA only" in printed
        assert bench.cpu_banner() in printed and "not speed claims" in printed
        assert "speed-up" not in printed and "speedup" not in printed
        assert env["note"] == bench.cpu_banner()
    for plot in tmp_path.glob("*.png"):
        assert plot.read_bytes().startswith(PNG_SIGNATURE) and plot.stat().st_size > 10_000


def test_bench_threads_default_to_the_cores_of_the_process(tmp_path):
    argv = ["bench", "--op", "softmax", "--cols", "64", "--rows", "2", "--modes", "fwd", "--providers", "torch",
            "--out", str(tmp_path), "--no-plots"]
    assert cli.main(argv) == 0
    expected = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert bench.default_threads() == expected
    assert json.loads((tmp_path / "env.json").read_text())["threads"] == expected
    _, rows = read_csv(tmp_path / "softmax.csv")
    assert [row["threads"] for row in rows] == [str(expected)]


def _raise_out_of_memory(config, q, k, v):
    def forward():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")

    return forward


def _raise_unsupported(config, q, k, v):
    raise providers.Unsupported("needs a GPU")


def _raise_runtime_error(config, q, k, v):
    def forward():
        raise RuntimeError("something broke\nsecond line not shown")

    return forward


def test_bench_rows_for_oom_unsupported_and_errors_do_not_stop_the_sweep(monkeypatch, tmp_path, capsys):
    for name, build in (("oom", _raise_out_of_memory), ("unsupported", _raise_unsupported),
                        ("broken", _raise_runtime_error)):
        monkeypatch.setitem(providers.ATTENTION_PROVIDERS, name, providers.Provider(name, build))
    argv = ["bench", "--seqlens", "16", "--head-dims", "16", "--causal", "false", "--modes", "fwd", "fwd_bwd",
            "--providers", "oom", "unsupported", "broken", "naive", "--out", str(tmp_path), "--no-plots"]
    assert cli.main(argv) == 0  # failures of other providers are reported, not fatal

    _, rows = read_csv(tmp_path / "attention.csv")
    statuses = [(row["mode"], row["provider"], row["status"]) for row in rows]
    assert statuses == [
        ("fwd", "oom", "oom"), ("fwd", "unsupported", "unsupported"),
        ("fwd", "broken", "error: RuntimeError: something broke"), ("fwd", "naive", "ok"),
        ("fwd_bwd", "oom", "oom"), ("fwd_bwd", "unsupported", "unsupported"),
        ("fwd_bwd", "broken", "error: RuntimeError: something broke"), ("fwd_bwd", "naive", "ok"),
    ]
    for row in rows:
        assert (row["ms_median"] == "") == (row["status"] != "ok")
    assert not list(tmp_path.glob("*.png"))
    assert "needs a GPU" in capsys.readouterr().out


def test_bench_exits_1_when_flash_softmax_itself_errors(monkeypatch, tmp_path):
    monkeypatch.setitem(providers.ATTENTION_PROVIDERS, "flash_softmax",
                        providers.Provider("flash_softmax", _raise_runtime_error))
    argv = ["bench", "--seqlens", "16", "--head-dims", "16", "--causal", "false", "--modes", "fwd",
            "--providers", "flash_softmax", "--out", str(tmp_path), "--no-plots"]
    assert cli.main(argv) == 1
    _, rows = read_csv(tmp_path / "attention.csv")
    assert [row["status"] for row in rows] == ["error: RuntimeError: something broke"]


def test_bench_softmax_writes_its_csv_and_plot(tmp_path):
    argv = ["bench", "--op", "softmax", "--cols", "64", "5000", "--rows", "2", "--modes", "fwd", "bwd",
            "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    columns, rows = read_csv(tmp_path / "softmax.csv")
    assert columns == SOFTMAX_COLUMNS
    assert len(rows) == 2 * 2 * 2  # cols x modes x providers (flash_softmax, torch)
    for row in rows:
        assert row["status"] == "ok", row
        tensors_moved = {"fwd": 2, "bwd": 3}[row["mode"]]
        bytes_moved = tensors_moved * int(row["rows"]) * int(row["cols"]) * 2  # float16
        assert float(row["gbps"]) == pytest.approx(bytes_moved / (float(row["ms_median"]) * 1e-3) / 1e9, rel=1e-9)
    for name in ("softmax_gbps_float16.png", "softmax_time_float16.png"):
        assert (tmp_path / name).read_bytes().startswith(PNG_SIGNATURE)
    assert (tmp_path / "env.json").exists()


def test_bench_log_softmax_writes_its_own_csv(tmp_path):
    argv = ["bench", "--op", "log_softmax", "--cols", "300", "--rows", "2", "--modes", "fwd", "bwd",
            "--out", str(tmp_path), "--no-plots"]
    assert cli.main(argv) == 0
    columns, rows = read_csv(tmp_path / "log_softmax.csv")
    assert columns == SOFTMAX_COLUMNS
    assert [(row["provider"], row["mode"]) for row in rows] == [
        ("flash_softmax", "fwd"), ("torch", "fwd"), ("flash_softmax", "bwd"), ("torch", "bwd")]
    assert all(row["status"] == "ok" for row in rows)
    assert not (tmp_path / "softmax.csv").exists()


@pytest.mark.parametrize(
    "seqlen_q,seqlen_k,causal,pairs",
    [(4, 4, False, 16), (4, 4, True, 10), (2, 5, True, 4 + 5), (5, 2, True, 1 + 2), (1, 1, True, 1)],
)
def test_flops_count_exactly_the_pairs_a_bottom_right_causal_mask_keeps(seqlen_q, seqlen_k, causal, pairs):
    keep = reference.band_mask(seqlen_q, seqlen_k, causal, (-1, -1), "cpu")
    assert pairs == (seqlen_q * seqlen_k if keep is None else int(keep.sum()))
    forward = bench_attention.AttentionConfig("fwd", causal, "float16", 2, 3, seqlen_q, seqlen_k, 8)
    assert forward.kept_pairs() == pairs
    assert forward.flops() == 4 * 2 * 3 * pairs * 8
    assert bench_attention.AttentionConfig("bwd", causal, "float16", 2, 3, seqlen_q, seqlen_k, 8).flops() == \
        2.5 * forward.flops()
    assert bench_attention.AttentionConfig("fwd_bwd", causal, "float16", 2, 3, seqlen_q, seqlen_k, 8).flops() == \
        3.5 * forward.flops()


@pytest.mark.parametrize("seqlen_q,seqlen_k", [(9, 9), (5, 12), (12, 5)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [0, 3])
def test_flops_of_a_window_count_only_the_band(seqlen_q, seqlen_k, causal, window):
    """A window's cost is O(S * w): the FLOP count follows the band, as the kernels' work does."""
    config = bench_attention.AttentionConfig("fwd", causal, "float16", 1, 1, seqlen_q, seqlen_k, 8, window=window)
    keep = reference.band_mask(seqlen_q, seqlen_k, causal, config.window_size(), "cpu")
    assert config.kept_pairs() == int(keep.sum())


def test_bench_with_grouped_heads_and_a_window(tmp_path):
    out = tmp_path / "gqa-window"
    status = cli.main(["bench", "--seqlens", "40", "--head-dims", "16", "--causal", "true", "--modes", "fwd",
                       "--batch", "1", "--heads", "4", "--gqa", "2", "--window", "8",
                       "--providers", "flash_softmax", "sdpa_math", "naive", "--out", str(out), "--no-plots"])
    assert status == 0
    with open(out / "attention.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["provider"] for row in rows] == ["flash_softmax", "sdpa_math", "naive"]
    assert all(row["status"] == "ok" for row in rows)
    assert "--gqa 2 --window 8" in json.loads((out / "env.json").read_text())["command"]


def test_bench_times_each_modifier_on_flash_softmax_with_its_overhead(monkeypatch, tmp_path, capsys):
    """One row per modifier for flash_softmax only (forward and backward with the sinks' and the bias's
    gradients), its overhead the ratio to the plain row; tests/test_bench_output.py covers every mode."""
    if not ON_GPU:  # three timed calls per row instead of 0.2 s' worth: the interpreter takes tenths of a second a call
        monkeypatch.setattr(sweep, "measure_time",
                            lambda call, device: time_cpu(call, min_repetitions=3, min_seconds=0))
    out = tmp_path / "modifiers"
    status = cli.main(["bench", "--seqlens", "16", "--head-dims", "16", "--causal", "true", "--modes", "fwd_bwd",
                       "--providers", "flash_softmax", "naive", "--modifiers", "sinks", "alibi", "dropout", "bias",
                       "--threads", "1", "--out", str(out), "--no-plots"])
    assert status == 0
    printed = capsys.readouterr().out
    columns, rows = read_csv(out / "attention.csv")
    assert columns == ATTENTION_COLUMNS
    assert [(row["provider"], row["modifier"]) for row in rows] == [
        ("flash_softmax", "none"), ("naive", "none"), ("flash_softmax", "sinks"), ("flash_softmax", "alibi"),
        ("flash_softmax", "dropout"), ("flash_softmax", "bias")]
    plain_ms = float(rows[0]["ms_median"])
    for row in rows:
        assert row["status"] == "ok", row
        if row["modifier"] == "none":
            assert row["overhead_vs_plain"] == ""
        else:
            overhead = float(row["overhead_vs_plain"])
            assert overhead == pytest.approx(float(row["ms_median"]) / plain_ms, rel=1e-9)
            # The same kernels with one thing more, in the same interpreter: neither free nor of another order.
            assert 0.2 < overhead < 20, row
    assert bench.OVERHEAD_CAPTION in " ".join(printed.split())


def test_bench_rejects_a_group_size_that_does_not_divide_the_heads(tmp_path, capsys):
    status = cli.main(["bench", "--seqlens", "16", "--head-dims", "16", "--heads", "4", "--gqa", "3",
                       "--out", str(tmp_path), "--no-plots"])
    assert status == 2
    assert "--gqa 3 must divide the number of heads, 4" in capsys.readouterr().err


def test_default_attention_sweep_holds_the_token_budget():
    args = cli.build_parser().parse_args(["bench"])
    configs = bench_attention.configurations(bench_attention.resolve_sweep(args, on_gpu=True))
    assert {config.seqlen_q for config in configs} == {512, 1024, 2048, 4096, 8192, 16384}
    assert {(config.head_dim, config.heads) for config in configs} == {(64, 32), (128, 16)}
    assert all(config.batch * config.seqlen_q == 16384 for config in configs)
    assert {config.mode for config in configs} == {"fwd", "bwd", "fwd_bwd"}
    assert {(config.causal, config.dtype) for config in configs} == {
        (causal, dtype) for causal in (False, True) for dtype in ("bfloat16", "float16")}


def test_cpu_timing_reports_ordered_quantiles_of_real_work():
    timing = time_cpu(lambda: sum(range(20_000)), min_repetitions=5, min_seconds=0.0)
    assert 0 < timing.p20 <= timing.median <= timing.p80


def test_device_slug(monkeypatch):
    if not torch.cuda.is_available():
        assert device_slug() == "interpreter"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert device_slug() == "nvidia-h100-80gb-hbm3"


# ----------------------------------------------------------------------------------------- verify

TINY_VERIFY = ["verify", "--seqlens", "33", "--head-dims", "16", "--dtypes", "float16", "--causal", "true"]


def test_verify_passes_on_a_tiny_grid_with_the_real_kernels(capsys):
    assert cli.main(TINY_VERIFY) == 0
    output = capsys.readouterr().out
    assert "3/3 cases passed" in output and "FAIL" not in output


def _attention_without_scale(q, k, v, *, causal=False, softmax_scale=None, return_lse=False):
    """A typical kernel bug: the softmax scale is forgotten."""
    return reference.attention(q, k, v, causal=causal, softmax_scale=1.0, return_lse=return_lse)


class _SoftmaxWithoutRowSum(torch.autograd.Function):
    """Right forward, wrong backward: dx = y * dy, missing the ``- rowsum(dy * y)`` term."""

    @staticmethod
    def forward(ctx, x, dim):
        y = torch.softmax(x.float(), dim=dim).to(x.dtype)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        return y * dy, None


def _softmax_wrong_gradient(x, dim=-1):
    return _SoftmaxWithoutRowSum.apply(x, dim)


def _attention_that_raises(q, k, v, **options):
    raise RuntimeError("kernel launch failed")


@pytest.mark.parametrize(
    "name,wrong,ops,expected",
    [
        ("attention", _attention_without_scale, "attention", "FAIL"),
        ("softmax", _softmax_wrong_gradient, "softmax", "dx: FAIL"),
        ("attention", _attention_that_raises, "attention", "RuntimeError: kernel launch failed"),
    ],
    ids=["attention-scale", "softmax-backward", "attention-raises"],
)
def test_verify_exits_1_when_a_wrong_kernel_is_injected(monkeypatch, capsys, name, wrong, ops, expected):
    monkeypatch.setitem(verify.KERNELS, name, wrong)
    assert cli.main([*TINY_VERIFY, "--ops", ops]) == 1
    output = capsys.readouterr().out
    assert expected in output and "FAILED" in output


def test_verify_hook_accepts_a_correct_kernel(monkeypatch):
    """The same hook with the float32 reference as the kernel passes: the failures above are the kernels'."""
    monkeypatch.setitem(verify.KERNELS, "attention", reference.attention)
    assert cli.main([*TINY_VERIFY, "--ops", "attention", "--dtypes", "bfloat16", "float32"]) == 0


def test_verify_runs_option_cases_only_where_the_kernel_has_the_feature():
    def plain(q, k, v, *, causal=False, return_lse=False):
        if k.shape[1] != q.shape[1] or v.shape[-1] != q.shape[-1]:
            raise ValueError("k: expected the heads and head dim of q")
        return reference.attention(q, k, v, causal=causal, return_lse=return_lse)

    def with_options(q, k, v, *, causal=False, window_size=(-1, -1), softcap=0.0, attn_bias=None, sinks=None,
                     alibi_slopes=None, dropout_p=0.0, return_lse=False):
        return reference.attention(q, k, v, causal=causal, window_size=window_size, softcap=softcap,
                                   attn_bias=attn_bias, sinks=sinks, alibi_slopes=alibi_slopes, dropout_p=dropout_p,
                                   return_lse=return_lse)

    every_feature = {"window_size", "softcap", "attn_bias", "gqa", "head_dim_v", "sinks", "alibi_slopes", "dropout_p"}
    device = torch.device("cpu")
    assert verify.attention_features(plain, device) == set()
    assert verify.attention_features(with_options, device) == every_feature
    needed = set().union(*(case.requires() for case in verify.OPTION_ATTENTION + verify.MODIFIER_ATTENTION))
    assert needed == every_feature


def test_verify_option_cases_pass_with_a_kernel_that_has_every_feature(monkeypatch):
    def with_options(q, k, v, **options):
        return reference.attention(q, k, v, **options)

    device = torch.device("cpu")
    for case in verify.OPTION_ATTENTION + verify.MODIFIER_ATTENTION:
        if case in verify.OPTION_ATTENTION and case.bias is None and case.softcap == 0:
            continue  # one window/GQA/Dv case each is covered by the kernels' own tests; keep this fast
        monkeypatch.setitem(verify.KERNELS, "attention", with_options)
        result = verify.run_case(case, device, seed=0)
        assert result.passed, (case.label, result.error, [str(c) for c in result.comparisons])


# The score modifiers: sinks, ALiBi, dropout, a float bias's gradient and the gradient through lse.

MODIFIER_SWEEP = [*TINY_VERIFY, "--ops", "attention", "--modifiers", "sinks", "alibi", "dropout", "bias"]


def _modifier_case(**fields) -> verify.AttentionCase:
    """The first case of the quick grid's modifier cases with these field values."""
    return next(case for case in verify.MODIFIER_ATTENTION
                if all(getattr(case, name) == value for name, value in fields.items()))


def _only_attention_cases(monkeypatch, cases: list) -> None:
    """Make the quick grid's attention exactly ``cases``."""
    monkeypatch.setattr(verify, "QUICK_ATTENTION", [])
    monkeypatch.setattr(verify, "OPTION_ATTENTION", [])
    monkeypatch.setattr(verify, "MODIFIER_ATTENTION", cases)


def test_verify_quick_and_full_grids_cover_the_modifiers_with_the_options():
    quick, _ = verify.select_cases(cli.build_parser().parse_args(["verify", "--quick"]), on_gpu=False)
    modified = [case for case in quick if isinstance(case, verify.AttentionCase) and (
        case.sinks or case.alibi or case.dropout_p or case.bias_grad or case.lse_loss)]
    assert modified == verify.MODIFIER_ATTENTION
    assert {case.alibi for case in modified} == {None, "heads", "batch"}
    assert any(case.sinks and case.lse_loss and case.bias_grad for case in modified)  # both extra gradients at once
    assert any(case.seqlen_q > case.seqlen_k and case.causal and case.sinks for case in modified)  # rows without keys
    assert {"window_size", "softcap", "gqa", "head_dim_v"} <= set().union(*(case.requires() for case in modified))
    assert {case.dtype for case in modified} == {"float16", "bfloat16", "float32"}

    full, _ = verify.full_grids()
    large = [case for case in full if case.seqlen_q >= 1023]
    for fields in verify.FULL_MODIFIERS:
        matching = [case for case in large if all(getattr(case, name) == value for name, value in fields.items())]
        assert {case.dtype for case in matching} == set(verify.ALL_DTYPES) and {c.causal for c in matching} == {
            False, True}, fields


def test_verify_checks_and_shows_the_modifier_gradients(monkeypatch, capsys):
    """Every quick modifier case through the command, the reference as the kernel (the harness, fast): the
    table names dsinks and dbias where a case has them, as it names dq."""
    _only_attention_cases(monkeypatch, verify.MODIFIER_ATTENTION)
    monkeypatch.setitem(verify.KERNELS, "attention", reference.attention)
    assert cli.main(["verify", "--quick", "--ops", "attention"]) == 0
    output = capsys.readouterr().out
    count = len(verify.MODIFIER_ATTENTION)
    assert f"{count}/{count} cases passed" in output
    lines = output.splitlines()
    for case in verify.MODIFIER_ATTENTION:
        row = next(line for line in lines if case.label in line)
        names = {"out", "lse", "dq", "dk", "dv"} | ({"dsinks"} if case.sinks else set())
        assert names | ({"dbias"} if case.bias_grad else set()) <= set(row.replace("│", " ").split()), row
        assert ("dsinks" in row) == case.sinks and ("dbias" in row) == case.bias_grad


def test_verify_passes_the_benchmark_modifiers_with_the_real_kernels(capsys):
    assert cli.main(MODIFIER_SWEEP) == 0
    output = capsys.readouterr().out
    assert "5/5 cases passed" in output and "FAIL" not in output
    for words in ("sinks", "alibi (Hq,)", "dropout=0.1", "float bias with grad", "dsinks", "dbias"):
        assert words in output


@pytest.mark.parametrize("fields", [dict(alibi="batch"), dict(lse_loss=True, bias_grad=True, sinks=True)],
                         ids=["alibi-per-batch", "lse-loss-bias-sinks"])
def test_verify_passes_the_quick_modifier_cases_beyond_the_sweep_with_the_real_kernels(fields):
    case = _modifier_case(**fields)
    result = verify.run_case(case, torch.device(DEVICE), seed=0)
    assert result.passed, (case.label, result.error, [str(c) for c in result.comparisons])


class _ScaledGradient(torch.autograd.Function):
    """The identity whose backward multiplies the gradient by ``factor``."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def _doubled_gradient_of(keyword: str):
    """A backward bug: the reference, with the gradient of its input ``keyword`` (sinks, attn_bias) doubled."""

    def attention(q, k, v, **options):
        if options.get(keyword) is not None:
            options[keyword] = _ScaledGradient.apply(options[keyword], 2.0)
        return reference.attention(q, k, v, **options)

    return attention


def _alibi_of_batch_0(q, k, v, alibi_slopes=None, **options):
    """(B, Hq) slopes read as (Hq,): every batch gets batch 0's."""
    if alibi_slopes is not None and alibi_slopes.dim() == 2:
        alibi_slopes = alibi_slopes[0]
    return reference.attention(q, k, v, alibi_slopes=alibi_slopes, **options)


def _dropout_with_its_own_state(q, k, v, **options):
    """Dropout keyed by a fixed seed instead of the one drawn from torch's generator."""
    return reference.attention(q, k, v, rng_state=torch.tensor([7, 0]), **options)


def _lse_without_gradient(q, k, v, **options):
    """An lse whose backward is dropped: a loss on it reaches nothing."""
    out, lse = reference.attention(q, k, v, **options)
    return out, _ScaledGradient.apply(lse, 0.0)


@pytest.mark.parametrize(
    "wrong,fields,expected",
    [
        (_doubled_gradient_of("sinks"), dict(sinks=True), "dsinks: FAIL"),
        (_doubled_gradient_of("attn_bias"), dict(bias_grad=True), "dbias: FAIL"),
        (_alibi_of_batch_0, dict(alibi="batch"), "out: FAIL"),
        (_dropout_with_its_own_state, dict(dropout_p=0.17), "out: FAIL"),
        (_lse_without_gradient, dict(lse_loss=True), "dq: FAIL"),
    ],
    ids=["dsinks", "dbias", "alibi-per-batch", "dropout-state", "lse-gradient"],
)
def test_verify_exits_1_when_a_modifier_is_wrong(monkeypatch, capsys, wrong, fields, expected):
    case = _modifier_case(**fields)
    _only_attention_cases(monkeypatch, [case])
    monkeypatch.setitem(verify.KERNELS, "attention", wrong)
    assert cli.main(["verify", "--quick", "--ops", "attention"]) == 1
    output = capsys.readouterr().out
    assert f"{case.label}: {expected}" in output and "FAILED" in output


def test_verify_dropout_leaves_the_callers_random_state_alone(monkeypatch):
    monkeypatch.setitem(verify.KERNELS, "attention", reference.attention)
    state = torch.get_rng_state()
    assert verify.run_case(_modifier_case(dropout_p=0.17), torch.device("cpu"), seed=3).passed
    assert torch.equal(torch.get_rng_state(), state)


def test_modifier_cases_reject_contradictory_fields():
    with pytest.raises(ValueError, match="bias_grad: only a float bias has a gradient; the case has bias='bool'"):
        verify.AttentionCase(8, 8, 16, False, "float16", bias="bool", bias_grad=True)
    with pytest.raises(ValueError, match="alibi: expected None, 'heads' or 'batch', got 'rows'"):
        verify.AttentionCase(8, 8, 16, False, "float16", alibi="rows")
    with pytest.raises(ValueError, match=r"dropout_p: expected a probability in \[0, 1\), got 1.0"):
        verify.AttentionCase(8, 8, 16, False, "float16", dropout_p=1.0)


def test_modifier_names_agree_between_the_command_line_bench_and_verify():
    assert cli.MODIFIER_NAMES == bench_attention.MODIFIERS == tuple(verify.SWEEP_MODIFIERS)


def test_sweep_grid_follows_the_benchmark_shapes():
    attention, softmax = verify.sweep_grids([512, 1024], [64, 128], [False, True], ["bfloat16"], 1, 2)
    assert len(attention) == 2 * 2 * 2
    assert {(case.seqlen_q, case.seqlen_k) for case in attention} == {(512, 512), (1024, 1024)}
    assert {case.shape for case in softmax} == {(2, 512), (2, 1024)}

    attention, _ = verify.sweep_grids([512], [64], [True], ["bfloat16"], 1, 2, ["dropout", "sinks", "dropout"])
    assert [(case.dropout_p, case.sinks) for case in attention] == [
        (0.0, False), (bench_attention.DROPOUT_P, False), (0.0, True)]  # plain, then each modifier once


# ------------------------------------------------------------------------------------- info, entry


def test_info_reports_versions_device_and_backends(capsys):
    assert cli.main(["info"]) == 0
    output = capsys.readouterr().out
    for expected in ("python", "torch", torch.__version__, "triton", "numpy", "flash_softmax"):
        assert expected in output
    if not torch.cuda.is_available():
        assert "CPU only" in output and "triton-interpreter" in output and "interpreter" in output


def test_python_m_flash_softmax_help():
    done = subprocess.run([sys.executable, "-m", "flash_softmax", "--help"], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "verify" in done.stdout and "bench" in done.stdout and "info" in done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter switch only applies without a GPU")
def test_entry_point_switches_to_the_interpreter_without_being_told():
    """Started without TRITON_INTERPRET, a command that runs kernels still runs them, in the interpreter
    (``info`` does not switch: it reports the environment as it is; see tests/test_transparency.py)."""
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "flash_softmax", "verify", "--ops", "softmax", "--dtypes", "float32"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=180, env=environment)
    assert done.returncode == 0, done.stderr
    assert "Triton's interpreter" in done.stdout
    assert "(triton-interpreter)" in done.stdout
