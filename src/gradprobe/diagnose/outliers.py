"""Batches that carry input outliers, from the first affine layer's statistics per step.

``RMS(y_t) / RMS(W_t)`` of the first affine layer ``y = W x + b`` is proportional to the RMS of
step ``t``'s inputs while the weights keep their initial scale (within a factor ``GROWN`` = 2 of
their first RMS; steps beyond are left out). A step whose ratio is ``SURGE`` (10) times the
run's quiet level (its 10th percentile) carried inputs ten times larger than the other batches:
an outlier dominates it (clean batches differ by a few per cent, by the central limit theorem;
measured on the diagnosis suite's healthy runs: at most 1.5×). The ``input-scale`` rule reports
them; the exploding rule does not count gradient-norm spikes on them (the first layer's weight
gradient ``δ xᵀ`` scales with the input: no feedback loop).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from gradprobe.diagnose.frames import AFFINE_TYPES, Frames

SURGE = 10.0
GROWN = 2.0
MIN_SURGE_STEPS = 12


def _first_affine(frames: Frames) -> str | None:
    order = [n for n in frames.depth_order() if frames.layer_row(n).get("param_shapes")]
    if not order:
        return None
    row = frames.layer_row(order[0])
    shapes = row.get("param_shapes") or []
    if row.get("type") not in AFFINE_TYPES or not shapes or len(shapes[0]) < 2:
        return None
    return order[0]


def input_surges(frames: Frames) -> pd.Series:
    """Per step, the first layer's ``RMS(y_t)/RMS(W_t)`` over its 10th percentile (the quiet
    batches), for the steps whose weights are within ``GROWN`` of their first RMS; empty where
    it cannot be estimated (module docstring)."""
    name = _first_affine(frames)
    if name is None:
        return pd.Series(dtype="float64")
    a = frames.wide("act", "rms", [name])
    w = frames.wide("weight", "rms", [name])
    if a.empty or w.empty:
        return pd.Series(dtype="float64")
    w = w[name].astype("float64")
    w = w[np.isfinite(w) & (w > 0)]
    if w.empty:
        return pd.Series(dtype="float64")
    w0 = float(w.iloc[0])
    w = w[(w <= GROWN * w0) & (w >= w0 / GROWN)]
    ratio = (a[name].astype("float64") / w).dropna()
    ratio = ratio[np.isfinite(ratio) & (ratio > 0)]
    if len(ratio) < MIN_SURGE_STEPS:
        return pd.Series(dtype="float64")
    return ratio / float(ratio.quantile(0.1))


def outlier_steps(frames: Frames) -> pd.Index:
    """Steps whose batch carried inputs ``SURGE`` times the quiet batches' (at least two such
    steps, else none): the gradient-norm spikes on these steps are the inputs' doing."""
    surges = input_surges(frames)
    hot = surges[surges >= SURGE]
    return hot.index if len(hot) >= 2 else surges.index[:0]


__all__ = ["GROWN", "SURGE", "input_surges", "outlier_steps"]
