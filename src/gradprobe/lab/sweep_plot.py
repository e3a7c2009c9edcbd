"""The sweep's figure, drawn from its tables (it computes nothing: the means over seeds come
from :func:`gradprobe.lab.sweep.seed_means`).

Two rows sharing their x axis: the final training loss, and the ratio of the first to the last
weight layer's gradient RMS at the last recorded step (1 = the gradient reaches the input
undiminished; a log axis when the ratios span decades). The x axis is ``depth`` when the grid
varies it (else the first numeric field it varies, else the first field it varies, as
categories); one colour per value of the other varying fields (activation first); one column
per ``init`` when the grid varies it; each seed is a dot, the line joins the means over seeds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd

if TYPE_CHECKING:
    from matplotlib.figure import Figure

ROWS = (("final_loss", "final training loss"),
        ("grad_ratio_last_step", "grad RMS ratio, first / last layer"))
XLABELS = {"depth": "depth (hidden layers)", "width": "width (units per hidden layer)",
           "lr": "learning rate"}


def layout(table: pd.DataFrame, axes: Sequence[str]) -> tuple[str, str | None, list[str]]:
    """``(x, panel, colours)``: the field on the x axis, the field of the columns (or None) and
    the fields told apart by colour."""
    varying = [a for a in axes if table[a].nunique(dropna=False) > 1]
    numeric = [a for a in varying if a != "seed" and pd.api.types.is_numeric_dtype(table[a])]
    others = [a for a in varying if a != "seed"]
    x = "depth" if "depth" in varying else \
        (numeric or others or (["seed"] if "seed" in varying else ["run"]))[0]
    panel = "init" if "init" in varying and x != "init" else None
    colours = [a for a in sorted(varying, key=lambda a: a != "activation")
               if a not in (x, panel, "seed")]
    return x, panel, colours


def _labels(frame: pd.DataFrame, colours: list[str]) -> pd.Series:
    if frame.empty:
        return pd.Series([], dtype=object)
    return frame.apply(lambda r: ", ".join(
        str(r[a]) if len(colours) == 1 else f"{a}={r[a]}" for a in colours) or "mean over seeds", axis=1)


def plot(table: pd.DataFrame, means: pd.DataFrame, axes: Sequence[str]) -> Figure:
    """The figure of a sweep: ``table`` (one row per run; failed runs left out) and ``means``
    (one row per configuration apart from its seed)."""
    from gradprobe.report import style

    ok = table[table["status"] != "failed"]
    x, panel, colours = layout(ok, axes)
    ok = ok.assign(_line=_labels(ok, colours))
    means = means.assign(_line=_labels(means, colours))
    if x not in means:  # only seeds vary, or nothing: every run is a dot
        means = means.iloc[:0]
    categorical = not pd.api.types.is_numeric_dtype(ok[x])
    ticks = list(dict.fromkeys(ok[x])) if categorical else sorted(ok[x].unique())
    position = {v: i for i, v in enumerate(ticks)} if categorical else None
    panels = list(dict.fromkeys(ok[panel])) if panel else [None]
    lines = list(dict.fromkeys(ok["_line"]))
    colour = style.distinct_colors(lines)
    fig, grid = style.figure(2, len(panels), sharex=True, sharey="row",
                             title="Sweep: final loss and gradient reaching the first layer",
                             size=(4.6 * len(panels) + 2.4, 6.4))
    for col, value in enumerate(panels):
        for row, (column, label) in enumerate(ROWS):
            ax = grid[row, col]
            for line in lines:
                dots = ok[(ok["_line"] == line) & ((ok[panel] == value) if panel else True)]
                joined = means[(means["_line"] == line) &
                               ((means[panel] == value) if panel else True)]
                _draw(ax, dots, joined, x, column, colour[line], line, position)
            if column == "grad_ratio_last_step":
                ax.axhline(1.0, color="0.4", linewidth=0.8, linestyle=":")
            what = "final loss" if row == 0 else "first / last layer gradient"
            style.finish(ax, title=f"{what}, {panel} = {value}" if panel else what,
                         xlabel=XLABELS.get(x, x) if row else "",
                         ylabel=label if col == 0 else "",
                         scale=style.choose_scale(ok[column].to_numpy(dtype=float)))
    if categorical or (pd.api.types.is_integer_dtype(ok[x]) and len(ticks) <= 12):
        grid[0, 0].set_xticks(range(len(ticks)) if categorical else ticks)
        if categorical:
            grid[0, 0].set_xticklabels([str(t) for t in ticks])
    style.legend_outside(grid[0, -1], title=", ".join(colours) if colours else None)
    return fig


def _draw(ax: Any, dots: pd.DataFrame, joined: pd.DataFrame, x: str, column: str, colour: Any,
          label: str, position: dict[Any, int] | None) -> None:
    def xs(frame: pd.DataFrame) -> Any:
        return frame[x].map(position) if position is not None else frame[x]

    if not joined.empty:  # categories are not joined by a line: nothing lies between them
        joined = joined.assign(_x=xs(joined)).sort_values("_x")
        ax.plot(joined["_x"], joined[column].astype(float), color=colour, marker="o",
                markersize=5, linewidth=1.6 if position is None else 0, label=label)
    if len(dots) > len(joined):  # several seeds: each one a dot
        ax.scatter(xs(dots), dots[column].astype(float), color=colour, s=10, alpha=0.45,
                   linewidths=0)


__all__ = ["layout", "plot"]
