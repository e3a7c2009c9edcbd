"""activations study: the measurements against direct computations, claims at a small size."""

import math

import pytest
import torch

from gradprobe import activations as A
from gradprobe.errors import ConfigError
from gradprobe.lab import train
from gradprobe.lab.common import dead_fraction, saturated_fraction
from gradprobe.lab.experiments import activation_study as S

SMALL = S.ActivationStudyConfig(depth=12, width=32, epochs=7, lr=3e-3)


@pytest.fixture(scope="module")
def result():
    with train.threads(1):  # tiny matrices: one thread avoids contention on a shared CPU
        yield S.run(SMALL)


def test_every_displayed_claim_holds_at_small_size(result):
    assert len(result.claims) == 3
    for claim in result.claims:
        assert claim.holds, (claim.text, claim.evidence)
    assert list(result.table["activation"]) == list(S.DEFAULT_ACTIVATIONS)


def test_recommended_inits_and_gains(result):
    t = result.table.set_index("activation")
    assert t.loc["selu", "init"] == "lecun_normal" and t.loc["selu", "gain"] == 1.0
    assert t.loc["tanh", "gain"] == pytest.approx(5 / 3)
    assert t.loc["leaky_relu", "gain"] == pytest.approx(math.sqrt(2 / (1 + 0.01**2)))


def test_dead_and_saturated_fractions_match_slow_loops():
    torch.manual_seed(0)
    a = torch.relu(torch.randn(50, 40) - 1.5)  # many units never fire
    slow = sum(all(a[i, j] <= 0 for i in range(50)) for j in range(40)) / 40
    assert dead_fraction(A.get("relu"), a) == pytest.approx(slow)
    assert slow > 0  # the example has dead units to find
    t = torch.tanh(3 * torch.randn(30, 20))
    slow_sat = sum(float(1 - t[i, j] ** 2) < 0.05 for i in range(30) for j in range(20)) / 600
    assert saturated_fraction(A.get("tanh"), t) == pytest.approx(slow_sat)
    assert math.isnan(dead_fraction(A.get("elu"), a))
    assert math.isnan(saturated_fraction(A.get("relu"), a))


def test_gradient_ratio_matches_autograd():
    from gradprobe.lab.common import sequential_mlp

    torch.manual_seed(1)
    model = sequential_mlp([5, 6, 6, 6], "gelu", bias=True, head=3)
    x, y = torch.randn(20, 5), torch.randint(0, 3, (20,))
    m = S.measure(model, x, y, "cross_entropy")
    loss = torch.nn.functional.cross_entropy(model(x), y)
    g1, g3 = torch.autograd.grad(loss, [model.fc1.weight, model.fc3.weight])
    assert m["grad_ratio"] == pytest.approx(float(g1.norm() / g3.norm()), rel=1e-5)


def test_bad_config():
    with pytest.raises(ConfigError, match="unknown activation"):
        S.ActivationStudyConfig(activations=("relu", "swish9")).validate()
    with pytest.raises(ConfigError, match="at least one"):
        S.ActivationStudyConfig(activations=()).validate()


def test_figure(result):
    figs = S.plot(result)
    ax = figs["activations"].axes[0]
    assert ax.get_yscale() == "log" and ax.get_title() and ax.get_xlabel()
    # one legend, beside the loss panel, names the lines of both line panels
    labels = [t.get_text() for t in figs["activations"].axes[1].get_legend().get_texts()]
    assert labels == list(S.DEFAULT_ACTIVATIONS)
    assert [line.get_label() for line in ax.get_lines()][:len(labels)] == labels
    colors = {line.get_color() if isinstance(line.get_color(), str) else tuple(line.get_color())
              for line in ax.get_lines()}
    assert len(colors) == len(S.DEFAULT_ACTIVATIONS)  # one distinct colour each
