"""Units that stop learning: dead rectifiers, saturated sigmoid/tanh units, symmetric units.

Dead ReLU units (Lu et al. 2019, "Dying ReLU and Initialization")
    The Probe counts a unit dead in a step when the activation's ``inactive`` rule (ReLU:
    output ≤ 0) holds for all its elements in the step. A dead unit passes no gradient and its
    incoming weights never change again, so it stays dead. The rule takes, per activation
    layer, the *minimum* over the last third of the steps of ``dead_frac`` (a permanently dead
    unit is dead in every step; a sparse but living unit is not, so the minimum discounts it)
    and fires at ``DEAD`` (half the layer's units; error at 90 %). A unit looks dead by chance
    in a step with probability ``p^m`` (``p`` its inactive probability, ``m`` its elements per
    step = batch × positions): the rule needs ``m ≥ MIN_SAMPLES`` (16), where a healthy unit
    (``p ≈ 1/2``) looks dead with probability ``1.5e-5``. AutoTrainer counts zero *gradients*
    (≥ 70 %), which confuses a sparse gradient with a dead unit and depends on the batch size.

Saturation (Glorot & Bengio 2010, §3; LeCun et al. 1998, "Efficient BackProp")
    A unit is saturated when its derivative is below 5 % of the activation's maximum (the table
    in :mod:`gradprobe.activations`: sigmoid ``a(1−a) < 0.0125``, tanh ``|a| > 0.9747``); it
    then passes less than 1/20 of the gradient. The rule fires when the median over the second
    half of the run of a layer's ``saturated_frac`` reaches ``SATURATED`` (half its outputs;
    error at 90 %). The fraction is a property of the activation's derivative, not of the
    value scale, so it holds across widths, batch sizes and dtypes. Activations after the last
    weight layer (an output sigmoid whose confident predictions saturate by design) are left
    out. DeepDiagnosis's ``|x| ≥ 5`` on pre-activations is the same test at a fixed 0.7 %
    (sigmoid) derivative.

Symmetry (zero or constant initialisation; Goodfellow et al. 2016, §8.4)
    Units of layer ``l`` receive identical gradients, and so stay identical forever, when the
    rows of ``W_l`` are equal (a constant initialisation) and the columns of ``W_{l+1}`` are
    equal too. A random initialisation has zero mean, so its ``std/rms ≈ 1`` and almost no
    exact zeros; a layer counts as *constant* when ``std/rms ≤ CONSTANT`` (0.3, which needs
    ``|mean| ≥ 0.95·rms``) or all its entries are zero, at the first recorded step (weights and
    biases share the statistics). Exact zeros alone do not count: a scaled identity
    ``W = a·I`` is mostly zeros and its units differ. The rule
    fires for two consecutive weight layers that are both constant. Normalisers (γ = 1, β = 0
    by design) and a single zero-initialised output or residual layer (a good practice) do
    not fire. Note: a dedicated per-unit statistic (the spread *across units* of each unit's
    mean activation or weight row) would show symmetry after training has begun and for
    constant rows with random biases; the stored statistics mix units and examples.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from gradprobe.diagnose import cures
from gradprobe.diagnose.finding import Evidence, Finding, Remedy
from gradprobe.diagnose.frames import NORMALISER_TYPES, Frames, step_range, tail

DEAD = 0.5
MIN_SAMPLES = 16
SATURATED = 0.5
CONSTANT = 0.3
HEAVY = 0.9


def _act_layers_before_output(frames: Frames) -> list[str]:
    chain = frames.chain()
    order = frames.depth_order()
    if not chain:
        return order
    last = order.index(chain[-1])
    return order[:last]


@dataclass(frozen=True)
class _FractionRule:
    """A rule that fires on activation layers where a per-step fraction of units stays high:
    ``column`` summarised over the tail of the run by ``summary`` reaches ``threshold``
    (error from ``HEAVY``)."""

    rule: str
    column: str
    threshold: float
    summary: Callable[[pd.Series], float]
    evidence: str
    """The evidence's name, formatted with the layer: ``"dead units in {layer}"``."""
    how: str
    """How the value is summarised, for the evidence."""
    explanation: str
    remedies: Callable[[set[str]], tuple[Remedy, ...]]
    """The remedies, given the model's activations."""


DEAD_RULE = _FractionRule(
    "dead-relu", "dead_frac", DEAD, lambda f: float(np.min(tail(f))), "dead units in {layer}",
    "minimum over the last third of the steps",
    explanation=("Rectifier units whose input stays negative output 0 and pass no gradient, "
                 "so their weights never recover: the dying ReLU (Lu et al. 2019), "
                 "usually from a large learning rate or a negative bias."),
    remedies=lambda acts: (
        cures.swap("leaky_relu", "a negative slope keeps a gradient on every unit "
                   "(Maas et al. 2013)", from_="relu"),
        cures.init_for(acts | {"relu"}, "He initialisation with zero bias starts half of "
                       "each unit's inputs active (He et al. 2015)"),
        cures.lr(0.1, "large steps push biases far negative and kill units"),
    ),
)
SATURATED_RULE = _FractionRule(
    "saturation", "saturated_frac", SATURATED, lambda f: float(np.median(tail(f, 0.5))),
    "saturated outputs of {layer}", "derivative < 5 % of its maximum; median, second half",
    explanation=("Most outputs of a bounded activation sit on its flat tails, where the "
                 "derivative is near 0 and the gradient stops (Glorot & Bengio 2010; "
                 "LeCun et al. 1998): pre-activations are too large."),
    remedies=lambda acts: (
        cures.init_for(acts - {"relu"}, "a variance-preserving scale keeps "
                       "pre-activations in the linear regime (Glorot & Bengio 2010)"),
        cures.norm("batch", "normalising pre-activations keeps them near 0 "
                   "(Ioffe & Szegedy 2015)"),
        cures.swap("relu", "rectifiers do not saturate for positive inputs"),
    ),
)


