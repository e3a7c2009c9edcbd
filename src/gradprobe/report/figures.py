"""The report's figures, drawn from a run's frames.

Every function here takes frames the :class:`~gradprobe.Run` reader returns (``scalars()``,
``losses()``, ``histograms()``) and only **selects and pivots** their columns: no statistic is
computed here (rule 12 of the house style). Each returns a :class:`Plot` (the figure and a
sentence saying what was left out), or ``None`` when the run holds no data for it.

Readability rules kept by every figure:

* one colour per layer from :func:`gradprobe.report.style.layer_colors`, computed once over all
  layers in depth order, so a layer has the same colour in every figure (dark = input side);
* line plots draw at most :data:`MAX_LEGEND` layers, evenly spread from input to output, and
  their legend (outside the data) names exactly those; the heat map shows every layer;
* a log axis where the values span more than two decades, its limits set by the smallest and
  largest finite positive values drawn (a zero never stretches it);
* line plots show at most :data:`MAX_POINTS` steps: every k-th recorded step with
  ``k = ceil(n_steps / MAX_POINTS)``, the last step always kept (:func:`thin_steps`); the caption
  says so. A spike between two shown steps is not drawn: the heat map keeps up to
  :data:`MAX_HEAT_STEPS` steps, and the diagnosis reads every step.

The selection rules live in :mod:`gradprobe.report.select` (no matplotlib there).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from gradprobe.report import style
from gradprobe.report.select import (
    MAX_HEAT_STEPS,
    MAX_LEGEND,
    MAX_POINTS,
    gaps_note,
    legend_pick,
    lines_note,
    pivot,
    text,
    thin_note,
    thin_steps,
)

MAX_PROFILE_STEPS = 4
"""Steps at which the depth profile of activation gradients is drawn."""

Colors = Mapping[str, Any]


@dataclass(frozen=True)
class Layers:
    """What the figures need to know of a run's layers, each list in depth order (input first).

    ``labels`` are the names shown in legends and ticks (``"3 (Linear)"`` for a Sequential's
    index names); ``colors`` one colour per layer over ``order``.
    """

    order: list[str]
    labels: Mapping[str, str]
    colors: Colors
    weights: list[str]
    activations: list[str]

    @classmethod
    def of(cls, names: Sequence[str], types: Sequence[str], weights: Sequence[str],
           activations: Sequence[str]) -> Layers:
        labels = {n: text(f"{n} ({t})" if str(n).isdigit() else n) for n, t in zip(names, types)}
        return cls(list(names), labels, style.layer_colors(list(names)), list(weights),
                   list(activations))


@dataclass
class Plot:
    """A figure and the caption sentence that says what it shows and what it left out."""

    figure: Figure
    note: str = ""


def _layer_legend(target: Any, names: Sequence[str], info: Layers,
                  *, outside_fig: bool = False, title: str = "layer (input → output)") -> None:
    shown = legend_pick(names)
    handles = [Line2D([], [], color=info.colors[n], linewidth=2) for n in shown]
    if len(shown) < len(names):
        title += f"\n{len(shown)} of {len(names)} shown"
    labels = [info.labels.get(n, text(n)) for n in shown]
    kw = dict(title=title, fontsize="small", title_fontsize="small", frameon=False)
    if outside_fig:
        target.legend(handles, labels, loc="outside right upper", **kw)
    else:
        target.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                      borderaxespad=0.0, **kw)


def _finite_positive(values: np.ndarray) -> np.ndarray:
    v = np.asarray(values, dtype=float).ravel()
    return v[np.isfinite(v) & (v > 0)]


def scale_y(ax: Any, values: np.ndarray, *, force_log: bool = False) -> str:
    """Log axis when no value is negative and the positive ones span more than two decades;
    its limits come from the smallest and largest finite positive values, so exact zeros
    (gradients that underflowed) leave gaps instead of stretching the axis to 1e-300."""
    arr = np.asarray(values, dtype=float).ravel()
    arr = arr[np.isfinite(arr)]
    pos = arr[arr > 0]
    use_log = pos.size > 0 and not (arr < 0).any() and (force_log or style.spans_decades(pos))
    if use_log:
        ax.set_yscale("log")
        lo, hi = pos.min(), pos.max()
        pad = 10 ** max(0.1, 0.05 * math.log10(hi / lo)) if hi > lo else 2.0
        ax.set_ylim(lo / pad, hi * pad)
        return "log"
    return "linear"


def _lines(ax: Any, table: pd.DataFrame, info: Layers, *, lw: float = 1.3) -> list[str]:
    """One line per layer, at most :data:`MAX_LEGEND` layers evenly spread in depth (the same
    ones the legend names, so every line drawn can be identified); returns them."""
    x = table.index.to_numpy()
    drawn = legend_pick(list(table.columns))
    for name in drawn:
        ax.plot(x, table[name].to_numpy(dtype=float), color=info.colors[name], linewidth=lw)
    return drawn



def _steps(scalars: pd.DataFrame, kind: str) -> np.ndarray:
    return scalars.loc[scalars["kind"] == kind, "step"].to_numpy()


def _over_steps(scalars: pd.DataFrame, kind: str, column: str, info: Layers,
                max_points: int = MAX_POINTS) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """The steps where ``kind`` was recorded, the ones drawn (at most ``max_points``, first and
    last kept: :func:`thin_steps`), and the step x layer table of ``column`` at those."""
    recorded = _steps(scalars, kind)
    steps = thin_steps(recorded, max_points)
    return recorded, steps, pivot(scalars, kind, column, info.order, steps)


def _ticks(ax: Any, axis: str, names: Sequence[str], info: Layers, cap: int) -> None:
    shown = legend_pick(names, cap)
    pos = [list(names).index(n) for n in shown]
    labels = [info.labels.get(n, text(n)) for n in shown]
    if axis == "x":
        rotate = len(shown) > 6
        ax.set_xticks(pos, labels, rotation=40 if rotate else 0,
                      ha="right" if rotate else "center", fontsize="small")
    else:
        ax.set_yticks(pos, labels, fontsize="small")


def grad_rms(scalars: pd.DataFrame, info: Layers) -> Plot | None:
    """Parameter-gradient RMS per layer over steps."""
    all_steps, steps, table = _over_steps(scalars, "grad", "rms", info)
    if table.empty:
        return None
    fig, axes = style.figure(1, 1, size=(9.5, 4.2))
    ax = axes[0, 0]
    drawn = _lines(ax, table, info)
    used = scale_y(ax, table[drawn].to_numpy(dtype=float))
    style.finish(ax, title="Gradient RMS of each layer's parameters over training",
                 xlabel="optimizer step", ylabel="RMS of ∂L/∂θ (weights and biases)", scale=used)
    _layer_legend(ax, drawn, info)
    return Plot(fig, " ".join(filter(None, [
        lines_note(drawn, len(table.columns)), thin_note(all_steps, steps),
        gaps_note(table[drawn].to_numpy(dtype=float), used)])))


def grad_heatmap(scalars: pd.DataFrame, info: Layers) -> Plot | None:
    """Layer x step raster of parameter-gradient RMS on a log colour scale."""
    all_steps, steps, table = _over_steps(scalars, "grad", "rms", info, MAX_HEAT_STEPS)
    if table.empty:
        return None
    image = np.ma.masked_invalid(table.to_numpy(dtype=float).T)
    image = np.ma.masked_less_equal(image, 0)
    n_layers = image.shape[0]
    fig, axes = style.figure(1, 1, size=(9.5, min(2.4 + 0.16 * n_layers, 6.5)))
    ax = axes[0, 0]
    pos = _finite_positive(image.compressed())
    cmap = colormaps["magma"].with_extremes(bad="#c8c8c8")
    x0 = float(steps[0])
    x1 = float(steps[-1]) if len(steps) > 1 else x0 + 1
    if pos.size:
        norm = LogNorm(vmin=pos.min(), vmax=max(pos.max(), pos.min() * 1.0001))
        im = ax.imshow(image, aspect="auto", interpolation="nearest", cmap=cmap, norm=norm,
                       extent=(x0, x1, n_layers - 0.5, -0.5))
        fig.colorbar(im, ax=ax, label="RMS of ∂L/∂θ (log scale)")
    _ticks(ax, "y", list(table.columns), info, 30)
    style.finish(ax, title="Gradient RMS, layer x step (input at the top)",
                 xlabel="optimizer step", ylabel="layer (input → output)")
    ax.grid(False)
    note = thin_note(all_steps, steps, MAX_HEAT_STEPS) + " Grey: zero, non-finite or not recorded."
    return Plot(fig, note.strip())


def act_grad_profile(scalars: pd.DataFrame, info: Layers) -> Plot | None:
    """RMS of the gradient of each layer's output, across depth, at a few steps.

    The layers are the weight layers (their output gradient is the back-propagated signal of
    Glorot & Bengio 2010, fig. 7) when they have activation gradients, else all layers.
    """
    present = set(scalars.loc[scalars["kind"] == "act_grad", "layer"].unique())
    layers = [n for n in info.weights if n in present] or [n for n in info.order if n in present]
    if not layers:
        return None
    recorded = np.unique(_steps(scalars, "act_grad"))
    idx = np.unique(np.round(np.linspace(0, len(recorded) - 1,
                                         min(MAX_PROFILE_STEPS, len(recorded)))).astype(int))
    steps = recorded[idx]
    table = pivot(scalars, "act_grad", "rms", layers, steps)
    fig, axes = style.figure(1, 1, size=(9.5, 4.4))
    ax = axes[0, 0]
    step_colors = colormaps["plasma"](np.linspace(0.0, 0.8, len(steps)))
    x = np.arange(len(table.columns))
    for color, step in zip(step_colors, table.index):
        ax.plot(x, table.loc[step].to_numpy(dtype=float), color=color, marker="o",
                markersize=3.5 if len(x) <= 40 else 0, linewidth=1.6, label=f"step {int(step)}")
    used = scale_y(ax, table.to_numpy(dtype=float))
    _ticks(ax, "x", list(table.columns), info, 20)
    which = "weight layers" if set(layers) <= set(info.weights) else "layers"
    style.finish(ax, title=f"Back-propagated gradient across depth (outputs of the {which})",
                 xlabel="layer (input → output)", ylabel="RMS of ∂L/∂(layer output)", scale=used)
    ax.legend(title="optimizer step", fontsize="small", title_fontsize="small", frameon=False,
              loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    rule = ("A straight line rising from input to output on this log axis is geometric decay "
            "of the gradient on its way back to the input." if used == "log" else "")
    return Plot(fig, " ".join(filter(None, [
        f"At {len(steps)} of {len(recorded)} recorded steps (first, evenly spaced, last).", rule,
        gaps_note(table.to_numpy(dtype=float), used)])))


def weight_stats(scalars: pd.DataFrame, info: Layers) -> Plot | None:
    """Mean and standard deviation of each layer's parameters over steps (two panels)."""
    all_steps, steps, mean = _over_steps(scalars, "weight", "mean", info)
    if mean.empty:
        return None
    std = pivot(scalars, "weight", "std", info.order, steps)
    fig, axes = style.figure(1, 2, size=(11.5, 4.0), sharex=True)
    drawn = _lines(axes[0, 0], mean, info)
    style.finish(axes[0, 0], title="Mean of the layer's parameters", xlabel="optimizer step",
                 ylabel="mean of θ (weights and biases)")
    _lines(axes[0, 1], std, info)
    used = scale_y(axes[0, 1], std[drawn].to_numpy(dtype=float))
    style.finish(axes[0, 1], title="Standard deviation of the layer's parameters",
                 xlabel="optimizer step", ylabel="std of θ (weights and biases)", scale=used)
    _layer_legend(fig, drawn, info, outside_fig=True)
    return Plot(fig, " ".join(filter(None, [lines_note(drawn, len(mean.columns)),
                                            thin_note(all_steps, steps)])))


