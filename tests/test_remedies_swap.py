"""gp.remedies.swap_activations_: modules, fx-rewritten functional calls, SELU, errors."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradprobe.errors import ConfigError, UnsupportedModelError
from gradprobe.remedies import init_, swap_activations_

torch.set_num_threads(1)


def sigmoid_mlp(depth=10, width=32, d_in=8, dropout=0.0):
    torch.manual_seed(0)
    layers = [nn.Linear(d_in, width), nn.Sigmoid()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.Sigmoid()]
        if dropout:
            layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers, nn.Linear(width, 1))


class Functional(nn.Module):
    """Custom forward with functional activations in all three spellings."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 6), nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, x):
        h = torch.sigmoid(self.a(x))
        h = F.tanh(self.b(h))
        return self.c(h).sigmoid()


class Outer(nn.Module):
    """Untraceable forward (data-dependent branch) around a traceable child."""

    def __init__(self):
        super().__init__()
        self.inner = Functional()
        self.act = nn.Tanh()

    def forward(self, x):
        if x.sum() > 0:
            x = x * 2
        return torch.tanh(self.inner(self.act(x)))


def test_sequential_modules_are_swapped_and_listed():
    net = sigmoid_mlp(depth=3)
    rec = swap_activations_(net, "relu")
    assert [(s.name, s.old, s.new, s.how) for s in rec.swapped] == [
        ("1", "sigmoid", "relu", "module"), ("3", "sigmoid", "relu", "module"),
        ("5", "sigmoid", "relu", "module")]
    assert rec.model is net
    assert sum(isinstance(m, nn.ReLU) for m in net) == 3
    assert not any(isinstance(m, nn.Sigmoid) for m in net)
    assert "1: sigmoid -> relu (module)" in str(rec)


def test_where_restricts_the_swap():
    net = sigmoid_mlp(depth=3)
    rec = swap_activations_(net, "elu", where=["1", "5"])
    assert [s.name for s in rec.swapped] == ["1", "5"]
    assert isinstance(net[3], nn.Sigmoid) and isinstance(net[5], nn.ELU)


def test_swap_makes_a_deep_sigmoid_mlp_train():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=g)
    y = (x[:, :1] * x[:, 1:2] > 0).float()
    sig = sigmoid_mlp()
    init_(sig, "xavier_normal", generator=torch.Generator().manual_seed(0))
    rel = copy.deepcopy(sig)
    swap_activations_(rel, "relu")

    def first_grad_and_train(net):
        loss = F.binary_cross_entropy_with_logits(net(x), y)
        loss.backward()
        g0 = net[0].weight.grad.norm().item()
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        for _ in range(60):
            opt.zero_grad()
            F.binary_cross_entropy_with_logits(net(x), y).backward()
            opt.step()
        return g0, F.binary_cross_entropy_with_logits(net(x), y).item()

    g_sig, loss_sig = first_grad_and_train(sig)
    g_rel, loss_rel = first_grad_and_train(rel)
    # sigmoid: each of 10 layers scales the gradient by <= 1/4 -> the first layer gets ~nothing
    assert g_rel > 100 * g_sig
    assert loss_sig > 0.68  # stuck at ln 2 = 0.693 (chance)
    assert loss_rel < loss_sig - 0.05


def test_prelu_parameters_join_the_optimizer():
    net = sigmoid_mlp(depth=2)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    rec = swap_activations_(net, "prelu", optimizer=opt)
    assert rec.added_to_optimizer == 2
    assert len(opt.param_groups) == 2
    new = opt.param_groups[1]
    assert {id(p) for p in new["params"]} == {id(net[1].weight), id(net[3].weight)}
    assert (new["lr"], new["momentum"], new["weight_decay"]) == (0.05, 0.9, 1e-4)


def test_selu_brings_lecun_normal_and_alpha_dropout():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(400, 400), nn.Tanh(), nn.Dropout(0.2), nn.Linear(400, 400),
                        nn.Tanh(), nn.Linear(400, 1))
    rec = swap_activations_(net, "selu")
    assert rec.reinitialised == ("0", "3")
    assert rec.dropouts == ("2",)
    assert isinstance(net[2], nn.AlphaDropout) and net[2].p == 0.2
    for i in (0, 3):  # LeCun normal: std 1/sqrt(fan_in)
        assert net[i].weight.std().item() == pytest.approx(1 / math.sqrt(400), rel=0.02)
    assert "AlphaDropout" in str(rec) and "LeCun" in str(rec)
    # the self-normalising fixed point: activations stay near zero mean, unit variance
    net.eval()
    h = net[:5](torch.randn(4000, 400))
    assert abs(h.mean().item()) < 0.1 and h.var().item() == pytest.approx(1.0, abs=0.15)


