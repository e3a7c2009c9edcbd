"""The sweep's figure, drawn from its table (it computes nothing the table does not hold).

Two rows sharing their x axis: the final training loss, and the ratio of the first to the last
weight layer's gradient RMS at the last recorded step (1 = the gradient reaches the input
undiminished; a log axis when the ratios span decades). The x axis is ``depth`` when the grid
varies it (else the first numeric field it varies, else the runs in order); one colour per
value of the other varying fields (activation first); one column per ``init`` when the grid
varies it; seeds are dots around their mean's line.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from matplotlib.figure import Figure

ROWS = (("final_loss", "final training loss"),
        ("grad_ratio_last_step", "grad RMS ratio, first / last layer"))
XLABELS = {"depth": "depth (hidden layers)", "width": "width (units per hidden layer)",
           "lr": "learning rate"}


def _varying(table: pd.DataFrame, axes: Sequence[str]) -> list[str]:
    return [a for a in axes if table[a].nunique(dropna=False) > 1]


def _x_axis(table: pd.DataFrame, varying: list[str]) -> str | None:
    if "depth" in varying:
        return "depth"
    numeric = [a for a in varying if a != "seed" and pd.api.types.is_numeric_dtype(table[a])]
    return numeric[0] if numeric else None


def plot(table: pd.DataFrame, axes: Sequence[str]) -> Figure:
    """The figure of a sweep's ``table`` (failed runs left out)."""
    from gradprobe.report import style

    ok = table[table["status"] != "failed"].copy()
    varying = _varying(ok, axes)
    x = _x_axis(ok, varying)
    panel = "init" if "init" in varying and x != "init" else None
    colours = [a for a in sorted(varying, key=lambda a: a != "activation")
               if a not in (x, panel, "seed")]
    if x is None:
        ok["run index"] = np.arange(len(ok))
        x = "run index"
    ok["_line"] = [", ".join(str(r[a]) if len(colours) == 1 else f"{a}={r[a]}" for a in colours)
                   or "all runs" for _, r in ok.iterrows()]
    panels = list(dict.fromkeys(ok[panel])) if panel else [None]
    lines = list(dict.fromkeys(ok["_line"]))
    colour = style.distinct_colors(lines)
    fig, grid = style.figure(2, len(panels), sharex=True, sharey="row",
                             title="Sweep: final loss and gradient reaching the first layer",
                             size=(4.6 * len(panels) + 2.4, 6.4))
    for col, value in enumerate(panels):
        sub = ok if panel is None else ok[ok[panel] == value]
        for row, (column, label) in enumerate(ROWS):
            ax = grid[row, col]
            for line in lines:
                _draw(ax, sub[sub["_line"] == line], x, column, colour[line], line)
            scale = style.choose_scale(ok[column].to_numpy(dtype=float))
            if column == "grad_ratio_last_step":
                ax.axhline(1.0, color="0.4", linewidth=0.8, linestyle=":")
            what = "final loss" if row == 0 else "first / last layer gradient"
            style.finish(ax, title=f"{what}, {panel} = {value}" if panel else what,
                         xlabel=XLABELS.get(x, x) if row else "",
                         ylabel=label if col == 0 else "", scale=scale)
    ticks = sorted(ok[x].unique())
    if pd.api.types.is_integer_dtype(ok[x]) and len(ticks) <= 12:
        grid[0, 0].set_xticks(ticks)
    legend_title = ", ".join(colours) if colours else None
    style.legend_outside(grid[0, -1], title=legend_title)
    return fig


def _draw(ax: Any, rows: pd.DataFrame, x: str, column: str, colour: Any, label: str) -> None:
    if rows.empty:
        return
    values = rows[[x, column]].astype({column: float})
    mean = values.groupby(x, sort=True)[column].mean()
    ax.plot(mean.index, mean.to_numpy(), color=colour, marker="o", markersize=4, linewidth=1.6,
            label=label)
    if values.groupby(x).size().max() > 1:  # several seeds: each one a dot
        ax.scatter(values[x], values[column], color=colour, s=10, alpha=0.45, linewidths=0)


__all__ = ["plot"]
