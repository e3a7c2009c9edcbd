"""The learning rate, read from the update-to-weight ratio ``‖ΔW‖/‖W‖``.

The ratio is what a step does to a layer relative to its own size: free of the weights' scale,
the loss scale (an SGD step scales with it, but ``lr`` is what sets the ratio) and the width.
Its healthy value is about ``1e-3`` (Karpathy 2019, "A recipe for training neural networks";
cs231n's "ratio of updates to values"): a thousand steps to change a layer by its own size.

* **Too large**: the *median layer's* ratio reaches ``HIGH`` (0.1, two decades above healthy:
  each step changes a typical layer by a tenth of itself) either as the median over all steps
  (sustained), or over the first ``EARLY`` steps while the typical layer's drift
  ``‖W−W0‖/‖W0‖`` reaches ``DRIFTED`` (10): the large early steps did not settle but carried
  the weights ten times their own size away (too large a step inflates the weights until the
  ratio looks small again, so the run's late median alone misses it). Error at ``1`` (each
  step replaces the weights). The remedy scales the rate by ``HEALTHY / ratio`` (to the healthy
  ``1e-3``, within ``[1e-3, 0.1]``). A large rate that still trains (Adam at 2e-2 on a small MLP:
  early ratio 0.12, drift 2) does not fire.
* **Too small**: even the layer that moves most changes by at most ``LOW`` (``1e-5``, two
  decades below healthy) per step, median over the steps: a hundred thousand steps to change a
  layer by its own size. Taking the *fastest* layer keeps vanishing gradients (early layers
  still, late ones moving) out of this rule.

Both need ``MIN_STEPS`` (5) steps with ratios, the too-large test only ``MIN_EARLY`` (3): a
rate so large that the run overflows within a few steps leaves few finite ratios.
AMP-skipped steps are left out (their ratio is 0 by construction). DeepDiagnosis flags any
layer outside ``[1e-5, 1e-1]``; the median over layers and steps does not fire on one quiet
layer or one noisy step.
"""

from __future__ import annotations

import numpy as np

from gradprobe.diagnose import cures
from gradprobe.diagnose.finding import Evidence, Finding
from gradprobe.diagnose.frames import NORMALISER_TYPES, Frames, step_range

HIGH = 0.1
LOW = 1e-5
HEALTHY = 1e-3
EARLY = 5
DRIFTED = 10.0
REPLACE = 1.0
MIN_STEPS = 5
MIN_EARLY = 3


def update_ratios(frames: Frames):
    """``step x layer`` table of ``‖ΔW‖/‖W‖`` over the weight layers (normalisers excluded)."""
    layers = [n for n in frames.chain()
              if frames.layer_row(n).get("type") not in NORMALISER_TYPES]
    table = frames.wide("update", "norm", layers)
    return table


def finite_ratios(frames: Frames):
    """``(table, rows, vals)``: :func:`update_ratios`, the mask of the steps that count (at
    least half the layers with a finite ratio: all-zero weights have none), and those steps'
    ratios (non-finite ones NaN)."""
    table = update_ratios(frames)
    vals = table.to_numpy(dtype="float64")
    vals = np.where(np.isfinite(vals), vals, np.nan)
    rows = (~np.isnan(vals)).sum(axis=1) * 2 >= vals.shape[1] if vals.size else \
        np.zeros(len(table), dtype=bool)
    return table, rows, vals[rows]


def learning_rate(frames: Frames) -> list[Finding]:
    table, finite_rows, vals = finite_ratios(frames)
    if table.empty or len(table) < MIN_EARLY:
        return []
    if finite_rows.sum() < MIN_EARLY:  # a run that overflows at once has few finite steps
        return []
    per_step = np.nanmedian(vals, axis=1)
    typical = float(np.median(per_step))
    early = float(np.median(per_step[:EARLY]))
    fastest = float(np.median(np.nanmax(vals, axis=1)))
    steps = step_range(table.index[finite_rows])
    drift = frames.wide("drift", "norm", list(table.columns)).to_numpy(dtype="float64")
    drift = np.where(np.isfinite(drift), drift, np.nan)
    rows_ok = (~np.isnan(drift)).any(axis=1) if drift.size else np.array([], bool)
    drifted = float(np.max(np.nanmedian(drift[rows_ok], axis=1))) if rows_ok.any() else 0.0
    evidence = []
    if typical >= HIGH:
        evidence.append(Evidence("update/weight ratio (median layer, median step)", typical,
                                 HIGH, ">=", "healthy ≈ 1e-3"))
    elif early >= HIGH and drifted >= DRIFTED:
        evidence += [Evidence(f"update/weight ratio (median layer, first {EARLY} steps)", early,
                              HIGH, ">=", "healthy ≈ 1e-3"),
                     Evidence("drift ‖W−W0‖/‖W0‖ of the median layer", drifted, DRIFTED, ">=",
                              "the weights left their initial scale")]
    if evidence:
        typical = max(typical, early)
        return [Finding(
            rule="learning-rate", severity="error" if typical >= REPLACE else "warning",
            layers=tuple(table.columns), steps=steps,
            evidence=tuple(evidence),
            explanation=("Each step changes the weights by a large fraction of themselves, far "
                         "above the healthy ~1e-3 (Karpathy 2019): the learning rate is too "
                         "large for the curvature of the loss (LeCun et al. 1998)."),
            remedies=(cures.lr(float(f"{min(0.1, max(1e-3, HEALTHY / typical)):.2g}")
                               if typical > 0.1 else 0.1,
                               "brings the update/weight ratio to the healthy 1e-3 (Adam's "
                               "step is proportional to the rate; SGD's at least)"),
                      cures.clip_for(frames, "bounds the steps while the rate is tuned")),
        )]
    if fastest <= LOW and finite_rows.sum() >= MIN_STEPS:
        factor = 10.0 if fastest == 0 else float(min(1e3, max(10.0, 1e-3 / fastest)))
        return [Finding(
            rule="learning-rate", severity="warning", layers=tuple(table.columns), steps=steps,
            evidence=(Evidence("update/weight ratio of the fastest layer (median step)",
                               fastest, LOW, "<=", "healthy ≈ 1e-3"),),
            explanation=("Even the fastest-moving layer changes by a negligible fraction of "
                         "itself each step, far below the healthy ~1e-3 (Karpathy 2019): the "
                         "learning rate is too small (or zero) to train in a useful time."),
            remedies=(cures.lr(round(factor, 3), "brings the update/weight ratio toward 1e-3"),),
        )]
    return []


__all__ = ["DRIFTED", "EARLY", "HIGH", "LOW", "finite_ratios", "learning_rate",
           "update_ratios"]
