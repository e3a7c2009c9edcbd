"""drift: claims at a small size, a size where the first claim fails, Probe drift against a
hand-computed ‖W − W₀‖/‖W₀‖, bad options, figures."""

import math

import pytest
import torch

import gradprobe as gp
from gradprobe.errors import ConfigError
from gradprobe.lab import data, train
from gradprobe.lab.experiments import drift as D

SMALL = D.DriftConfig(depth=10, width=32, epochs=4, seeds=1)


@pytest.fixture(scope="module")
def result():
    with train.threads(1):
        return D.run(SMALL)


def test_every_claim_holds_at_small_size(result):
    assert len(result.claims) == 5
    for claim in result.claims:
        assert claim.holds, (claim.text, claim.evidence)
    t = result.table.set_index(["network", "optimizer"])
    assert t.loc[("vanishing (sigmoid, Xavier)", "sgd"), "first_over_out"] < 1e-3


def test_shallow_sigmoid_first_layer_moves():
    # two sigmoid layers attenuate the gradient by ~1/16 at most: the first layer moves
    with train.threads(1):
        r = D.run(D.DriftConfig(depth=2, width=32, epochs=3, seeds=1))
    assert not r.claim("Vanishing net under SGD: the first layer stays").holds


def test_probe_drift_is_relative_weight_distance():
    xtr, ytr, _, _ = data.digits()
    model = D._build(D.DriftConfig(depth=3, width=8), "relu", "he_normal", 0)
    w0 = {n: m.weight.detach().clone() for n, m in model.named_modules()
          if isinstance(m, torch.nn.Linear)}
    import tempfile
    run_dir = tempfile.mkdtemp() + "/r"
    train.fit(model, xtr[:256], ytr[:256], loss="cross_entropy", optimizer="sgd", lr=0.1,
              epochs=1, batch_size=256, run_dir=run_dir, probe_options={"kinds": ("drift",)})
    frame = gp.Run.open(run_dir).scalars(kinds="drift")
    for name, before in w0.items():
        after = dict(model.named_modules())[name].weight.detach()
        expected = float((after - before).norm() / before.norm())
        got = float(frame[frame.layer == name]["norm"].iloc[-1])
        assert got == pytest.approx(expected, rel=1e-4), name


def test_bad_config():
    with pytest.raises(ConfigError, match="lr_adam"):
        D.DriftConfig(lr_adam=-1.0).validate()
    with pytest.raises(ConfigError, match="depth"):
        D.DriftConfig(depth=0).validate()


def test_figures(result):
    figs = D.plot(result)
    assert set(figs) == {"drift_by_layer", "drift_over_training"}
    for fig in figs.values():
        for ax in fig.axes:
            if ax.get_label() == "<colorbar>":
                continue
            assert ax.get_yscale() == "log" and ax.get_title()
            lo, hi = ax.get_ylim()
            assert math.log10(hi / lo) < 12  # spans the data's decades, not a zero's
