"""Vanishing and exploding gradients across depth.

The measured quantity is the back-propagated **activation gradient** ``δ_l = ∂L/∂y_l`` at the
output of each weight layer, as Glorot & Bengio (2010) follow it: parameter-gradient ratios
alone mislead, because ``∂L/∂W_l = δ_l x_{l-1}ᵀ`` also carries the forward signal ``x_{l-1}``.
In a linear chain ``W = a·I`` the forward signal grows like ``a^l`` while ``δ_l`` shrinks like
``a^{L-l}`` (for ``a < 1``) and every ``‖∂L/∂W_l‖`` is the same; in a deep ReLU network with
plain Xavier the two halvings of the variance cancel the same way. The activation gradient
shows the collapse.

Rate across depth
    For each recorded step, ``log10 RMS(δ_l)`` of the hidden weight layers (the chain of weight
    layers in depth order without normalisers and embeddings, less the output layer, whose
    gradient ``∂L/∂logits`` has another scale) is fitted by least squares against the layer's
    position: the slope ``s`` is decades per layer and ``D = s·(n−1)`` the decades across the
    ``n ≥ 3`` hidden layers. The median over steps is used (one noisy step does not decide),
    and the median over the last fifth of the steps must pass too (a collapse that training
    repaired is not a finding).
    RMS, not norm: per-unit variance is what variance-preserving initialisers keep constant
    (Glorot & Bengio 2010; He et al. 2015), so layers of different widths compare.

    Both the loss scale (AMP, ``reduction="sum"``), the batch size and the dtype multiply every
    ``δ_l`` of a step by one factor and cancel in ``s``; depth and width enter only through the
    per-layer rate, which is what is judged.

Thresholds
    *Vanishing*: ``D ≥ VANISH_DECADES`` (2): the first hidden layer's gradient is 100× smaller
    than the last one's, so with one learning rate it learns 100× slower (sigmoid: σ' ≤ 1/4,
    so ``D ≥ 2`` after 3–4 saturating layers; Hochreiter 1991, Bengio et al. 1994). A per-layer
    factor of 0.9 is harmless at depth 5 (0.66) and crippling at depth 50 (0.005): the total,
    not the rate, decides. The fit must be *geometric*: at least ``AGREE`` (60 %) of the
    successive ratios go the fitted way, so one odd layer (an attention projection, a width
    change) does not make a trend. *Exploding* is the mirror image, ``D ≤ −EXPLODE_DECADES``
    (Pascanu et al. 2013): early layers get 100× the gradient of late ones and the forward
    signal typically grows with them. AutoTrainer's first/last *weight-gradient* ratios
    (``< 1e-3`` vanishing, ``> 70`` exploding) miss both chains above.

Drift
    Independently, vanishing shows as early layers that never leave their initialisation while
    later ones do: ``drift = ‖W−W0‖/‖W0‖`` at the last step of the first hidden layer is at most
    ``DRIFT_RATIO`` (1/100) of the median drift of the later half of the chain, while the later
    half has moved by at least ``MOVED`` (1e-3 of its norm). Ratios of ratios: free of scale.
    Adaptive optimisers (Adam) normalise the update per parameter and can hide this signal; the
    activation-gradient rate is the primary test, and drift decides alone only in runs recorded
    without ``act_grad`` (dead units and zero weights freeze early layers too; the profile tells
    them apart).
"""

from __future__ import annotations

import numpy as np

from gradprobe.diagnose import cures
from gradprobe.diagnose.finding import Evidence, Finding, Severity
from gradprobe.diagnose.frames import Frames, depth_slope, log10, step_range

VANISH_DECADES = 2.0
EXPLODE_DECADES = 2.0
AGREE = 0.6
DRIFT_RATIO = 1e-2
MOVED = 1e-3
MIN_LAYERS = 3


def hidden_chain(frames: Frames) -> list[str]:
    """The chain without its output layer."""
    return frames.chain()[:-1]