def act_histograms(hist: pd.DataFrame, info: Layers) -> Plot | None:
    """Histograms of layer outputs, one panel per layer, the first and last histogram steps
    overlaid; panels share both axes.

    Layers are the activation modules (nn.ReLU, nn.Sigmoid, ...) when the run has histograms of
    them, else every layer with histograms; at most :data:`MAX_LEGEND`, evenly spread in depth.
    """
    act = hist[hist["kind"] == "act"] if len(hist) else hist
    if act.empty:
        return None
    present = set(act["layer"].unique())
    layers = [n for n in info.activations if n in present] or \
        [n for n in info.order if n in present]
    layers = legend_pick(layers)
    recorded = np.unique(act["step"])
    steps = recorded[[0, -1]] if len(recorded) > 1 else recorded
    nrows = math.ceil(len(layers) / 5)
    ncols = math.ceil(len(layers) / nrows)
    fig, axes = style.figure(nrows, ncols, size=(2.5 * ncols + 1.6, 2.3 * nrows + 0.5),
                             sharex=True)
    for ax in axes.flat[1:]:
        ax.sharey(axes.flat[0])
    styles: list[dict[str, Any]] = [dict(color="#9aa3ad", linewidth=1.2, fill=True, alpha=0.45),
                                    dict(color="#1d232b", linewidth=1.3)]
    for ax, name in zip(axes.flat, layers):
        rows = act[act["layer"] == name].set_index("step")
        for st, step in zip(styles[-len(steps):], steps):
            if step in rows.index:
                ax.stairs(rows.loc[step, "counts"], rows.loc[step, "bin_edges"], **st)
        ax.set_title(info.labels.get(name, text(name)), fontsize="small",
                     color=info.colors[name])
        ax.grid(True, alpha=0.3)
    for i, ax in enumerate(axes.flat):
        if i >= len(layers):
            ax.set_visible(False)
        elif i + ncols >= len(layers):  # nothing drawn below: this panel carries the x axis
            ax.xaxis.set_tick_params(labelbottom=True)
            ax.set_xlabel("output value")
    for ax in axes[:, 0]:
        ax.set_ylabel("values per bin")
    handles = [Line2D([], [], color=st["color"], linewidth=4 if "fill" in st else 1.5)
               for st in styles[-len(steps):]]
    fig.legend(handles, [f"step {int(s)}" for s in steps], loc="outside right upper",
               fontsize="small", frameon=False, title="optimizer step", title_fontsize="small")
    kinds = "activation modules" if set(layers) <= set(info.activations) else "layers"
    return Plot(fig, f"Outputs of the {kinds} over one batch (input first), at the first and last "
                     f"of {len(recorded)} histogram steps; {len(act['counts'].iloc[0])} bins per "
                     "histogram, from the layer's minimum to its maximum at that step. Narrow "
                     "spikes, each about a batch tall, are units whose output hardly changes from "
                     "one example to the next.")


