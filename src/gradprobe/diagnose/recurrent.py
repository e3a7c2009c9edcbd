"""Vanishing and exploding gradients through time, in recurrent layers (RNN, LSTM, GRU).

Measured quantity (:meth:`gradprobe.Run.time_gradients`, recorded on the histogram schedule):
``g_t = ‖∂L/∂x_t‖``, the norm over the batch and features of the gradient with respect to the
recurrent layer's input at time step ``t``. It carries the gradient back-propagated through
time: ``∂L/∂x_t = W_ihᵀ diag(f'_t) dL/dh_t`` and ``dL/dh_t`` sums the paths from every later
step, each multiplied by one Jacobian ``∂h_{k+1}/∂h_k`` per step it crosses (Bengio et al.
1994; Pascanu et al. 2013). When those Jacobians shrink (or grow) vectors by a steady factor,
``log10 g_t`` falls (rises) linearly with the distance ``d = T − 1 − t`` from the end of the
sequence.

Rate through time
    For each recorded step, ``log10 g_t`` (finite, positive values; at least ``MIN_T`` = 4
    time steps) is fitted by least squares against ``d``: the slope ``r`` is decades per time
    step, ``10^r`` the **per-time-step decay rate**, and ``D = −r·(T_fit − 1)`` the decades lost
    from the last time step to the first. The medians over the recorded steps and over their
    last fifth are used (a collapse that training repaired is not a finding).

Thresholds
    *Vanishing*: ``D ≥ VANISH_DECADES`` (2): the gradient from the start of the sequence is
    100× weaker than from its end, so dependencies across the sequence are learned 100× more
    slowly than local ones. *Exploding*: ``D ≤ −EXPLODE_DECADES`` (2). The trend must be
    *geometric*: the profile is cut into up to 8 consecutive blocks of time steps and at least
    ``AGREE`` (60 %) of the successive block means move the fitted way, and the far half of the
    sequence (large ``d``) alone must show at least half the rate. The second test keeps a
    loss on every time step from looking like explosion: there ``∂L/∂x_t`` sums ``T − t``
    losses and grows like ``sqrt(T − t)``, whose log-slope dies out with ``d``. The loss scale
    (AMP, ``reduction="sum"``), batch size and width multiply every ``g_t`` of a step by one
    factor and cancel in ``r``; the sequence length enters through ``D``, the total, which is
    what decides.

Severity
    ``nn.RNN``: warning, error from twice the threshold. ``nn.LSTM`` and ``nn.GRU``: info;
    their gates can learn to keep the gradient (a forget gate near 1 is an additive path:
    Hochreiter & Schmidhuber 1997), and PyTorch's default initialisation of them decays a few
    decades over 20 steps at the start of every run (measured in tests/test_diagnose_recurrent.py).
    Bidirectional layers and packed sequences are not recorded (see :class:`gradprobe.Probe`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from gradprobe.diagnose import cures
from gradprobe.diagnose.finding import Evidence, Finding, Remedy, Severity
from gradprobe.diagnose.frames import Frames, log10, step_range

VANISH_DECADES = 2.0
EXPLODE_DECADES = 2.0
AGREE = 0.6
MIN_T = 4
BLOCKS = 8
GATED = frozenset({"LSTM", "GRU", "LSTMCell", "GRUCell"})


def fit_profile(grad_norm: np.ndarray) -> tuple[float, float, float, float]:
    """``(rate, decades, agree, far_rate)`` of one profile ``g_t`` in time order: the fitted
    slope of ``log10 g`` against the distance from the end (decades per time step; negative:
    decays into the past), the decades lost from the last time step to the first, the
    fraction of successive block means agreeing with it, and the slope over the far half.
    NaN with fewer than ``MIN_T`` usable time steps."""
    y = log10(grad_norm)
    d = (len(y) - 1 - np.arange(len(y), dtype="float64"))
    ok = np.isfinite(y)
    nan = float("nan")
    if ok.sum() < MIN_T:
        return nan, nan, nan, nan
    d, y = d[ok][::-1], y[ok][::-1]  # increasing distance from the end
    rate = float(np.polyfit(d, y, 1)[0])
    decades = -rate * float(d[-1] - d[0])
    blocks = np.array_split(np.arange(len(d)), min(BLOCKS, len(d)))
    means = np.array([y[b].mean() for b in blocks])
    agree = float(np.mean(np.sign(np.diff(means)) == np.sign(rate)))
    far = d >= np.median(d)
    far_rate = float(np.polyfit(d[far], y[far], 1)[0]) if far.sum() >= MIN_T // 2 + 1 else rate
    return rate, decades, agree, far_rate


def profiles(frames: Frames) -> dict[str, pd.DataFrame]:
    """Per recurrent layer: one row per recorded step with ``rate, decades, agree, far_rate``."""
    t = frames.time
    out: dict[str, pd.DataFrame] = {}
    if t is None or t.empty:
        return out
    for name, group in t.groupby("layer", sort=False):
        recs = []
        for step, prof in group.groupby("step"):
            fit = fit_profile(prof.sort_values("t")["grad_norm"].to_numpy(dtype="float64"))
            if np.isfinite(fit[0]):
                recs.append({"step": int(step), "rate": fit[0], "decades": fit[1],
                             "agree": fit[2], "far_rate": fit[3]})
        if recs:
            out[str(name)] = pd.DataFrame(recs).sort_values("step")
    return out


def _remedies(frames: Frames, name: str, vanishing: bool, gated: bool) -> tuple[Remedy, ...]:
    """Cures aimed at the recurrent layer ``name`` itself (an initialiser for the whole model
    would also need a gain for every feed-forward layer it cannot determine)."""
    orthogonal = cures.init_recurrent([name], "orthogonal recurrent weights keep every singular "
                                      "value of W_hh at 1, so the product over time neither "
                                      "shrinks nor grows (Saxe et al. 2014)")
    identity = Remedy("init_", {"scheme": "identity", "layers": [name]},
                      f'gp.remedies.init_(model, "identity", layers={[name]!r})',
                      "IRNN: W_hh = I, small input weights, zero bias pass the gradient "
                      "unchanged through time (Le et al. 2015)")
    if vanishing:
        out = [orthogonal]
        if not gated:
            out.append(Remedy("setting", {}, "nn.LSTM(...) or nn.GRU(...) instead of nn.RNN",
                              "gated cells carry the gradient along an additive path "
                              "(Hochreiter & Schmidhuber 1997; Cho et al. 2014)"))
            out.append(identity)
        return tuple(out)
    out = [cures.clip_for(frames, "caps the step an exploded gradient takes (Pascanu et al. "
                          "2013)"), orthogonal]
    if not gated:
        out.append(identity)
    out.append(cures.lr(0.1, "a smaller step keeps the large gradients from diverging"))
    return tuple(out)


def through_time(frames: Frames) -> list[Finding]:
    """``vanishing-gradients`` / ``exploding-gradients`` through time, per recurrent layer."""
    findings: list[Finding] = []
    for name, fits in profiles(frames).items():
        decades = float(np.median(fits["decades"]))
        k = max(1, len(fits) // 5)
        late = float(np.median(fits["decades"].to_numpy()[-k:]))
        agree = float(np.median(fits["agree"]))
        rate = float(np.median(fits["rate"]))
        far = float(np.median(fits["far_rate"]))
        geometric = agree >= AGREE and abs(far) >= 0.5 * abs(rate) and far * rate > 0
        vanish = decades >= VANISH_DECADES and late >= VANISH_DECADES and geometric
        explode = decades <= -EXPLODE_DECADES and late <= -EXPLODE_DECADES and geometric
        if not (vanish or explode):
            continue
        typ = str(frames.layer_row(name).get("type", ""))
        gated = typ in GATED
        severity: Severity = "info" if gated else (
            "error" if abs(decades) >= 2 * VANISH_DECADES else "warning")
        fired = fits[fits["decades"] >= VANISH_DECADES] if vanish else \
            fits[fits["decades"] <= -EXPLODE_DECADES]
        word = "lost" if vanish else "gained"
        findings.append(Finding(
            rule="vanishing-gradients" if vanish else "exploding-gradients",
            severity=severity, layers=(name,), steps=step_range(fired["step"]),
            evidence=(
                Evidence("per-time-step decay rate", 10 ** rate, 1.0, "<" if vanish else ">",
                         f"‖∂L/∂x_t‖ of {name} ({typ}) per step into the past, fitted; "
                         "median over recorded steps"),
                Evidence(f"decades {word} from the last time step to the first", abs(decades),
                         VANISH_DECADES if vanish else EXPLODE_DECADES, ">=",
                         f"median over steps; last fifth {abs(late):.3g}"),
                Evidence("time blocks agreeing with the trend", agree, AGREE, ">="),
            ),
            explanation=(
                f"The gradient back-propagated through time in {name} "
                + ("shrinks" if vanish else "grows")
                + " by a roughly constant factor per time step, so the start of each sequence "
                + ("hardly influences learning" if vanish else "dominates the update")
                + " (Bengio et al. 1994; Pascanu et al. 2013)."
                + (" Gated cells can learn to keep it; reported for information." if gated
                   else "")),
            remedies=_remedies(frames, str(name), vanish, gated),
        ))
    return findings


__all__ = ["AGREE", "EXPLODE_DECADES", "VANISH_DECADES", "fit_profile", "profiles",
           "through_time"]
