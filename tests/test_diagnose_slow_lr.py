"""The too-small learning rate of a run that still descends (diagnose/slow.py), on real runs
and on hand-made loss curves checked against an independent least-squares fit."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

import gradprobe as gp
from gradprobe.diagnose import slow
from gradprobe.diagnose.finding import Finding
from gradprobe.diagnose.frames import Frames
from gradprobe.lab import train, zoo
from gradprobe.lab.data import circles


def _train(path, lr, epochs):
    """The doctor suite's lr-100x-small model (2-64-64-1 ReLU MLP, He init, SGD + momentum,
    binary cross-entropy on circles) through the lab's loop: 4 steps per epoch."""
    with train.seeded(0):
        model = zoo.mlp([2, 64, 64, 1], "relu")
        gp.remedies.init_(model, "he_normal")
    x, y, _, _ = circles(1000, noise=0.08)
    train.fit(model, x, y, loss="bce", optimizer="momentum", lr=lr, batch_size=128,
              epochs=epochs, run_dir=path, probe_every=1, probe_options={"budget": None})
    return gp.Run.open(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("slow")
    return {"small": _train(root / "small", 1e-3, 75),      # 100x below the good rate
            "good": _train(root / "good", 0.1, 15),         # the good rate, still descending
            "converged": _train(root / "converged", 0.1, 75)}


def _lr_findings(run):
    return [f for f in gp.diagnose(run) if f.rule == "learning-rate"]


def test_fires_on_a_rate_100x_too_small(runs):
    found = _lr_findings(runs["small"])
    assert len(found) == 1 and found[0].severity == "warning", found
    f = found[0]
    ratio = next(e for e in f.evidence if e.name.startswith("update/weight"))
    assert ratio.value <= slow.SMALL
    assert {(r.name, r.kwargs["factor"]) for r in f.remedies} == {("set_lr_", 10.0),
                                                                  ("set_lr_", 100.0)}
    # the evidence is the run's own loss, read back independently of the rule
    losses = runs["small"].losses().sort_values("step")["loss"].to_numpy()
    removed = next(e for e in f.evidence if e.name.startswith("fraction"))
    end = np.median(losses[-(len(losses) // 5):])
    assert removed.value == pytest.approx((losses[0] - end) / losses[0])


@pytest.mark.parametrize("name", ["good", "converged"])
def test_silent_at_the_good_rate(runs, name):
    assert not _lr_findings(runs[name]), gp.diagnose(runs[name])
    shape = slow.loss_shape(Frames.of(runs[name]))
    # the converged run fails the loss tests themselves, not only the ratio gate
    assert name != "converged" or not slow.descending(shape), shape


def test_a_gradient_flow_finding_silences_it(runs, monkeypatch):
    frames = Frames.of(runs["small"])
    assert slow.slow_learning_rate(frames)
    flow = Finding("exploding-gradients", "warning", (), None, (), "", ())
    monkeypatch.setattr(slow, "SILENCED_BY", (lambda fr: [flow],))
    assert not slow.slow_learning_rate(frames)
    info = Finding("exploding-gradients", "info", (), None, (), "", ())
    monkeypatch.setattr(slow, "SILENCED_BY", (lambda fr: [info],))
    assert slow.slow_learning_rate(frames)


def _curve(values):
    empty = pd.DataFrame(columns=["step", "layer", "kind", "norm"])
    return Frames(layers=pd.DataFrame(), scalars=empty,
                  losses=pd.DataFrame({"step": np.arange(len(values)), "loss": values}))


def test_loss_shape_against_a_least_squares_fit():
    rng = np.random.default_rng(0)
    n = 200
    line = 1.0 - 0.001 * np.arange(n) + rng.normal(0, 0.01, n)
    shape = slow.loss_shape(_curve(line))
    fit = stats.linregress(np.arange(n // 2, n), line[n // 2:])
    assert shape["t"] == pytest.approx(fit.slope / fit.stderr, rel=1e-9)
    assert shape["share"] == pytest.approx(0.5, abs=0.1)  # a straight line: half in each half
    assert slow.descending(shape)
    converged = 0.5 + 0.5 * np.exp(-np.arange(n) / 10.0) + rng.normal(0, 0.01, n)
    shape = slow.loss_shape(_curve(converged))
    assert abs(shape["share"]) < 0.05 and not slow.descending(shape)
    flat = 1.0 + rng.normal(0, 0.01, n)
    assert not slow.descending(slow.loss_shape(_curve(flat)))
    assert slow.loss_shape(_curve(line[:slow.MIN_STEPS - 1])) is None
    with_nan = line.copy()
    with_nan[50] = math.nan
    assert slow.loss_shape(_curve(with_nan))["start"] == line[0]


def test_each_loss_test_rejects_on_its_own():
    """A still-falling line that already removed most of its loss, and a fall made early
    followed by a slow steady tail: each fails exactly one of the loss tests."""
    n = 200
    steps = np.arange(n)
    steep = 1.0 - 0.7 * steps / (n - 1)  # straight and falling, but 70 % removed
    shape = slow.loss_shape(_curve(steep))
    assert shape["t"] <= -slow.FALLING_T and shape["share"] >= slow.LINEAR
    assert shape["removed"] > slow.REMOVED and not slow.descending(shape)
    early = np.where(steps < 20, 1.0 - 0.3 * steps / 20, 0.7 - 0.05 * (steps - 20) / (n - 20))
    shape = slow.loss_shape(_curve(early))
    assert shape["t"] <= -slow.FALLING_T and shape["removed"] <= slow.REMOVED
    assert shape["share"] < slow.LINEAR and not slow.descending(shape)


def test_the_ratio_gate(runs, monkeypatch):
    """The same slow run with the gate set below its own median update ratio is silent."""
    frames = Frames.of(runs["small"])
    typical, _, _ = slow.step_ratios(frames)
    assert slow.slow_learning_rate(frames)
    monkeypatch.setattr(slow, "SMALL", typical / 2)
    assert not slow.slow_learning_rate(Frames.of(runs["small"]))
