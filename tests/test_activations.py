"""The activation table against closed forms and torch's own modules."""

import math

import pytest
import torch
from torch import nn

from gradprobe import activations as A
from gradprobe.errors import ConfigError


def test_saturation_thresholds_follow_derivative_fraction():
    x = torch.linspace(-12, 12, 200_001, dtype=torch.float64)
    for name, deriv in [
        ("sigmoid", lambda a: a * (1 - a) / 0.25),
        ("tanh", lambda a: (1 - a * a) / 1.0),
    ]:
        spec = A.get(name)
        a = spec.fn(x)
        assert spec.saturated is not None
        mask = spec.saturated(a)
        expected = deriv(a) < A.SATURATION_FRACTION
        # Disagreement only within float rounding of the band edge.
        assert (mask != expected).sum().item() <= 2


def test_spec_for_module_uses_mro_most_specific_first():
    class MyReLU(nn.ReLU):
        pass

    assert A.spec_for_module(MyReLU()).name == "relu"
    assert A.spec_for_module(nn.ReLU6()).name == "relu6"  # ReLU6 subclasses Hardtanh
    assert A.spec_for_module(nn.Hardtanh()).name == "hardtanh"
    assert A.spec_for_module(nn.Linear(2, 2)) is None


@pytest.mark.parametrize("name", ["sigmoid", "tanh", "relu", "leaky_relu", "selu", "elu", "gelu"])
def test_fn_matches_module(name):
    spec = A.get(name)
    x = torch.randn(1000, dtype=torch.float64)
    torch.testing.assert_close(spec.fn(x), spec.factory().double()(x))


def test_gains_match_torch_where_torch_is_right():
    assert A.get("tanh").gain == pytest.approx(nn.init.calculate_gain("tanh"))
    assert A.get("relu").gain == pytest.approx(nn.init.calculate_gain("relu"))
    assert A.get("leaky_relu").gain == pytest.approx(nn.init.calculate_gain("leaky_relu", 0.01))
    assert A.get("relu").gain == pytest.approx(math.sqrt(2))


def test_unknown_activation_names_the_choices():
    with pytest.raises(ConfigError, match="unknown activation 'swish2'") as info:
        A.get("swish2")
    assert "tanh" in str(info.value)
