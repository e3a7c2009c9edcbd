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

The first layer is the first weight layer in depth order; the estimate needs an affine layer
with parameters (Linear, ConvNd) whose weight and activation statistics were recorded; a model
that starts with an embedding or a normaliser has normalised inputs by construction.
"""

from __future__ import annotations

import math

import numpy as np

from gradprobe.diagnose import cures
from gradprobe.diagnose.finding import Evidence, Finding
from gradprobe.diagnose.frames import AFFINE_TYPES, Frames, step_range
from gradprobe.diagnose.input_stats import measured_input_scale

SCALE = 10.0
OUTLIER = 50.0
MOVED = 0.1


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


def input_scale(frames: Frames) -> list[Finding]:
    measured = measured_input_scale(frames)  # the recorded input (kind "input") first
    if measured is not None:
        return measured
    est = input_rms(frames)
    if est is None:
        return []
    name, rho = est
    evidence = []
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


__all__ = ["OUTLIER", "SCALE", "input_rms", "input_scale"]
