"""What gradprobe knows about activation functions, in one table.

Every part of gradprobe that needs layer-specific knowledge of a nonlinearity (which outputs count
as *saturated*, which units count as *dead*, the initialisation gain, the elementwise function used
by mean-field theory) reads it from :data:`ACTIVATIONS`, never from ``isinstance`` chains.

Saturation
    A unit is saturated when the local derivative of its activation has fallen below
    ``SATURATION_FRACTION`` (5 %) of the activation's maximum derivative. This is scale-free and
    reads directly off the output ``a``: sigmoid ``σ' = a(1-a) ≤ 0.25`` is saturated for
    ``a(1-a) < 0.0125`` (``a < 0.0127`` or ``a > 0.9873``); tanh ``1-a² ≤ 1`` is saturated for
    ``|a| > 0.9747``. Hard-clipping activations (Hardtanh, ReLU6, Hardsigmoid) are saturated at
    their clip values, where the derivative is exactly 0.

Dead units
    A rectifier unit whose derivative is exactly zero for every example of a batch (ReLU: output
    never positive) receives no gradient that step: Lu et al. 2019, "Dying ReLU and
    Initialization". Leaky variants (Leaky ReLU, PReLU, RReLU, ELU, SELU) have a non-zero
    derivative on the negative side and cannot die; they have no ``inactive`` rule.

Gains
    ``gain`` is the factor by which ``std = gain · sqrt(2 / (fan_in + fan_out))`` (Glorot) or
    ``gain / sqrt(fan_in)`` (He/LeCun) keeps the variance of the signal: 1 for identity and
    sigmoid's linear regime around 0 (but see docs/initialisation.md), 5/3 for tanh, √2 for ReLU,
    √(2 / (1 + α²)) for leaky rectifiers (He et al. 2015), and for SELU the self-normalising
    LeCun-normal initialisation (gain 1 on fan_in, Klambauer et al. 2017) rather than PyTorch's
    3/4.

Example
    >>> import torch
    >>> from gradprobe.activations import spec_for_module
    >>> spec = spec_for_module(torch.nn.Tanh())
    >>> spec.name, round(spec.gain, 4)
    ('tanh', 1.6667)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SATURATION_FRACTION = 0.05
"""A unit is saturated when φ'(x) < SATURATION_FRACTION · max φ'."""

_SIG_BAND = (1.0 - math.sqrt(1.0 - 4.0 * 0.25 * SATURATION_FRACTION)) / 2.0  # a(1-a) = 0.0125
_TANH_BAND = math.sqrt(1.0 - SATURATION_FRACTION)  # 1 - a^2 = 0.05

RRELU_LOWER, RRELU_UPPER = 1.0 / 8.0, 1.0 / 3.0


@dataclass(frozen=True)
class ActivationSpec:
    """One activation function.

    ``fn`` is the elementwise function (evaluation-mode semantics: RReLU uses its mean slope,
    PReLU its default 0.25) used by theory and the lab. ``saturated(a)`` / ``inactive(a)`` take the
    activation's *output* and return a boolean mask, or are ``None`` when the notion does not
    apply.
    """

    name: str
    fn: Callable[[Tensor], Tensor]
    module_types: tuple[type[nn.Module], ...]
    factory: Callable[[], nn.Module]
    gain: float
    recommended_init: str
    saturated: Callable[[Tensor], Tensor] | None = None
    inactive: Callable[[Tensor], Tensor] | None = None
    bounded: bool = False
    kinks: tuple[float, ...] = ()
    """Points where ``fn`` or its derivative is not smooth (ReLU: 0; hardtanh: ±1). Gaussian
    quadrature in :mod:`gradprobe.theory.meanfield` splits its integrals there."""


def _sigmoid_saturated(a: Tensor) -> Tensor:
    return (a < _SIG_BAND) | (a > 1.0 - _SIG_BAND)


def _tanh_saturated(a: Tensor) -> Tensor:
    return a.abs() > _TANH_BAND


def _relu_inactive(a: Tensor) -> Tensor:
    return a <= 0


def _leaky(slope: float) -> float:
    return math.sqrt(2.0 / (1.0 + slope * slope))


def _selu_factory() -> nn.Module:
    return nn.SELU()


ACTIVATIONS: dict[str, ActivationSpec] = {
    s.name: s
    for s in [
        ActivationSpec("identity", lambda x: x, (nn.Identity,), nn.Identity, 1.0, "xavier_normal"),
        ActivationSpec(
            "sigmoid", torch.sigmoid, (nn.Sigmoid,), nn.Sigmoid, 1.0, "xavier_normal",
            saturated=_sigmoid_saturated, bounded=True,
        ),
        ActivationSpec(
            "tanh", torch.tanh, (nn.Tanh,), nn.Tanh, 5.0 / 3.0, "xavier_normal",
            saturated=_tanh_saturated, bounded=True,
        ),
        ActivationSpec(
            "relu", F.relu, (nn.ReLU,), nn.ReLU, math.sqrt(2.0), "he_normal",
            inactive=_relu_inactive, kinks=(0.0,),
        ),
        ActivationSpec(
            "relu6", F.relu6, (nn.ReLU6,), nn.ReLU6, math.sqrt(2.0), "he_normal",
            saturated=lambda a: a >= 6.0, inactive=_relu_inactive, kinks=(0.0, 6.0),
        ),
        ActivationSpec(
            "leaky_relu", lambda x: F.leaky_relu(x, 0.01), (nn.LeakyReLU,),
            lambda: nn.LeakyReLU(0.01), _leaky(0.01), "he_normal", kinks=(0.0,),
        ),
        ActivationSpec(
            "prelu", lambda x: F.leaky_relu(x, 0.25), (nn.PReLU,), nn.PReLU, _leaky(0.25),
            "he_normal", kinks=(0.0,),
        ),
        ActivationSpec(
            "rrelu", lambda x: F.leaky_relu(x, (RRELU_LOWER + RRELU_UPPER) / 2.0), (nn.RReLU,),
            nn.RReLU, _leaky((RRELU_LOWER + RRELU_UPPER) / 2.0), "he_normal", kinks=(0.0,),
        ),
        ActivationSpec(
            "elu", F.elu, (nn.ELU,), nn.ELU, math.sqrt(2.0), "he_normal", kinks=(0.0,)
        ),
        ActivationSpec(
            "selu", F.selu, (nn.SELU,), _selu_factory, 1.0, "lecun_normal", kinks=(0.0,)
        ),
        ActivationSpec("gelu", F.gelu, (nn.GELU,), nn.GELU, math.sqrt(2.0), "he_normal"),
        ActivationSpec("silu", F.silu, (nn.SiLU,), nn.SiLU, math.sqrt(2.0), "he_normal"),
        ActivationSpec(
            "softplus", F.softplus, (nn.Softplus,), nn.Softplus, math.sqrt(2.0), "he_normal"
        ),
        ActivationSpec(
            "hardtanh", F.hardtanh, (nn.Hardtanh,), nn.Hardtanh, 5.0 / 3.0, "xavier_normal",
            saturated=lambda a: a.abs() >= 1.0, bounded=True, kinks=(-1.0, 1.0),
        ),
    ]
}


def spec_for_module(module: nn.Module) -> ActivationSpec | None:
    """The :class:`ActivationSpec` of an activation module, or ``None`` if it is not one.

    Subclasses are matched through their MRO, most specific first (``nn.ReLU6`` subclasses
    ``nn.Hardtanh``), so a user's ``class MyReLU(nn.ReLU)`` is treated as a ReLU.
    """
    for klass in type(module).__mro__:
        for spec in ACTIVATIONS.values():
            if klass in spec.module_types:
                return spec
    return None


def get(name: str) -> ActivationSpec:
    """Look an activation up by name, with a clear error listing the known names."""
    key = name.lower().replace("-", "_")
    if key not in ACTIVATIONS:
        from gradprobe.errors import ConfigError

        raise ConfigError(
            f"unknown activation {name!r}",
            hint="choose one of: " + ", ".join(sorted(ACTIVATIONS)),
        )
    return ACTIVATIONS[key]


__all__ = ["ACTIVATIONS", "SATURATION_FRACTION", "ActivationSpec", "get", "spec_for_module"]
