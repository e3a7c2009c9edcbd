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
