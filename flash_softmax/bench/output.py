"""What a benchmark run leaves behind: a terminal table, a CSV, ``env.json`` and PNG plots.

Plots are drawn on a bare ``matplotlib.figure.Figure`` (the Agg canvas), never through pyplot, so no
window opens and no global backend is switched in the calling process.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table


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


def make_console() -> Console:
    """A rich console; when output goes to a file or pipe, wide enough that table cells are not cut."""
    console = Console()
    return console if console.is_terminal else Console(width=200)


def print_table(console: Console, title: str, columns: Sequence[str], rows: Sequence[Sequence[str]],
                *, caption: str | None = None) -> None:
    """A rich table of pre-formatted cells; numeric-looking columns are right-aligned."""
    table = Table(title=escape(title), caption=caption and escape(caption), header_style="bold")
    for column in columns:
        table.add_column(escape(column), justify="left" if column in ("provider", "mode", "dtype", "status") else "right")
    for row in rows:
        style = None if row[-1] == "ok" else ("red" if row[-1].startswith("error") else "yellow")
        table.add_row(*(escape(cell) for cell in row), style=style)
    console.print(table)


def plot_metric(
    records: Sequence[dict[str, object]],
    path: Path,
    *,
    metric: str,
    metric_label: str,
    x: str,
    x_label: str,
    panel_rows: Sequence[str],
    panel_column: str,
    title: str,
    empty_note: str = "no successful measurement",
) -> Path:
    """One line per provider of ``metric`` against ``x``, in a grid of panels; write a PNG to ``path``.

    Panels are laid out with one row per distinct value of the ``panel_rows`` fields (e.g. head_dim and
    causal) and one column per value of ``panel_column`` (e.g. mode). Only rows with status ``ok`` and a
    finite metric are drawn; an empty panel says ``empty_note``.
    """
    from matplotlib.figure import Figure

    row_values = list(dict.fromkeys(tuple(record[key] for key in panel_rows) for record in records))
    column_values = list(dict.fromkeys(record[panel_column] for record in records))
    providers = list(dict.fromkeys(record["provider"] for record in records))
    figure = Figure(figsize=(4.6 * max(len(column_values), 1), 3.4 * max(len(row_values), 1)), layout="constrained")
    axes = figure.subplots(max(len(row_values), 1), max(len(column_values), 1), squeeze=False)
    for row_index, row_value in enumerate(row_values):
        for column_index, column_value in enumerate(column_values):
            ax = axes[row_index][column_index]
            panel = [
                record for record in records
                if tuple(record[key] for key in panel_rows) == row_value and record[panel_column] == column_value
            ]
            drawn = False
            for provider in providers:
                points = sorted(
                    (record[x], record[metric]) for record in panel
                    if record["provider"] == provider and record["status"] == "ok"
                    and record[metric] is not None and math.isfinite(record[metric])
                )
                if points:
                    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=provider)
                    drawn = True
            if drawn:
                ax.legend(fontsize="small")
            else:
                ax.text(0.5, 0.5, empty_note, ha="center", va="center", transform=ax.transAxes, wrap=True)
            ax.set_xscale("log", base=2)
            ticks = sorted({record[x] for record in panel})
            ax.set_xticks(ticks, [str(tick) for tick in ticks])
            ax.minorticks_off()
            ax.set_xlabel(x_label)
            ax.set_ylabel(metric_label)
            ax.grid(True, alpha=0.3)
            settings = [f"{key}={value}" for key, value in zip(panel_rows, row_value)]
            ax.set_title(", ".join([*settings, f"{panel_column}={column_value}"]), fontsize="medium")
    figure.suptitle(title)
    figure.savefig(path, dpi=100)
    return path
