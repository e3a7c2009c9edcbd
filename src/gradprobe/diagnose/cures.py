"""The remedies findings name, built in one place so every rule spells them the same way.

Each is a :class:`Remedy` whose ``name`` is a function of :mod:`gradprobe.remedies` and whose
``kwargs`` are its keyword arguments: the doctor applies it as
``getattr(gp.remedies, r.name)(target, **r.kwargs)`` (the target, model or optimizer, comes from
``gradprobe.remedies.TARGETS``). ``standardize_inputs_`` has no kwargs: the doctor supplies the
sample inputs ``x``.
"""

from __future__ import annotations

import math

import numpy as np

from gradprobe.diagnose.finding import Remedy
from gradprobe.diagnose.frames import Frames, grad_norm

CLIP_MIN_STEPS = 12
"""Finite gradient norms needed to take the clipping threshold from the run itself."""
CLIP_DEFAULT = 1.0
CLIP_NOISE = 5.0
"""Mini-batch noise moves the gradient norm by a factor of ~2-5 (growth.py): the threshold is
this many times the run's median norm, so only steps beyond the noise are clipped."""


def init(scheme: str, why: str) -> Remedy:
    return Remedy("init_", {"scheme": scheme}, f'gp.remedies.init_(model, "{scheme}")', why)


def swap(to: str, why: str, *, from_: str | None = None) -> Remedy:
    """``swap_activations_`` swaps the saturating activations unless ``from_`` names others
    (a rectifier is never swapped silently: dead ReLUs name ``from_="relu"``)."""
    if from_ is None:
        return Remedy("swap_activations_", {"to": to},
                      f'gp.remedies.swap_activations_(model, "{to}", optimizer=opt)', why)
    return Remedy("swap_activations_", {"to": to, "from_": from_},
                  f'gp.remedies.swap_activations_(model, "{to}", from_="{from_}", '
                  'optimizer=opt)', why)


def norm(kind: str, why: str) -> Remedy:
    return Remedy("add_norm_", {"kind": kind},
                  f'gp.remedies.add_norm_(model, "{kind}", optimizer=opt)', why)


def residual(why: str) -> Remedy:
    return Remedy("residual_", {}, "gp.remedies.residual_(model, optimizer=opt)", why)


def clip(max_norm: float, why: str) -> Remedy:
    return Remedy("clip_gradients_", {"max_norm": max_norm},
                  f"gp.remedies.clip_gradients_(opt, max_norm={max_norm})", why)


def clip_for(frames: Frames, why: str) -> Remedy:
    """Clipping by norm at ``CLIP_NOISE`` (5) times the run's own typical gradient norm, the
    median of the total gradient norm over its finite steps (Pascanu et al. 2013, §3.2: "look
    at statistics on the average norm over a sufficiently large number of updates"; the median
    is that average, robust to the spikes being clipped). Mini-batch noise moves the norm by a
    factor of 2-5, so ordinary steps pass and only the spikes are cut; a threshold at the
    median itself would shorten half the steps (measured: a 20-layer ReLU net under SGD then
    ended at a loss of 0.39 instead of 0.007). The threshold has the loss's own scale (loss
    reduction, batch size, loss scale), where a constant has none. Runs with fewer than
    ``CLIP_MIN_STEPS`` finite norms (they overflowed at once) get ``CLIP_DEFAULT`` (1.0)."""
    g = grad_norm(frames)
    g = g[g > 0]
    if len(g) < CLIP_MIN_STEPS:
        return clip(CLIP_DEFAULT, why + "; the run has too few finite gradient norms to set "
                    "the threshold from, 1.0 is a default")
    value = CLIP_NOISE * float(np.median(g))
    value = float(f"{value:.2g}") if math.isfinite(value) else CLIP_DEFAULT
    return clip(value, why + f"; threshold: {CLIP_NOISE:g}x the run's median gradient norm")


def init_recurrent(layers: list[str], why: str) -> Remedy:
    """Orthogonal recurrent (and input) weights with gain 1 on the named recurrent layers: the
    hidden-to-hidden map then preserves the norm of the back-propagated gradient through time,
    its singular values all 1 (Saxe et al. 2014; Henaff et al. 2016; the identity of Le et al.
    2015 is one such matrix). Gain 1, not the nonlinearity's, which would compound over the
    time steps."""
    return Remedy("init_", {"scheme": "orthogonal", "gain": 1.0, "layers": list(layers)},
                  f'gp.remedies.init_(model, "orthogonal", gain=1.0, layers={list(layers)!r})',
                  why)


def lr(factor: float, why: str) -> Remedy:
    return Remedy("set_lr_", {"factor": factor}, f"gp.remedies.set_lr_(opt, factor={factor})", why)


def standardize(why: str) -> Remedy:
    return Remedy("standardize_inputs_", {}, "gp.remedies.standardize_inputs_(model, x_sample)",
                  why)


def init_for(activations: set[str], why: str) -> Remedy:
    """The variance-preserving initialiser of the model's activations: He for rectifiers
    (He et al. 2015), Glorot for sigmoid, tanh and linear chains (Glorot & Bengio 2010)."""
    rect = {"relu", "relu6", "leaky_relu", "prelu", "rrelu", "elu", "gelu", "silu", "softplus"}
    scheme = "he_normal" if activations & rect else "xavier_uniform"
    return init(scheme, why)


def init_model(frames: Frames, why: str) -> tuple[Remedy, ...]:
    """The initialisation remedies of ``frames``'s model: orthogonal recurrent weights first when
    it has recurrent layers (:func:`init_recurrent`), then :func:`init_for` its activations."""
    rec = frames.recurrent()
    out = (init_recurrent(rec, "norm-preserving recurrent weights keep the gradient's size "
                          "through time (Saxe et al. 2014; Le et al. 2015)"),) if rec else ()
    return (*out, init_for(frames.activations(), why))


__all__ = ["clip", "clip_for", "init", "init_for", "init_model", "init_recurrent", "lr", "norm",
           "residual", "standardize", "swap"]
