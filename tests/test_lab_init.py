"""init study: zero-init symmetry exactly, the gain study against closed forms, claims at a small size."""

import math

import pytest
import torch

from gradprobe.errors import ConfigError
from gradprobe.lab import train
from gradprobe.lab.experiments import init_study as S

SMALL = S.InitStudyConfig(
    depth=12, width=32, inits=("zeros", "normal_0.01", "he_normal", "orthogonal"),
    epochs=7, lr=3e-3, symmetry_steps=10, gain_width=64, gain_samples=128, gains=(1.0, 5 / 3, 4.0, 8.0, 12.0),
)


@pytest.fixture(scope="module")
def result():
    with train.threads(1):  # tiny matrices: one thread avoids contention on a shared CPU
        yield S.run(SMALL)


def test_every_displayed_claim_holds_at_small_size(result):
    texts = [c.text for c in result.claims]
    assert len(texts) == 12, texts
    for claim in result.claims:
        assert claim.holds, (claim.text, claim.evidence)


@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu"])
def test_zero_init_loss_is_exactly_ln2_and_units_identical(activation):
    out = S.symmetry(activation, depth=5, width=6, steps=15, seed=3)
    # ln 2 computed independently: BCE at logit 0 is -ln(1/2)
    ln2 = -math.log(0.5)
    assert all(v == out["losses"][0] for v in out["losses"])  # bitwise constant
    assert abs(out["losses"][0] - ln2) <= 2 * math.ulp(ln2)
    assert out["identical"]
    assert out["n_pos"] == out["n_neg"]


def test_symmetry_checker_detects_broken_symmetry():
    # reference: the same identity test on a model whose units differ must fail
    from gradprobe.lab.common import sequential_mlp

    model = sequential_mlp([2, 4, 4], "tanh", bias=True, head=1)
    w = model.fc2.weight
    assert not torch.equal(w, w[:1].expand_as(w))


def test_gain_profile_linear_closed_form():
    # identity activation: Var[a_l] = g² Var[a_(l-1)] (forward) and Var[g_(l-1)] = g² Var[g_l]
    x = torch.randn(512, 256, generator=torch.Generator().manual_seed(0))
    g = 1.5
    p = S.gain_profile(lambda t: t, g, x, 8, torch.Generator().manual_seed(1))
    fwd = [b / a for a, b in zip(p["fwd_var"], p["fwd_var"][1:])]
    bwd = [a / b for a, b in zip(p["bwd_var"], p["bwd_var"][1:])]
    for ratios in (fwd, bwd):
        geo = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
        assert geo == pytest.approx(g * g, rel=0.05)


def test_gain_table_factor_4_on_tanh_is_wrong(result):
    gains = result.tables["gains"]
    tanh = gains[gains["activation"] == "tanh"].set_index("gain")
    # gain 4 on tanh: saturated forward pass and exploding backward pass
    assert tanh.loc[4.0, "saturated_last"] > 0.3
    assert tanh.loc[4.0, "bwd_factor_per_layer"] > 2.0
    assert 0.8 < tanh.loc[1.0, "bwd_factor_per_layer"] < 1.0
    sig = gains[gains["activation"] == "sigmoid"]
    assert (sig["mean_last"] > 0.45).all()  # sigmoid's mean: the caveat behind factor 4


def test_grid_gradient_ratio_and_small_init_vanishing(result):
    main = result.tables["main"].set_index(["activation", "key"])
    for _, row in main.iterrows():
        if row["grad_last"] > 0:
            assert row["grad_ratio"] == pytest.approx(row["grad_first"] / row["grad_last"])
        else:  # both underflowed to 0: reported as NaN, never as a ratio of 1 or 0
            assert math.isnan(row["grad_ratio"])
    # N(0, 0.01²): each layer scales the signal by ~0.01·√32 ≈ 0.06, so the first layer's gradient
    # is many orders below what He initialisation gives the same layer
    for act in ("tanh", "relu"):
        assert main.loc[(act, "normal_0.01"), "grad_first"] < 1e-6 * main.loc[(act, "he_normal"), "grad_first"]


def test_bad_options_are_clear_errors():
    with pytest.raises(ConfigError, match="unknown initialisation"):
        S.InitStudyConfig(inits=("kaiming",)).validate()
    with pytest.raises(ConfigError, match="unknown activation"):
        S.InitStudyConfig(activations=("swish9",)).validate()
    with pytest.raises(ConfigError, match="gains must be positive"):
        S.InitStudyConfig(gains=(1.0, -2.0)).validate()


def test_figures(result):
    figs = S.plot(result)
    assert set(figs) == {"gain_study", "accuracy", "grad_ratio", "grad_profiles"}
    for k, ax in enumerate(figs["gain_study"].axes[:6]):
        assert ax.get_yscale() == "log" and ax.get_title() and ax.get_ylabel()
        assert ax.get_xlabel() or k < 3  # the top row shares the bottom row's x-axis


def test_scaled_init_claim_can_fail():
    """The ratio band is tight enough to fail: a table where one init's first layer gets 5x the
    last layer's gradient (N(0, 1)-like growth) breaks it."""
    main = S.pd.DataFrame({
        "activation": ["tanh", "tanh"], "key": ["he_normal", "orthogonal"], "init": ["He", "orth"],
        "grad_ratio": [1.2, 5.0], "test_acc_after": [0.9, 0.9]})
    gains = S.pd.DataFrame(columns=["activation", "gain"])
    sym = S.pd.DataFrame({"activation": ["tanh"], "steps": [1], "loss_last": [0.69],
                          "loss_constant": [True], "loss_minus_ln2": [0.0], "units_identical": [True]})
    cfg = S.InitStudyConfig(activations=("tanh",), inits=("he_normal", "orthogonal"), gains=(2.0,))
    claim = next(c for c in S._claims(cfg, main, gains, sym) if c.text.startswith("tanh: every"))
    assert not claim.holds
    main.loc[1, "grad_ratio"] = 3.0
    claim = next(c for c in S._claims(cfg, main, gains, sym) if c.text.startswith("tanh: every"))
    assert claim.holds


def test_rows_are_named_by_scheme_and_gain(result):
    main = result.tables["main"].set_index(["activation", "key"])
    assert main.loc[("relu", "he_normal"), "row"] == "He normal × g"
    assert main.loc[("relu", "he_normal"), "gain"] == pytest.approx(2 ** 0.5)
    assert main.loc[("tanh", "orthogonal"), "gain"] == pytest.approx(5 / 3)
    assert math.isnan(main.loc[("tanh", "zeros"), "gain"])


def test_gain_profile_is_float64_and_draws_no_floor(result):
    for p in result.data["gain_profiles"].values():
        assert min(p["bwd_var"]) > 0  # 1e-37 and below are representable: nothing underflows
    figs = S.plot(result)
    for ax in figs["grad_profiles"].axes:
        for line in ax.get_lines():
            y = line.get_ydata()
            assert not (S.np.asarray(y, float) <= 1e-39).any()  # no zero drawn at a floor