def act_grad_profile(frames: Frames) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``(layers, steps, slopes)``: the fitted decades-per-layer of each step whose profile is
    finite, and the fraction of successive layers agreeing with it (``slopes[:, 1]``)."""
    layers = hidden_chain(frames)
    table = frames.wide("act_grad", "rms", layers)
    if table.empty or table.shape[1] < MIN_LAYERS:
        return list(table.columns) if not table.empty else [], np.array([]), np.empty((0, 2))
    logs = log10(table.to_numpy())
    keep = np.isfinite(logs).all(axis=1)
    fits = np.array([depth_slope(row) for row in logs[keep]]).reshape(-1, 2)
    return list(table.columns), table.index.to_numpy()[keep], fits


def _late(fits: np.ndarray, n: int) -> float:
    """Decades across the chain, median over the last fifth of the profiled steps."""
    k = max(1, len(fits) // 5)
    return float(np.median(fits[-k:, 0])) * (n - 1)


def _drift(frames: Frames, layers: list[str]) -> tuple[float, float] | None:
    table = frames.wide("drift", "norm", layers)
    if table.empty or table.shape[1] < MIN_LAYERS:
        return None
    last = table.ffill().iloc[-1].to_numpy(dtype="float64")
    if not np.isfinite(last).all():
        return None
    late = float(np.median(last[len(last) // 2:]))
    return float(last[0]), late


def _vanishing_remedies(frames: Frames) -> tuple:
    acts = frames.activations()
    out = []
    if acts & {"sigmoid", "tanh", "hardtanh"}:
        out.append(cures.swap("relu", "rectifiers pass gradient 1 where active; σ' ≤ 1/4 "
                              "shrinks it every layer (Glorot & Bengio 2010)"))
    out.extend(cures.init_model(frames, "variance-preserving initialisation keeps Var(δ) "
                                "constant across layers (Glorot & Bengio 2010; He et al. 2015)"))
    out.append(cures.norm("batch", "normalisation re-scales each layer's signal "
                          "(Ioffe & Szegedy 2015)"))
    out.append(cures.residual("identity paths carry the gradient past every block "
                              "(He et al. 2016)"))
    return tuple(out)


def vanishing(frames: Frames) -> list[Finding]:
    """Activation gradients collapsing geometrically toward the input, or early layers that
    stay at their initialisation while later ones move (see the module docstring)."""
    layers, steps, fits = act_grad_profile(frames)
    evidence: list[Evidence] = []
    fired_steps = None
    severity: Severity = "warning"
    if len(fits):
        slope, agree = float(np.median(fits[:, 0])), float(np.median(fits[:, 1]))
        decades = slope * (len(layers) - 1)
        if (decades >= VANISH_DECADES and agree >= AGREE
                and _late(fits, len(layers)) >= VANISH_DECADES):
            fired_steps = step_range(steps[fits[:, 0] * (len(layers) - 1) >= VANISH_DECADES])
            severity = "error" if decades >= 2 * VANISH_DECADES else "warning"
            evidence += [
                Evidence("act_grad RMS decades lost from last to first hidden layer", decades,
                         VANISH_DECADES, ">=", f"fitted over {len(layers)} layers, median "
                         "over steps"),
                Evidence("act_grad RMS factor per layer", 10 ** (-slope), 1.0, "<",
                         "geometric rate toward the input"),
                Evidence("layers agreeing with the trend", agree, AGREE, ">="),
            ]
    drift = _drift(frames, layers or hidden_chain(frames))
    if drift is not None:
        first, late = drift
        ratio = first / late if late > 0 else float("nan")
        # drift alone decides only where no activation gradients were recorded: dead units
        # and zero weights also freeze early layers, and the profile tells them apart
        alone = not len(fits)
        if late >= MOVED and np.isfinite(ratio) and ratio <= DRIFT_RATIO and (
                evidence or alone):
            evidence.append(Evidence("drift of first hidden layer / later layers", ratio,
                                     DRIFT_RATIO, "<=", "‖W−W0‖/‖W0‖ at the last step"))
            if fired_steps is None:
                fired_steps = step_range(frames.kind("drift")["step"])
    if not evidence:
        return []
    return [Finding(
        rule="vanishing-gradients", severity=severity, layers=tuple(layers),
        steps=fired_steps, evidence=tuple(evidence),
        explanation=("The back-propagated gradient shrinks by a roughly constant factor per "
                     "layer, so early layers learn orders of magnitude slower than late ones "
                     "(Hochreiter 1991; Glorot & Bengio 2010)."),
        remedies=_vanishing_remedies(frames),
    )]


def exploding_depth(frames: Frames) -> list[Finding]:
    """Activation gradients growing geometrically toward the input (see the module docstring);
    forward activation growth across the same layers is added as evidence."""
    layers, steps, fits = act_grad_profile(frames)
    if not len(fits):
        return []
    slope, agree = float(np.median(fits[:, 0])), float(np.median(fits[:, 1]))
    decades = -slope * (len(layers) - 1)
    if not (decades >= EXPLODE_DECADES and agree >= AGREE
            and -_late(fits, len(layers)) >= EXPLODE_DECADES):
        return []
    evidence = [
        Evidence("act_grad RMS decades gained from last to first hidden layer", decades,
                 EXPLODE_DECADES, ">=", f"fitted over {len(layers)} layers, median over steps"),
        Evidence("act_grad RMS factor per layer toward the input", 10 ** (-slope), 1.0, ">"),
    ]
    acts = frames.wide("act", "rms", layers)
    if not acts.empty:
        a = log10(acts.to_numpy())
        rows = [depth_slope(r)[0] for r in a if np.isfinite(r).all()]
        if rows:
            evidence.append(Evidence("activation RMS factor per layer",
                                     10 ** float(np.median(rows)), note="forward signal"))
    return [Finding(
        rule="exploding-gradients",
        severity="error" if decades >= 2 * EXPLODE_DECADES else "warning",
        layers=tuple(layers),
        steps=step_range(steps[-fits[:, 0] * (len(layers) - 1) >= EXPLODE_DECADES]),
        evidence=tuple(evidence),
        explanation=("Each layer multiplies the back-propagated gradient by a factor above 1, "
                     "so it grows geometrically toward the input (Pascanu et al. 2013; "
                     "Glorot & Bengio 2010)."),
        remedies=(
            *cures.init_model(frames, "a variance-preserving initialisation keeps each "
                              "layer's gain near 1 (Glorot & Bengio 2010; He et al. 2015)"),
            cures.clip_for(frames, "caps the step the exploded gradient takes "
                           "(Pascanu et al. 2013)"),
            cures.norm("batch", "normalisation removes the per-layer gain "
                       "(Ioffe & Szegedy 2015)"),
            cures.lr(0.1, "a smaller step keeps the large gradients from diverging"),
        ),
    )]


__all__ = ["AGREE", "EXPLODE_DECADES", "VANISH_DECADES", "act_grad_profile",
           "exploding_depth", "hidden_chain", "vanishing"]
