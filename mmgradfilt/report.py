"""Reporting shared by the hook's log and the tools: plain-text tables, tables
that are both printed and written as CSV, JSON and CSV writers, and bar-chart
helpers.

Nothing heavy is imported here (the hook's log uses this module in every
training run): matplotlib is imported when a chart is drawn.
"""
import csv
import json
import os
from dataclasses import dataclass
from typing import Any, Dict, Sequence, Union

MB = 2.0**20


def format_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A plain-text table with aligned columns."""
    cells = [[str(c) for c in row] for row in [headers, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ['  '.join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
             for row in cells]
    lines.insert(1, '  '.join('-' * w for w in widths))
    return '\n'.join(lines)


def pair_label(values: Union[int, Sequence[int]]) -> str:
    """``4`` for an int or a square pair, ``2x4`` otherwise."""
    if isinstance(values, int):
        return str(values)
    return (str(values[0]) if values[0] == values[1] else
            '{}x{}'.format(*values))


@dataclass(frozen=True)
class Column:
    """One column of a :class:`Table`.

    Args:
        header (str): Its title in the printed table.
        name (str): Its name in the CSV file, with the unit of its values
            (``backward_filtered_ms``, ``backward_speedup_x``).
        fmt (str): Format spec of its values when printed. Defaults to ''
            (``str``).
        suffix (str): Printed after each value (``'x'`` for ratios).
            Defaults to ''.
    """
    header: str
    name: str
    fmt: str = ''
    suffix: str = ''

    def cell(self, value: Any) -> str:
        """``value`` as printed; ``-`` for None (not measured)."""
        if value is None:
            return '-'
        return format(value, self.fmt) + self.suffix


class Table:
    """Rows of values, printed formatted and written to CSV as they are
    (numbers stay numbers; None is an empty cell).

    Args:
        columns (Sequence[Column]): The columns.
        rows (Sequence[Sequence]): One value per column in each row.
    """

    def __init__(self, columns: Sequence[Column],
                 rows: Sequence[Sequence]) -> None:
        for row in rows:
            if len(row) != len(columns):
                raise ValueError(f'row {row!r} has {len(row)} values for '
                                 f'{len(columns)} columns')
        self.columns = list(columns)
        self.rows = [list(row) for row in rows]

    def text(self) -> str:
        """The printed table."""
        return format_table(
            [c.header for c in self.columns],
            [[c.cell(v) for c, v in zip(self.columns, row)]
             for row in self.rows])

    def write_csv(self, path: str) -> None:
        """The table as CSV, column names with their units."""
        write_csv(path, [c.name for c in self.columns],
                  [['' if v is None else v for v in row] for row in self.rows])


def write_json(path: str, data) -> None:
    """Write ``data`` whole or not at all: a crash mid-write keeps the old file."""
    with open(path + '.tmp', 'w') as f:
        json.dump(data, f, indent=2)
    os.replace(path + '.tmp', path)


def write_csv(path: str, headers: Sequence[str],
              rows: Sequence[Sequence]) -> None:
    """A CSV file with one header row."""
    with open(path, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(headers)
        writer.writerows(rows)


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def radius_bars(rows: Sequence[Dict], label_key: str, value_key: str):
    """A figure and its axes with one group of bars per ``label_key`` value,
    one bar per ``radius`` (in the order the rows give them); a missing
    value (None) draws no bar."""
    names = list(dict.fromkeys(r[label_key] for r in rows))
    radii = list(dict.fromkeys(pair_label(r['radius']) for r in rows))
    fig, ax = pyplot().subplots(figsize=(max(6, 1.2 * len(names)), 4.5))
    width = 0.8 / len(radii)
    for i, radius in enumerate(radii):
        values = {r[label_key]: r[value_key] for r in rows
                  if pair_label(r['radius']) == radius}
        ax.bar([j + i * width for j in range(len(names))],
               [values.get(n) or 0 for n in names], width,
               label=f'r={radius}')
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))])
    ax.set_xticklabels(names, rotation=30, ha='right', fontsize=8)
    ax.legend()
    return fig, ax


def save_figure(fig, path: str) -> None:
    """Lay out, save as PNG and close ``fig``."""
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot().close(fig)
