"""A learning rate too small for the run: the loss falls steadily but slowly, the weights barely move.

A too small rate is the one failure that looks like a working run: nothing vanishes, explodes or
saturates, and the loss goes down. Bengio (2012, "Practical recommendations for
gradient-based training of deep architectures", §3.1.1) describes it: with too small a rate
the loss decreases slowly and steadily, roughly linearly, where a good rate removes most of it
early and then flattens; LeCun et al. (1998, "Efficient BackProp", §5) show the first-order
step shrinking in proportion to the rate. The loss alone cannot tell it from a good rate with
too short a budget (a run at ``lr/100`` for ``T`` steps retraces, to first order, the run at
``lr`` for ``T/100`` steps), so the absolute size of the steps decides: the update-to-weight
ratio ``‖ΔW‖/‖W‖`` of the median layer against its healthy ``1e-3`` (Karpathy 2019; cs231n).

The finding (``learning-rate``, warning) needs all of:

* **Small steps**: the median layer's update ratio (median over the steps) at most
  ``SMALL`` (2.5e-4, a quarter of the healthy 1e-3). Measured on the runs the threshold was
  chosen from: the doctor suite's SGD-with-momentum run at lr 1e-3 (its healthy twin uses 0.1)
  has 1.0e-4 (seeds 0-4: 0.87-1.13e-4); the healthy runs of the diagnosis suite that are still
  descending have 5.3e-4 (a leaky-ReLU MLP at SGD 0.01, seeds 4.9-5.6e-4) and more
  (3.8e-3: tanh MLP on standardised circles). 2.5e-4 leaves a factor 2 on either side.
  Converged healthy runs reach 1e-6 (their gradients vanish at the minimum): the loss tests
  below keep them out.
* **Still falling**: the least-squares slope of the loss over the second half of the run
  is negative with a t-statistic at most ``-FALLING_T`` (-3: the decrease is not mini-batch
  noise; a plateau gives |t| ≲ 2), and the second half removed at least ``LINEAR`` (0.25) of the
  run's total decrease: ``(L_mid − L_end) / (L0 − L_end) ≥ 0.25`` with ``L0`` the first loss,
  ``L_mid``/``L_end`` the medians of the fifths ending halfway and at the end (a straight line
  gives 0.5, a run that converged in its first half ≈ 0; measured 0.57 on the slow run,
  ≤ 0.02 on every converged healthy run of both suites).
* **Most of the loss left**: ``(L0 − L_end) / |L0| ≤ REMOVED`` (0.5): a run that already
  removed more than half of its loss is not crippled by its rate (the slow run removed 13 %).
* **No gradient-flow pathology**: non-finite values, vanishing or exploding gradients (in depth,
  over the steps, through time), dead or saturated units, symmetric weights and badly scaled
  inputs all make steps small or a descent slow, and each has its own cure; when one of those
  rules fires this one stays silent (the deep exploding chains of the diagnosis suite, trained
  at 1e-6 and 1e-7 to stay finite, have ratios 1e-4 and 1e-5 and a still-falling loss).
* The fastest layer above ``optimisation.LOW`` (1e-5): below it :func:`learning_rate` already
  reports the rate as too small.

Remedies: ``set_lr_`` by ×10 and ×100 (the doctor tries each and keeps the better). The ratio
does not give the factor: it is 1e-4 on the slow run where the healthy twin's is 6e-4, because
the healthy run converges and its gradients shrink, so ``1e-3 / ratio`` understates it.

Needs ``MIN_STEPS`` (20) finite losses and ``optimisation.MIN_STEPS`` steps with ratios.
"""

from __future__ import annotations

import numpy as np

from gradprobe.diagnose import cures
from gradprobe.diagnose.depth import exploding_depth, vanishing
from gradprobe.diagnose.finding import Evidence, Finding
from gradprobe.diagnose.frames import Frames, step_range
from gradprobe.diagnose.growth import exploding_steps
from gradprobe.diagnose.inputs import input_scale
from gradprobe.diagnose.nonfinite import nonfinite
from gradprobe.diagnose.optimisation import LOW, finite_ratios, update_ratios
from gradprobe.diagnose.optimisation import MIN_STEPS as MIN_RATIO_STEPS
from gradprobe.diagnose.recurrent import through_time
from gradprobe.diagnose.symmetry import symmetry
from gradprobe.diagnose.units import dead_relu, saturation

SMALL = 2.5e-4
FALLING_T = 3.0
LINEAR = 0.25
REMOVED = 0.5
MIN_STEPS = 20
FACTORS = (10.0, 100.0)
SILENCED_BY = (nonfinite, vanishing, exploding_depth, exploding_steps, through_time, dead_relu,
               saturation, symmetry, input_scale)
