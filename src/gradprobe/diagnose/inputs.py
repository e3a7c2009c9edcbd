"""Inputs far from normalised, estimated from what the first layer sees.

A freshly initialised affine layer ``y = W x + b`` with i.i.d. zero-mean weights of RMS ``w``
gives ``E[y_j²] = fan_in · w² · E[x²] + b²``, so before the weights have learned anything

    ``ρ = RMS(y) / (RMS(W) · sqrt(fan_in))``

estimates ``sqrt(E[x²])``, the RMS of the layer's input per feature. Every initialiser in use
(Glorot & Bengio 2010; He et al. 2015; LeCun et al. 1998) assumes normalised inputs,
``E[x²] ≈ 1``; the rule fires when ``ρ`` lies outside ``[1/SCALE, SCALE]`` (SCALE = 10: the
first layer's pre-activations are ten times too large, saturating a tanh or blowing up the
first update, or ten times too small), read at the first recorded step (the weights are
recorded after its update: the estimate is skipped when that update moved them by more than
``MOVED`` = 10 % of their norm). The ratio is the
input's own scale relative to the unit the initialisers assume, so it does not depend on the
width, batch size, dtype or loss scale.

Outliers: a few huge inputs dominate the first layer (and blow up the loss; LeCun et al.
1998, §4.3) when the first layer's ``abs_max / RMS`` over a step reaches ``OUTLIER`` (50):
Gaussian pre-activations of a million elements stay below ~5.5 RMS, images and heavy-tailed
features below ~15. The median over the steps is used.

Inputs too small: ``ρ`` cannot see them, because the layer's output is then its bias
(``RMS(y) → RMS(b)``) and the stored statistics pool a layer's weight and bias. The weight
*gradient* sees them: it is proportional to the input. For an affine layer over a batch,
``∂L/∂W = Σ_n δ_n x_nᵀ`` and ``∂L/∂b = Σ_n δ_n`` with ``δ_n = ∂L/∂y_n``; with ``δ`` and ``x``
uncorrelated,

    ``‖∇θ_l‖² ≈ κ_l · ‖δ_l‖² · (fan_in_l · E[x_{l−1}²] + [l has a bias])``

where ``κ_l`` (1 for independent examples, up to the batch size for identical ones) says how
coherent the per-example gradients are. Layer 2's input is recorded (the output of the module
before it), which gives ``κ_2``; the same batch and backward signal one layer apart give
``κ_1 ≈ κ_2``, and then layer 1's equation gives ``E[x²]``, the input's mean square per feature
(``grad``, ``act_grad`` and ``act`` of the first two affine layers, median over the steps).
It fires at ``≤ 1/SCALE``. Measured on the diagnosis suite: 0.66–3 on every healthy and
otherwise pathological run, 0.05 for inputs scaled by 1e-3 (whose ``ρ`` was 0.36).

Outlier batches: the per-step ratio ``RMS(y_t) / RMS(W_t)`` is proportional to the RMS of the
step's inputs while the weights keep their initial scale (within a factor ``GROWN`` = 2). A
batch whose ratio is ``SURGE`` (10) times the run's quiet level (its 10th percentile) carries
inputs ten times larger than the rest: an outlier dominates it (batches of clean data differ
by a few per cent, by the central limit theorem). Two such steps or more are evidence of
outliers; gradient-norm spikes on those very steps (the first layer's weight gradient is
proportional to its input) are reported here, as the inputs' doing, and not as exploding
gradients (:func:`gradprobe.diagnose.outliers.outlier_steps`, which the exploding rule
consults too).

The first layer is the first weight layer in depth order; the estimates need affine layers
with parameters (Linear, ConvNd) whose statistics were recorded; a model that starts with an
embedding or a normaliser has normalised inputs by construction.
"""

from __future__ import annotations

import math

import numpy as np

from gradprobe.diagnose import cures
from gradprobe.diagnose.finding import Evidence, Finding
from gradprobe.diagnose.frames import AFFINE_TYPES, NORMALISER_TYPES, Frames, step_range
from gradprobe.diagnose.growth import SPIKE, gradient_spikes
from gradprobe.diagnose.input_stats import measured_input_scale
from gradprobe.diagnose.outliers import SURGE, input_surges, outlier_steps

SCALE = 10.0
OUTLIER = 50.0
MOVED = 0.1
MIN_GRAD_STEPS = 5


def first_layer(frames: Frames) -> str | None:
    order = [n for n in frames.depth_order()
             if frames.layer_row(n).get("param_shapes")]
    return order[0] if order else None


def input_rms(frames: Frames) -> tuple[str, float] | None:
    """``(layer, ρ)`` at the first recorded step, or None where it cannot be estimated."""
    name = first_layer(frames)
    if name is None:
        return None
    row = frames.layer_row(name)
    if row.get("type") not in AFFINE_TYPES:
        return None
    shape = (row.get("param_shapes") or [[]])[0]
    if len(shape) < 2:
        return None
    fan_in = int(np.prod(shape[1:]))
    act = frames.kind("act")
    act = act[act["layer"] == name]
    w = frames.kind("weight")
    w = w[w["layer"] == name]
    if act.empty or w.empty:
        return None
    a = act.sort_values("step").iloc[0]
    wr = w.sort_values("step").iloc[0]
    drift = frames.kind("drift")
    drift = drift[(drift["layer"] == name) & (drift["step"] == wr["step"])]
    if len(drift) and not float(drift["norm"].iloc[0]) <= MOVED:
        return None  # the first update moved the weights: their RMS no longer describes W0
    if not (math.isfinite(a["rms"]) and math.isfinite(wr["rms"]) and wr["rms"] > 0):
        return None
    return name, float(a["rms"] / (wr["rms"] * math.sqrt(fan_in)))


