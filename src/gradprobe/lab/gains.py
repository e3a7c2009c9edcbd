"""The gain study: which gain ``g`` in ``W ~ N(0, g²/n)`` keeps the forward activation variance and
the backward gradient variance constant through a deep stack of square layers.

``a_l = φ(W_l a_(l-1))``, no bias, ``∂L/∂a_L ~ N(0, 1)``, in float64 so that no variance
underflows to 0. In the linear regime ``Var[a_l] = n·Var[W]·φ'(0)²·Var[a_(l-1)]`` (Glorot &
Bengio 2010), so ``g = 1/φ'(0)`` keeps it: 1 for tanh, 4 for sigmoid (the Theano tutorial's
factor, not in the paper); PyTorch's ``calculate_gain('tanh') = 5/3`` aims at the forward fixed
point instead. The layers are written out by hand (no modules), so that any elementwise function
can be studied: :data:`GAIN_FUNCTIONS` adds the centred sigmoid ``σ(x) − ½ = tanh(x/2)/2``, which
isolates the effect of sigmoid's mean ½.

:func:`gain_profile` measures one function at one gain; :func:`gain_study` measures every
function at every gain and returns the table's rows and the per-layer profiles that the
``init`` experiment (:mod:`gradprobe.lab.experiments.init_study`) turns into claims and figures.

Example
    >>> import torch
    >>> from gradprobe.lab import gains
    >>> p = gains.gain_profile(torch.tanh, 1.0, torch.randn(64, 32), 5, torch.Generator().manual_seed(0))
    >>> len(p["fwd_var"]), len(p["bwd_var"])
    (5, 5)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from gradprobe import activations

GAIN_FUNCTIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "tanh": activations.get("tanh").fn,
    "sigmoid": activations.get("sigmoid").fn,
    "sigmoid − ½": lambda x: torch.sigmoid(x) - 0.5,
}
"""Activations of the gain study; ``σ(x) − ½ = tanh(x/2)/2`` isolates the effect of sigmoid's mean."""


def gain_saturated(name: str, a: Tensor) -> float:
    """Saturated fraction by the activation table's rule (σ − ½ is shifted back to σ)."""
    if name == "tanh":
        rule = activations.get("tanh").saturated
    else:
        rule = activations.get("sigmoid").saturated
        a = a + 0.5 if name != "sigmoid" else a
    assert rule is not None
    return float(rule(a).double().mean())


def gain_profile(
    fn: Callable[[Tensor], Tensor], gain: float, x: Tensor, depth: int,
    generator: torch.Generator,
) -> dict[str, Any]:
    """Forward/backward variance per layer of ``a_l = fn(W_l a_(l-1))``, ``W_l ~ N(0, g²/n)``,
    square layers, no bias; ``∂L/∂a_L ~ N(0, 1)``. Written out by hand (no modules) so that any
    elementwise function can be studied."""
    n = x.shape[1]
    h = x.double()
    acts: list[Tensor] = []
    for _ in range(depth):
        w = (torch.randn(n, n, generator=generator, dtype=torch.float64)
             * (gain / math.sqrt(n))).requires_grad_()
        h = fn(h @ w.T)
        h.retain_grad()
        acts.append(h)
    g = torch.randn(h.shape, generator=generator, dtype=torch.float64)
    (h * g).sum().backward()
    return {
        "acts_last": acts[-1].detach(),
        "fwd_var": [float(a.detach().var()) for a in acts],
        "bwd_var": [float(a.grad.var()) for a in acts if a.grad is not None],
        "mean": [float(a.detach().mean()) for a in acts],
    }


def gain_study(
    gains: Sequence[float], *, samples: int, width: int, depth: int, seed: int,
) -> tuple[list[dict[str, Any]], dict[tuple[str, float], dict[str, Any]]]:
    """Every function of :data:`GAIN_FUNCTIONS` at every gain, on ``samples`` N(0, 1) inputs of
    ``width`` through ``depth`` layers (inputs drawn from ``seed``, every profile's weights from
    ``seed + 1``, so the functions and gains are compared on the same draws).

    Returns one row per (function, gain): the first and last layer's forward variance and their
    ratio, the backward ratio ``Var[∂L/∂a_1] / Var[∂L/∂a_L]`` and its per-layer factor
    ``ratio^(1/(L-1))``, the last layer's mean and saturated fraction; and the profiles
    (``fwd_var``, ``bwd_var``, ``mean`` per layer) keyed by ``(function, gain)``.
    """
    x = torch.randn(samples, width, generator=torch.Generator().manual_seed(seed))
    rows, profiles = [], {}
    for fname, fn in GAIN_FUNCTIONS.items():
        for gain in gains:
            p = gain_profile(fn, gain, x, depth, torch.Generator().manual_seed(seed + 1))
            profiles[(fname, gain)] = p
            fwd, bwd = p["fwd_var"], p["bwd_var"]
            ratio_b = bwd[0] / bwd[-1]
            rows.append({
                "activation": fname, "gain": gain,
                "fwd_var_first": fwd[0], "fwd_var_last": fwd[-1], "fwd_ratio": fwd[-1] / fwd[0],
                "bwd_ratio": ratio_b,
                "bwd_factor_per_layer": ratio_b ** (1.0 / (len(bwd) - 1)) if ratio_b > 0 else 0.0,
                "mean_last": p["mean"][-1],
                "saturated_last": gain_saturated(fname, p.pop("acts_last")),
            })
    return rows, profiles


__all__ = ["GAIN_FUNCTIONS", "gain_profile", "gain_saturated", "gain_study"]