"""The gradient-flow rules whose findings silence this one (each explains small or slow steps
with its own cure)."""


def loss_shape(frames: Frames) -> dict[str, float] | None:
    """``L0``, ``L_mid``, ``L_end``, the fraction removed ``(L0 − L_end)/|L0|``, the second
    half's share of the decrease and the t-statistic of the second half's slope; ``None`` with
    fewer than ``MIN_STEPS`` finite losses."""
    loss = frames.losses
    if loss is None or len(loss) < MIN_STEPS:
        return None
    series = loss.sort_values("step")
    values = series["loss"].astype("float64").to_numpy()
    steps = series["step"].astype("float64").to_numpy()
    ok = np.isfinite(values)
    values, steps = values[ok], steps[ok]
    n = len(values)
    if n < MIN_STEPS or values[0] == 0:
        return None
    k = max(5, n // 5)
    start, end = float(values[0]), float(np.median(values[-k:]))
    mid = float(np.median(values[max(0, n // 2 - k):n // 2]))
    x, y = steps[n // 2:], values[n // 2:]
    x = x - x.mean()
    sxx = float((x ** 2).sum())
    slope = float((x * (y - y.mean())).sum() / sxx) if sxx > 0 else 0.0
    resid = y - y.mean() - slope * x
    se = float(np.sqrt((resid ** 2).sum() / max(1, len(y) - 2) / sxx)) if sxx > 0 else 0.0
    t = slope / se if se > 0 else (-np.inf if slope < 0 else 0.0)
    share = (mid - end) / (start - end) if start > end else float("nan")
    return {"start": start, "mid": mid, "end": end, "removed": (start - end) / abs(start),
            "share": share, "t": float(t), "first": float(steps[0]), "last": float(steps[-1])}


def descending(shape: dict[str, float]) -> bool:
    """The loss tests of the rule on :func:`loss_shape`'s values: still falling, in a
    near-straight line, most of the loss left."""
    return (shape["t"] <= -FALLING_T and shape["share"] >= LINEAR
            and shape["removed"] <= REMOVED)


def step_ratios(frames: Frames) -> tuple[float, float, int]:
    """Median over steps of the median layer's and of the fastest layer's update ratio, and
    the number of steps with ratios (at least half the layers finite)."""
    _, rows, vals = finite_ratios(frames)
    if not rows.any():
        return float("nan"), float("nan"), 0
    return (float(np.median(np.nanmedian(vals, axis=1))),
            float(np.median(np.nanmax(vals, axis=1))), int(rows.sum()))


def slow_learning_rate(frames: Frames) -> list[Finding]:
    shape = loss_shape(frames)
    if shape is None:
        return []
    typical, fastest, n = step_ratios(frames)
    if n < MIN_RATIO_STEPS or not typical <= SMALL or not fastest > LOW or not descending(shape):
        return []
    if any(f.severity != "info" for rule in SILENCED_BY for f in frames.findings(rule)):
        return []
    return [Finding(
        rule="learning-rate", severity="warning", layers=tuple(update_ratios(frames).columns),
        steps=step_range([shape["first"], shape["last"]]),
        evidence=(
            Evidence("update/weight ratio (median layer, median step)", typical, SMALL, "<=",
                     "healthy ≈ 1e-3"),
            Evidence("t-statistic of the loss's slope over the second half", shape["t"],
                     -FALLING_T, "<=", "still falling"),
            Evidence("share of the decrease made in the second half", shape["share"], LINEAR,
                     ">=", "≈ 0.5 for a straight line, ≈ 0 once converged"),
            Evidence("fraction of the first loss removed", shape["removed"], REMOVED, "<=",
                     f"first loss {shape['start']:.4g}, median of the last fifth "
                     f"{shape['end']:.4g}"),
        ),
        explanation=("The loss falls steadily but slowly, nearly in a straight line, while each "
                     "step changes the weights by far less than the healthy ~1e-3 of "
                     "themselves (Karpathy 2019) and no gradient-flow problem explains it: the "
                     "learning rate is too small (Bengio 2012, §3.1.1)."),
        remedies=tuple(cures.lr(f, f"×{f:g}: larger steps along a descent that is already "
                                   "steady") for f in FACTORS),
    )]


__all__ = ["FALLING_T", "LINEAR", "REMOVED", "SILENCED_BY", "SMALL", "descending", "loss_shape",
           "slow_learning_rate", "step_ratios"]
