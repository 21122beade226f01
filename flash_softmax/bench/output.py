"""What a benchmark run leaves behind: a terminal table, a CSV, ``env.json`` and PNG plots.

rich (tables, progress bars) and matplotlib (plots) are optional: they come with the ``bench`` extra,
``pip install 'flash-softmax[bench]'``. Nothing here imports them at module level, so the package and
``flash-softmax verify`` work without them; :func:`require` gives a command that cannot do without one a
clear message naming the extra to install. Without rich, :func:`make_console` and :func:`print_table`
print plain text.

Plots are drawn on a bare ``matplotlib.figure.Figure`` (the Agg canvas), never through pyplot, so no
window opens and no global backend is switched in the calling process.
"""

from __future__ import annotations

import contextlib
import csv
import importlib
import json
import math
import sys
import textwrap
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType

#: The optional extras of the package, as ``pip install 'flash-softmax[<extra>]'`` names them, and the
#: packages each brings, for the message of :func:`require`.
EXTRAS = {"bench": "rich and matplotlib", "hf": "transformers", "interpreter": "numpy"}

#: A y axis whose plotted values span more than this factor is drawn in log scale.
LOG_SCALE_SPAN = 10.0


class MissingExtraError(ImportError):
    """An optional dependency a command needs is not installed; the message says what to install."""


def require(module_name: str, extra: str, what: str) -> ModuleType:
    """Import ``module_name`` for ``what`` (e.g. ``"flash-softmax bench"``) and return it.

    Raises:
        MissingExtraError: (an ``ImportError``) when it is not installed, saying e.g. ``flash-softmax bench
            needs rich and matplotlib: pip install 'flash-softmax[bench]' (rich is not installed)``.
    """
    try:
        return importlib.import_module(module_name)
    except ImportError as error:
        packages = EXTRAS.get(extra, module_name)
        missing = getattr(error, "name", None) or module_name
        raise MissingExtraError(
            f"{what} needs {packages}: pip install 'flash-softmax[{extra}]' ({missing} is not installed)"
        ) from error


def _rich(module_name: str) -> ModuleType | None:
    """A rich module, or None where rich is not installed (the plain-text fallbacks below then apply)."""
    try:
        return importlib.import_module(module_name)
    except ImportError:
        return None


def format_number(value: float | None, digits: int = 3) -> str:
    """A short human figure, ``-`` for missing or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.0f}"


def csv_value(value: object) -> object:
    """CSV cells: booleans as ``true``/``false``, missing or NaN numbers as empty cells."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return value


def write_csv(path: Path, columns: Sequence[str], records: Sequence[dict[str, object]]) -> Path:
    """Write ``records`` with exactly ``columns``, in that order."""
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="raise")
        writer.writeheader()
        for record in records:
            writer.writerow({column: csv_value(record[column]) for column in columns})
    return path


def write_json(path: Path, data: dict[str, object]) -> Path:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return path


# ------------------------------------------------------------------------------------------ terminal


class PlainConsole:
    """What the commands print through where rich is not installed: plain lines on stdout, no colour.

    Takes the arguments of ``rich.console.Console.print`` that the commands use (``style``, ``markup``)
    and ignores them. stdout is looked up at every call, as rich does, so redirections made later apply.
    """

    is_terminal = False

    def print(self, *objects: object, style: str | None = None, markup: bool | None = None) -> None:
        print(*objects, file=sys.stdout, flush=True)


def make_console():
    """A rich console (wide enough that table cells are not cut when output goes to a file or pipe), or a
    :class:`PlainConsole` where rich is not installed."""
    console_module = _rich("rich.console")
    if console_module is None:
        return PlainConsole()
    console = console_module.Console()
    return console if console.is_terminal else console_module.Console(width=200)


def status_style(status: str) -> str | None:
    """The colour of a table row by its status cell: none when it passed, red for failures, else yellow."""
    if status in ("ok", "pass"):
        return None
    return "red" if status.startswith(("error", "ERROR", "FAIL")) else "yellow"


def plain_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]], *,
                caption: str | None = None, left_aligned: Sequence[str] = ()) -> str:
    """The text of a table without rich: a title line, padded columns (those not in ``left_aligned``
    right-aligned, as numbers are), and the caption below."""
    widths = [max([len(column), *(len(row[index]) for row in rows)]) for index, column in enumerate(columns)]
    left = [column in left_aligned for column in columns]

    def line(cells: Sequence[str]) -> str:
        padded = (cell.ljust(width) if is_left else cell.rjust(width)
                  for cell, width, is_left in zip(cells, widths, left))
        return "  ".join(padded).rstrip()

    lines = [title, line(columns), line(["-" * width for width in widths]), *(line(row) for row in rows)]
    if caption:
        lines.append(caption)
    return "\n".join(lines)


def print_table(console, title: str, columns: Sequence[str], rows: Sequence[Sequence[str]], *,
                caption: str | None = None, styles: Sequence[str | None] | None = None,
                left_aligned: Sequence[str] = ("provider", "mode", "dtype", "status")) -> None:
    """A table of pre-formatted cells: rich's on a rich console, plain text otherwise.

    ``styles`` colours each row (default: :func:`status_style` of its last cell); columns named in
    ``left_aligned`` are left-aligned, the others (numbers) right-aligned.
    """
    if isinstance(console, PlainConsole):
        console.print(plain_table(title, columns, rows, caption=caption, left_aligned=left_aligned))
        return
    from rich.markup import escape
    from rich.table import Table

    styles = [status_style(row[-1]) for row in rows] if styles is None else styles
    table = Table(title=escape(title), caption=caption and escape(caption), header_style="bold")
    for column in columns:
        table.add_column(escape(column), justify="left" if column in left_aligned else "right")
    for row, style in zip(rows, styles):
        table.add_row(*(escape(cell) for cell in row), style=style)
    console.print(table)