def _affine(frames: Frames, name: str) -> tuple[int, bool] | None:
    """``(fan_in, has_bias)`` of an affine layer, else None."""
    row = frames.layer_row(name)
    shapes = row.get("param_shapes") or []
    if row.get("type") not in AFFINE_TYPES or not shapes or len(shapes[0]) < 2:
        return None
    return int(np.prod(shapes[0][1:])), len(shapes) > 1


def input_rms_from_gradients(frames: Frames) -> tuple[str, float, int] | None:
    """``(layer, estimated input RMS per feature, steps used)`` from the weight gradients of the
    first two affine layers (module docstring), or None where it cannot be estimated."""
    chain = frames.chain()
    if len(chain) < 2 or chain[0] != first_layer(frames):
        return None
    l1, l2 = chain[0], chain[1]
    a1, a2 = _affine(frames, l1), _affine(frames, l2)
    order = frames.depth_order()
    if a1 is None or a2 is None or order.index(l2) == 0:
        return None
    prev = order[order.index(l2) - 1]
    row = frames.layer_row(prev)
    if prev != l1 and row.get("param_shapes") and row.get("type") not in NORMALISER_TYPES:
        return None  # the module before layer 2 is not known to hand it its input
    g = frames.wide("grad", "norm", [l1, l2])
    d = frames.wide("act_grad", "norm", [l1, l2])
    h = frames.wide("act", "rms", [prev])
    if g.shape[1] < 2 or d.shape[1] < 2 or h.shape[1] < 1:
        return None
    steps = g.index.intersection(d.index).intersection(h.index)
    g, d, h = (t.loc[steps].to_numpy(dtype="float64") for t in (g, d, h))
    (f1, b1), (f2, b2) = a1, a2
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        kappa2 = g[:, 1] ** 2 / (d[:, 1] ** 2 * (f2 * h[:, 0] ** 2 + b2))
        x2 = (g[:, 0] ** 2 / (kappa2 * d[:, 0] ** 2) - b1) / f1
    x2 = x2[np.isfinite(x2)]
    if len(x2) < MIN_GRAD_STEPS:
        return None
    return l1, math.sqrt(max(float(np.median(x2)), 0.0)), len(x2)


def input_scale(frames: Frames) -> list[Finding]:
    measured = measured_input_scale(frames)  # the recorded input (kind "input") first
    if measured is not None:
        return measured
    est = input_rms(frames)
    small = input_rms_from_gradients(frames)
    surges = input_surges(frames)
    hot = outlier_steps(frames)
    if est is None and small is None and not len(hot):
        return []
    name, rho = est if est is not None else (first_layer(frames) or "", 1.0)
    evidence = []
    if small is not None and small[1] <= 1.0 / SCALE and rho < SCALE:
        name = small[0]
        evidence.append(Evidence("input RMS per feature estimated from the weight gradients",
                                 small[1], 1.0 / SCALE, "<=",
                                 f"first two layers' grad / act_grad, median over {small[2]} "
                                 "steps; normalised ≈ 1"))
    if rho >= SCALE or rho <= 1.0 / SCALE:
        evidence.append(Evidence("estimated input RMS per feature", rho,
                                 SCALE if rho >= SCALE else 1.0 / SCALE,
                                 ">=" if rho >= SCALE else "<=",
                                 "RMS(y)/(RMS(W)·sqrt(fan_in)) at the first step; "
                                 "normalised ≈ 1"))
    act = frames.kind("act")
    act = act[(act["layer"] == name) & np.isfinite(act["rms"]) & (act["rms"] > 0)]
    if len(act):
        peak = float(np.median(act["abs_max"] / act["rms"]))
        if peak >= OUTLIER:
            evidence.append(Evidence(f"{name} output abs_max / RMS", peak, OUTLIER, ">=",
                                     "outliers dominate the first layer; median over steps"))
    if len(hot):
        evidence.append(Evidence("a batch's input RMS / the quiet batches'",
                                 float(surges.max()), SURGE, ">=",
                                 f"{len(hot)} of {len(surges)} steps; RMS(y)/RMS(W) of the "
                                 "first layer against its 10th percentile"))
        spikes = gradient_spikes(frames)
        on = spikes[spikes.index.isin(hot)]
        if len(on):
            evidence.append(Evidence("gradient-norm spike on an outlier batch", float(on.max()),
                                     SPIKE, ">=", f"{len(on)} spike(s), each on a batch with "
                                     "outliers: the weight gradient scales with the input"))
    if not evidence:
        return []
    return [Finding(
        rule="input-scale", severity="warning", layers=(name,),
        steps=step_range(act["step"]) if len(act) else None, evidence=tuple(evidence),
        explanation=("The inputs are far from zero mean and unit variance, which every "
                     "initialiser assumes: the first layer's pre-activations and its weight "
                     "gradient scale with them (LeCun et al. 1998, 'Efficient BackProp', §4.3)."),
        remedies=(cures.standardize("standardising inputs (robustly, for outliers) puts the "
                                    "first layer where its initialisation expects"),
                  cures.norm("batch", "normalisation after the first layer absorbs the scale")),
    )]


__all__ = ["OUTLIER", "SCALE", "SURGE", "first_layer", "input_rms", "input_rms_from_gradients",
           "input_scale", "input_surges", "outlier_steps"]
