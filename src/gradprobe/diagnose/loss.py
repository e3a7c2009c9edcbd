"""The loss: not decreasing, stuck at chance level, oscillating.

Everything is measured against the run's own start, so the loss's unit, scale and reduction do
not matter:

* ``L0`` = the first observed loss (the model as initialised; a run that diverges within a few
  steps must not move its own reference), ``L_end`` = median of the last fifth;
  the relative improvement ``(L0 − L_end) / |L0|`` below ``IMPROVE`` (5 %) over at least
  ``MIN_STEPS`` steps is a plateau (a loss that rose is one too). A run that learned and then
  converged has a large improvement and does not fire.
* *Chance level* (cross-entropy over ``C`` classes predicts ``1/C`` everywhere at
  ``L = ln C``): ``C`` is ``config["n_classes"]`` (or ``num_classes``/``classes``) if recorded,
  else the output layer's width when ``L0`` lies within 25 % of its ``ln C`` (the loss then is
  cross-entropy from an uninformed start); a single output (a binary classifier's logit,
  ``binary_cross_entropy_with_logits``) counts as ``C = 2``. An ``L_end`` within ``CHANCE``
  (10 %) of ``ln C`` is reported as stuck at chance: the network predicts the class prior. This
  holds even when the loss improved on ``L0``, provided it stopped falling (the median of the
  last fifth is within ``IMPROVE`` of the median of the fifth that ends halfway): a network
  initialised far from the prior (large random weights give confident wrong outputs,
  ``L0 > ln C``) first falls *to* chance, and staying there is the plateau; a slow run that
  is passing through ``ln C`` on its way down is not.
* *Oscillating*: the spread of the second half, ``(p90 − p10) / median``, reaches
  ``OSCILLATION`` (1): the loss jumps by its own size from step to step instead of settling
  (too large a learning rate; Goodfellow et al. 2016, §8.1.3).
"""

from __future__ import annotations

import math

import numpy as np

from gradprobe.diagnose import cures
from gradprobe.diagnose.finding import Evidence, Finding
from gradprobe.diagnose.frames import Frames

START = 5
MIN_STEPS = 20
IMPROVE = 0.05
CHANCE = 0.10
OSCILLATION = 1.0


def n_classes(frames: Frames, start_loss: float) -> int | None:
    """Classes from the recorded config, else the output width when ``L0 ≈ ln C``."""
    for key in ("n_classes", "num_classes", "classes"):
        value = frames.config.get(key)
        if isinstance(value, int) and value >= 2:
            return value
    chain = frames.chain()
    if not chain:
        return None
    shapes = frames.layer_row(chain[-1]).get("param_shapes") or []
    width = int(shapes[0][0]) if shapes and shapes[0] else 0
    classes = 2 if width == 1 else width
    if classes >= 2 and abs(start_loss - math.log(classes)) <= 0.25 * math.log(classes):
        return classes
    return None


def loss_plateau(frames: Frames) -> list[Finding]:
    loss = frames.losses
    if loss is None or len(loss) < MIN_STEPS:
        return []
    series = loss.sort_values("step")
    values = series["loss"].astype("float64").to_numpy()
    ok = np.isfinite(values)
    values, steps = values[ok], series["step"].to_numpy()[ok]
    if len(values) < MIN_STEPS:
        return []
    start = float(values[0])
    end = float(np.median(values[-max(START, len(values) // 5):]))
    if start == 0:
        return []
    improvement = (start - end) / abs(start)
    classes = n_classes(frames, start)
    chance = classes is not None and abs(end - math.log(classes)) <= CHANCE * math.log(classes)
    k = max(START, len(values) // 5)
    mid = float(np.median(values[max(0, len(values) // 2 - k):len(values) // 2]))
    stalled = mid != 0 and (mid - end) / abs(mid) < IMPROVE
    if improvement >= IMPROVE and not (chance and stalled):
        return []
    if improvement < IMPROVE:
        evidence = [Evidence("relative loss improvement since the start", improvement, IMPROVE,
                             "<", f"first loss {start:.4g}, median of the last fifth {end:.4g}")]
    else:  # fell to chance, then stopped: the comparison that fired is the later one
        evidence = [Evidence("relative loss improvement over the second half", (mid - end) /
                             abs(mid), IMPROVE, "<", f"median before the middle {mid:.4g}, "
                             f"median of the last fifth {end:.4g}")]
    if chance and classes is not None:
        ln_c = math.log(classes)
        evidence.append(Evidence("final loss / ln C", end / ln_c,
                                 note=f"within {CHANCE:.0%} of 1; ln C = {ln_c:.4g}: chance "
                                 f"level of {classes} classes"))
    half = values[len(values) // 2:]
    med = float(np.median(half))
    spread = float((np.percentile(half, 90) - np.percentile(half, 10)) / med) if med > 0 else 0
    if spread >= OSCILLATION:
        evidence.append(Evidence("loss spread (p90 − p10) / median, second half", spread,
                                 OSCILLATION, ">=", "oscillating"))
    what = ("stays at chance level: the network predicts the class prior" if chance
            else "does not decrease against its own start")
    acts = frames.activations()
    return [Finding(
        rule="loss-plateau", severity="warning",
        layers=(), steps=(int(steps[0]), int(steps[-1])), evidence=tuple(evidence),
        explanation=(f"The loss {what}. Either no gradient reaches the weights (see other "
                     "findings), the step size is wrong, or the targets carry no learnable "
                     "signal (Goodfellow et al. 2016, §8.2)."),
        remedies=(
            cures.lr(10.0 if spread < OSCILLATION else 0.1,
                     "the step is too small to move the loss" if spread < OSCILLATION
                     else "the loss oscillates: the step overshoots"),
            cures.init_for(acts, "a variance-preserving start lets every layer learn "
                           "(Glorot & Bengio 2010; He et al. 2015)"),
            *((cures.swap("relu", "saturating units pass at most 1/4 (sigmoid) of the "
                          "gradient per layer; rectifiers pass all of it where active "
                          "(Glorot, Bordes & Bengio 2011)"),)
              if acts & {"sigmoid", "tanh", "hardtanh"} else ()),
            cures.norm("batch", "normalisation conditions the problem (Ioffe & Szegedy 2015)"),
        ),
    )]


__all__ = ["IMPROVE", "MIN_STEPS", "loss_plateau", "n_classes"]
