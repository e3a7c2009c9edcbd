r"""Mean-field signal propagation in deep fully connected networks at initialisation.

Conventions (fan-in)
    Layer ``l`` computes ``h^l = W^l x^{l-1} + b^l`` and ``x^l = φ(h^l)``, with ``W^l`` of shape
    ``n_l × n_{l-1}``, i.i.d. entries of second moment ``σ_w² / n_{l-1}`` (so
    ``σ_w² = fan_in · E[W²]``) and biases of second moment ``σ_b²``. ``q^l = E[(h^l_i)²]`` is the
    pre-activation second moment, ``δ^l = ∂L/∂h^l`` the back-propagated gradient, ``z ~ N(0, 1)``.

Forward (Poole et al. 2016, eq. 3)
    ``q^l = σ_w² E_z[φ(√q^{l-1} z)²] + σ_b²`` (the first layer sees the raw input:
    ``q^1 = σ_w² q_in + σ_b²`` with ``q_in`` the input's mean square). Its stable fixed point is
    ``q*``; the correlation ``c`` between two inputs follows the companion map with fixed point
    ``c*``.

Backward (Schoenholz et al. 2017, eq. 14; the gradient-independence assumption)
    ``δ^l_i = φ'(h^l_i) Σ_j W^{l+1}_{ji} δ^{l+1}_j``, hence

    ``E[(δ^l)²] / E[(δ^{l+1})²] = σ_{w,l+1}² · (n_{l+1} / n_l) · E_z[φ'(√q^l z)²]``.

    The width ratio appears because ``σ_w²`` is defined on the fan-in ``n_l`` of ``W^{l+1}``
    while the sum runs over its fan-out ``n_{l+1}``: per weight it is ``n_{l+1} · E[W²] · E[φ'²]``.
    For equal widths at the fixed point this is ``χ₁ = σ_w² E_z[φ'(√q* z)²]``.

Phase and depth scales (Schoenholz et al. 2017, eqs. 6, 9)
    ``χ₁ < 1`` ordered (gradients vanish), ``χ₁ > 1`` chaotic (gradients explode), ``χ₁ = 1``
    critical. ``ξ_q = -1 / ln(∂q^{l+1}/∂q^l |_{q*})``, ``ξ_c = -1 / ln χ_c(c*)`` with
    ``χ_c = σ_w² E[φ'(u₁) φ'(u₂)]``, and the gradient scale ``ξ_∇ = 1 / |ln χ₁|``. Networks deeper
    than about ``6 ξ_c`` did not train in their experiments.

Quadrature
    :mod:`gradprobe.theory.quadrature` (Gauss–Hermite, or Gauss–Legendre split at kinks).

Example
    >>> from gradprobe.theory import meanfield as mf
    >>> round(mf.chi1("relu", 2.0, 0.0), 6)
    1.0
    >>> round(mf.critical_sigma_w2("tanh", 0.05), 2)
    1.76
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from gradprobe import activations
from gradprobe.activations import ActivationSpec
from gradprobe.errors import ConfigError
from gradprobe.theory.quadrature import (
    check_nonneg,
    dphi,
    gauss_expect,
    gaussian_rule,
    pair_rule,
    phi,
)

Phase = Literal["ordered", "critical", "chaotic"]

_Q_INF = 1e12
_Q_ZERO = 1e-14
CRITICAL_TOL = 0.01
"""``|χ₁ - 1| ≤ CRITICAL_TOL`` counts as critical (one percent per layer)."""
DEPTH_FACTOR = 6.0
"""Trainable depth ≈ ``DEPTH_FACTOR · ξ`` (Schoenholz et al. 2017, Fig. 5)."""

ActivationLike = str | ActivationSpec


def resolve(activation: ActivationLike) -> ActivationSpec:
    """An :class:`~gradprobe.activations.ActivationSpec` from a name or a spec."""
    if isinstance(activation, ActivationSpec):
        return activation
    if not isinstance(activation, str):
        raise ConfigError(
            f"activation must be a name or an ActivationSpec, got {type(activation).__name__}",
            hint="e.g. 'tanh'; see gradprobe.activations.ACTIVATIONS",
        )
    return activations.get(activation)


def _clamp_q(q: float) -> float:
    return min(max(q, _Q_ZERO), _Q_INF)


def second_moment(activation: ActivationLike, q: float) -> float:
    """``E_z[φ(√q z)²]``."""
    spec = resolve(activation)
    return gauss_expect(lambda u: phi(spec, u) ** 2, _clamp_q(q), kinks=spec.kinks)


def derivative_second_moment(activation: ActivationLike, q: float) -> float:
    """``E_z[φ'(√q z)²]`` (ReLU: 1/2 for every q > 0; tanh: 1 at q → 0)."""
    spec = resolve(activation)
    return gauss_expect(lambda u: dphi(spec, u) ** 2, _clamp_q(q), kinks=spec.kinks)


def q_map(activation: ActivationLike, q: float, sigma_w2: float, sigma_b2: float) -> float:
    """One step of the variance map ``σ_w² E_z[φ(√q z)²] + σ_b²`` (Poole et al. 2016, eq. 3)."""
    sigma_w2 = check_nonneg("sigma_w2", sigma_w2)
    sigma_b2 = check_nonneg("sigma_b2", sigma_b2)
    return sigma_w2 * second_moment(activation, q) + sigma_b2


def q_trajectory(
    activation: ActivationLike,
    sigma_w2: float,
    sigma_b2: float,
    depth: int,
    *,
    q_in: float = 1.0,
) -> np.ndarray:
    """``q^1 … q^depth`` for a stack of ``depth`` layers fed inputs of mean square ``q_in``.

    ``q^1 = σ_w² q_in + σ_b²`` (the first layer sees the raw input), then the variance map.
    """
    if depth < 1:
        raise ConfigError(f"depth must be >= 1, got {depth}", hint="pass depth=10")
    q_in = check_nonneg("q_in", q_in)
    out = np.empty(depth)
    out[0] = check_nonneg("sigma_w2", sigma_w2) * q_in + check_nonneg("sigma_b2", sigma_b2)
    for i in range(1, depth):
        out[i] = q_map(activation, out[i - 1], sigma_w2, sigma_b2)
    return out


def fixed_point(
    activation: ActivationLike,
    sigma_w2: float,
    sigma_b2: float,
    *,
    q0: float = 1.0,
    tol: float = 1e-11,
    max_iter: int = 500,
) -> float:
    """The fixed point ``q*`` reached by iterating the variance map from ``q0``.

    Returns ``0.0`` when the map contracts to zero (e.g. tanh, no bias, ``σ_w² ≤ 1``) and
    ``inf`` when it grows without bound (e.g. ReLU with ``σ_w² > 2``, or still growing after
    ``max_iter`` steps: ReLU with a bias at ``σ_w² = 2`` grows by ``σ_b²`` per layer). Aitken's
    Δ² extrapolation every third step speeds up the slow convergence near criticality.
    """
    q = check_nonneg("q0", q0)
    history: list[float] = []
    for _ in range(max_iter):
        new = q_map(activation, q, sigma_w2, sigma_b2)
        if new > _Q_INF:
            return math.inf
        if new < _Q_ZERO:
            return 0.0
        if abs(new - q) <= tol * max(new, 1e-12):
            return new
        history.append(new)
        q = new
        if len(history) >= 3:
            a, b, c = history[-3:]
            # Aitken's Δ² only while the iteration converges monotonically (ratio in (0, 1)).
            ratio = (c - b) / (b - a) if b != a else 0.0
            if 0.0 < ratio < 1.0:
                acc = c + (c - b) * ratio / (1.0 - ratio)
                if 0.0 < acc < _Q_INF:
                    q = acc
            history.clear()
    return math.inf if q_map(activation, q, sigma_w2, sigma_b2) > q * (1 + 1e-9) else q


def chi1(
    activation: ActivationLike, sigma_w2: float, sigma_b2: float, *, q: float | None = None
) -> float:
    """``χ₁ = σ_w² E_z[φ'(√q z)²]`` at ``q`` (default: the fixed point ``q*``)."""
    sigma_w2 = check_nonneg("sigma_w2", sigma_w2)
    if q is None:
        q = fixed_point(activation, sigma_w2, sigma_b2)
    return sigma_w2 * derivative_second_moment(activation, q)


def gradient_ratio(
    activation: ActivationLike, q: float, *, sigma_w2_next: float, fan_in_next: int, fan_out_next: int
) -> float:
    """Predicted ``E[(δ^l)²] / E[(δ^{l+1})²]``: ``σ_{w,l+1}² (n_{l+1}/n_l) E_z[φ'(√q^l z)²]``.

    ``q`` is layer ``l``'s pre-activation second moment; the ``_next`` arguments describe
    ``W^{l+1}`` (``fan_in_next = n_l``, ``fan_out_next = n_{l+1}``).
    """
    if fan_in_next < 1 or fan_out_next < 1:
        raise ConfigError(
            f"fan_in_next and fan_out_next must be >= 1, got {fan_in_next}, {fan_out_next}",
            hint="pass the next layer's weight shape",
        )
    return (
        check_nonneg("sigma_w2_next", sigma_w2_next)
        * (fan_out_next / fan_in_next)
        * derivative_second_moment(activation, q)
    )


def c_map(
    activation: ActivationLike, c: float, q: float, sigma_w2: float, sigma_b2: float
) -> float:
    """Correlation map ``(σ_w² E[φ(u₁)φ(u₂)] + σ_b²) / q`` at the fixed point ``q``
    (Poole et al. 2016, eq. 5)."""
    spec = resolve(activation)
    u1, u2, w = pair_rule(spec, q, c)
    return float((sigma_w2 * (w * phi(spec, u1) * phi(spec, u2)).sum() + sigma_b2) / q)


def chi_c(activation: ActivationLike, c: float, q: float, sigma_w2: float) -> float:
    """``χ_c = σ_w² E[φ'(u₁)φ'(u₂)]``, the slope of the correlation map at ``c``."""
    spec = resolve(activation)
    u1, u2, w = pair_rule(spec, q, c)
    return float(sigma_w2 * (w * dphi(spec, u1) * dphi(spec, u2)).sum())


def correlation_fixed_point(
    activation: ActivationLike, q_star: float, sigma_w2: float, sigma_b2: float
) -> float:
    """The stable fixed point ``c* < 1`` of the correlation map in the chaotic phase.

    ``g(c) = c_map(c) - c`` is ``≥ 0`` at ``c = 0`` (``(σ_w² E[φ]² + σ_b²)/q* ≥ 0``) and ``< 0``
    just below ``c = 1`` when ``χ₁ > 1``; bisection on that bracket. Returns 1.0 when there is no
    sign change (ordered or critical).
    """
    spec = resolve(activation)
    lo, hi = 0.0, 1.0 - 1e-7
    if c_map(spec, hi, q_star, sigma_w2, sigma_b2) - hi >= 0:
        return 1.0
    if c_map(spec, lo, q_star, sigma_w2, sigma_b2) - lo < 0:
        lo = -1.0
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if c_map(spec, mid, q_star, sigma_w2, sigma_b2) - mid >= 0:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class MeanField:
    """Mean-field summary of one ``(activation, σ_w², σ_b²)`` stack.

    ``max_depth = DEPTH_FACTOR · ξ``: the depth beyond which Schoenholz et al. (2017) found
    training to fail, with ``ξ = ξ_c`` (order/chaos) or ``ξ_∇`` where ``ξ_c`` is undefined
    (unbounded activations whose ``q*`` diverges). ``inf`` at criticality.
    """

    activation: str
    sigma_w2: float
    sigma_b2: float
    q_star: float
    chi1: float
    c_star: float
    chi_c: float
    xi_q: float
    xi_c: float
    xi_grad: float
    phase: Phase
    max_depth: float


def phase_of(chi: float, *, tol: float = CRITICAL_TOL) -> Phase:
    """``"ordered"`` (χ₁ < 1 − tol), ``"chaotic"`` (χ₁ > 1 + tol) or ``"critical"``."""
    if chi < 1.0 - tol:
        return "ordered"
    if chi > 1.0 + tol:
        return "chaotic"
    return "critical"


def _xi(rate: float) -> float:
    """``1 / |ln rate|`` (``inf`` at rate 1); ``nan`` for a non-positive or infinite rate."""
    if not (rate > 0) or not math.isfinite(rate):
        return math.nan
    log = math.log(rate)
    return math.inf if log == 0 else 1.0 / abs(log)


def analyse(
    activation: ActivationLike,
    sigma_w2: float,
    sigma_b2: float = 0.0,
    *,
    q0: float = 1.0,
    tol: float = CRITICAL_TOL,
) -> MeanField:
    """Fixed points, ``χ₁``, ``χ_c``, depth scales, phase and trainable depth.

    >>> m = analyse("tanh", 1.0, 0.05)
    >>> m.phase, round(m.chi1, 2)
    ('ordered', 0.76)
    """
    spec = resolve(activation)
    sigma_w2 = check_nonneg("sigma_w2", sigma_w2)
    sigma_b2 = check_nonneg("sigma_b2", sigma_b2)
    q_star = fixed_point(spec, sigma_w2, sigma_b2, q0=q0)
    q_eval = _clamp_q(q_star)
    c1 = chi1(spec, sigma_w2, sigma_b2, q=q_eval)
    xi_grad = math.inf if c1 == 1.0 else 1.0 / abs(math.log(c1)) if c1 > 0 else 0.0
    if math.isfinite(q_star):
        h = 1e-4 * max(q_star, 1e-4)
        lo = max(q_star - h, 0.0)
        slope = (q_map(spec, q_star + h, sigma_w2, sigma_b2) - q_map(spec, lo, sigma_w2, sigma_b2)) / (
            q_star + h - lo
        )
        xi_q = _xi(abs(slope))
    else:
        xi_q = math.nan
    if not math.isfinite(q_star) or q_star <= _Q_ZERO or c1 <= 1.0 + 1e-9:
        # Ordered phase (or a degenerate q*): c* = 1 and χ_c(1) = χ₁.
        c_star, cc = 1.0, c1
    else:
        c_star = correlation_fixed_point(spec, q_star, sigma_w2, sigma_b2)
        cc = chi_c(spec, c_star, q_star, sigma_w2)
    xi_c = _xi(cc) if cc < 1.0 else math.nan
    ph = phase_of(c1, tol=tol)
    if ph == "critical":
        max_depth = math.inf
    elif math.isfinite(xi_c):
        max_depth = DEPTH_FACTOR * xi_c
    else:
        max_depth = DEPTH_FACTOR * xi_grad
    return MeanField(
        spec.name, sigma_w2, sigma_b2, q_star, c1, c_star, cc, xi_q, xi_c, xi_grad, ph, max_depth
    )


def critical_sigma_w2(
    activation: ActivationLike, sigma_b2: float = 0.0, *, lo: float = 1e-3, hi: float = 1e4
) -> float:
    """The ``σ_w²`` at which ``χ₁(q*) = 1`` for this activation and ``σ_b²`` (bisection).

    Raises :class:`ConfigError` when ``χ₁ - 1`` does not change sign on ``[lo, hi]`` (no
    order-to-chaos transition there).

    >>> round(critical_sigma_w2("relu"), 4)
    2.0
    """
    spec = resolve(activation)
    sigma_b2 = check_nonneg("sigma_b2", sigma_b2)

    def f(s2: float) -> float:
        return chi1(spec, s2, sigma_b2, q=_clamp_q(fixed_point(spec, s2, sigma_b2))) - 1.0

    # Bracket from a narrow start (most activations are critical near σ_w² ≈ 1..3), widening
    # geometrically to [lo, hi]; then the Illinois variant of regula falsi in ln σ_w².
    a, b = max(lo, 0.5), min(hi, 8.0)
    f_a, f_b = f(a), f(b)
    while f_a * f_b > 0 and (a > lo or b < hi):
        if f_a > 0 and a > lo:
            a, b, f_b = max(lo, a / 8.0), a, f_a
            f_a = f(a)
        elif f_b < 0 and b < hi:
            a, b, f_a = b, min(hi, b * 8.0), f_b
            f_b = f(b)
        else:
            break
    if f_a * f_b > 0:
        raise ConfigError(
            f"{spec.name} with sigma_b2={sigma_b2} has no critical sigma_w2 in [{lo}, {hi}]",
            hint="use the activation's recommended initialiser instead",
        )
    if f_a == 0:
        return a
    if f_b == 0:
        return b
    ta, tb = math.log(a), math.log(b)
    side = 0
    for _ in range(100):
        t = (ta * f_b - tb * f_a) / (f_b - f_a)
        f_t = f(math.exp(t))
        if f_t == 0 or abs(tb - ta) < 1e-12:
            return math.exp(t)
        if (f_t < 0) == (f_a < 0):
            ta, f_a = t, f_t
            if side == -1:
                f_b /= 2.0
            side = -1
        else:
            tb, f_b = t, f_t
            if side == 1:
                f_a /= 2.0
            side = 1
        if abs(f_t) < 1e-12:
            return math.exp(t)
    return math.exp(0.5 * (ta + tb))


__all__ = [
    "CRITICAL_TOL",
    "DEPTH_FACTOR",
    "MeanField",
    "Phase",
    "analyse",
    "c_map",
    "chi1",
    "chi_c",
    "correlation_fixed_point",
    "critical_sigma_w2",
    "derivative_second_moment",
    "dphi",
    "fixed_point",
    "gauss_expect",
    "gaussian_rule",
    "gradient_ratio",
    "phase_of",
    "phi",
    "q_map",
    "q_trajectory",
    "resolve",
    "second_moment",
]
