"""The rules on the Probe's diagnosis statistics: symmetry (unit spread), input-scale (the first
layer's recorded input), vanishing / exploding through time (per-time-step gradients)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import gradprobe as gp
from gradprobe.diagnose import input_stats, inputs, recurrent, symmetry
from gradprobe.diagnose.frames import Frames

COLS = ["count", "mean", "std", "rms", "abs_mean", "norm", "min", "max", "abs_max", "zero_frac",
        "nonfinite", "saturated_frac", "dead_frac"]


def _layers(spec):
    return pd.DataFrame([
        {"layer_id": i, "name": n, "type": t, "depth": i, "param_shapes": s, "activation": a}
        for i, (n, t, s, a) in enumerate(spec)
    ]).astype({"depth": "Int64"})


def _rows(values, steps=30):
    out = []
    for step in range(steps):
        for (layer, kind), v in values.items():
            cols = v(step) if callable(v) else v
            row = {c: np.nan for c in COLS} | {"count": 64.0, "nonfinite": 0.0} | cols
            out.append({"step": step, "layer": layer, "kind": kind, **row, "skipped": False})
    frame = pd.DataFrame(out)
    frame["layer_id"] = 0
    return frame


MLP = _layers([("fc0", "Linear", [[16, 8], [16]], None), ("act0", "Tanh", [], "tanh"),
               ("fc1", "Linear", [[16, 16], [16]], None), ("act1", "Tanh", [], "tanh"),
               ("head", "Linear", [[1, 16], [1]], None)])


def _frames(scalars, time=None, layers=MLP):
    kw = {} if time is None else {"time": time}
    return Frames(layers=layers, scalars=scalars, **kw)


# ------------------------------------------------------------------------------ symmetry


@pytest.mark.parametrize("late,fires", [(0.0, True), (0.01, True), (0.2, False), (0.95, False)])
def test_symmetry_fires_when_units_stay_identical(late, fires):
    spread = {("fc0", "spread"): {"norm": 0.9}, ("head", "spread"): {"norm": 0.0},
              ("fc1", "spread"): lambda s: {"norm": 0.0 if s < 10 else late}}
    found = symmetry.symmetry(_frames(_rows(spread)))
    assert bool(found) is fires
    if fires:
        assert found[0].rule == "symmetry" and found[0].layers == ("fc1",)
        assert found[0].remedies[0].name == "init_"


def test_symmetry_counts_all_zero_weights_and_skips_single_units():
    spread = {("fc1", "spread"): {"norm": np.nan}, ("head", "spread"): {"norm": np.nan}}
    found = symmetry.symmetry(_frames(_rows(spread)))
    assert found and found[0].layers == ("fc1",)  # 0/0: every weight zero; head has 1 unit
    bad = {("fc1", "spread"): {"norm": np.nan, "nonfinite": 3.0}}
    assert symmetry.symmetry(_frames(_rows(bad))) == []  # NaN weights: not this rule's business


def test_symmetry_falls_back_without_spread():
    weights = {(n, "weight"): {"rms": 0.1, "std": 0.0, "zero_frac": 0.0} for n in ("fc0", "fc1")}
    found = symmetry.symmetry(_frames(_rows(weights)))
    assert found and found[0].rule == "symmetry"


def _train(run_dir, model, x, y, steps=30, lr=0.1, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    with gp.Probe(model, opt, run_dir=run_dir, **kw) as probe:
        for _ in range(steps):
            loss = nn.functional.cross_entropy(model(x), y)
            probe.observe_loss(loss)
            loss.backward()
            opt.step()
            opt.zero_grad()
    return probe.run


@pytest.mark.parametrize("init", ["constant", "zeros_hidden", "random"])
def test_symmetry_end_to_end(tmp_path, init):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                          nn.Linear(16, 3))
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear) and init == "constant":
                m.weight.fill_(0.2)
                m.bias.fill_(0.0)
        if init == "zeros_hidden":  # one zero layer between random ones: symmetry breaks
            model[2].weight.zero_()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 4, generator=g), torch.randint(0, 3, (64,), generator=g)
    d = gp.diagnose(_train(tmp_path / "r", model, x, y))
    sym = [f for f in d if f.rule == "symmetry"]
    if init == "constant":
        assert sym and set(sym[0].layers) == {"0", "2"}
        assert sym[0].evidence[0].value < 1e-2
    else:
        assert not sym


# ------------------------------------------------------------------------------ input scale


def _input(rms, mean=0.0, zero_frac=0.0, abs_max=None, layer="fc0"):
    std = float(np.sqrt(max(rms ** 2 - mean ** 2, 0.0)))
    return {(layer, "input"): {"rms": rms, "mean": mean, "std": std, "zero_frac": zero_frac,
                               "abs_max": abs_max if abs_max is not None else 3 * rms}}


@pytest.mark.parametrize("case,fires", [
    (dict(rms=1.0), False), (dict(rms=40.0), True), (dict(rms=0.02), True),
    (dict(rms=0.03, zero_frac=0.999), False),  # one-hot of 1000: RMS of non-zeros is 0.95
    (dict(rms=5.0, mean=4.9), True),  # offset 4.9 / 1.0
    (dict(rms=1.0, abs_max=200.0), True), (dict(rms=1.0, abs_max=20.0), False),
])
def test_measured_input_scale(case, fires):
    found = input_stats.measured_input_scale(_frames(_rows(_input(**case))))
    assert found is not None and bool(found) is fires
    via_inputs = inputs.input_scale(_frames(_rows(_input(**case))))  # the rule calls it first
    assert [f.evidence for f in via_inputs] == [f.evidence for f in found]


def test_measured_input_scale_is_scale_free_in_its_ratios_and_skips_made_inputs():
    a = input_stats.measured_input_scale(_frames(_rows(_input(1.0, abs_max=200.0))))
    b = input_stats.measured_input_scale(_frames(_rows(_input(1e-3, abs_max=0.2))))
    assert a and b and a[0].evidence[-1].value == pytest.approx(b[0].evidence[-1].value)
    emb = _layers([("emb", "Embedding", [[10, 16]], None), ("fc0", "Linear", [[4, 16]], None)])
    assert input_stats.measured_input_scale(_frames(_rows(_input(40.0)), layers=emb)) == []
    assert input_stats.measured_input_scale(_frames(_rows({}), layers=emb)) is None


@pytest.mark.parametrize("scale,offset,fires", [(1.0, 0.0, False), (100.0, 0.0, True),
                                                (1.0, 8.0, True)])
def test_input_scale_end_to_end(tmp_path, scale, offset, fires):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 5, generator=g) * scale + offset
    y = torch.randint(0, 3, (64,), generator=g)
    run = _train(tmp_path / "r", model, x, y, steps=5, lr=1e-4)
    found = [f for f in gp.diagnose(run) if f.rule == "input-scale"]
    assert bool(found) is fires
    if fires:
        assert found[0].layers == ("0",)


# ------------------------------------------------------------------------------ through time


def _time(profile_of_step, steps=10, layer="rnn", T=30):
    recs = []
    for step in range(steps):
        g = profile_of_step(step, np.arange(T))
        recs += [{"step": step, "layer": layer, "t": t, "grad_norm": v}
                 for t, v in enumerate(g)]
    return pd.DataFrame(recs)


RNN = _layers([("rnn", "RNN", [[8, 3], [8, 8], [8], [8]], None),
               ("head", "Linear", [[2, 8], [2]], None)])


@pytest.mark.parametrize("rate", [0.5, 0.8, 0.95, 1.0, 1.3])
def test_fit_profile_recovers_a_geometric_rate(rate):
    T = 30
    g = 3e-4 * rate ** (T - 1 - np.arange(T))  # g_t = rate^(distance from the end)
    fit = recurrent.fit_profile(g)
    assert 10 ** fit[0] == pytest.approx(rate, rel=1e-9)
    assert fit[1] == pytest.approx(-np.log10(rate) * (T - 1), abs=1e-9)


@pytest.mark.parametrize("rate,rule,severity", [
    (0.7, "vanishing-gradients", "error"), (0.85, "vanishing-gradients", "warning"),
    (0.95, None, None), (1.0, None, None), (1.3, "exploding-gradients", "warning"),
    (1.5, "exploding-gradients", "error"),
])
def test_through_time_on_a_geometric_profile(rate, rule, severity):
    rng = np.random.default_rng(0)

    def prof(step, t):
        return 1e-3 * rate ** (t[-1] - t) * np.exp(rng.normal(0, 0.1, len(t)))

    found = recurrent.through_time(_frames(_rows({}), _time(prof), layers=RNN))
    assert [f.rule for f in found] == ([rule] if rule else [])
    if rule:
        f = found[0]
        assert f.layers == ("rnn",) and f.severity == severity
        assert f.evidence[0].name == "per-time-step decay rate"
        assert f.evidence[0].value == pytest.approx(rate, rel=0.02)
        scaled = recurrent.through_time(_frames(_rows({}), _time(
            lambda s, t: 1e-9 * prof(s, t)), layers=RNN))  # loss scale, batch size: cancel
        assert scaled[0].evidence[0].value == pytest.approx(f.evidence[0].value, rel=0.02)


def test_through_time_ignores_a_loss_on_every_step_and_repaired_collapses():
    # a loss at every time step: ∂L/∂x_t sums T − t losses, grows like sqrt(T − t)
    T = 10_000
    acc = _time(lambda s, t: np.sqrt(t[-1] - t + 1.0), T=T, steps=3)
    assert recurrent.through_time(_frames(_rows({}), acc, layers=RNN)) == []
    # vanishing early in the run, repaired later: the last fifth decides too
    fixed = _time(lambda s, t: (0.7 if s < 5 else 0.99) ** (t[-1] - t))
    assert recurrent.through_time(_frames(_rows({}), fixed, layers=RNN)) == []


def test_gated_cells_are_reported_as_info():
    lstm = RNN.assign(type=["LSTM", "Linear"])
    found = recurrent.through_time(_frames(_rows({}), _time(lambda s, t: 0.7 ** (t[-1] - t)),
                                           layers=lstm))
    assert found and found[0].severity == "info"


class _SeqNet(nn.Module):
    def __init__(self, cell, scale=None):
        super().__init__()
        self.rnn = cell(4, 16, batch_first=True)
        self.head = nn.Linear(16, 2)
        if scale is not None:
            with torch.no_grad():
                self.rnn.weight_hh_l0.mul_(scale)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


@pytest.mark.parametrize("scale,fires", [(0.2, True), (None, None)])
def test_through_time_end_to_end(tmp_path, scale, fires):
    """A tanh RNN with small recurrent weights on sequences of 40 steps, loss on the last:
    ∂L/∂x_t collapses geometrically into the past (checked directly below)."""
    torch.manual_seed(0)
    model = _SeqNet(nn.RNN, scale)
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(16, 40, 4, generator=g), torch.randint(0, 2, (16,), generator=g)
    # the label, measured independently of the rule: ‖∂L/∂x_0‖ / ‖∂L/∂x_T-1‖ by autograd
    xr = x.clone().requires_grad_()
    gx, = torch.autograd.grad(nn.functional.cross_entropy(model(xr), y), xr)
    ratio = float(gx[:, 0].norm() / gx[:, -1].norm())
    run = _train(tmp_path / "r", model, x, y, steps=10, lr=0.01, hist_every=2)
    tg = run.time_gradients()
    assert set(tg.step) == {0, 2, 4, 6, 8} and tg.t.max() == 39
    found = [f for f in gp.diagnose(run) if f.rule == "vanishing-gradients"
             and f.layers == ("rnn",)]
    if fires:
        assert ratio < 1e-2
        assert found and found[0].severity in ("warning", "error")
    else:  # default init on 40 steps: whatever it shows, the finding follows the measurement
        assert bool(found) is (ratio < 1e-2)


def test_through_time_remedies_apply_to_a_model_with_a_head(tmp_path):
    """Every remedy the recurrent rule names applies as the doctor applies it (an initialiser
    aimed at the recurrent layer, not one that needs a gain for the Linear head)."""
    from gradprobe.remedies import TARGETS

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.RNN(2, 32, nonlinearity="relu", batch_first=True)
            self.head = nn.Linear(32, 1)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])

    def make():
        torch.manual_seed(0)
        net = Net()
        nn.init.normal_(net.rnn.weight_hh_l0, 0.0, 0.3)  # spectral radius ~2: explodes
        return net, torch.optim.SGD(net.parameters(), lr=1e-6)

    net, opt = make()
    with gp.Probe(net, opt, run_dir=tmp_path / "r", hist_every=2) as probe:
        for _ in range(12):
            loss = net(torch.randn(8, 40, 2)).pow(2).mean()
            probe.observe_loss(loss)
            loss.backward()
            opt.step()
            opt.zero_grad()
    found = [f for f in gp.diagnose(probe.run)
             if f.layers == ("rnn",) and f.rule == "exploding-gradients"]
    assert found, gp.diagnose(probe.run).rules
    named = [r for r in found[0].remedies if r.name in TARGETS]
    assert {r.kwargs.get("scheme") for r in named if r.name == "init_"} == {"orthogonal",
                                                                            "identity"}
    for remedy in named:
        net, opt = make()
        target = net if TARGETS[remedy.name] == "model" else opt
        getattr(gp.remedies, remedy.name)(target, **remedy.kwargs)