def dead_saturated(scalars: pd.DataFrame, info: Layers) -> Plot | None:
    """Fractions of dead units and saturated values per activation layer over steps (a panel
    for each of the two that some layer has a rule for)."""
    act = scalars[scalars["kind"] == "act"]
    all_steps = act["step"].to_numpy()
    steps = thin_steps(all_steps)
    panels = [
        (pivot(act, "act", "dead_frac", info.order, steps).dropna(axis=1, how="all"),
         "Dead units (inactive on every example)", "fraction of the layer's units"),
        (pivot(act, "act", "saturated_frac", info.order, steps).dropna(axis=1, how="all"),
         "Saturated outputs (activation's flat region)", "fraction of the layer's outputs"),
    ]
    panels = [p for p in panels if not p[0].empty]
    if not panels:
        return None
    fig, axes = style.figure(1, len(panels), size=(5.6 * len(panels) + 1.8, 3.8), sharex=True)
    names: set[str] = set()
    subset = False
    for ax, (table, title, ylabel) in zip(axes[0], panels):
        drawn = _lines(ax, table, info)
        ax.set_ylim(-0.03, 1.03)
        style.finish(ax, title=title, xlabel="optimizer step", ylabel=ylabel)
        names |= set(drawn)
        subset = subset or len(drawn) < len(table.columns)
    _layer_legend(fig, [n for n in info.order if n in names], info, outside_fig=True)
    note = (f"At most {MAX_LEGEND} layers drawn per panel, evenly spread from input to output. "
            if subset else "")
    return Plot(fig, (note + thin_note(all_steps, steps)).strip())