@contextlib.contextmanager
def quiet_interpreter() -> Iterator[None]:
    """Silence numpy's notes on the ``log(0)`` and ``inf - inf`` that Triton's interpreter computes for
    masked scores on purpose: noise, where every result that matters is checked anyway."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton.runtime.interpreter")
        yield


@contextlib.contextmanager
def progress(console, description: str, total: int) -> Iterator[Callable[[str], None]]:
    """A transient progress bar of ``total`` steps on a rich console; yields ``step(description)``, which
    counts one step done and shows ``description`` beside the bar. Without rich nothing is drawn. Inside
    it the interpreter is quiet (:func:`quiet_interpreter`).
    """
    with quiet_interpreter():
        if isinstance(console, PlainConsole):
            yield lambda description: None
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, transient=True) as bar:
            task = bar.add_task(description, total=total)
            yield lambda next_description: bar.update(task, advance=1, description=next_description)


# --------------------------------------------------------------------------------------------- plots


def axis_scale(values: Sequence[float], span: float = LOG_SCALE_SPAN) -> str:
    """``"log"`` when the positive finite ``values`` span more than ``span`` times (largest over smallest),
    else ``"linear"``: on a linear axis such values put everything but the largest near zero."""
    positive = [value for value in values if value is not None and math.isfinite(value) and value > 0]
    if len(positive) < 2:
        return "linear"
    return "log" if max(positive) > span * min(positive) else "linear"


def _points(records: Sequence[dict[str, object]], x: str, metric: str) -> list[tuple[float, float]]:
    """``(x, metric)`` of the rows that can be drawn: status ``ok`` and a finite metric."""
    return sorted(
        (record[x], record[metric]) for record in records
        if record["status"] == "ok" and record[metric] is not None and math.isfinite(record[metric])
    )


def build_figure(
    records: Sequence[dict[str, object]],
    *,
    metric: str,
    metric_label: str,
    x: str,
    x_label: str,
    panel_rows: Sequence[str],
    panel_column: str,
    title: str,
    banner: str | None = None,
):
    """One line per provider of ``metric`` against ``x``, in a grid of panels; a matplotlib ``Figure``, or
    None when no row has anything to draw.

    Panels are laid out with one row per distinct value of the ``panel_rows`` fields (e.g. head_dim and
    causal) and one column per value of ``panel_column`` (e.g. mode). Only rows with status ``ok`` and a
    finite metric are drawn, and only panels that have such rows are shown: a metric that is not measured
    (peak memory off CUDA) gives no empty panel. Each panel's y axis is logarithmic where its values span
    more than :data:`LOG_SCALE_SPAN` (:func:`axis_scale`). ``banner`` is written in red above the panels.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullLocator

    drawable = [record for record in records if _points([record], x, metric)]
    if not drawable:
        return None

    def panel_key(record: dict[str, object]) -> tuple:
        return tuple(record[key] for key in panel_rows)

    row_values = list(dict.fromkeys(panel_key(record) for record in drawable))
    column_values = list(dict.fromkeys(record[panel_column] for record in drawable))
    providers = list(dict.fromkeys(record["provider"] for record in drawable))
    width = 4.6 * len(column_values)
    # Wrapped to the figure's width (about 11 characters an inch at the title's size), never cut off.
    banner_lines = textwrap.wrap(banner, width=int(11 * width)) if banner else []
    height = 3.4 * len(row_values) + 0.25 * len(banner_lines)
    figure = Figure(figsize=(width, height), layout="constrained")
    axes = figure.subplots(len(row_values), len(column_values), squeeze=False)
    for row_index, row_value in enumerate(row_values):
        for column_index, column_value in enumerate(column_values):
            ax = axes[row_index][column_index]
            panel = [record for record in drawable
                     if panel_key(record) == row_value and record[panel_column] == column_value]
            if not panel:  # this combination was not measured, or nothing of it can be drawn
                ax.set_visible(False)
                continue
            for provider in providers:
                points = _points([record for record in panel if record["provider"] == provider], x, metric)
                if points:
                    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=provider)
            ax.legend(fontsize="small")
            ax.set_xscale("log", base=2)
            ticks = sorted({record[x] for record in panel})
            ax.set_xticks(ticks, [str(tick) for tick in ticks])
            ax.set_yscale(axis_scale([record[metric] for record in panel]))
            ax.xaxis.set_minor_locator(NullLocator())  # the x ticks are exactly the lengths measured
            ax.set_xlabel(x_label)
            ax.set_ylabel(metric_label + (" (log scale)" if ax.get_yscale() == "log" else ""))
            ax.grid(True, which="both" if ax.get_yscale() == "log" else "major", alpha=0.3)
            settings = [f"{key}={value}" for key, value in zip(panel_rows, row_value)]
            ax.set_title(", ".join([*settings, f"{panel_column}={column_value}"]), fontsize="medium")
    figure.suptitle("\n".join([title, *banner_lines]), color="firebrick" if banner_lines else "black")
    return figure


def plot_metric(records: Sequence[dict[str, object]], path: Path, **options) -> Path | None:
    """:func:`build_figure` of ``records`` written as a PNG to ``path``; None (and no file) when there is
    nothing to draw."""
    figure = build_figure(records, **options)
    if figure is None:
        return None
    figure.savefig(path, dpi=100)
    return path
