"""What ``flash-softmax bench`` shows: axis scales, which panels a figure has, the CPU banner, the columns
each device gets, the plain-text table without rich and the message for a missing extra.

The figures are built from hand-made rows (no kernel runs), so every test here takes well under a second;
tests/test_cli.py runs the whole command.
"""

from __future__ import annotations

import math

import pytest

from flash_softmax import bench
from flash_softmax.bench import attention as bench_attention
from flash_softmax.bench import output
from flash_softmax.bench import softmax as bench_softmax


def attention_row(provider: str, mode: str, seqlen: int, ms: float | None, memory: float = math.nan,
                  head_dim: int = 16, status: str = "ok") -> dict[str, object]:
    """A CSV row of ``bench --op attention`` as the table and plots read it."""
    return {"provider": provider, "mode": mode, "causal": True, "dtype": "float16", "batch": 1, "heads": 2,
            "seqlen_q": seqlen, "seqlen_k": seqlen, "head_dim": head_dim, "ms_median": ms, "ms_p20": ms,
            "ms_p80": ms, "tflops": None if ms is None else 1.0 / ms, "peak_mem_mib": memory, "threads": 2,
            "status": status}


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
