r"""The cases with formulas: references for the quadrature and for measurements.

- Deep linear chain with scalar weight ``a`` per layer (``h^l = a h^{l-1}``): the gradient is
  multiplied by ``a`` per layer, so by ``a^L`` over ``L`` layers (``1.5^50 ≈ 6.4e8``,
  ``0.5^50 ≈ 8.9e-16``). Saxe et al. 2014.
- ReLU: ``E_z[relu(√q z)²] = q/2`` and ``E_z[relu'(√q z)²] = 1/2``, so ``χ₁ = σ_w²/2`` and He
  initialisation ``σ_w² = 2`` is critical (He et al. 2015). The pair expectations are the
  arc-cosine kernel of degree 1 and 0 (Cho & Saul 2009).
- tanh: the critical line ``χ₁(q*) = 1`` parametrised by ``q*`` (Poole et al. 2016, Fig. 2;
  Schoenholz et al. 2017): ``σ_w² = 1 / E[φ'(√q* z)²]``, ``σ_b² = q* − σ_w² E[φ(√q* z)²]``,
  closed up to one-dimensional Gaussian integrals and solved for ``q*`` at the given ``σ_b²``.
- Square ``n × n`` random matrix with i.i.d. entries of variance ``v``: its singular values
  follow the quarter-circle law on ``[0, 2√(nv)]`` (Marchenko–Pastur with ratio 1), mean
  ``8/(3π) √(nv)`` — 0.849 for Glorot's normalised initialisation (``v = 1/n`` when square) and
  0.490 for the standard ``U[−1/√n, 1/√n]`` (``v = 1/(3n)``). Glorot & Bengio 2010 report about
  0.8 and 0.5 for the layer Jacobians.
- Product of ``L`` independent ``n × n`` Gaussian matrices of entry variance ``1/n``: the
  ``i``-th log singular value grows like ``L λ_i`` with Lyapunov exponents
  ``λ_i = ½ (ψ((n − i + 1)/2) + ln(2/n))`` (Newman 1986), so the spectrum spreads exponentially
  with depth; orthogonal matrices keep every singular value at 1 (Saxe et al. 2014; Pennington
  et al. 2017).

>>> relu_chi1(2.0), linear_chain_gain(0.5, 3)
(1.0, 0.125)
"""

from __future__ import annotations

import math

import numpy as np
import torch

from gradprobe.errors import ConfigError


def linear_chain_gain(a: float, depth: int) -> float:
    """Gradient factor ``a^L`` through ``depth`` layers of scalar weight ``a`` (variance: square it)."""
    if depth < 0:
        raise ConfigError(f"depth must be >= 0, got {depth}", hint="pass depth=50")
    return float(a) ** int(depth)


def relu_chi1(sigma_w2: float) -> float:
    """``χ₁ = σ_w² / 2`` for ReLU, whatever ``q`` (positive homogeneity)."""
    return float(sigma_w2) / 2.0


def relu_pair_moments(q: float, c: float) -> tuple[float, float]:
    """``(E[relu(u₁) relu(u₂)], E[relu'(u₁) relu'(u₂)])`` for centred Gaussians of variance
    ``q`` and correlation ``c``: ``q/(2π)(√(1−c²) + (π − arccos c) c)`` and
    ``(π − arccos c)/(2π)`` (Cho & Saul 2009)."""
    c = min(1.0, max(-1.0, float(c)))
    theta = math.acos(c)
    return (
        q / (2 * math.pi) * (math.sqrt(1 - c * c) + (math.pi - theta) * c),
        (math.pi - theta) / (2 * math.pi),
    )


def tanh_critical_sigma_w2(sigma_b2: float) -> float:
    """Critical ``σ_w²`` of a tanh network at bias variance ``σ_b²`` (the parametric critical
    line, independent of :func:`gradprobe.theory.meanfield.critical_sigma_w2`'s bisection on
    ``σ_w²``).

    >>> round(tanh_critical_sigma_w2(0.05), 2)
    1.76
    """
    from gradprobe.theory.meanfield import derivative_second_moment, second_moment

    if not math.isfinite(sigma_b2) or sigma_b2 < 0:
        raise ConfigError(f"sigma_b2 must be >= 0, got {sigma_b2}", hint="pass sigma_b2=0.05")
    if sigma_b2 == 0:
        return 1.0

    def curve(q: float) -> tuple[float, float]:
        s2 = 1.0 / derivative_second_moment("tanh", q)
        return s2, q - s2 * second_moment("tanh", q)

    lo, hi = 1e-12, 1.0
    while curve(hi)[1] < sigma_b2:
        hi *= 2.0
        if hi > 1e8:
            raise ConfigError(f"sigma_b2={sigma_b2} is beyond the tanh critical line's range")
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if curve(mid)[1] < sigma_b2:
            lo = mid
        else:
            hi = mid
    return curve(0.5 * (lo + hi))[0]


def quarter_circle_mean_singular_value(n: int, variance: float) -> float:
    """Mean singular value ``8/(3π) √(n v)`` of a large square matrix with entry variance ``v``."""
    return 8.0 / (3.0 * math.pi) * math.sqrt(n * variance)


def gaussian_product_log_singular_values(n: int, depth: int) -> np.ndarray:
    """Expected log singular values ``L λ_i`` (descending) of a product of ``depth`` Gaussian
    ``n × n`` matrices with entry variance ``1/n``; ``λ_i = ½(ψ((n−i+1)/2) + ln(2/n))``."""
    i = torch.arange(1, n + 1, dtype=torch.float64)
    lam = 0.5 * (torch.special.digamma((n - i + 1) / 2) + math.log(2.0 / n))
    return depth * lam.numpy()


__all__ = [
    "gaussian_product_log_singular_values",
    "linear_chain_gain",
    "quarter_circle_mean_singular_value",
    "relu_chi1",
    "relu_pair_moments",
    "tanh_critical_sigma_w2",
]
