"""Jacobian spectra by Lanczos against materialised Jacobians and random-matrix laws."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from gradprobe.errors import ConfigError, UnsupportedModelError
from gradprobe.lab import train
from gradprobe.lab.zoo import linear_chain, mlp
from gradprobe.theory import closed_form as cf
from gradprobe.theory.jacobian import (
    block_spectra,
    jacobian_spectrum,
    largest_singular_value,
)

# torch.func's first use imports torch.jit helpers that warn about their own deprecation.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


@pytest.fixture(autouse=True)
def _one_thread():
    # Small problems: one thread avoids oversubscribing a shared CPU.
    with train.threads(1):
        yield


def _reference_svd(model, x):
    jac = torch.func.jacrev(lambda v: model(v.reshape(x.shape)).reshape(-1))(x.reshape(-1))
    return torch.linalg.svdvals(jac.detach().double()).numpy()


def test_full_lanczos_matches_materialised_jacobian_and_singular_values_of_a_layer():
    torch.manual_seed(4)
    lin = nn.Linear(40, 30, bias=False)
    spec = jacobian_spectrum(lin, torch.randn(1, 40), k=30)
    ref = torch.linalg.svdvals(lin.weight.detach().double()).numpy()
    np.testing.assert_allclose(spec.singular_values, ref, rtol=1e-5)
    torch.manual_seed(1)
    net = mlp([12, 20, 20, 7], "tanh").double()
    x = torch.randn(1, 12, dtype=torch.float64)
    spec = jacobian_spectrum(net, x, k=7)
    assert spec.exact and spec.n_in == 12 and spec.n_out == 7
    np.testing.assert_allclose(spec.singular_values, _reference_svd(net, x), rtol=1e-10)


def test_partial_lanczos_gets_the_top_and_bounds_the_bottom():
    torch.manual_seed(2)
    net = mlp([60, 80, 60], "tanh").double()
    x = torch.randn(1, 60, dtype=torch.float64)
    ref = _reference_svd(net, x)
    spec = jacobian_spectrum(net, x, k=30)
    assert not spec.exact
    assert spec.largest == pytest.approx(ref[0], rel=1e-8)
    assert spec.smallest >= ref[-1] - 1e-12  # Ritz values interlace: an upper bound
    assert largest_singular_value(net, x, iters=200) == pytest.approx(ref[0], rel=1e-4)


def test_orthogonal_linear_chain_keeps_every_singular_value_at_one():
    net = linear_chain(100, 50, "orthogonal")
    spec = jacobian_spectrum(net, torch.randn(1, 100), k=100)
    assert spec.exact and len(spec.singular_values) == 100
    assert np.max(np.abs(spec.singular_values - 1)) < 1e-5
    assert spec.spread < 1 + 2e-5


def test_gaussian_linear_chain_spectrum_collapses_as_lyapunov_exponents_predict():
    net32 = linear_chain(100, 50, "gaussian")
    assert jacobian_spectrum(net32, torch.randn(1, 100), k=100).median < 1e-4
    # In float64 the median is resolved: compare with exp(L λ_median) (Newman 1986), whose
    # finite-depth fluctuation is O(√L) in the log; allow a factor e^{±4}.
    net64 = linear_chain(100, 50, "gaussian", dtype=torch.float64)
    med = jacobian_spectrum(net64, torch.randn(1, 100, dtype=torch.float64), k=100).median
    predicted = np.median(cf.gaussian_product_log_singular_values(100, 50))
    assert abs(math.log(med) - predicted) < 4.0


@pytest.mark.parametrize(
    "init, expected",
    [("normalised", 8 / (3 * math.pi)), ("standard", 8 / (3 * math.pi) / math.sqrt(3))],
)
def test_glorot_weight_singular_values_follow_quarter_circle(init, expected):
    # Glorot & Bengio 2010: ~0.85 vs ~0.49 (they report 0.8 and 0.5 for layer Jacobians).
    n = 300
    torch.manual_seed(0)
    lin = nn.Linear(n, n, bias=False)
    if init == "normalised":
        nn.init.uniform_(lin.weight, -math.sqrt(6 / (2 * n)), math.sqrt(6 / (2 * n)))
    else:
        nn.init.uniform_(lin.weight, -1 / math.sqrt(n), 1 / math.sqrt(n))
    assert torch.linalg.svdvals(lin.weight.detach()).mean().item() == pytest.approx(
        expected, abs=0.02
    )


def test_block_spectra_follow_sequential_blocks():
    torch.manual_seed(3)
    net = mlp([5, 6, 6, 3], "relu").double()
    x = torch.randn(1, 5, dtype=torch.float64)
    blocks = block_spectra(net, x)
    assert [b.name for b in blocks] == ["fc1+act1", "fc2+act2", "out", "model"]
    h1 = net[1](net[0](x))
    ref = _reference_svd(nn.Sequential(net[2], net[3]), h1)
    np.testing.assert_allclose(blocks[1].singular_values, ref, rtol=1e-9, atol=1e-12)


def test_model_is_untouched_and_errors_are_clear():
    net = mlp([4, 4, 2], "tanh")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    jacobian_spectrum(net, torch.randn(1, 4))
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(p.grad is None for p in net.parameters())
    with pytest.raises(ConfigError, match="k must be"):
        jacobian_spectrum(net, torch.randn(1, 4), k=3)
    with pytest.raises(ConfigError, match="floating-point"):
        jacobian_spectrum(net, torch.ones(1, 4, dtype=torch.long))
    with pytest.raises(UnsupportedModelError, match="nn.Sequential"):
        block_spectra(nn.ModuleList([net]), torch.randn(1, 4))  # type: ignore[arg-type]
    with pytest.raises(UnsupportedModelError, match="not a tensor"):
        jacobian_spectrum(lambda v: (v, v), torch.randn(1, 4))
