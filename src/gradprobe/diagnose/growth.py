"""Exploding gradients over steps: sustained growth, spikes, and loss spikes.

All three compare the run with its own history, so they hold whatever the loss scale, batch
size, width or dtype (each multiplies the whole series by one factor):

* **growth**: the total gradient norm ``G_t = sqrt(Σ_layers ‖∇W_l‖²)``, smoothed by a running
  median of ``SMOOTH`` steps (one spike does not make a trend), rises to at least
  ``GROWTH`` (100×) its start (the median of the first ``SMOOTH`` steps: one odd first
  gradient, e.g. a tiny one at a flat start, does not set the scale) and stays there for ``SMOOTH``
  steps, or until the run ends: a feedback loop keeps growing, whereas a network leaving a
  flat start (a deep sigmoid net whose first gradient is tiny) passes the mark once and falls
  back. Healthy runs move ``G``
  by a factor of a few as the loss falls or the weights grow; two decades is a feedback loop
  (Pascanu et al. 2013: the gradient norm grows with the largest Jacobian singular value,
  geometrically in steps once weights grow).
* **spike**: ``G_t`` is at least ``SPIKE`` (30×) the median of the ``WINDOW`` steps before it.
  Mini-batch noise moves ``G`` by a factor of ~2–5 (its sampling spread); a cliff in the loss
  surface (Pascanu et al. 2013, Fig. 2) by orders of magnitude.
* **loss spike**: the loss is at least ``LOSS_SPIKE`` (10×) the median of the ``WINDOW``
  losses before it *and* above the loss at the start: progress is lost, not just noise on a
  loss near zero; or the loss's running median climbs to ``LOSS_SPIKE`` × its first value
  (divergence).

Spikes on batches that carry input outliers (:func:`gradprobe.diagnose.outliers.outlier_steps`:
the first layer's output jumped by ``SURGE`` × with its weights unchanged) are not counted: the
first layer's weight gradient ``δ xᵀ`` scales with the input, so a 1000× outlier makes a large
gradient without any feedback loop. The ``input-scale`` finding reports them, as one finding
that explains both. In a budgeted run (the Probe's default) ``G_t`` is known at every step, the
first layer's statistics at the full steps only: where a run has outlier batches, a spike at a
step without the full tier is not counted either.

Non-finite values are the ``nonfinite`` rule's (they are skipped here), AMP-skipped steps are
removed before anything is compared.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from gradprobe.diagnose import cures
from gradprobe.diagnose.finding import Evidence, Finding
from gradprobe.diagnose.frames import Frames, grad_norm, spike_ratios
from gradprobe.diagnose.outliers import outlier_steps

GROWTH = 100.0
SPIKE = 30.0
LOSS_SPIKE = 10.0
WINDOW = 10
SMOOTH = 5
MIN_STEPS = 12


def _longest_run(flags: np.ndarray) -> int:
    """The longest stretch of consecutive True values."""
    best = run = 0
    for f in flags:
        run = run + 1 if f else 0
        best = max(best, run)
    return best


def gradient_spikes(frames: Frames) -> pd.Series:
    """``G_t / median of the WINDOW steps before``, at the steps where it reaches ``SPIKE``."""
    g = grad_norm(frames)
    if len(g) < MIN_STEPS:
        return pd.Series(dtype="float64")
    ratio = spike_ratios(g, WINDOW)
    return ratio[ratio >= SPIKE]


def exploding_steps(frames: Frames) -> list[Finding]:
    """Gradient-norm growth or spikes, and loss spikes, against the run's own history."""
    evidence: list[Evidence] = []
    steps: list[int] = []
    g = grad_norm(frames)
    if len(g) > SMOOTH and (g > 0).any():
        smooth = g.rolling(SMOOTH, min_periods=SMOOTH).median().dropna()
        start = float(smooth.iloc[0]) if len(smooth) else 0.0
        if start > 0:
            high = (smooth / start >= GROWTH).to_numpy()
            if _longest_run(high) >= SMOOTH or (len(high) and high[-1]):
                growth = float(smooth.max() / start)
                evidence.append(Evidence("gradient norm (running median) / its start", growth,
                                         GROWTH, ">=", f"start: median of the first {SMOOTH} "
                                         f"steps; held for {_longest_run(high)} steps"))
                steps += [int(smooth.idxmax())]
        hits = gradient_spikes(frames)
        if len(hits):
            known = outlier_steps(frames)
            hits = hits[~hits.index.isin(known)]
            if len(known):  # outlier batches in this run: a spike on a step without the
                # full tier (no first-layer statistics) may be one of them, so it is not counted
                hits = hits[hits.index.isin(frames.scalars["step"].unique())]
        if len(hits):
            evidence.append(Evidence("gradient-norm spike / median of previous steps",
                                     float(hits.max()), SPIKE, ">=",
                                     f"{len(hits)} spike(s), window {WINDOW}"))
            steps += [int(hits.index.min()), int(hits.index.max())]
    loss = frames.losses
    if len(loss) > SMOOTH:
        series = loss.set_index("step")["loss"].astype("float64")
        series = series[np.isfinite(series)]
        if len(series) > SMOOTH:
            start = float(series.iloc[0])
            smooth = series.rolling(SMOOTH, min_periods=SMOOTH).median().dropna()
            if start > 0 and len(smooth) and smooth.max() >= LOSS_SPIKE * start:
                evidence.append(Evidence("loss (running median) / first loss",
                                         float(smooth.max() / start), LOSS_SPIKE, ">=",
                                         "the loss diverges"))
                steps += [int(smooth.idxmax())]
            ratio = spike_ratios(series, WINDOW)
            if len(series) < MIN_STEPS:
                ratio = ratio.iloc[0:0]
            hits = ratio[(ratio >= LOSS_SPIKE) & (series.reindex(ratio.index) > abs(start))]
            if len(hits):
                evidence.append(Evidence("loss spike / median of previous losses",
                                         float(hits.max()), LOSS_SPIKE, ">=",
                                         "and above the starting loss"))
                steps += [int(hits.index.min()), int(hits.index.max())]
    if not evidence:
        return []
    return [Finding(
        rule="exploding-gradients",
        severity="error" if len(evidence) > 1 else "warning",
        layers=(),
        steps=(min(steps), max(steps)),
        evidence=tuple(evidence),
        explanation=("The gradient norm grows or jumps by orders of magnitude against the "
                     "run's own history: the update overshoots a steep region of the loss and "
                     "feeds back into larger gradients (Pascanu et al. 2013)."),
        remedies=(
            cures.clip_for(frames, "bounds the step a spike can take (Pascanu et al. 2013)"),
            cures.lr(0.1, "a smaller step stays inside the region where the gradient is "
                     "informative"),
            *cures.init_model(frames, "a variance-preserving initialisation starts the layer "
                              "gains near 1 (Glorot & Bengio 2010; He et al. 2015)"),
        ),
    )]


__all__ = ["GROWTH", "LOSS_SPIKE", "SPIKE", "exploding_steps", "grad_norm", "gradient_spikes"]
