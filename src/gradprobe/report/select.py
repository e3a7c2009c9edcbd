"""Which steps and layers a figure draws, and the caption sentences that say so.

Pure selection: nothing here computes a statistic, and nothing imports matplotlib. The rules:

* **steps**: a line plot draws at most :data:`MAX_POINTS` steps, every k-th recorded step with
  ``k = ceil(n_steps / MAX_POINTS)``, the last step always kept (:func:`thin_steps`); the heat map
  at most :data:`MAX_HEAT_STEPS` by the same rule;
* **layers**: a line plot draws at most :data:`MAX_LEGEND` layers, evenly spread from input to
  output, first and last included (:func:`legend_pick`), and its legend names exactly those.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

MAX_POINTS = 400
"""Steps drawn per line at most (every k-th recorded step, the last one always)."""
MAX_HEAT_STEPS = 600
"""Step columns of the heat map at most (same rule as :data:`MAX_POINTS`): about the pixel
width of its axes, so no column is lost to resampling on screen."""
MAX_LEGEND = 12
"""Legend entries at most; with more layers, this many evenly spread from input to output."""


def text(name: object) -> str:
    """A user string as matplotlib must receive it: ``$`` would start mathtext."""
    return str(name).replace("$", r"\$")


def thin_steps(steps: Sequence[int] | np.ndarray, max_points: int = MAX_POINTS) -> np.ndarray:
    """Every k-th of the sorted unique ``steps``, ``k = ceil(n / max_points)``, plus the last.

    >>> thin_steps(range(10), 4).tolist()
    [0, 3, 6, 9]
    """
    s = np.unique(np.asarray(steps))
    if s.size <= max_points:
        return s
    k = math.ceil(s.size / max_points)
    out = s[::k]
    return out if out[-1] == s[-1] else np.append(out, s[-1])


def thin_note(all_steps: np.ndarray, shown: np.ndarray, max_points: int = MAX_POINTS) -> str:
    """The caption sentence stating :func:`thin_steps`' rule (empty when nothing was left out)."""
    n, m = len(np.unique(all_steps)), len(shown)
    if m >= n:
        return ""
    k = math.ceil(n / max_points)
    nth = {1: "st", 2: "nd", 3: "rd"}.get(k % 10 if k % 100 not in (11, 12, 13) else 0, "th")
    return (f"Steps thinned for drawing: every {k}{nth} of {n} recorded steps ({m} shown, "
            "last kept).")


def grad_every_step(run: Any, grad: pd.DataFrame) -> pd.DataFrame:
    """The ``grad`` rows to draw over training: every step's from the always-on tier
    (``run.grad_norms()``: RMS = norm / √(the layer's parameter count)) where it has more steps
    than the full tier's ``grad`` rows (a budgeted run records those on a few steps only, and
    lines drawn between them would hide what happened in between); else ``grad`` as given."""
    norms = run.grad_norms()
    if norms.empty or norms["step"].nunique() <= grad["step"].nunique():
        return grad
    sizes = {str(r["name"]): sum(math.prod(s) for s in (r["param_shapes"] or []))
             for _, r in run.layers.iterrows()}
    n = norms["layer"].map(sizes).astype("float64")
    out = pd.DataFrame({"step": norms["step"], "layer": norms["layer"], "kind": "grad",
                        "rms": norms["grad_norm"] / np.sqrt(n.where(n > 0))})
    return out.dropna(subset=["rms"])


def pivot(scalars: pd.DataFrame, kind: str, column: str, order: Sequence[str],
          steps: np.ndarray | None = None) -> pd.DataFrame:
    """``column`` of ``kind`` as a step x layer table, layers in ``order`` (those present)."""
    rows = scalars[scalars["kind"] == kind]
    if steps is not None:
        rows = rows[rows["step"].isin(steps)]
    if rows.empty:
        return pd.DataFrame()
    try:  # one row per (step, layer, kind) in a run; pivot_table only for duplicated rows
        table = rows.pivot(index="step", columns="layer", values=column)
    except ValueError:
        table = rows.pivot_table(index="step", columns="layer", values=column, aggfunc="first",
                                 dropna=False)
    return table[[name for name in order if name in table.columns]]


def legend_pick(names: Sequence[str], cap: int = MAX_LEGEND) -> list[str]:
    """At most ``cap`` names, evenly spread, first and last included."""
    if len(names) <= cap:
        return list(names)
    idx = np.unique(np.round(np.linspace(0, len(names) - 1, cap)).astype(int))
    return [names[i] for i in idx]


def gaps_note(values: np.ndarray, scale: str) -> str:
    """The caption sentence for values a figure cannot draw (zeros on a log axis, NaN, Inf)."""
    arr = np.asarray(values, dtype=float).ravel()
    parts = []
    zeros = int((arr == 0).sum()) if scale == "log" else 0
    if zeros:
        parts.append(f"{zeros} exact zeros (a gradient that underflowed, or a layer the loss "
                     "does not reach) cannot be drawn on the log axis and leave gaps.")
    bad = int(np.isinf(arr).sum())
    if bad:
        parts.append(f"{bad} infinite values are not drawn (see the non-finite events).")
    return " ".join(parts)


def lines_note(drawn: Sequence[str], total: int) -> str:
    """The caption sentence for line plots that drew a subset of the layers."""
    if len(drawn) >= total:
        return ""
    return (f"{len(drawn)} of {total} layers drawn, evenly spread from input to output; the "
            "heat map shows every layer.")


__all__ = ["grad_every_step", "MAX_HEAT_STEPS", "MAX_LEGEND", "MAX_POINTS", "gaps_note", "legend_pick", "lines_note",
           "pivot", "text", "thin_note", "thin_steps"]
