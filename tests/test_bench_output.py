"""What ``flash-softmax bench`` shows: axis scales, which panels a figure has, the CPU banner, the columns
each device gets, the score modifiers' rows and overhead column, the plain-text table without rich and the
message for a missing extra.

The figures are built from hand-made rows (no kernel runs), so every test here takes well under a second;
tests/test_cli.py runs the whole command.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from flash_softmax import bench
from flash_softmax.bench import attention as bench_attention
from flash_softmax.bench import output
from flash_softmax.bench import providers
from flash_softmax.bench import softmax as bench_softmax
from flash_softmax.bench.sweep import Measurement, Result
from flash_softmax.bench.timing import Timing


def attention_row(provider: str, mode: str, seqlen: int, ms: float | None, memory: float = math.nan,
                  head_dim: int = 16, status: str = "ok", modifier: str = "none",
                  overhead: float | None = None) -> dict[str, object]:
    """A CSV row of ``bench --op attention`` as the table and plots read it."""
    return {"provider": provider, "mode": mode, "causal": True, "dtype": "float16", "batch": 1, "heads": 2,
            "seqlen_q": seqlen, "seqlen_k": seqlen, "head_dim": head_dim, "modifier": modifier, "ms_median": ms,
            "ms_p20": ms, "ms_p80": ms, "tflops": None if ms is None else 1.0 / ms, "peak_mem_mib": memory,
            "overhead_vs_plain": overhead, "threads": 2, "status": status}


def figure_of(records, metric: str, banner: str | None = None):
    return output.build_figure(records, metric=metric, metric_label=metric, x="seqlen_q", x_label="S",
                               panel_rows=("head_dim", "causal"), panel_column="mode", title="t", banner=banner)


def visible_axes(figure):
    return [ax for ax in figure.axes if ax.get_visible()]


# ------------------------------------------------------------------------------------------- scales


@pytest.mark.parametrize(
    "values,scale",
    [
        ([1.0, 5.0, 10.0], "linear"),  # exactly 10x is not more than 10x
        ([1.0, 10.01], "log"),
        ([0.002, 3.0, 40.0], "log"),
        ([7.0], "linear"),
        ([], "linear"),
        ([None, math.nan, math.inf, 0.0, -5.0, 2.0, 3.0], "linear"),  # only positive finite values count
        ([None, math.nan, 0.5, 60.0], "log"),
    ],
)
def test_axis_scale_is_log_for_a_span_above_10x(values, scale):
    assert output.axis_scale(values) == scale


def test_each_panel_of_a_figure_gets_its_own_scale():
    records = [
        # fwd: the interpreter against a materialised reference, 500x apart
        attention_row("flash_softmax", "fwd", 16, 50.0), attention_row("naive", "fwd", 16, 0.1),
        attention_row("flash_softmax", "fwd", 32, 80.0), attention_row("naive", "fwd", 32, 0.2),
        # bwd: within 2x
        attention_row("flash_softmax", "bwd", 16, 3.0), attention_row("naive", "bwd", 16, 2.0),
        attention_row("flash_softmax", "bwd", 32, 4.0), attention_row("naive", "bwd", 32, 3.0),
    ]
    figure = figure_of(records, "ms_median")
    scales = {ax.get_title(): ax.get_yscale() for ax in visible_axes(figure)}
    assert scales == {"head_dim=16, causal=True, mode=fwd": "log", "head_dim=16, causal=True, mode=bwd": "linear"}
    fwd = next(ax for ax in figure.axes if ax.get_title().endswith("mode=fwd"))
    assert "log scale" in fwd.get_ylabel()


# ------------------------------------------------------------------------------------------- panels


def test_no_figure_for_a_metric_that_was_never_measured():
    """Peak memory is NaN off CUDA: no figure at all, rather than a figure of empty panels."""
    records = [attention_row("flash_softmax", mode, seqlen, 1.0) for mode in ("fwd", "bwd") for seqlen in (16, 32)]
    assert figure_of(records, "peak_mem_mib") is None


def test_no_memory_panel_where_no_provider_measured_memory(tmp_path):
    """Memory measured for fwd only (say the bwd rows all ran out of memory): one panel, not two."""
    records = [
        attention_row("flash_softmax", "fwd", 16, 1.0, memory=10.0),
        attention_row("flash_softmax", "fwd", 32, 1.0, memory=30.0),
        attention_row("naive", "fwd", 16, 1.0),  # a provider without the figure draws no line
        attention_row("flash_softmax", "bwd", 16, None, status="oom"),
        attention_row("naive", "bwd", 16, None, status="oom"),
    ]
    figure = figure_of(records, "peak_mem_mib")
    axes = visible_axes(figure)
    assert [ax.get_title() for ax in axes] == ["head_dim=16, causal=True, mode=fwd"]
    assert [line.get_label() for line in axes[0].get_lines()] == ["flash_softmax"]
    path = output.plot_metric(records, tmp_path / "memory.png", metric="peak_mem_mib", metric_label="MiB",
                              x="seqlen_q", x_label="S", panel_rows=("head_dim", "causal"), panel_column="mode",
                              title="t")
    assert path.exists()
    assert output.plot_metric(records[3:], tmp_path / "none.png", metric="peak_mem_mib", metric_label="MiB",
                              x="seqlen_q", x_label="S", panel_rows=(), panel_column="mode", title="t") is None
    assert not (tmp_path / "none.png").exists()


def test_a_combination_that_was_not_run_leaves_no_empty_panel():
    records = [attention_row("flash_softmax", "fwd", 16, 1.0, head_dim=16),
               attention_row("flash_softmax", "bwd", 16, 1.0, head_dim=32)]
    figure = figure_of(records, "ms_median")
    assert sorted(ax.get_title() for ax in visible_axes(figure)) == [
        "head_dim=16, causal=True, mode=fwd", "head_dim=32, causal=True, mode=bwd"]


# ------------------------------------------------------------------------------------- CPU and GPU


def test_the_cpu_banner_is_on_every_figure():
    records = [attention_row("flash_softmax", "fwd", 16, 1.0), attention_row("flash_softmax", "fwd", 32, 2.0)]
    banner = bench.cpu_banner()
    assert "CPU" in banner and "not speed claims" in banner
    # The banner is wrapped to the figure's width: compare the words.
    assert banner in " ".join(figure_of(records, "ms_median", banner=banner)._suptitle.get_text().split())
    assert "speed claims" not in figure_of(records, "ms_median")._suptitle.get_text()


def test_speedup_only_on_a_gpu():
    for module in (bench_attention, bench_softmax):
        cpu = bench.csv_columns(module.CSV_COLUMNS, on_gpu=False)
        gpu = bench.csv_columns(module.CSV_COLUMNS, on_gpu=True)
        assert "fs_speedup" not in cpu and cpu[-2:] == ("threads", "status")
        assert gpu[-3:] == ("fs_speedup", "threads", "status")  # status stays last

    records = [attention_row("flash_softmax", "fwd", 16, 1.0), attention_row("naive", "fwd", 16, 2.0)]
    columns, rows = bench.table_rows("attention", records, ["", ""], on_gpu=False)
    assert not any("speed" in column for column in columns) and columns[-1] == "status"
    assert all(len(row) == len(columns) for row in rows)

    records[1]["fs_speedup"] = 2.0
    columns, rows = bench.table_rows("attention", records, ["", "why"], on_gpu=True)
    assert columns[-2:] == [bench.SPEEDUP_COLUMN, "status"]
    assert [row[-2:] for row in rows] == [["-", "ok"], ["2x", "ok (why)"]]


# ------------------------------------------------------------------------------------------ modifiers


def result(provider: str, mode: str, modifier: str, ms: float | None, seqlen: int = 64) -> Result:
    """A measured attention row (``ms`` None: it failed) as the sweep returns it."""
    config = bench_attention.AttentionConfig(mode, True, "float16", 1, 2, seqlen, seqlen, 16, modifier=modifier)
    measurement = Measurement("ok", Timing(ms, ms, ms)) if ms is not None else Measurement("error: RuntimeError")
    return Result(provider, config, measurement)


def test_overhead_is_the_time_over_the_same_providers_plain_time_in_each_mode():
    results = [
        result("flash_softmax", "fwd", "none", 2.0), result("naive", "fwd", "none", 1.0),
        result("flash_softmax", "fwd", "sinks", 2.5), result("flash_softmax", "fwd", "dropout", 3.0),
        result("flash_softmax", "bwd", "none", 4.0), result("flash_softmax", "bwd", "bias", 6.0),
        result("flash_softmax", "fwd_bwd", "none", 6.0), result("flash_softmax", "fwd_bwd", "alibi", 6.6),
        result("flash_softmax", "fwd", "alibi", 2.0, seqlen=128),  # no plain row of this length
        result("flash_softmax", "fwd_bwd", "sinks", None),  # failed: nothing to compare
        result("flash_softmax", "bwd", "none", None, seqlen=128), result("flash_softmax", "bwd", "sinks", 5.0, 128),
    ]
    assert bench_attention.overheads(results) == pytest.approx({2: 1.25, 3: 1.5, 5: 1.5, 7: 1.1})


def test_the_table_shows_modifier_and_overhead_only_for_a_run_with_modifiers():
    plain = [attention_row("flash_softmax", "fwd", 16, 2.0), attention_row("naive", "fwd", 16, 1.0)]
    columns, _ = bench.table_rows("attention", plain, ["", ""], on_gpu=False)
    assert "modifier" not in columns and "overhead" not in columns
    assert bench.table_caption(plain, on_gpu=False) is None

    records = [*plain, attention_row("flash_softmax", "fwd", 16, 3.0, modifier="bias", overhead=1.5)]
    for on_gpu in (False, True):
        columns, rows = bench.table_rows("attention", records, ["", "", ""], on_gpu=on_gpu)
        tail = [*bench.MODIFIER_COLUMNS, *([bench.SPEEDUP_COLUMN] if on_gpu else []), "status"]
        assert columns[-len(tail):] == tail
        cells = [dict(zip(columns, row)) for row in rows]
        assert [(cell["modifier"], cell["overhead"]) for cell in cells] == [("none", "-"), ("none", "-"),
                                                                            ("bias", "1.5x")]
        caption = bench.table_caption(records, on_gpu)
        assert caption.startswith(bench.OVERHEAD_CAPTION) and (bench.SPEEDUP_CAPTION in caption) == on_gpu


def test_each_modifier_is_a_line_of_its_own_in_the_plots():
    records = [attention_row("flash_softmax", "fwd", seqlen, ms, modifier=modifier)
               for modifier, ms in (("none", 1.0), ("sinks", 1.2), ("dropout", 1.5)) for seqlen in (16, 32)]
    figure = figure_of(bench.plot_records(records), "ms_median")
    (ax,) = visible_axes(figure)
    assert [line.get_label() for line in ax.get_lines()] == ["flash_softmax", "flash_softmax +sinks",
                                                             "flash_softmax +dropout"]
    assert all(len(line.get_xdata()) == 2 for line in ax.get_lines())


def test_the_attention_csv_columns_include_modifier_and_overhead():
    columns = bench.csv_columns(bench_attention.CSV_COLUMNS, on_gpu=True)
    assert columns.index("modifier") == columns.index("head_dim") + 1
    assert columns[-5:] == ("peak_mem_mib", "overhead_vs_plain", "fs_speedup", "threads", "status")


@pytest.mark.parametrize("mode", bench_attention.MODES)
def test_modifier_inputs_are_what_the_readme_says(mode):
    config = bench_attention.AttentionConfig(mode, True, "bfloat16", 2, 4, 24, 24, 16)
    q = torch.zeros(2, 4, 24, 16, dtype=torch.bfloat16)
    requires_grad = mode != "fwd"
    assert bench_attention.modifier_inputs(config, q, requires_grad) == {}
    sinks = bench_attention.modifier_inputs(replace(config, modifier="sinks"), q, requires_grad)["sinks"]
    assert (sinks.shape, sinks.dtype, sinks.requires_grad) == ((4,), torch.bfloat16, requires_grad)
    slopes = bench_attention.modifier_inputs(replace(config, modifier="alibi"), q, requires_grad)["alibi_slopes"]
    assert slopes.dtype == torch.float32 and slopes.tolist() == [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8]
    assert bench_attention.modifier_inputs(replace(config, modifier="dropout"), q, requires_grad) == {
        "dropout_p": bench_attention.DROPOUT_P}
    bias = bench_attention.modifier_inputs(replace(config, modifier="bias"), q, requires_grad)["attn_bias"]
    assert (bias.shape, bias.dtype, bias.requires_grad) == ((2, 1, 24, 24), torch.bfloat16, requires_grad)
    with pytest.raises(ValueError, match="modifier: expected 'none' or one of sinks, alibi, dropout, bias, got 'x'"):
        bench_attention.modifier_inputs(replace(config, modifier="x"), q, requires_grad)


def test_only_flash_softmax_runs_the_modifiers():
    plain = bench_attention.AttentionConfig("fwd", True, "float16", 1, 2, 16, 16, 16)
    sinks = replace(plain, modifier="sinks")
    takers = [name for name, provider in providers.ATTENTION_PROVIDERS.items() if bench_attention.runs(sinks, provider)]
    assert takers == ["flash_softmax"]
    assert all(bench_attention.runs(plain, provider) for provider in providers.ATTENTION_PROVIDERS.values())
    assert sinks.flops() == plain.flops()  # TFLOP/s of a modifier row counts the plain matmul work


# ------------------------------------------------------------------------------------------ terminal


def test_plain_table_without_rich(capsys):
    console = output.PlainConsole()
    output.print_table(console, "title", ["provider", "ms"], [["flash_softmax", "1.5"], ["naive", "12"]],
                       caption="a caption")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "title" and lines[-1] == "a caption"
    assert lines[1].split() == ["provider", "ms"] and lines[3].split() == ["flash_softmax", "1.5"]
    assert lines[1].endswith("ms") and lines[3].endswith("1.5") and lines[4].endswith(" 12")  # numbers right
    assert lines[3].startswith("flash_softmax") and lines[4].startswith("naive ")
    with output.progress(console, "steps", 2) as step:
        step("one")
        step("two")
    assert capsys.readouterr().out == ""  # no progress bar in plain text


def test_require_names_the_extra_to_install():
    assert output.require("json", "bench", "flash-softmax bench").dumps([]) == "[]"
    with pytest.raises(ImportError) as error:
        output.require("no_such_module_here", "bench", "flash-softmax bench")
    assert isinstance(error.value, output.MissingExtraError)
    assert str(error.value).startswith(
        "flash-softmax bench needs rich and matplotlib: pip install 'flash-softmax[bench]'")
    assert "no_such_module_here" in str(error.value)
