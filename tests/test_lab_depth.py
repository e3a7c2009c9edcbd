"""depth-histograms: claims at a small size, and the measurements against closed forms."""

import math

import pytest
import torch

from gradprobe.errors import ConfigError
from gradprobe.lab import common, train
from gradprobe.lab.experiments import depth_histograms as dh

SMALL = dh.DepthHistogramsConfig(n_samples=300, width=200, step=10, depth=10, bins=20)


@pytest.fixture(scope="module")
def result():
    with train.threads(1):  # tiny matrices: one thread avoids contention on a shared CPU
        yield dh.run(SMALL)


def test_every_displayed_claim_holds_at_small_size(result):
    assert len(result.claims) == 8
    for claim in result.claims:
        assert claim.holds, (claim.text, claim.evidence)
    assert result.claim("tanh N(0, 0.01²): layer-10 activation std is below 1e-4").holds


def test_small_init_decays_like_linear_regime_closed_form(result):
    # Near 0, tanh(h) ≈ h, so std(a_l) ≈ 0.01 · sqrt(n_{l-1}) · std(a_{l-1}).
    t = result.tables["main"]
    t = t[t["init"] == "tanh N(0, 0.01²)"].set_index("layer")
    sizes = SMALL.sizes
    for layer in range(3, 11):
        expected = 0.01 * math.sqrt(sizes[layer - 1]) * t.loc[layer - 1, "act_std"]
        assert t.loc[layer, "act_std"] == pytest.approx(expected, rel=0.05)


def _second_moment(result, key):
    t = result.tables["main"]
    t = t[t["init"] == key].set_index("layer")
    return t["act_std"] ** 2 + t["act_mean"] ** 2, t


def test_relu_second_moment_per_layer_closed_form(result):
    # He et al. 2015 eq. 10: E[a_l²] = Var(h_l)/2 = (n_{l-1}·Var(w)/2)·E[a_{l-1}²].
    # He: Var(w) = 2/n_{l-1}, factor 1.  Xavier: Var(w) = 2/(n_{l-1}+n_l), factor n_{l-1}/(n_{l-1}+n_l).
    # One layer's factor fluctuates with the finite width; the geometric mean over 9 layers does not.
    sizes = SMALL.sizes
    for key, factor in [("relu He normal", lambda i: 1.0),
                        ("relu Xavier normal", lambda i: sizes[i - 1] / (sizes[i - 1] + sizes[i]))]:
        ms, t = _second_moment(result, key)
        logs = [math.log(ms[i] / ms[i - 1] / factor(i)) for i in range(2, 11)]
        assert math.exp(sum(logs) / len(logs)) == pytest.approx(1.0, abs=0.12), key
        assert t["zero_frac"].between(0.4, 0.6).all()  # half the ReLU outputs are exactly 0


def test_histograms_count_every_value(result):
    for (key, layer, kind), (edges, counts) in result.data["hist"].items():
        row = result.tables["main"].set_index(["init", "layer"]).loc[(key, layer)]
        n = SMALL.n_samples * row["width"]
        if kind == "act" and key.startswith("relu"):  # zeros are reported apart
            n = round(n * (1 - row["zero_frac"]))
        assert counts.sum() == n
        assert len(edges) == SMALL.bins + 1


def test_propagate_matches_autograd():
    torch.manual_seed(0)
    model = common.sequential_mlp([6, 5, 4, 3], "tanh", head=2)
    x = torch.randn(7, 6)
    y = torch.tensor([0, 1, 1, 0, 1, 0, 0])
    sig = common.propagate(model, x, lambda out: torch.nn.functional.cross_entropy(out, y))
    # reference: an explicit functional forward and torch.autograd.grad
    acts, h = [], x
    for i in range(1, 4):
        h = torch.tanh(h @ getattr(model, f"fc{i}").weight.T)
        acts.append(h)
    out = h @ model.out.weight.T
    loss = torch.nn.functional.cross_entropy(out, y)
    weights = [getattr(model, f"fc{i}").weight for i in range(1, 4)]
    grads = torch.autograd.grad(loss, acts + weights)
    for got, want in zip(sig.act_grads + sig.weight_grads, grads):
        torch.testing.assert_close(got, want)
    assert sig.names == ["act1", "act2", "act3"]
    assert all(p.grad is None for p in model.parameters())


def test_rerun_gives_identical_numbers(result):
    torch.manual_seed(123)  # the global RNG state must not matter
    again = dh.run(SMALL)
    assert again.tables["main"].equals(result.tables["main"])


def test_bad_config_is_one_clear_error():
    with pytest.raises(ConfigError, match="leaves no units"):
        dh.DepthHistogramsConfig(width=100, step=50, depth=10).validate()
    with pytest.raises(ConfigError, match="depth >= 2"):
        dh.DepthHistogramsConfig(depth=1).validate()


def test_figures_are_labelled():
    result = dh.run(dh.DepthHistogramsConfig(n_samples=50, width=40, step=5, depth=3, bins=10))
    figs = dh.plot(result)
    assert set(figs) == {"activations", "activation_gradients", "std_by_depth"}
    lines = figs["std_by_depth"].axes
    assert all(ax.get_yscale() == "log" and ax.get_xlabel() and ax.get_title() for ax in lines)
    assert [t.get_text() for t in lines[1].get_legend().get_texts()] == result.data["rows"]
    # the histogram grid shares its x-axis along each row (one init), so a collapse shows
    grid = figs["activations"].axes
    assert grid[0].get_shared_x_axes().joined(grid[0], grid[1])
    assert not grid[0].get_shared_x_axes().joined(grid[0], grid[3])  # next row: own range


def test_tightened_claims_can_fail(result):
    """Each threshold is what the phenomenon means, and a table without it fails: ReLU Xavier
    keeping its std, tanh Xavier collapsing like N(0, 0.01²), He drifting by 30 %."""
    t = result.tables["main"].copy()
    L = SMALL.depth

    def scale(key, factor):
        rows = (t["init"] == key) & (t["layer"] == L)
        t.loc[rows, "act_std"] = t.loc[rows, "act_std"] * factor

    scale("relu Xavier normal", 10.0)
    scale("tanh Xavier normal", 0.5)
    scale("relu He normal", 0.7)
    failed = [c.text.split(":")[0] for c in dh._claims(t, L, SMALL.sizes) if not c.holds]
    assert failed == ["tanh Xavier normal", "ReLU Xavier normal", "ReLU He normal"]
