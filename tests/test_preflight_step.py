"""preflight's step-size check and borderline flag: sharpness against an explicit Gauss–Newton
matrix, the stability limit against measured divergence, the ReLU correlation map against its
closed form and a wide network."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradprobe as gp
from gradprobe.errors import ConfigError
from gradprobe.lab.zoo import mlp
from gradprobe.theory import meanfield as mf
from gradprobe.theory.curvature import sharpness, step_limit, step_status
from gradprobe.theory.preflight import degree_borderline

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


def _explicit_gauss_newton_top(net, x, y):
    """Slow reference: J (outputs x parameters) by autograd row by row, H_L of the mean
    cross-entropy in closed form, eigvalsh of Jᵀ H_L J."""
    params = list(net.parameters())
    out = net(x)
    rows = []
    for k in range(out.numel()):
        g = torch.autograd.grad(out.reshape(-1)[k], params, retain_graph=True)
        rows.append(torch.cat([t.reshape(-1) for t in g]))
    jac = torch.stack(rows).double()
    p = torch.softmax(out.detach().double(), dim=1)
    blocks = [torch.diag(pi) - torch.outer(pi, pi) for pi in p]
    h = torch.block_diag(*blocks) / len(x)
    del y  # the cross-entropy's Hessian in the logits does not depend on the labels
    return float(torch.linalg.eigvalsh(jac.T @ h @ jac)[-1])


def test_sharpness_matches_explicit_gauss_newton_matrix():
    torch.manual_seed(0)
    net = mlp([6, 12, 12, 3], "tanh")
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    ref = _explicit_gauss_newton_top(net, x, y)
    lam = sharpness(net, x, F.cross_entropy, y, iters=300, tol=1e-7)
    assert lam == pytest.approx(ref, rel=1e-3)
    # and for mean-squared error on a linear model, the Hessian in closed form: 2 XᵀX / n
    lin = nn.Linear(5, 1, bias=False)
    xs = torch.randn(40, 5)
    exact = float(torch.linalg.eigvalsh(2 * xs.T.double() @ xs.double() / 40)[-1])
    assert sharpness(lin, xs, F.mse_loss, torch.zeros(40, 1), iters=500, tol=1e-8) == (
        pytest.approx(exact, rel=1e-3))


def _heavy_ball_final_loss(lr, momentum, steps=200):
    torch.manual_seed(1)
    xs = torch.randn(64, 4) * torch.tensor([3.0, 1.0, 0.5, 0.2])
    ys = xs @ torch.tensor([[1.0], [-2.0], [0.5], [1.0]])
    lin = nn.Linear(4, 1, bias=False)
    nn.init.zeros_(lin.weight)
    lam = sharpness(lin, xs, F.mse_loss, ys, iters=500, tol=1e-9)
    opt = torch.optim.SGD(lin.parameters(), lr=lr * step_limit(lam, momentum), momentum=momentum)
    for _ in range(steps):
        loss = F.mse_loss(lin(xs), ys)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(F.mse_loss(lin(xs), ys).detach()), float(F.mse_loss(torch.zeros_like(ys), ys))


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_step_limit_separates_convergence_from_divergence(momentum):
    """Full-batch heavy ball on a quadratic: 0.9 of the limit converges, 1.1 of it diverges."""
    below, start = _heavy_ball_final_loss(0.9, momentum, steps=600)
    above, _ = _heavy_ball_final_loss(1.1, momentum, steps=600)
    assert below < 1e-3 * start
    assert above > 1e3 * start or not math.isfinite(above)


def test_step_status_boundaries_and_errors():
    lam = 380.0
    assert step_status(lam, 0.009, 0.9)[0] == "borderline"
    assert step_status(lam, 0.011, 0.9)[0] == "unstable"
    assert step_status(lam, 0.004, 0.9)[0] == "stable"
    assert step_status(lam, 0.01, 0.9)[1] == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="momentum"):
        step_limit(1.0, 1.0)
    with pytest.raises(ConfigError, match="lr"):
        step_status(1.0, -0.1)


def test_relu_correlation_map_converges_to_one_like_its_closed_form_and_a_wide_net():
    """ReLU's correlation map has no chaotic phase: c → 1 with 1 − c_l ≈ 9π²/(2 l²)
    (expanding the arc-cosine kernel: 1 − c' = (1 − c) − (2√2/3π)(1 − c)^{3/2})."""
    def arccos_map(c):  # Cho & Saul (2009): the degree-1 arc-cosine kernel, σ_w² = 2
        return (math.sqrt(1 - c * c) + (math.pi - math.acos(c)) * c) / math.pi

    c, eps = 0.0, []
    for layer in range(2000):
        if layer < 30:  # quadrature agrees with the closed form while 1 - c is not tiny
            assert mf.c_map("relu", c, 1.0, 2.0, 0.0) == pytest.approx(arccos_map(c), abs=1e-5)
        c = arccos_map(c)
        eps.append(1 - c)
    assert all(a > b > 0 for a, b in zip(eps, eps[1:]))
    assert eps[-1] * 2000**2 == pytest.approx(9 * math.pi**2 / 2, rel=0.1)
    # a wide He-initialised net: the measured cosine of two orthogonal inputs after each layer
    torch.manual_seed(0)
    width, depth = 1500, 12
    h = torch.linalg.qr(torch.randn(width, 2))[0].T * math.sqrt(width)
    c_theory = 0.0
    for _ in range(depth):
        w = torch.randn(width, width) * math.sqrt(2.0 / width)
        h = torch.relu(h) @ w.T
        c_theory = mf.c_map("relu", c_theory, 1.0, 2.0, 0.0)
        measured = float((h[0] @ h[1]) / (h[0].norm() * h[1].norm()))
        assert measured == pytest.approx(c_theory, abs=0.04)
    assert c_theory > 0.85


def _digits_like(depth, init_std, seed=0):
    torch.manual_seed(seed)
    net = mlp([16] + [32] * depth + [4], "relu")
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=init_std(m.in_features))
                nn.init.zeros_(m.bias)
    return net, torch.randn(64, 16), torch.randint(0, 4, (64,))


