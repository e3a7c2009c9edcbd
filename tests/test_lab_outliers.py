"""outliers: claims at a small size, a magnitude where the outliers are harmless, the corrupted
rows, bad options, figures."""

import math

import pytest
import torch

from gradprobe.errors import ConfigError
from gradprobe.lab import train
from gradprobe.lab.experiments import outliers as O

SMALL = O.OutliersConfig(epochs=8, seeds=1)


@pytest.fixture(scope="module")
def result():
    with train.threads(1):
        return O.run(SMALL)


def test_every_claim_holds_at_small_size(result):
    assert len(result.claims) == 6
    for claim in result.claims:
        assert claim.holds, (claim.text, claim.evidence)


def test_rows_times_three_are_harmless():
    with train.threads(1):
        r = O.run(O.OutliersConfig(magnitude=3.0, epochs=4, seeds=1))
    assert not r.claim("Outliers blow up the first layer's gradient").holds
    assert not r.claim("Outliers blow up the loss").holds


def test_corrupt_scales_only_the_chosen_rows():
    x = torch.randn(1000, 2)
    bad, rows = O.corrupt(x, 0.005, 1e4, seed=0)
    assert len(rows) == 5 and len(set(rows.tolist())) == 5
    mask = torch.zeros(1000, dtype=torch.bool)
    mask[rows] = True
    assert torch.equal(bad[~mask], x[~mask])
    assert torch.allclose(bad[mask], x[mask] * 1e4)


def test_table_and_steps(result):
    t = result.table.set_index("setting")
    assert list(t.index) == list(O.SETTINGS)
    assert t.loc["clean", "outlier_rows"] == 0 and t.loc["outliers", "outlier_rows"] == 5
    steps = result.tables["steps"]
    per_run = steps.groupby(["setting", "seed"]).size()
    assert (per_run == SMALL.epochs * math.ceil(SMALL.n_samples / 2 / SMALL.batch_size)).all()


def test_bad_config():
    with pytest.raises(ConfigError, match="outlier_fraction"):
        O.OutliersConfig(outlier_fraction=0.0).validate()
    with pytest.raises(ConfigError, match="magnitude"):
        O.OutliersConfig(magnitude=-1.0).validate()


def test_figures(result):
    figs = O.plot(result)
    assert set(figs) == {"loss_and_gradient", "accuracy"}
    axes = figs["loss_and_gradient"].axes
    assert all(ax.get_yscale() == "log" for ax in axes)
    # panels that are compared share their y range
    assert len({ax.get_ylim() for ax in axes[:5]}) == 1
