"""Mean-field theory against a brute-force reference and against measurement in real networks."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from gradprobe.activations import ACTIVATIONS
from gradprobe.errors import ConfigError
from gradprobe.lab import train
from gradprobe.theory import closed_form as cf
from gradprobe.theory import meanfield as mf

# Brute-force reference: trapezoid rule on a fine grid (the slow, obvious integral).
_Z = np.linspace(-14.0, 14.0, 400_001)
_PDF = np.exp(-0.5 * _Z**2) / math.sqrt(2 * math.pi)


@pytest.fixture(autouse=True)
def _one_thread():
    # Small problems: one thread avoids oversubscribing a shared CPU.
    with train.threads(1):
        yield


# Smooth integrands: the trapezoid rule converges geometrically, a coarse grid is plenty.
_ZS = np.linspace(-14.0, 14.0, 8_001)
_PDFS = np.exp(-0.5 * _ZS**2) / math.sqrt(2 * math.pi)


def _ref_expect(f, q):
    return float(np.trapezoid(f(math.sqrt(q) * _Z) * _PDF, _Z))


def _ref_smooth(f, q):
    return float(np.trapezoid(f(math.sqrt(q) * _ZS) * _PDFS, _ZS))


def _ref_fn(name):
    spec = ACTIVATIONS[name]

    def phi(u):
        return spec.fn(torch.from_numpy(u.copy())).numpy()

    def dphi(u):  # centred finite difference, independent of autograd
        h = 1e-6
        return (phi(u + h) - phi(u - h)) / (2 * h)

    return phi, dphi


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_quadrature_matches_fine_grid_for_every_activation(name):
    phi, dphi = _ref_fn(name)
    for q in (0.05, 0.7, 3.0, 40.0):
        got = mf.second_moment(name, q)
        ref = _ref_expect(lambda u: phi(u) ** 2, q)
        assert got == pytest.approx(ref, rel=2e-6, abs=1e-9), (name, q)
        got_d = mf.derivative_second_moment(name, q)
        ref_d = _ref_expect(lambda u: dphi(u) ** 2, q)
        # The grid reference of a step-shaped φ'² is accurate to about one grid cell only.
        tol = 3e-4 if ACTIVATIONS[name].kinks else 2e-6
        assert got_d == pytest.approx(ref_d, rel=tol, abs=1e-8), (name, q)


def test_hardtanh_derivative_moment_is_a_gaussian_probability():
    for q in (0.05, 3.0, 40.0):
        exact = math.erf(1 / math.sqrt(2 * q))  # P(|√q z| < 1)
        assert mf.derivative_second_moment("hardtanh", q) == pytest.approx(exact, rel=1e-10)


def test_relu_closed_forms():
    for q in (0.01, 1.0, 123.0):
        assert mf.second_moment("relu", q) == pytest.approx(q / 2, rel=1e-12)
        assert mf.derivative_second_moment("relu", q) == pytest.approx(0.5, rel=1e-12)
    for s2 in (1.0, 2.0, 3.0):
        assert mf.chi1("relu", s2, 0.0) == pytest.approx(cf.relu_chi1(s2), rel=1e-10)


def test_pair_expectations_match_arccos_kernel():
    q, s2 = 1.7, 2.0
    for c in (-0.6, 0.0, 0.5, 0.95):
        k1, k0 = cf.relu_pair_moments(q, c)
        assert mf.c_map("relu", c, q, s2, 0.0) == pytest.approx(s2 * k1 / q, rel=1e-6)
        assert mf.chi_c("relu", c, q, s2) == pytest.approx(s2 * k0, rel=1e-6)


def test_fixed_point_against_plain_iteration_of_reference_map():
    q = 1.0
    for _ in range(200):
        q = 1.3 * _ref_smooth(lambda u: np.tanh(u) ** 2, q) + 0.1
    assert mf.fixed_point("tanh", 1.3, 0.1) == pytest.approx(q, rel=1e-6)
    assert mf.fixed_point("relu", 3.0, 0.0) == math.inf
    assert mf.fixed_point("tanh", 0.8, 0.0) == 0.0


@pytest.mark.parametrize("s2, expected", [(1.0, 0.76), (1.76, 1.00), (2.5, 1.13)])
def test_tanh_chi1_values_from_schoenholz(s2, expected):
    # Independent check: reference integral at the reference fixed point.
    q = 1.0
    for _ in range(200):
        q = s2 * _ref_smooth(lambda u: np.tanh(u) ** 2, q) + 0.05
    ref = s2 * _ref_smooth(lambda u: (1 - np.tanh(u) ** 2) ** 2, q)
    got = mf.chi1("tanh", s2, 0.05)
    assert got == pytest.approx(ref, rel=1e-6)
    assert got == pytest.approx(expected, abs=0.005)


def test_critical_sigma_two_independent_methods():
    for b2 in (0.0, 0.05, 0.3):
        assert mf.critical_sigma_w2("tanh", b2) == pytest.approx(
            cf.tanh_critical_sigma_w2(b2), rel=1e-5
        )
    assert mf.critical_sigma_w2("relu", 0.0) == pytest.approx(2.0, rel=1e-6)
    assert mf.chi1("tanh", mf.critical_sigma_w2("tanh", 0.05), 0.05) == pytest.approx(1, abs=1e-6)


def test_analyse_phase_and_depth_scales():
    ordered = mf.analyse("tanh", 1.0, 0.05)
    assert ordered.phase == "ordered" and ordered.c_star == 1.0
    assert ordered.xi_c == pytest.approx(-1 / math.log(ordered.chi1))
    assert ordered.max_depth == pytest.approx(6 * ordered.xi_c)
    chaotic = mf.analyse("tanh", 2.5, 0.05)
    assert chaotic.phase == "chaotic" and 0 < chaotic.c_star < 1
    # c* is a fixed point of the correlation map, and the map's slope there is chi_c.
    cm = mf.c_map("tanh", chaotic.c_star, chaotic.q_star, 2.5, 0.05)
    assert cm == pytest.approx(chaotic.c_star, abs=1e-6)
    # Price's theorem: d/dc of (σ_w² E[φ(u1)φ(u2)] + σ_b²)/q* is σ_w² E[φ'(u1)φ'(u2)] = χ_c.
    h = 1e-4
    slope = (
        mf.c_map("tanh", chaotic.c_star + h, chaotic.q_star, 2.5, 0.05)
        - mf.c_map("tanh", chaotic.c_star - h, chaotic.q_star, 2.5, 0.05)
    ) / (2 * h)
    assert chaotic.chi_c == pytest.approx(slope, rel=1e-4)
    assert mf.analyse("relu", 2.0).phase == "critical"


def _measured_ratios(act, s2, b2, *, width, depth, batch, seed, widths=None):
    """var(δ^l)/var(δ^{l+1}) measured by autograd in a real network (float64)."""
    gen = torch.Generator().manual_seed(seed)
    widths = widths or [width] * (depth + 1)
    fn = ACTIVATIONS[act].fn
    x = torch.randn(batch, widths[0], generator=gen, dtype=torch.float64).requires_grad_(True)
    hs, h = [], x
    for n_in, n_out in zip(widths[:-1], widths[1:]):
        w = torch.randn(n_out, n_in, generator=gen, dtype=torch.float64) * math.sqrt(s2 / n_in)
        b = torch.randn(n_out, generator=gen, dtype=torch.float64) * math.sqrt(b2)
        pre = (fn(h) if hs else h) @ w.T + b
        pre.retain_grad()
        hs.append(pre)
        h = pre
    out = fn(h)
    out.backward(torch.randn(out.shape, generator=gen, dtype=torch.float64))
    g = [float(t.grad.pow(2).mean()) for t in hs]
    return np.array(g[:-1]) / np.array(g[1:]), [float(t.detach().pow(2).mean()) for t in hs]


@pytest.mark.parametrize(
    "act, s2, b2", [("tanh", 1.0, 0.05), ("tanh", 1.76, 0.05), ("tanh", 2.5, 0.05),
                    ("relu", 1.0, 0.0), ("relu", 2.0, 0.0), ("relu", 3.0, 0.0)],
)
def test_measured_gradient_ratio_matches_chi1(act, s2, b2):
    # Width 300 (the full width-1000 table is in benchmarks/theory_agreement.py); geometric mean
    # over layers past the q transient and three seeds; tolerance 2 %.
    logs = []
    for seed in range(3):
        r, _ = _measured_ratios(act, s2, b2, width=300, depth=20, batch=64, seed=seed)
        logs.append(np.log(r[8:]))
    measured = math.exp(np.mean(logs))
    assert measured == pytest.approx(mf.chi1(act, s2, b2), rel=0.02)


def test_width_changes_enter_as_fan_out_over_fan_in():
    widths = [200, 400, 100, 300, 300, 150, 450]
    s2, b2 = 1.5, 0.05
    all_r, all_pred = [], []
    for seed in range(3):
        r, _ = _measured_ratios("tanh", s2, b2, width=0, depth=0, batch=128, seed=seed,
                                widths=widths)
        traj = mf.q_trajectory("tanh", s2, b2, len(widths) - 1, q_in=1.0)
        pred = [mf.gradient_ratio("tanh", traj[i], sigma_w2_next=s2, fan_in_next=widths[i + 1],
                                  fan_out_next=widths[i + 2]) for i in range(len(widths) - 2)]
        all_r.append(np.log(r))
        all_pred.append(np.log(pred))
    got, pred = np.mean(all_r, axis=0), np.mean(all_pred, axis=0)
    # Per layer within 6 % (the ratios themselves range from 0.3 to 3: widths matter).
    assert np.ptp(np.exp(pred)) > 2
    assert np.max(np.abs(got - pred)) < 0.06


def test_q_trajectory_matches_measured_forward_pass():
    # Per-layer q fluctuates by a few % at width 400 (shared weights and biases, correlated
    # examples): average three seeds, check each layer to 6 % and the mean to 2 %.
    traj = mf.q_trajectory("tanh", 2.0, 0.1, 10, q_in=1.0)
    logs = [np.log(np.array(_measured_ratios("tanh", 2.0, 0.1, width=400, depth=10, batch=64,
                                             seed=seed)[1]) / traj) for seed in range(3)]
    per_layer = np.mean(logs, axis=0)
    assert np.max(np.abs(per_layer)) < 0.06
    assert abs(np.mean(per_layer)) < 0.02


def test_bad_arguments_raise_config_errors():
    with pytest.raises(ConfigError, match="sigma_w2"):
        mf.chi1("tanh", -1.0, 0.0)
    with pytest.raises(ConfigError, match="unknown activation"):
        mf.chi1("swishy", 1.0, 0.0)
    with pytest.raises(ConfigError, match="activation must be"):
        mf.resolve(nn.Tanh())  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="depth"):
        mf.q_trajectory("tanh", 1.0, 0.0, 0)
    with pytest.raises(ConfigError, match="no critical"):
        mf.critical_sigma_w2("sigmoid", 0.05, hi=10.0)
    with pytest.raises(ConfigError, match="fan_in_next"):
        mf.gradient_ratio("tanh", 1.0, sigma_w2_next=1.0, fan_in_next=0, fan_out_next=3)


def test_closed_form_linear_chain_and_random_matrices():
    assert cf.linear_chain_gain(1.5, 50) == pytest.approx(1.5**50)
    assert cf.quarter_circle_mean_singular_value(1000, 1 / 1000) == pytest.approx(0.8488, abs=1e-4)
    assert cf.quarter_circle_mean_singular_value(1000, 1 / 3000) == pytest.approx(0.4901, abs=1e-4)
    # Lyapunov exponents: n = 1 is a chi variable, E[ln |z|] = (psi(1/2) + ln 2)/2.
    assert cf.gaussian_product_log_singular_values(1, 1)[0] == pytest.approx(
        (-1.9635100260214235 + math.log(2)) / 2
    )


def test_depth_scales_match_iterating_the_maps():
    # xi_q: the variance map's distance to q* shrinks by exp(-1/xi_q) per layer; xi_c: the
    # correlation map's distance to c* by chi_c(c*) = exp(-1/xi_c) (Schoenholz et al. 2017).
    m = mf.analyse("tanh", 2.5, 0.05)
    q = m.q_star * 1.01
    for _ in range(3):
        q_next = mf.q_map("tanh", q, 2.5, 0.05)
        rate, q = (q_next - m.q_star) / (q - m.q_star), q_next
    assert -1 / math.log(rate) == pytest.approx(m.xi_q, rel=0.02)
    c = m.c_star + 0.01
    for _ in range(3):
        c_next = mf.c_map("tanh", c, m.q_star, 2.5, 0.05)
        rate, c = (c_next - m.c_star) / (c - m.c_star), c_next
    assert -1 / math.log(rate) == pytest.approx(m.xi_c, rel=0.02)
    assert m.max_depth == pytest.approx(6 * m.xi_c)


def test_xi_c_closed_form_for_an_odd_activation_without_bias():
    # tanh, sigma_b2 = 0: c* = 0 and chi_c(0) = sigma_w2 E[phi'(u)]^2, a one-dimensional integral.
    m = mf.analyse("tanh", 2.0, 0.0)
    assert m.c_star == pytest.approx(0.0, abs=1e-6)
    mean_dphi = mf.gauss_expect(lambda u: 1 / np.cosh(u) ** 2, m.q_star)
    assert m.xi_c == pytest.approx(-1 / math.log(2.0 * mean_dphi**2), rel=1e-4)
    # Chaotic yet shallow-scaled: for tanh the correlation scale is longer than the gradient's.
    assert m.phase == "chaotic" and m.xi_c > m.xi_grad
