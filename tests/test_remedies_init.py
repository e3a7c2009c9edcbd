"""gp.remedies.init_ against closed-form variances and torch.nn.init."""

import math

import pytest
import torch
from torch import nn

from gradprobe.errors import ConfigError, UnsupportedModelError
from gradprobe.remedies import SCHEMES, init_


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------ closed-form variances
# Formulas written out here independently of the implementation (fi = 1200, fo = 800).
FI, FO = 1200, 800
CLOSED_FORM = {
    # scheme: (std of the distribution, uniform bound or None), for ReLU (gain sqrt 2)
    "xavier_normal": (math.sqrt(2) * math.sqrt(2 / (FI + FO)), None),
    "xavier_uniform": (math.sqrt(2) * math.sqrt(2 / (FI + FO)), math.sqrt(2) * math.sqrt(6 / (FI + FO))),
    "he_normal": (math.sqrt(2 / FI), None),
    "he_uniform": (math.sqrt(2 / FI), math.sqrt(6 / FI)),
    "lecun_normal": (math.sqrt(1 / FI), None),
    "lecun_uniform": (math.sqrt(1 / FI), math.sqrt(3 / FI)),
}


@pytest.mark.parametrize("scheme", sorted(CLOSED_FORM))
def test_empirical_std_matches_closed_form(scheme):
    net = nn.Sequential(nn.Linear(FI, FO), nn.ReLU())
    record = init_(net, scheme, generator=gen())
    w = net[0].weight.detach().double()
    std, bound = CLOSED_FORM[scheme]
    # 960k draws: the sample std is within 0.5 % of the true one with overwhelming probability
    assert w.std().item() == pytest.approx(std, rel=5e-3)
    assert abs(w.mean().item()) < 5 * std / math.sqrt(w.numel())
    (entry,) = record
    assert entry.std == pytest.approx(std, rel=1e-12)
    if bound is None:
        assert entry.bound is None
        # normal: about 0.27 % of draws beyond 3 std
        assert (w.abs() > 3 * std).double().mean().item() == pytest.approx(0.0027, abs=6e-4)
    else:
        assert entry.bound == pytest.approx(bound, rel=1e-12)
        assert w.abs().max().item() <= bound
        assert w.abs().max().item() > 0.999 * bound


def test_normal_and_uniform_use_std_directly():
    lin = nn.Linear(1000, 1000)
    init_(lin, "normal", std=0.05, generator=gen())
    assert lin.weight.std().item() == pytest.approx(0.05, rel=5e-3)
    init_(lin, "uniform", std=0.05, generator=gen())
    assert lin.weight.std().item() == pytest.approx(0.05, rel=5e-3)
    assert lin.weight.abs().max().item() <= 0.05 * math.sqrt(3)


def test_zeros_and_bias():
    net = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 1))
    init_(net, "zeros", bias=0.5)
    assert all((m.weight == 0).all() for m in (net[0], net[2]))
    assert all((m.bias == 0.5).all() for m in (net[0], net[2]))
    before = net[0].bias.clone()
    init_(net, "he_normal", bias=None)
    assert torch.equal(net[0].bias, before)


# ------------------------------------------------------------------ against torch.nn.init
TORCH_EQUIV = [
    ("xavier_normal", "tanh", lambda w, g: nn.init.xavier_normal_(w, gain=5 / 3, generator=g)),
    ("xavier_uniform", "sigmoid", lambda w, g: nn.init.xavier_uniform_(w, gain=1.0, generator=g)),
    ("he_normal", "relu", lambda w, g: nn.init.kaiming_normal_(w, nonlinearity="relu", generator=g)),
    ("he_uniform", "relu", lambda w, g: nn.init.kaiming_uniform_(w, nonlinearity="relu", generator=g)),
    ("he_normal", "leaky_relu",
     lambda w, g: nn.init.kaiming_normal_(w, a=0.01, nonlinearity="leaky_relu", generator=g)),
    ("lecun_normal", "selu", lambda w, g: nn.init.kaiming_normal_(w, nonlinearity="linear", generator=g)),
    ("orthogonal", "relu", lambda w, g: nn.init.orthogonal_(w, gain=math.sqrt(2), generator=g)),
]


