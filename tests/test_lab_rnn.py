"""rnn: tasks, the hand-stepped unroll against the fused layers, gradient through time, the
spectral-radius law, and the training claims' bookkeeping at a small size."""

import math

import numpy as np
import pytest
import torch

from gradprobe.errors import ConfigError
from gradprobe.lab import train
from gradprobe.lab.experiments import rnn as R

SMALL = R.RnnConfig(lengths=(6, 30), hidden=64, steps=8, sgd_steps=20, batch=16,
                    temporal_order=False)


@pytest.fixture(scope="module")
def result():
    with train.threads(1):
        return R.run(SMALL)


def test_adding_baseline_is_one_sixth():
    x, y = R.adding_problem(200_000, 20, torch.Generator().manual_seed(0))
    assert (x[..., 1].sum(1) == 2).all()
    mse = float(((y - 1.0) ** 2).mean())
    assert mse == pytest.approx(R.ADDING_BASELINE, rel=0.02)


def test_temporal_order_labels():
    x, y = R.temporal_order(500, 40, torch.Generator().manual_seed(1))
    marks = x[..., 1]
    assert ((marks != 0).sum(1) == 2).all()
    first = marks[:, 4:8].sum(1)   # [0.1T, 0.2T)
    second = marks[:, 20:24].sum(1)  # [0.5T, 0.6T)
    assert torch.equal(y, (first > 0).long() * 2 + (second > 0).long())


@pytest.mark.parametrize("kind", R.KINDS)
def test_unroll_matches_the_fused_layer(kind):
    model = R.build(kind, 2, 8, 1, relu_gain=1.2, seed=3)
    x, _ = R.adding_problem(5, 12, torch.Generator().manual_seed(2))
    out, states = R.unroll(model, x)
    seq, _ = model.rnn(x)
    torch.testing.assert_close(torch.stack(states, 1), seq, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-6)


def test_irnn_is_identity_initialised():
    model = R.build("irnn", 2, 8, 1, relu_gain=1.5, seed=0)
    torch.testing.assert_close(model.rnn.weight_hh_l0.detach(), torch.eye(8))
    assert float(model.rnn.bias_hh_l0.detach().abs().max()) == 0.0
    assert float(model.rnn.weight_ih_l0.detach().std()) < 0.01


def test_linear_rnn_gradient_is_power_of_w():
    # the spectral study's linear case against (Wᵀ)^k u computed directly
    cfg = R.RnnConfig(hidden=6, spectral_length=9, radii=(0.7, 1.3))
    table = R.spectral_study(cfg)
    gen = torch.Generator().manual_seed(cfg.seed + 7)
    w0 = torch.randn(6, 6, generator=gen, dtype=torch.float64) / math.sqrt(6)
    w0 = w0 / torch.linalg.eigvals(w0).abs().max()
    torch.randn(6, 2, generator=gen, dtype=torch.float64)
    R.adding_problem(16, 9, gen)
    u = torch.randn(16, 6, generator=gen, dtype=torch.float64)
    for rho in cfg.radii:
        w = rho * w0
        g = table[(table.activation == "linear") & (table.rho == rho)].sort_values("t")
        expected = [float((u @ torch.linalg.matrix_power(w, 9 - t)).norm() / u.norm())
                    for t in range(1, 10)]
        np.testing.assert_allclose(g["ratio"], expected, rtol=1e-10)


def test_init_and_spectral_claims_hold(result):
    for prefix in ("at initialisation", "linear RNN", "tanh RNN"):
        claim = result.claim(prefix)
        assert claim.holds, (claim.text, claim.evidence)


def test_short_sequences_fail_the_gradient_claims():
    # at T = 5 nothing has had time to vanish or explode: the claims are measured, not assumed
    with train.threads(1):
        r = R.run(R.RnnConfig(lengths=(5,), hidden=64, steps=2, sgd_steps=50, batch=8,
                              temporal_order=False, spectral_length=5))
    assert not r.claim("at initialisation").holds
    assert not r.claim("linear RNN").holds
    # five steps of ρ ≈ 1.5 do not overflow plain SGD: nothing for clipping to cure
    assert r.tables["relu_sgd"]["first_nonfinite_step"].isna().all()
    assert not r.claim("adding problem, T = 5, plain SGD").holds


def test_training_claims_follow_the_table(result):
    runs = result.tables["runs"]
    add = runs[(runs["task"] == "adding") & (runs["T"] == 30)].set_index(["model", "clip"])
    tanh = add.loc["tanh", "test_mse"].min()
    gru = add.loc["gru", "test_mse"].min()
    assert result.claim("adding problem, T = 30: the GRU").holds == bool(tanh > 0.1 and gru < 0.05)
    # 8 steps train nothing: the "tanh fails where LSTM and IRNN succeed" claim cannot hold
    assert not result.claim("adding problem, T = 30: the tanh").holds
    assert set(result.tables["main"]["clip"]) == {"no", "by norm"}
    assert np.isfinite(result.tables["spectral"]["grad_ratio h_1/h_T"]).all()


def test_clipping_claims_at_small_size(result):
    # plain SGD overflows at T = 30 without clipping and stays finite with it, already in 20 steps
    sgd = result.tables["relu_sgd"].set_index("clip")
    assert sgd.loc["no", "first_nonfinite_step"] <= 20
    assert sgd["first_nonfinite_step"].isna().tolist() == [False, True]
    assert result.claim("adding problem, T = 30, plain SGD").holds
    # 8 Adam steps teach the clipped IRNN nothing: the "clipping turns the IRNN's failure into
    # training" claim fails at this size
    assert not result.claim("adding problem, T = 30, Adam: clipping").holds
    runs = result.tables["runs"].set_index(["task", "T", "model", "clip"])
    assert runs.loc[("adding", 30, "irnn", True), "test_mse"] > R.SOLVED_MSE


def test_clip_hook_bounds_the_update():
    # fit's clipping is gp.remedies.clip_gradients_: one SGD step (no momentum yet) moves the
    # parameters by exactly sgd_lr · max_norm when the gradient is larger
    cfg = R.RnnConfig(sgd_steps=1, batch=4, max_norm=0.5)
    model = R.build("relu", 2, 16, 1, relu_gain=1.5, seed=0)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    res = R.fit(model, "adding", 20, cfg, clip=True, seed=0, optimizer="sgd")
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert res["grad_norm"][0] > cfg.max_norm
    assert float((after - before).norm()) == pytest.approx(cfg.sgd_lr * cfg.max_norm, rel=1e-4)


def test_bad_config():
    with pytest.raises(ConfigError, match="length"):
        R.RnnConfig(lengths=(2,)).validate()
    with pytest.raises(ConfigError, match="max_norm"):
        R.RnnConfig(max_norm=0).validate()


def test_figures(result):
    figs = R.plot(result)
    assert set(figs) == {"gradient_through_time", "spectral_radius", "loss_curves"}
    for fig in figs.values():
        for ax in fig.axes:
            assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel()
