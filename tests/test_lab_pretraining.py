"""pretraining: claims at a small size, a depth at which random init trains without help, bad
options, figures."""

import pytest

from gradprobe.errors import ConfigError
from gradprobe.lab import train
from gradprobe.lab.experiments import pretraining as P

SMALL = P.PretrainingConfig(depth=4, width=64, epochs=15, pretrain_epochs=10, seeds=1)


@pytest.fixture(scope="module")
def result():
    with train.threads(1):
        return P.run(SMALL)


def test_every_claim_holds_at_small_size(result):
    assert len(result.claims) == 5
    for claim in result.claims:
        assert claim.holds, (claim.text, claim.evidence)


def test_shallow_sigmoid_needs_no_pretraining():
    with train.threads(1):
        r = P.run(P.PretrainingConfig(depth=2, width=32, epochs=10, pretrain_epochs=2, seeds=1))
    assert not r.claim("Random init:").holds
    assert not r.claim("Pretraining helps").holds


def test_tables(result):
    t = result.table.set_index("model")
    assert list(t.index) == list(P.MODELS)
    # pretraining leaves the output layer random: accuracy before fine-tuning is near chance
    assert (t["test_acc_before"] < 0.2).all()
    recon = result.tables["reconstruction"]
    assert list(recon["layer"]) == [f"fc{i}" for i in range(1, SMALL.depth + 1)]


def test_bad_config():
    with pytest.raises(ConfigError, match="momentum"):
        P.PretrainingConfig(momentum=1.0).validate()
    with pytest.raises(ConfigError, match="pretrain_epochs"):
        P.PretrainingConfig(pretrain_epochs=0).validate()


def test_figure(result):
    figs = P.plot(result)
    assert set(figs) == {"pretraining"}
    loss_ax, acc_ax, recon_ax = figs["pretraining"].axes
    assert loss_ax.get_yscale() == "log" and recon_ax.get_yscale() == "log"
    assert acc_ax.get_ylabel() == "test accuracy"
