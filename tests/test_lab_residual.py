"""residual: plain vs residual MLPs, gradient depth profile at initialisation and training."""

import numpy as np
import pytest
import torch

from gradprobe.errors import ConfigError
from gradprobe.lab import train
from gradprobe.lab.experiments import residual as Rs
from gradprobe.remedies.residual import Residual

SMALL = Rs.ResidualConfig(depths=(3, 30), steps=150)


@pytest.fixture(scope="module")
def result():
    with train.threads(1):
        return Rs.run(SMALL)


def test_claims_at_small_size(result):
    for claim in result.claims:
        assert claim.holds, (claim.text, claim.evidence)


def test_shallow_networks_fail_the_depth_claims():
    # at depth 3 the plain gradient has not vanished and the residual signal has not grown
    with train.threads(1):
        r = Rs.run(Rs.ResidualConfig(depths=(3,), steps=5))
    assert not r.claim("at initialisation the plain").holds
    assert not r.claim("the price").holds
    assert not r.claim("in training").holds


def test_residual_model_is_x_plus_f_of_x():
    plain = Rs.build(4, 64, False, 0)
    res = Rs.build(4, 64, True, 0)
    blocks = [m for m in res if isinstance(m, Residual)]
    assert len(blocks) == 4  # fc1 is square too at width 64
    x = torch.randn(5, 64)
    h = x
    for lin in [m for m in plain if isinstance(m, torch.nn.Linear)][:-1]:
        h = h + torch.relu(lin(h))  # same weights: build is seeded
    torch.testing.assert_close(res(x), [m for m in plain][-1](h))


def test_scaled_residual_is_x_plus_f_of_x_over_sqrt_depth():
    # ReLU is positively homogeneous: scaling the branch's Linear by 1/√L scales f by 1/√L
    plain = Rs.build(4, 64, False, 0)
    scaled = Rs.build(4, 64, True, 0, scaled=True)
    x = torch.randn(5, 64)
    h = x
    for lin in [m for m in plain if isinstance(m, torch.nn.Linear)][:-1]:
        h = h + torch.relu(lin(h)) / 2  # 1/√4
    torch.testing.assert_close(scaled(x), [m for m in plain][-1](h))


def test_profile_matches_autograd_on_weights(result):
    # ‖∂L/∂a_L‖ of the last hidden layer equals what autograd gives through the read-out
    xtr, ytr, _, _ = Rs.standardized_digits(0)
    model = Rs.build(3, 64, False, 0)
    grads, _ = Rs.gradient_profile(model, xtr[:256], ytr[:256])
    np.testing.assert_allclose(grads, result.data["profiles"][(3, "plain")], rtol=1e-6)
    a = torch.relu(model[4](torch.relu(model[2](torch.relu(model[0](xtr[:256]))))))
    a = a.detach().requires_grad_()
    torch.nn.functional.cross_entropy(model[6](a), ytr[:256]).backward()
    assert grads[-1] == pytest.approx(float(a.grad.norm()), rel=1e-5)


def test_bad_config():
    with pytest.raises(ConfigError, match="depths"):
        Rs.ResidualConfig(depths=(1,)).validate()


def test_figures(result):
    figs = Rs.plot(result)
    assert set(figs) == {"gradient_profile", "training"}
    ax = figs["gradient_profile"].axes[0]
    assert ax.get_yscale() == "log" and ax.get_title() and ax.get_xlabel()