@pytest.mark.parametrize("scheme,act,reference", TORCH_EQUIV, ids=[f"{s}-{a}" for s, a, _ in TORCH_EQUIV])
@pytest.mark.parametrize("layer", ["linear", "conv2d", "conv1d-groups"])
def test_bitwise_equal_to_torch_nn_init(scheme, act, reference, layer):
    def make():
        if layer == "linear":
            return nn.Linear(30, 20)
        if layer == "conv2d":
            return nn.Conv2d(3, 8, kernel_size=(3, 5))
        return nn.Conv1d(4, 6, kernel_size=3, groups=2)

    ours, theirs = make(), make()
    init_(ours, scheme, activation=act, generator=gen(3))
    with torch.no_grad():
        reference(theirs.weight, gen(3))
    assert torch.equal(ours.weight, theirs.weight)


def test_conv_fans_match_torch():
    from torch.nn.init import _calculate_fan_in_and_fan_out

    conv = nn.Conv3d(6, 9, kernel_size=(2, 3, 4), groups=3)
    rec = init_(conv, "he_normal", activation="relu")
    (e,) = rec
    assert (e.fan_in, e.fan_out) == _calculate_fan_in_and_fan_out(conv.weight)
    assert e.fan_in == (6 // 3) * 2 * 3 * 4


def test_orthogonal_rows_are_orthonormal_times_gain():
    net = nn.Sequential(nn.Linear(64, 32), nn.Tanh())
    init_(net, "orthogonal", generator=gen())
    w = net[0].weight.double()
    torch.testing.assert_close(w @ w.T, (5 / 3) ** 2 * torch.eye(32, dtype=torch.float64), atol=1e-5, rtol=0)


# ------------------------------------------------------------------ recurrent layers
def test_lstm_gates_initialised_blockwise_with_gate_gains():
    lstm = nn.LSTM(8, 16, num_layers=2)
    rec = init_(lstm, "orthogonal", generator=gen())
    assert len(rec) == 2 * 2 * 4  # layers x (ih, hh) x gates
    gates = [e.gate for e in rec if e.param == "weight_hh_l0"]
    assert gates == ["i", "f", "g", "o"]
    for e, block in zip([e for e in rec if e.param == "weight_hh_l0"], lstm.weight_hh_l0.chunk(4)):
        gain = 5 / 3 if e.gate == "g" else 1.0
        assert e.gain == pytest.approx(gain)
        torch.testing.assert_close(block @ block.T, gain**2 * torch.eye(16), atol=1e-5, rtol=0)
    assert all((b == 0).all() for n, b in lstm.named_parameters() if n.startswith("bias"))


def test_gru_input_blocks_match_xavier_closed_form():
    gru = nn.GRU(300, 200)
    init_(gru, "xavier_normal", generator=gen())
    r, z, n = gru.weight_ih_l0.chunk(3)
    std = math.sqrt(2 / (300 + 200))
    assert r.std().item() == pytest.approx(std, rel=2e-2)
    assert n.std().item() == pytest.approx(5 / 3 * std, rel=2e-2)


def test_identity_irnn():
    rnn = nn.RNN(50, 40, nonlinearity="relu")
    rec = init_(rnn, "identity", generator=gen())
    assert torch.equal(rnn.weight_hh_l0, torch.eye(40))
    assert rnn.weight_ih_l0.std().item() == pytest.approx(0.001, rel=0.05)
    assert {e.scheme for e in rec} == {"identity", "normal"}
    sq = nn.Linear(6, 6)
    init_(sq, "identity", gain=0.5)
    assert torch.equal(sq.weight, 0.5 * torch.eye(6))


@pytest.mark.parametrize("module", [nn.Linear(3, 4), nn.Conv1d(2, 2, 1), nn.LSTM(3, 3)],
                         ids=["non-square", "conv", "lstm"])
def test_identity_not_applicable(module):
    with pytest.raises(ConfigError, match="identity"):
        init_(module, "identity")


# ------------------------------------------------------------------ which activation
def test_auto_activation_sequential_and_output_fallback():
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(),
                        nn.Linear(4, 1))
    rec = init_(net, "xavier_normal")
    assert [(e.layer, e.activation, e.found_by) for e in rec] == [
        ("0", "tanh", "traced"), ("3", "tanh", "traced"), ("5", "tanh", "model-wide")]
    assert rec.order == "traced"


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.b = nn.Linear(4, 4)  # registered first, called second
        self.a = nn.Linear(4, 4)
        self.out = nn.Linear(4, 1)
        self.act = nn.ReLU()

    def forward(self, x):
        x = torch.nn.functional.gelu(self.a(x))
        x = self.act(self.b(x))
        return self.out(x)


