"""Shared figure helpers: one look for every figure gradprobe draws.

Rules every figure follows (they are what makes a gradient figure readable):

* **one colour per layer, in depth order**, from a sequential colour map (shallow = dark purple,
  deep = yellow with ``viridis``), and a legend listing the layers from input to output;
* **log scale where values span decades** (:func:`spans_decades`): gradient magnitudes across
  depth routinely span 10^3-10^10, and a linear axis would show one line and a floor;
* a title on every axes, labels on both axes, a figure title saying what was run.

Figures are built on :class:`matplotlib.figure.Figure` directly, not through ``pyplot``, so no
global figure state is kept and nothing is shown on screen.

>>> from gradprobe.report import style
>>> fig, axes = style.figure(1, 1, title="demo")
>>> colors = style.layer_colors(["fc1", "fc2", "out"])
>>> style.plot_layers(axes[0, 0], [0, 1, 2], {"fc1": [1, 2, 3], "fc2": [1e-3, 1e-2, 1e-1],
...                   "out": [5, 5, 5]}, title="norm", xlabel="epoch", ylabel="|g|")
'log'
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import numpy as np
from matplotlib import colormaps
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.figure import Figure

Scale = Literal["auto", "linear", "log", "symlog"]

DECADES_FOR_LOG = 2.0
"""A positive series spanning more than this many decades (a factor 100) is drawn on a log axis."""

LAYER_CMAP = "viridis"
"""Sequential colour map for layers: the colour itself tells the depth."""

CATEGORY_COLORS = ("#1b6ca8", "#d1495b", "#edae49", "#00798c", "#66a182", "#8d96a3", "#2e4057")
"""Distinct colours for categories that have no order (activations, initialisations)."""


def figure(
    nrows: int = 1, ncols: int = 1, *, title: str | None = None,
    size: tuple[float, float] | None = None, sharex: bool | str = False,
    sharey: bool | str = False,
) -> tuple[Figure, np.ndarray]:
    """A new figure with a grid of axes (always a 2-D array) and constrained layout; ``sharex``
    and ``sharey`` as :meth:`matplotlib.figure.Figure.subplots` (``"row"``, ``"col"``, ``True``)."""
    if size is None:
        size = (4.8 * ncols + 0.8, 3.4 * nrows + 0.6)
    fig = Figure(figsize=size, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=sharex, sharey=sharey)  # type: ignore[arg-type]
    if title:
        fig.suptitle(title, fontsize="large", fontweight="bold")
    return fig, axes


def layer_colors(names: Sequence[str], cmap: str = LAYER_CMAP) -> dict[str, tuple[float, ...]]:
    """One colour per layer, in depth order (``names`` as listed, input side first).

    The colour map is sampled on [0, 0.9] so the deepest layer stays readable on white.
    """
    cm = colormaps[cmap]
    n = len(names)
    return {name: tuple(cm(0.9 * i / max(n - 1, 1))) for i, name in enumerate(names)}


def diverging_colors(n: int, cmap: str = "coolwarm") -> list[tuple[float, ...]]:
    """``n`` colours across a diverging map, blue to red, for values ordered around a middle
    one (spectral radii below and above 1)."""
    cm = colormaps[cmap]
    return [tuple(cm(i / max(n - 1, 1))) for i in range(n)]


LINESTYLES = ("-", "--", "-.", ":")


def layer_linestyles(names: Sequence[str]) -> dict[str, str]:
    """Line styles cycled over layers, so neighbouring layers differ by more than a shade."""
    return {name: LINESTYLES[i % len(LINESTYLES)] for i, name in enumerate(names)}


def category_colors(names: Sequence[str]) -> dict[str, str]:
    """Distinct colours for unordered categories (cycled when there are many)."""
    return {name: CATEGORY_COLORS[i % len(CATEGORY_COLORS)] for i, name in enumerate(names)}


def distinct_colors(names: Sequence[str]) -> dict[str, tuple[float, ...] | str]:
    """One distinct colour per unordered category: the house palette (:func:`category_colors`)
    up to its seven colours, ``tab10`` up to ten names, ``tab20`` beyond (cycled past 20)."""
    if len(names) <= len(CATEGORY_COLORS):
        return dict(category_colors(names))
    cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {n: tuple(cmap(i)) for i, n in enumerate(names)}


def spans_decades(values: Iterable[float], decades: float = DECADES_FOR_LOG) -> bool:
    """True when the finite positive ``values`` are all positive and span more than ``decades``.

    >>> spans_decades([1e-6, 1e-2]), spans_decades([0.2, 0.9]), spans_decades([-1.0, 1e3])
    (True, False, False)
    """
    arr = np.asarray(list(values), dtype=float)
    arr = arr[np.isfinite(arr)]
    if arr.size == 0 or (arr <= 0).any():
        return False
    return bool(math.log10(arr.max() / arr.min()) > decades)


def choose_scale(values: Iterable[float], scale: Scale = "auto") -> str:
    """The y scale to draw ``values`` with: ``log`` for positive data spanning decades,
    ``symlog`` for signed data spanning decades in magnitude, else ``linear``."""
    if scale != "auto":
        return scale
    arr = np.asarray(list(values), dtype=float)
    arr = arr[np.isfinite(arr)]
    if spans_decades(arr):
        return "log"
    nz = np.abs(arr[arr != 0])
    if arr.size and (arr < 0).any() and nz.size and math.log10(nz.max() / nz.min()) > 4:
        return "symlog"
    return "linear"


def plot_layers(
    ax: Axes,
    x: Sequence[float] | np.ndarray,
    series: Mapping[str, Sequence[float] | np.ndarray],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    scale: Scale = "auto",
    colors: Mapping[str, tuple[float, ...] | str] | None = None,
    legend: bool = True,
    linewidth: float = 1.6,
    linestyles: Mapping[str, str] | None = None,
    marker: str | None = None,
    linestyle: str = "-",
) -> str:
    """Draw one line per layer (``series`` in depth order) and return the y scale used.

    ``x`` may be shared by all series or a mapping is expected to have equal lengths.
    """
    colors = colors or layer_colors(list(series))
    all_values = np.concatenate([np.asarray(v, dtype=float).ravel() for v in series.values()]) \
        if series else np.array([])
    used = choose_scale(all_values, scale)
    for name, values in series.items():
        ax.plot(x, values, color=colors[name], label=name, linewidth=linewidth, marker=marker,
                markersize=3.5, linestyle=(linestyles or {}).get(name, linestyle))
    finish(ax, title=title, xlabel=xlabel, ylabel=ylabel, scale=used)
    if legend and series:
        layer_legend(ax)
    return used


def finish(ax: Axes, *, title: str, xlabel: str, ylabel: str, scale: str = "linear") -> None:
    """Title, axis labels, scale and a light grid."""
    ax.set_title(title, fontsize="medium")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if scale == "symlog":
        ax.set_yscale("symlog", linthresh=1e-8)
    elif scale != "linear":
        ax.set_yscale(scale)
    ax.grid(True, which="major", alpha=0.3)
    if scale == "log":
        ax.grid(True, which="minor", alpha=0.08)


def layer_legend(ax: Axes, *, title: str = "layer (input → output)", ncol: int | None = None) -> None:
    """A legend in the order the lines were drawn (depth order), outside the data when long."""
    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return
    n = len(labels)
    ax.legend(handles, labels, title=title, fontsize="small", title_fontsize="small",
              ncol=ncol or (1 if n <= 6 else 2), loc="best", framealpha=0.85)


def legend_outside(ax: Axes, *, title: str | None = None, ncol: int = 1,
                   handles: Sequence[Artist] | None = None,
                   labels: Sequence[str] | None = None) -> None:
    """A legend to the right of ``ax``, outside the data (constrained layout makes room)."""
    if handles is None or labels is None:
        handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return
    ax.legend(list(handles), list(labels), title=title, fontsize="small", title_fontsize="small",
              ncol=ncol,
              loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False)


def plot_positive(
    ax: Axes, x: Sequence[float] | np.ndarray, values: Sequence[float] | np.ndarray, *,
    color: tuple[float, ...] | str, label: str | None = None, **line: object,
) -> bool:
    """Draw ``values`` on a log axis without inventing a floor: exact zeros (underflow) are not
    drawn as points but marked ``v`` on the bottom edge of the axes, where they do not stretch
    the axis. Returns whether any zero was marked (say so in the legend or title)."""
    v = np.asarray(values, dtype=float)
    xs = np.asarray(x, dtype=float)
    zero = v == 0
    ax.plot(xs, np.where(zero, np.nan, v), color=color, label=label, **line)  # type: ignore[arg-type]
    if zero.any():
        ax.plot(xs[zero], np.full(int(zero.sum()), 0.015), linestyle="none", marker="v",
                markersize=5, color=color, clip_on=False, transform=ax.get_xaxis_transform())
    return bool(zero.any())


ZERO_NOTE = "▼ on the bottom edge: exactly 0 (float32 underflow), not drawn"


def band(
    ax: Axes, x: Sequence[float] | np.ndarray, mean: np.ndarray, std: np.ndarray, *,
    color: tuple[float, ...] | str, label: str | None = None,
) -> None:
    """A mean line with a shaded ±1 std band (for results repeated over seeds)."""
    mean = np.asarray(mean, dtype=float)
    std = np.asarray(std, dtype=float)
    ax.plot(x, mean, color=color, label=label, linewidth=1.8)
    ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)


__all__ = [
    "CATEGORY_COLORS",
    "DECADES_FOR_LOG",
    "ZERO_NOTE",
    "LAYER_CMAP",
    "band",
    "category_colors",
    "choose_scale",
    "distinct_colors",
    "diverging_colors",
    "figure",
    "finish",
    "layer_colors",
    "layer_legend",
    "layer_linestyles",
    "legend_outside",
    "plot_positive",
    "plot_layers",
    "spans_decades",
]