def _enough_samples(group: pd.DataFrame) -> bool:
    """Whether a layer's steps hold at least ``MIN_SAMPLES`` elements per unit (median), so
    that a living unit does not look dead by chance; a layer without unit counts passes."""
    if "units" in group and group["units"].notna().all():
        m = float((group["count"] / group["units"].clip(lower=1)).median())
        return not m < MIN_SAMPLES  # a NaN median (counts unknown) is still judged
    return True


def _high_fraction(frames: Frames, rule: _FractionRule, *, layers: set[str] | None = None,
                   enough: Callable[[pd.DataFrame], bool] = lambda g: True) -> list[Finding]:
    """``rule`` over the activation layers (of ``layers``, default all): one finding naming
    every layer where it fires, or none. Layers ``enough`` refuses are not judged."""
    rows = frames.kind("act")
    if rows.empty or rule.column not in rows:
        return []
    keep = rows[rule.column].notna()
    if layers is not None:
        keep &= rows["layer"].isin(layers)
    found, worst, steps, evidence = [], 0.0, [], []
    for name, group in rows[keep].groupby("layer", sort=False):
        group = group.sort_values("step")
        if not enough(group):
            continue
        frac = rule.summary(group[rule.column])
        if frac >= rule.threshold:
            found.append(str(name))
            worst = max(worst, frac)
            steps += list(group["step"])
            evidence.append(Evidence(rule.evidence.format(layer=name), frac, rule.threshold, ">=",
                                     rule.how))
    if not found:
        return []
    return [Finding(
        rule=rule.rule, severity="error" if worst >= HEAVY else "warning",
        layers=tuple(found), steps=step_range(steps), evidence=tuple(evidence),
        explanation=rule.explanation, remedies=rule.remedies(frames.activations()),
    )]


def dead_relu(frames: Frames) -> list[Finding]:
    """Activation layers where most units are dead (``DEAD``) over the last third of the run."""
    return _high_fraction(frames, DEAD_RULE, enough=_enough_samples)


def saturation(frames: Frames) -> list[Finding]:
    """Activation layers before the output where most outputs saturate (``SATURATED``) over
    the second half of the run."""
    return _high_fraction(frames, SATURATED_RULE, layers=set(_act_layers_before_output(frames)))


def _constant(row: dict) -> tuple[bool, float, float]:
    rms, std, zero = (float(row.get(k, np.nan)) for k in ("rms", "std", "zero_frac"))
    if not (np.isfinite(rms) and np.isfinite(std)):
        return False, float("nan"), zero
    ratio = std / rms if rms > 0 else 0.0
    return (rms == 0 or ratio <= CONSTANT), ratio, zero


def symmetry(frames: Frames) -> list[Finding]:
    rows = frames.kind("weight")
    chain = [n for n in frames.chain()
             if frames.layer_row(n).get("type") not in NORMALISER_TYPES]
    if rows.empty or len(chain) < 2:
        return []
    first = rows[rows["step"] == rows["step"].min()].set_index("layer")
    flags = {}
    for name in chain:
        if name in first.index:
            flags[name] = _constant(first.loc[name].to_dict())
    layers, evidence = [], []
    for a, b in zip(chain[:-1], chain[1:]):
        shapes = frames.layer_row(a).get("param_shapes") or [[1]]
        units = int(shapes[0][0]) if shapes and shapes[0] else 1
        if a in flags and b in flags and flags[a][0] and flags[b][0] and units > 1:
            layers.append(a)
            evidence.append(Evidence(f"weight std/rms of {a}", flags[a][1], CONSTANT, "<=",
                                     f"zero fraction {flags[a][2]:.2f}; next layer {b} "
                                     f"std/rms {flags[b][1]:.2f}, first recorded step"))
    if not layers:
        return []
    acts = frames.activations()
    return [Finding(
        rule="symmetry", severity="error", layers=tuple(layers),
        steps=step_range(rows["step"]), evidence=tuple(evidence),
        explanation=("The layer and the next one start from constant (or zero) weights, so "
                     "every unit computes the same function and receives the same gradient: "
                     "the units never become different (Goodfellow et al. 2016, §8.4)."),
        remedies=(
            cures.init_for(acts, "random initialisation breaks the symmetry between units "
                           "(Glorot & Bengio 2010; He et al. 2015)"),
        ),
    )]


__all__ = ["CONSTANT", "DEAD", "MIN_SAMPLES", "SATURATED", "dead_relu", "saturation",
           "symmetry"]