def test_auto_activation_follows_execution_order_and_functional_calls():
    rec = init_(Functional(), "he_normal", layers=["a", "b"])
    found = {e.layer: e.activation for e in rec}
    assert found == {"a": "gelu", "b": "relu"}
    assert rec.order == "traced"


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act1 = nn.Linear(4, 4), nn.Sigmoid()
        self.fc2, self.act2 = nn.Linear(4, 4), nn.Sigmoid()

    def forward(self, x):
        x = self.act1(self.fc1(x))
        if x.sum() > 0:  # data-dependent branch: torch.fx cannot trace this
            x = x * 2
        return self.act2(self.fc2(x))


def test_untraceable_model_falls_back_to_registration_order():
    rec = init_(Untraceable(), "xavier_uniform")
    assert rec.order == "registration"
    assert [(e.layer, e.activation, e.gain) for e in rec] == [("fc1", "sigmoid", 1.0), ("fc2", "sigmoid", 1.0)]


def test_ambiguous_or_missing_activation_errors():
    mixed = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 1))
    with pytest.raises(ConfigError, match="layer '4' has no activation after it") as info:
        init_(mixed, "he_normal")
    assert "activation=" in info.value.hint
    rec = init_(mixed, "he_normal", activation="relu")  # explicit resolves it
    assert [e.gain for e in rec] == pytest.approx([math.sqrt(2)] * 3)
    init_(mixed, "lecun_normal")  # gain-free schemes need no activation
    bare = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="could not find the activation of layer '0'"):
        init_(bare, "orthogonal")
    assert len(init_(bare, "orthogonal", activation="identity")) == 2


# ------------------------------------------------------------------ mechanics and errors
def test_in_place_no_grad_record_and_reproducible():
    net = nn.Sequential(nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 2))
    w_before = net[0].weight
    rec = init_(net, "he_uniform", generator=gen(7))
    assert net[0].weight is w_before and net[0].weight.is_leaf and net[0].weight.requires_grad
    first = net[0].weight.clone()
    init_(net, "he_uniform", generator=gen(7))
    assert torch.equal(first, net[0].weight)
    assert rec.to_frame()[["layer", "scheme"]].values.tolist() == [["0", "he_uniform"], ["2", "he_uniform"]]


def test_tied_weights_initialised_once_and_layers_patterns():
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    net[2].weight = net[0].weight
    rec = init_(net, "he_normal")
    assert [e.layer for e in rec] == ["0", "4"]
    rec = init_(net, "zeros", layers=["4"])
    assert (net[4].weight == 0).all() and not (net[0].weight == 0).all()
    with pytest.raises(ConfigError, match="matches no module") as info:
        init_(net, "zeros", layers=["fc*"])
    assert "0, 1, 2" in info.value.hint


def test_scheme_and_argument_errors():
    net = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.BatchNorm1d(3))
    with pytest.raises(ConfigError, match="unknown initialisation scheme 'kaiming'") as info:
        init_(net, "kaiming")  # type: ignore[arg-type]
    assert all(s in info.value.hint for s in SCHEMES)
    with pytest.raises(ConfigError, match="'normal' needs std="):
        init_(net, "normal")
    with pytest.raises(ConfigError, match="std= applies only"):
        init_(net, "he_normal", std=0.1)
    with pytest.raises(ConfigError, match="gain= does not apply"):
        init_(net, "uniform", std=0.1, gain=2.0)
    with pytest.raises(ConfigError, match="std must be"):
        init_(net, "normal", std=-1.0)
    with pytest.raises(ConfigError, match="unknown activation"):
        init_(net, "he_normal", activation="swish9")
    with pytest.raises(UnsupportedModelError, match="BatchNorm1d"):
        init_(net, "he_normal", layers=["2"])
    with pytest.raises(UnsupportedModelError, match="no Linear"):
        init_(nn.Sequential(nn.ReLU()), "he_normal")
    with pytest.raises(UnsupportedModelError, match="needs an nn.Module"):
        init_("model", "he_normal")  # type: ignore[arg-type]
