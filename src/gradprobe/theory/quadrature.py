r"""Gaussian expectations ``E_z[f(√q z)]`` and ``E[g(u₁, u₂)]`` for mean-field theory.

Gauss–Hermite (``numpy.polynomial.hermite_e``, 161 nodes) when ``f`` is smooth and ``q ≤ 2``
(error < 1e-12 there); for activations with kinks (ReLU, hardtanh, …, read from
:data:`gradprobe.activations.ACTIVATIONS`) or wider pre-activations, where Gauss–Hermite converges
slowly, a composite Gauss–Legendre rule on ``[-12, 12]`` split at the kinks and at
``u ∈ {0, ±1, ±2, ±4, ±8}``. ``φ'`` is taken by autograd on ``φ`` itself.

Example
    >>> round(gauss_expect(lambda u: u**2, 3.0), 12)
    3.0
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache

import numpy as np
import torch
from numpy.polynomial.hermite_e import hermegauss
from numpy.polynomial.legendre import leggauss

from gradprobe.activations import ActivationSpec
from gradprobe.errors import ConfigError

Z_MAX = 12.0
"""Integration range in standard deviations (Gaussian tail mass beyond: 3.6e-33)."""
GH_DEGREE = 161
GL_DEGREE = 48
PAIR_DEGREE = 20
"""Gauss–Legendre nodes per segment for the two-dimensional (correlation) integrals."""
GH_MAX_Q = 2.0
"""Largest ``q`` (times the activation's unit scale) where plain Gauss–Hermite is used."""
_FEATURES = (-8.0, -4.0, -2.0, -1.0, 0.0, 1.0, 2.0, 4.0, 8.0)


def check_nonneg(name: str, value: float) -> float:
    """``value`` as a float, or :class:`ConfigError` when it is negative or not finite."""
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{name} must be a finite number >= 0, got {value}", hint=f"pass {name}=1.0")
    return value


@lru_cache(maxsize=8)
def _hermite(deg: int) -> tuple[np.ndarray, np.ndarray]:
    x, w = hermegauss(deg)
    return x, w / math.sqrt(2.0 * math.pi)


@lru_cache(maxsize=8)
def _legendre(deg: int) -> tuple[np.ndarray, np.ndarray]:
    return leggauss(deg)


def gaussian_rule(
    kinks: tuple[float, ...],
    shift: np.ndarray | float,
    scale: float,
    *,
    smooth_ok: bool = True,
    degree: int = GL_DEGREE,
) -> tuple[np.ndarray, np.ndarray]:
    """Nodes ``z`` and weights ``w`` with ``Σ w f(shift + scale·z) ≈ E_z f(shift + scale·z)``.

    One row per entry of ``shift``. ``kinks`` are the points (in ``u = shift + scale·z``) where
    ``f`` is not smooth. Plain Gauss–Hermite when there are no kinks, ``smooth_ok`` and
    ``scale² ≤ GH_MAX_Q``; otherwise composite Gauss–Legendre on ``[-Z_MAX, Z_MAX]`` split at the
    kinks and at the feature points ``u ∈ {0, ±1, ±2, ±4, ±8}``.
    """
    shift = np.atleast_1d(np.asarray(shift, dtype=np.float64))
    m = shift.shape[0]
    if not kinks and smooth_ok and scale * scale <= GH_MAX_Q and not np.any(shift):
        x, w = _hermite(GH_DEGREE)
        return np.broadcast_to(x, (m, x.size)), np.broadcast_to(w, (m, w.size))
    scale = max(float(scale), 1e-150)
    points = sorted(set(kinks) | set(_FEATURES))
    edges = [np.full(m, -Z_MAX)]
    edges += [np.clip((p - shift) / scale, -Z_MAX, Z_MAX) for p in points]
    edges.append(np.full(m, Z_MAX))
    xg, wg = _legendre(degree)
    zs, ws = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        half = ((hi - lo) / 2.0)[:, None]
        z = ((hi + lo) / 2.0)[:, None] + half * xg[None, :]
        zs.append(z)
        ws.append(half * wg[None, :] * np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi))
    return np.concatenate(zs, axis=1), np.concatenate(ws, axis=1)


def phi(spec: ActivationSpec, u: np.ndarray) -> np.ndarray:
    """``φ(u)`` in float64."""
    with torch.no_grad():
        return spec.fn(torch.from_numpy(np.array(u, dtype=np.float64))).numpy()


def dphi(spec: ActivationSpec, u: np.ndarray) -> np.ndarray:
    """``φ'(u)`` by autograd on the table's function (float64)."""
    t = torch.from_numpy(np.array(u, dtype=np.float64)).requires_grad_(True)
    with torch.enable_grad():
        y = spec.fn(t)
        (g,) = torch.autograd.grad(y.sum(), t)
    return g.numpy()


def gauss_expect(
    f: Callable[[np.ndarray], np.ndarray], q: float, *, kinks: tuple[float, ...] = ()
) -> float:
    """``E_{z~N(0,1)}[f(√q z)]`` for a vectorised numpy function ``f``.

    >>> round(gauss_expect(lambda u: u**4, 2.0), 10)   # 3 q²
    12.0
    """
    q = check_nonneg("q", q)
    s = math.sqrt(q)
    z, w = gaussian_rule(kinks, 0.0, s)
    return float((w[0] * f(s * z[0])).sum())



def pair_rule(
    spec: ActivationSpec, q: float, c: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``u₁`` (a column, to broadcast), ``u₂, w`` for ``E[g(u₁, u₂)]`` with ``(u₁, u₂)`` centred
    Gaussian, variance ``q``, correlation ``c``: ``u₂ = √q (c z₁ + √(1-c²) z₂)``, nested
    one-dimensional rules."""
    s = math.sqrt(q)
    z1, w1 = gaussian_rule(spec.kinks, 0.0, s, smooth_ok=False, degree=PAIR_DEGREE)
    z1, w1 = z1[0], w1[0]
    u1 = s * z1
    shift = s * c * z1
    scale = s * math.sqrt(max(0.0, 1.0 - c * c))
    z2, w2 = gaussian_rule(spec.kinks, shift, scale, smooth_ok=False, degree=PAIR_DEGREE)
    u2 = shift[:, None] + scale * z2
    return u1[:, None], u2, w1[:, None] * w2


__all__ = ["GH_DEGREE", "GH_MAX_Q", "GL_DEGREE", "PAIR_DEGREE", "Z_MAX", "check_nonneg", "dphi",
           "gauss_expect", "gaussian_rule", "pair_rule", "phi"]
