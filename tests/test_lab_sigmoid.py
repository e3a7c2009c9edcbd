"""sigmoid-bound: per-layer factors obey max φ', and the measured attenuation matches autograd."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import gradprobe as gp
from gradprobe.errors import ConfigError
from gradprobe.lab import train
from gradprobe.lab.experiments import sigmoid_bound

SMALL = {"depth": 6, "width": 32, "batch": 128}


@pytest.fixture(scope="module")
def result():
    return gp.lab.run("sigmoid-bound", **SMALL, seed=1)


def test_claims_hold_at_small_size(result):
    for claim in result.claims:
        assert claim.holds, claim
    layers = result.tables["layers"]
    sig = layers[layers.activation == "sigmoid"]
    assert (sig["activation_factor"] <= 0.25).all() and (sig["activation_factor"] > 0.15).all()
    main = result.table.set_index("activation")
    assert main.loc["sigmoid", "product of factors"] <= 0.25 ** 6
    assert main.loc["sigmoid", "input/top gradient"] < main.loc["tanh", "input/top gradient"]
    assert main.loc["sigmoid", "input/top gradient"] < main.loc["relu", "input/top gradient"]


def test_relu_factor_is_root_of_active_fraction(result):
    """For ReLU, ‖∂ℓ/∂z‖/‖∂ℓ/∂a‖ ≈ √(active fraction) ≈ 1/√2 at a symmetric initialisation."""
    relu = result.tables["layers"].query("activation == 'relu'")
    assert np.all(np.abs(relu["activation_factor"] - math.sqrt(0.5)) < 0.12)
    assert np.all(np.abs(relu["saturated_frac"] - 0.5) < 0.1)  # inactive (dead at this batch) units


@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu"])
def test_input_attenuation_matches_a_direct_autograd_computation(result, activation):
    """Recompute ‖∂ℓ/∂x‖ / ‖∂ℓ/∂a_L‖ with torch.autograd.grad on the same network and input."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(SMALL["batch"], SMALL["width"], generator=gen, dtype=torch.float64,
                    requires_grad=True)
    with train.seeded(1):
        model = sigmoid_bound.network(SMALL["depth"], SMALL["width"], activation)
    (gx,) = torch.autograd.grad(model(x).sum(), x)
    # ℓ = Σ ŷ and ŷ = a_L W_outᵀ + b: every example's ∂ℓ/∂a_L is the read-out row W_out
    w_out = model[-1].weight.detach()
    top = math.sqrt(SMALL["batch"]) * float(w_out.norm())
    expected = float(gx.norm()) / top
    table = result.table.set_index("activation")
    assert table.loc[activation, "input/top gradient"] == pytest.approx(expected, rel=1e-10)


def test_deterministic(result):
    again = gp.lab.run("sigmoid-bound", **SMALL, seed=1)
    assert again.tables["layers"].equals(result.tables["layers"])


def test_figure_is_drawn(tmp_path):
    result = gp.lab.run("sigmoid-bound", depth=3, width=8, batch=16)
    gp.lab.write(result, tmp_path, formats=("png",))
    assert (tmp_path / "sigmoid_bound.png").stat().st_size > 10_000


@pytest.mark.parametrize(
    "options, match",
    [({"activations": ("sigmoid", "gelu")}, "gelu"), ({"depth": 0}, "depth=0"),
     ({"activations": ()}, "activations")],
)
def test_bad_configs(options, match):
    with pytest.raises(ConfigError, match=match) as err:
        gp.lab.run("sigmoid-bound", **options)
    assert err.value.hint
