"""Symmetric units: a layer whose units keep identical incoming weights all through training.

Measured quantity (kind ``spread``, :mod:`gradprobe.stats.spread`): for each dense layer
(Linear, ConvNd) with ``u > 1`` output units, the spread of its weight rows ``w_i`` around their
mean row ``w̄``, relative to their size::

    s = sqrt(Σ_i ‖w_i − w̄‖² / Σ_i ‖w_i‖²)

``s = 0`` exactly when every unit has the same incoming weights; an all-zero layer (``0/0``) counts
as ``s = 0``. Units of layer ``l`` receive identical gradients, and so stay identical forever,
when their rows are equal and the next layer treats them alike (a constant or zero
initialisation of both; Goodfellow et al. 2016, §8.4: "the need to break symmetry"). Any random
initialisation with i.i.d. zero-mean entries gives ``E[s²] = 1 − 1/u``, so ``s ≥ 0.7`` for every
``u ≥ 2`` from the first step; once symmetry is broken (a random next layer sends each unit a
different gradient) ``s`` grows away from 0 within a few updates.

Threshold: the rule fires when ``s ≤ SYMMETRIC`` (0.05) at every recorded step of the last
third of the run: the units differ by less than 5 % of their size, 14× below the smallest value
a random initialisation gives (``u = 2``), and about 15× above the statistic's float32
resolution (~3e-3). ``s`` is a ratio of the weights to themselves: it does not depend on the
weights' scale, the width, the batch size, the dtype or the loss scale. A single zero-initialised
output or residual layer (a good practice: Goyal et al. 2017, "zero-γ") starts at ``s = 0`` and
leaves it at the first update, so it does not fire; a layer with one unit has nothing to
compare. Weights frozen on purpose at a constant (a fixed averaging filter) would fire.

Runs recorded without kind ``spread`` fall back to the weight moments at the first step
(:func:`gradprobe.diagnose.units.symmetry`).
"""

from __future__ import annotations

import numpy as np

from gradprobe.diagnose import cures, units
from gradprobe.diagnose.finding import Evidence, Finding
from gradprobe.diagnose.frames import Frames, step_range, tail

SYMMETRIC = 0.05


def unit_spread(frames: Frames) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per dense layer with more than one unit: ``(steps, s)`` in step order, ``s = 0`` for
    an all-zero layer, NaN where the weights were not finite."""
    rows = frames.kind("spread")
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if rows.empty:
        return out
    for name, group in rows.groupby("layer", sort=False):
        shapes = frames.layer_row(str(name)).get("param_shapes") or [[1]]
        n_units = int(shapes[0][0]) if len(shapes) and len(shapes[0]) else 1
        if n_units <= 1:
            continue
        group = group.sort_values("step")
        s = group["norm"].to_numpy(dtype="float64").copy()
        finite_w = group["nonfinite"].fillna(0).to_numpy() == 0
        s[np.isnan(s) & finite_w] = 0.0  # 0/0: every weight is zero
        out[str(name)] = (group["step"].to_numpy(), s)
    return out


def symmetry(frames: Frames) -> list[Finding]:
    """Dense layers whose units stay identical over the last third of the run (see the module
    docstring); the first-step weight moments where ``spread`` was not recorded."""
    spreads = unit_spread(frames)
    if frames.kind("spread").empty:
        return units.symmetry(frames)
    layers, evidence, steps = [], [], []
    for name in [n for n in frames.depth_order() if n in spreads]:
        st, s = spreads[name]
        ok = np.isfinite(s)
        if not ok.any():
            continue
        late = tail(s[ok])
        if float(np.max(late)) <= SYMMETRIC:
            layers.append(name)
            steps += list(st[ok])
            evidence.append(Evidence(
                f"unit spread of {name}", float(np.max(late)), SYMMETRIC, "<=",
                "sqrt(Σ‖w_i − w̄‖² / Σ‖w_i‖²) over its weight rows, maximum over the last "
                f"third of the steps (first step {float(s[ok][0]):.3g}; random rows ≈ "
                "sqrt(1 − 1/units))"))
    if not layers:
        return []
    acts = frames.activations()
    return [Finding(
        rule="symmetry", severity="error", layers=tuple(layers), steps=step_range(steps),
        evidence=tuple(evidence),
        explanation=("The layer's units have identical incoming weights and keep them: they "
                     "compute the same function and receive the same gradient, so the layer "
                     "works like a single unit (Goodfellow et al. 2016, §8.4; a constant or "
                     "zero initialisation)."),
        remedies=(
            cures.init_for(acts, "random initialisation breaks the symmetry between units "
                           "(Glorot & Bengio 2010; He et al. 2015)"),
        ),
    )]


__all__ = ["SYMMETRIC", "symmetry", "unit_spread"]