def test_preflight_lr_check_reads_the_optimizer_and_decides():
    net, x, y = _digits_like(8, lambda n: math.sqrt(2.0 / n))
    lam = sharpness(net, x, F.cross_entropy, y)
    limit = step_limit(lam, 0.9)
    plain = gp.preflight(net, x, F.cross_entropy, y)
    assert math.isnan(plain.sharpness) and plain.trainable
    fast = gp.preflight(net, x, F.cross_entropy, y, lr=2 * limit, momentum=0.9)
    assert fast.sharpness == pytest.approx(lam) and fast.step_limit == pytest.approx(limit)
    assert not fast.trainable and fast.reasons[-1].startswith("step size")
    close = gp.preflight(net, x, F.cross_entropy, y,
                         optimizer=torch.optim.SGD(net.parameters(), lr=0.7 * limit, momentum=0.9))
    assert close.trainable and close.borderline and "stability limit" in str(close)
    slow = gp.preflight(net, x, F.cross_entropy, y, lr=0.1 * limit, momentum=0.9)
    assert slow.trainable and not slow.borderline
    adam = gp.preflight(net, x, F.cross_entropy, y, optimizer=torch.optim.Adam(net.parameters()))
    assert adam.trainable and any("not checked" in n for n in adam.notes)


def test_step_limit_predicts_divergence_of_a_small_relu_net():
    """Full-batch heavy ball from initialisation: at 0.3 of the measured limit the loss never
    rises above where it started and halves; at 3 times the limit it rises well above it."""
    def final(factor):
        net, x, y = _digits_like(6, lambda n: math.sqrt(2.0 / n), seed=3)
        limit = step_limit(sharpness(net, x, F.cross_entropy, y), 0.9)
        opt = torch.optim.SGD(net.parameters(), lr=factor * limit, momentum=0.9)
        start = float(F.cross_entropy(net(x), y).detach())
        worst = start
        for _ in range(40):
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            worst = max(worst, float(loss.detach())) if torch.isfinite(loss) else math.inf
        return start, float(F.cross_entropy(net(x), y).detach()), worst

    start, end, worst = final(0.3)
    assert end < 0.5 * start and worst == start
    start, _, worst = final(3.0)
    assert worst > 1.3 * start


def test_degree_borderline_band_and_relu_boundary():
    assert degree_borderline(1.0) and degree_borderline(0.7) and degree_borderline(1.45)
    assert not degree_borderline(0.6) and not degree_borderline(1.6)
    net, x, _ = _digits_like(9, lambda n: math.sqrt(1.0 / n))  # LeCun: chi1 = 1/2 per layer
    report = gp.preflight(net, x)
    assert report.degree == pytest.approx(9 * math.log(2) / 6, rel=0.15)
    assert report.borderline == degree_borderline(report.degree)
    deep, xd, _ = _digits_like(30, lambda n: math.sqrt(1.0 / n))
    assert not gp.preflight(deep, xd).borderline


def test_preflight_step_arguments_are_checked():
    net, x, y = _digits_like(2, lambda n: math.sqrt(2.0 / n))
    with pytest.raises(ConfigError, match="needs the loss"):
        gp.preflight(net, x, lr=0.1)
    with pytest.raises(ConfigError, match="not both"):
        gp.preflight(net, x, F.cross_entropy, y, lr=0.1,
                     optimizer=torch.optim.SGD(net.parameters(), lr=0.1))
    with pytest.raises(ConfigError, match="torch.optim.Optimizer"):
        gp.preflight(net, x, F.cross_entropy, y, optimizer="sgd")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="lr must be"):
        gp.preflight(net, x, F.cross_entropy, y, lr=0.0)
    with pytest.raises(ConfigError, match="momentum"):
        gp.preflight(net, x, F.cross_entropy, y, lr=0.1, momentum=1.5)
    assert np.isfinite(gp.preflight(net, x, F.cross_entropy, y, lr=0.1).sharpness)


def test_curvature_docstring_examples_run():
    import doctest

    from gradprobe.theory import curvature

    result = doctest.testmod(curvature)
    assert result.attempted >= 4 and result.failed == 0
