"""Theory of gradient propagation at initialisation, and the preflight check built on it.

- :mod:`~gradprobe.theory.meanfield`: variance and correlation maps, ``q*``, ``χ₁``, depth
  scales, phase, per-layer predicted gradient ratios, critical ``σ_w²`` (Poole et al. 2016;
  Schoenholz et al. 2017).
- :mod:`~gradprobe.theory.closed_form`: the cases with formulas (linear chains, ReLU, random
  matrix singular-value laws), used as references.
- :mod:`~gradprobe.theory.jacobian`: input-output Jacobian singular values of an actual model by
  Jacobian-vector products and Lanczos bidiagonalisation (Pennington et al. 2017; Saxe et al.
  2014).
- :mod:`~gradprobe.theory.curvature`: the loss's Gauss–Newton sharpness and the largest stable
  SGD step ``2(1+β)/λ_max`` (Polyak 1964; Lee et al. 2019).
- :mod:`~gradprobe.theory.preflight`: ``preflight(model, inputs)``, theory against measurement.

>>> from gradprobe import theory
>>> round(theory.chi1("relu", 3.0, 0.0), 6)
1.5
"""

from __future__ import annotations

from gradprobe.theory.curvature import sharpness, step_limit, step_status
from gradprobe.theory.jacobian import (
    JacobianSpectrum,
    block_spectra,
    jacobian_spectrum,
    largest_singular_value,
)
from gradprobe.theory.meanfield import (
    MeanField,
    analyse,
    chi1,
    critical_sigma_w2,
    fixed_point,
    gradient_ratio,
    q_map,
    q_trajectory,
)
from gradprobe.theory.preflight import Fix, LayerCheck, PreflightReport, preflight

__all__ = [
    "Fix",
    "JacobianSpectrum",
    "LayerCheck",
    "MeanField",
    "PreflightReport",
    "analyse",
    "block_spectra",
    "chi1",
    "critical_sigma_w2",
    "fixed_point",
    "gradient_ratio",
    "jacobian_spectrum",
    "largest_singular_value",
    "preflight",
    "q_map",
    "q_trajectory",
    "sharpness",
    "step_limit",
    "step_status",
]
