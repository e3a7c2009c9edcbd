"""deep-relu: Xavier vs He on a 30-layer ReLU MLP, claims at a small size and closed forms."""

import math

import pytest

import gradprobe as gp
from gradprobe.errors import ConfigError
from gradprobe.lab import train
from gradprobe.lab.experiments import deep_relu as D

SMALL = D.DeepReluConfig(depth=30, width=32, epochs=10, batch_size=64)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("deep-relu")
    with train.threads(1):  # tiny matrices: one thread avoids contention on a shared CPU
        yield D.run(SMALL, out=out)


def test_every_displayed_claim_holds_at_small_size(result):
    assert len(result.claims) == 4
    for claim in result.claims:
        assert claim.holds, (claim.text, claim.evidence)


def test_variance_per_layer_follows_he_eq10(result):
    # E[a_l²] = ½·n·Var[W]·E[a_(l-1)²]: factor ½ per layer for Var W = 1/n, 1 for Var W = 2/n.
    # One layer fluctuates at width 32; the geometric mean over 29 layers does not.
    for label, factor in [("Xavier", 0.5), ("He", 1.0)]:
        var = result.data["act_var"][label]
        geo = (var[-1] / var[0]) ** (1 / (len(var) - 1))
        assert geo == pytest.approx(factor, rel=0.15), label
    table = result.table.set_index("init")
    assert table.loc["Xavier", "theory_ratio"] == 2.0 ** -29


def test_runs_are_probe_run_directories(result):
    assert set(result.runs) == {"Xavier", "He"}
    for label, path in result.runs.items():
        run = gp.Run.open(path)
        grad = run.scalars(kinds="grad")
        fc = sorted(set(grad[grad["layer"].str.startswith("fc")]["layer"]))
        assert len(fc) == SMALL.depth
        # the probe's per-layer gradient norms are what the figure draws
        frame = result.data["grad_norms"][label]
        assert len(frame) == len(grad[grad["layer"].str.startswith("fc")])
        assert (frame["norm"] > 0).all() and frame["norm"].map(math.isfinite).all()


def test_bad_config():
    with pytest.raises(ConfigError, match="momentum"):
        D.DeepReluConfig(momentum=1.5).validate()
    with pytest.raises(ConfigError, match="depth >= 2"):
        D.DeepReluConfig(depth=1).validate()


def test_figures(result):
    figs = D.plot(result)
    assert set(figs) == {"deep_relu", "grad_norms"}
    ax = figs["deep_relu"].axes[0]
    assert ax.get_yscale() == "log" and ax.get_title() and ax.get_xlabel()


def test_weight_and_bias_gradients_apart_recompose_the_probes_record(result):
    """The hooks' weight-only and bias-only norms at the Probe's steps give back what the Probe
    recorded for the whole module: ‖(∂W, ∂b)‖² = ‖∂W‖² + ‖∂b‖²."""
    for frame in result.data["grad_norms"].values():
        both = (frame["norm"] ** 2 + frame["bias_norm"] ** 2) ** 0.5
        assert both.to_numpy() == pytest.approx(frame["norm_w_and_b"].to_numpy(), rel=1e-4)


def test_xavier_stall_is_uniformly_small_weight_gradients(result):
    """docs/initialisation.md: with Xavier the gradient reaching layer l shrinks √2 per layer
    going down, the activations shrink going up, and the weight gradients come out equally small
    in every layer; He's are orders of magnitude larger."""
    x, h = result.data["profiles"]["Xavier"], result.data["profiles"]["He"]
    L = SMALL.depth
    arriving = x["act_grad_norm"].iloc[0] / x["act_grad_norm"].iloc[-1]
    assert 0.5 < arriving / 2 ** (-(L - 1) / 2) < 2.0
    w = x["weight_grad_norm"]
    assert w.max() / w.min() < 10
    assert w.max() < 1e-3 * h["weight_grad_norm"].min()
