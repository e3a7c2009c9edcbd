"""Failures found by checking real operators (issue 18), each reproduced as it was reported."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradprobe as gp


def test_empty_tensor_is_checked_trivially_and_said_so():
    params = {"x": torch.zeros(0), "y": torch.ones(3)}
    rep = gp.gradcheck_fn(lambda p: p["x"].sum() + p["y"].sum(), params, params)
    assert rep.ok, str(rep)
    assert rep["x"].n_checked == 0 and rep["x"].verdict == "ok" and rep["x"].shape == (0,)
    assert rep["y"].n_checked == 3 and rep["y"].rel_error < 1e-7
    assert any("x" in n and "empty" in n for n in rep.notes), rep.notes
    # A wrong gradient beside the empty tensor is still found.
    bad = gp.gradcheck_fn(lambda p: p["x"].sum() + p["y"].sum(), params,
                          {"x": torch.zeros(0), "y": 2 * torch.ones(3)})
    assert bad.failed == ["y"]


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_empty_parameter_of_a_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(0, 3), nn.Tanh(), nn.Linear(3, 1))
    rep = gp.gradcheck(model, F.mse_loss, torch.randn(4, 0), torch.randn(4, 1))
    assert rep.ok and rep["0.weight"].n_checked == 0, str(rep)
    assert any("0.weight" in n and "empty" in n for n in rep.notes)


def _grad(f, p):
    return torch.func.grad(f)(p)


def test_step_is_chosen_where_eps_reads_a_correct_gradient_as_suspicious():
    # ndtr in its lower tail is evaluated with cancellation: at eps=1e-7 the centred difference
    # is 3e-5 off, at 1e-6 .. 1e-4 it agrees with autograd to 1e-6.
    def f(p):
        return torch.special.ndtr(p["x"]).sum()

    x = {"x": torch.tensor([-4.8], dtype=torch.float64)}
    g = _grad(f, x)
    rep = gp.gradcheck_fn(f, x, g)
    row = rep["x"]
    assert rep.ok and row.verdict == "ok" and row.kinks_crossed == 0, str(rep)
    assert row.rel_error < 1e-6 and row.noise_floor < 1e-6
    assert row.steps and 1e-6 <= row.steps[0] <= 1e-4 and row.worst[0].step == row.steps[0]
    assert any("re-differenced" in n and "x" in n for n in rep.notes)
    assert "steps" in rep.table().columns
    # A 1 % error is still a bug.
    assert gp.gradcheck_fn(f, x, {"x": 1.01 * g["x"]}).failed == ["x"]


@pytest.mark.parametrize(
    ("f", "x"),
    [
        (lambda p: torch.logcumsumexp(p["x"], 0).mul(torch.arange(1.0, 7.0)).sum(),
         [3.0, -20.0, 15.0, 0.5, -7.0, 30.0]),
        (lambda p: torch.erfc(p["x"]).sum(), [0.5, 4.9, 5.5]),
        (lambda p: torch.special.ndtr(p["x"]).sum(), [-4.8, -3.0, -6.0, 0.3]),
    ],
    ids=["logcumsumexp", "erfc-tail", "ndtr-tail"],
)
def test_correct_gradients_in_hard_regions_read_ok_and_planted_errors_do_not(f, x):
    p = {"x": torch.tensor(x, dtype=torch.float64)}
    g = _grad(f, p)
    rep = gp.gradcheck_fn(f, p, g)
    assert rep.ok and rep["x"].noise_floor <= 1e-6, str(rep)
    assert gp.gradcheck_fn(f, p, {"x": 1.01 * g["x"]}).failed == ["x"]
    flipped = g["x"].clone()
    flipped[flipped.abs().argmax()] *= -1
    assert gp.gradcheck_fn(f, p, {"x": flipped}).failed == ["x"]


def test_step_ladder_leaves_a_kink_a_kink():
    # |w - c| with w 3e-8 above c: larger steps move the centred difference further from the
    # one-sided slope, so the coordinate keeps eps and reads as a kink.
    c = 0.7
    w = torch.tensor([c + 3e-8, 2.0], dtype=torch.float64)
    rep = gp.gradcheck_fn(lambda p: (p[0] - c).abs().sum(), [w], [torch.sign(w - c)])
    row = rep.rows[0]
    assert row.verdict == "kink" and row.worst[0].kink and row.worst[0].step == 1e-7, str(rep)


_IDX = torch.tensor([0, 2])
_WEIGHTS = torch.arange(12.0, dtype=torch.float64).view(4, 3)


def _index_fill(p):
    return (torch.index_fill(p["x"], 0, _IDX, p["v"]) * _WEIGHTS).sum()


def test_vmap_that_batches_wrongly_is_caught_per_tensor_and_the_loop_used():
    # Batching the 0-d value of index_fill gives every row the last value: J looks constant in
    # v, so a right gradient read as a bug and a zeroed one as ok before.
    p = {"x": torch.randn(4, 3, dtype=torch.float64), "v": torch.tensor(0.7, dtype=torch.float64)}
    g = torch.func.grad(_index_fill)(p)
    assert float(g["v"]) == float(_WEIGHTS[_IDX].sum())
    rep = gp.gradcheck_fn(_index_fill, p, g)
    assert rep.ok and rep.vectorized, str(rep)
    assert rep.fallback_reason is not None and rep.fallback_reason.startswith("v: ")
    assert "differs from the loop" in rep.fallback_reason and "x:" not in rep.fallback_reason
    assert "partly vectorised" in str(rep)
    zeroed = {"x": g["x"], "v": torch.zeros((), dtype=torch.float64)}
    assert gp.gradcheck_fn(_index_fill, p, zeroed).failed == ["v"]


def test_control_flow_on_one_tensor_falls_back_for_that_tensor_only():
    def f(p):
        if torch.any(p["b"] < 0):  # as gaussian_nll_loss checks its variance
            raise ValueError("negative variance")
        return (p["a"] ** 2).sum() + torch.log(p["b"]).sum()

    a = torch.randn(3, dtype=torch.float64)
    b = torch.rand(3, dtype=torch.float64) + 1.0
    rep = gp.gradcheck_fn(f, {"a": a, "b": b}, {"a": 2 * a, "b": 1 / b})
    assert rep.ok and rep.vectorized, str(rep)
    assert rep.fallback_reason is not None and rep.fallback_reason.startswith("b: ")
    assert "data-dependent control flow" in rep.fallback_reason
    assert gp.gradcheck_fn(f, {"a": a, "b": b}, {"a": 2 * a, "b": b}).failed == ["b"]


def test_model_with_control_flow_on_one_parameter_vectorises_the_others():
    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)
            self.scale = nn.Parameter(torch.ones(2))

        def forward(self, x):
            if torch.any(self.scale < 0):
                raise ValueError("negative scale")
            return self.lin(x) * self.scale

    torch.manual_seed(0)
    rep = gp.gradcheck(Gated(), lambda o: o.pow(2).mean(), torch.randn(5, 3))
    assert rep.ok and rep.vectorized, str(rep)
    assert rep.fallback_reason is not None and rep.fallback_reason.startswith("scale: ")
    assert "lin.weight" not in rep.fallback_reason


def test_float64_warnings_say_what_is_wrong_not_use_float64():
    x = torch.tensor([0.3, 1.7, -2.2], dtype=torch.float64)
    rep = gp.gradcheck_fn(lambda p: torch.floor(p[0]).sum(), [x], [torch.zeros(3)])
    assert rep.ok and len(rep.warnings) == 1, str(rep)
    assert "piecewise constant" in rep.warnings[0] and "float64" not in rep.warnings[0]
    # |J| = 1e6 against a gradient of 1e-9: roundoff, not the dtype, is the problem.
    w = torch.tensor([0.5, -0.25], dtype=torch.float64)
    rep = gp.gradcheck_fn(lambda p: 1e6 + 1e-9 * p[0].sum(), [w], [1e-9 * torch.ones(2)])
    assert rep.failed == [] and rep.warnings, str(rep)
    text = rep.warnings[0]
    assert "noise floor is above the verdict threshold" in text and "float64" not in text
    assert "subtract" in text and "eps ≈" in text


def test_ladder_resolves_a_float64_check_that_eps_cannot():
    # logcumsumexp of values near 1e4: |J| ≈ 1e4 against O(1) gradients, so roundoff at eps=1e-7
    # hides errors below 2e-4; larger steps resolve it, and the eps warning gives way to a note.
    gen = torch.Generator().manual_seed(0)
    x = {"x": torch.full((5, 5), 1e4, dtype=torch.float64)}
    w = torch.randn(5, 5, dtype=torch.float64, generator=gen)

    def f(p):
        return (torch.logcumsumexp(p["x"], 0) * w).sum()

    g = torch.func.grad(f)(x)
    rep = gp.gradcheck_fn(f, x, g)
    assert rep.ok and rep["x"].noise_floor < 1e-6 and not rep.warnings, str(rep)
    assert any("could not resolve" in n for n in rep.notes)
    assert gp.gradcheck_fn(f, x, {"x": 1.01 * g["x"]}).failed == ["x"]


def test_integer_features_get_a_clear_error():
    with pytest.raises(gp.ConfigError) as info:
        gp.gradcheck(torch.nn.Linear(3, 2), lambda o, t: (o - t).pow(2).mean(),
                     torch.randint(0, 3, (4, 3)), torch.zeros(4, 2))
    assert "int64" in info.value.hint and "x.float()" in info.value.hint


def test_full_mode_on_a_large_model_warns_with_the_cost(monkeypatch):
    from gradprobe.check import engine

    monkeypatch.setattr(engine, "FULL_WARN", 10)
    net = torch.nn.Linear(4, 3)
    with pytest.warns(UserWarning, match="mode='directional'"):
        report = gp.gradcheck(net, lambda o, t: (o - t).pow(2).mean(), torch.randn(5, 4),
                              torch.zeros(5, 3))
    assert any("15 parameters" in w for w in report.warnings)