def loss_curve(losses: pd.DataFrame) -> Plot | None:
    """The observed loss per optimizer step."""
    if losses.empty:
        return None
    steps = thin_steps(losses["step"])
    shown = losses[losses["step"].isin(steps)]
    fig, axes = style.figure(1, 1, size=(9.5, 3.6))
    ax = axes[0, 0]
    ax.plot(shown["step"], shown["loss"], color=style.CATEGORY_COLORS[0], linewidth=1.5)
    used = scale_y(ax, shown["loss"].to_numpy(dtype=float))
    style.finish(ax, title="Training loss", xlabel="optimizer step",
                 ylabel="loss (mean over the step's batches)", scale=used)
    return Plot(fig, thin_note(losses["step"].to_numpy(), steps))


def time_grads(frame: pd.DataFrame, info: Layers) -> Plot | None:
    """Norm of ∂L/∂h_t per time step t for each recurrent layer, at the first and last steps.

    ``frame`` has columns ``step, layer, t, norm`` (one row per recorded step, layer, time step).
    """
    if frame is None or frame.empty:
        return None
    present = set(frame["layer"])
    layers = ([n for n in info.order if n in present] or sorted(present))[:4]
    fig, axes = style.figure(1, len(layers), size=(5.0 * len(layers) + 1.6, 3.8))
    recorded = np.unique(frame["step"])
    steps = recorded[[0, -1]] if len(recorded) > 1 else recorded
    step_colors = colormaps["plasma"](np.linspace(0.0, 0.8, len(steps)))
    for i, (ax, name) in enumerate(zip(axes[0], layers)):
        if i:
            ax.sharey(axes[0, 0])
        rows = frame[frame["layer"] == name]
        for color, step in zip(step_colors, steps):
            sel = rows[rows["step"] == step].sort_values("t")
            ax.plot(sel["t"], sel["norm"], color=color, marker="o", markersize=3,
                    label=f"step {int(step)}")
        scale_y(ax, frame["norm"].to_numpy(dtype=float))
        style.finish(ax, title=f"Recurrent layer {info.labels.get(name, text(name))}", xlabel="time step t",
                     ylabel="‖∂L/∂h_t‖", scale=ax.get_yscale())
    axes[0, -1].legend(title="optimizer step", fontsize="small", frameon=False,
                       loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return Plot(fig, "A line falling (rising) towards early t is the gradient vanishing "
                     "(exploding) through time.")


__all__ = [
    "MAX_HEAT_STEPS", "MAX_LEGEND", "MAX_POINTS", "MAX_PROFILE_STEPS", "Layers", "Plot",
    "act_grad_profile", "act_histograms", "dead_saturated", "gaps_note", "grad_heatmap",
    "grad_rms", "legend_pick", "lines_note", "loss_curve", "pivot", "scale_y", "text",
    "thin_note", "thin_steps", "time_grads", "weight_stats",
]