def test_functional_calls_are_rewritten_through_fx():
    torch.manual_seed(0)
    model = Functional()
    x = torch.randn(5, 3)
    rec = swap_activations_(model, "leaky_relu")
    assert sorted((s.old, s.how) for s in rec.swapped) == [
        ("sigmoid", "fx"), ("sigmoid", "fx"), ("tanh", "fx")]
    assert rec.rewritten == ("",)
    new = rec.model
    assert isinstance(new, torch.fx.GraphModule) and new is not model
    assert new.a is model.a  # the same layers, the same parameters
    # reference: the forward written out by hand with Leaky ReLU
    ref = F.leaky_relu(model.c(F.leaky_relu(model.b(F.leaky_relu(model.a(x), 0.01)), 0.01)), 0.01)
    torch.testing.assert_close(new(x), ref)
    new(x).sum().backward()
    assert model.a.weight.grad is not None and model.a.weight.grad.abs().sum() > 0


def test_untraceable_forward_is_listed_and_traceable_child_is_rewritten():
    model = Outer()
    opt = torch.optim.Adam(model.parameters())
    before = [id(p) for p in model.parameters()]
    rec = swap_activations_(model, "relu", optimizer=opt)
    assert rec.model is model  # root not rewritten: it does not trace
    assert isinstance(model.act, nn.ReLU)
    assert isinstance(model.inner, torch.fx.GraphModule)  # child rewritten, replaced in parent
    assert rec.rewritten == ("inner",)
    assert [n.module for n in rec.not_swapped] == [""]
    assert rec.not_swapped[0].call == "torch.tanh(...)"
    assert "NOT swapped in <model>: torch.tanh(...)" in str(rec)
    assert [id(p) for p in model.parameters()] == before  # the optimizer still holds them
    model(torch.randn(2, 3)).sum().backward()


def test_bert_pooler_tanh_is_swapped_and_gelu_needs_from_(make_bert):
    bert = make_bert()
    rec = swap_activations_(bert, "relu")
    assert [(s.name, s.old) for s in rec.swapped] == [("pooler.activation", "tanh")]
    assert type(bert.encoder.layer[0].intermediate.intermediate_act_fn).__name__ == "GELUActivation"
    with pytest.raises(ConfigError, match="gelu does not saturate") as info:
        swap_activations_(bert, "relu", where="encoder.*")
    assert "from_='gelu'" in info.value.hint
    rec = swap_activations_(bert, "relu", where="encoder.*", from_="gelu")
    assert [s.name for s in rec.swapped] == [
        "encoder.layer.0.intermediate.intermediate_act_fn",
        "encoder.layer.1.intermediate.intermediate_act_fn"]
    ids = torch.randint(0, 50, (2, 6))
    out = bert(input_ids=ids)
    (out.last_hidden_state.sum() + out.pooler_output.sum()).backward()
    assert bert.embeddings.word_embeddings.weight.grad is not None


@pytest.mark.parametrize("kwargs, match", [
    ({"to": "gelu"}, "not an activation swap_activations_ can put in"),
    ({"to": "relu", "from_": "swish"}, "unknown activation"),
    ({"to": "relu", "from_": ["sigmoid", "relu"]}, "includes the target"),
    ({"to": "relu", "from_": []}, "from_= must be"),
    ({"to": "relu", "from_": "identity"}, "identity"),
    ({"to": "relu", "where": "nope*"}, "matches no module"),
    ({"to": "relu", "where": 3}, "where= must be"),
    ({"to": "relu", "optimizer": "sgd"}, "optimizer= must be"),
], ids=["to", "from-unknown", "from-includes-to", "from-empty", "from-identity", "where-none",
        "where-type", "optimizer"])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        swap_activations_(sigmoid_mlp(depth=2), **kwargs)


def test_nothing_to_swap_and_not_a_module():
    relu = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    with pytest.raises(ConfigError, match="no saturating activation .* relu does not saturate"):
        swap_activations_(relu, "elu")
    with pytest.raises(ConfigError, match="no sigmoid/tanh/relu6/hardtanh activation"):
        swap_activations_(nn.Linear(2, 2), "elu")
    with pytest.raises(UnsupportedModelError, match="needs an nn.Module"):
        swap_activations_(lambda x: x, "relu")
