"""gp.remedies.residual_: spans, x + f(x) against a hand-written reference, depth, errors."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradprobe.errors import ConfigError, UnsupportedModelError
from gradprobe.remedies import Residual, residual_
from gradprobe.remedies.residual import keeps_shape

torch.set_num_threads(1)


def tanh_mlp(depth=3, width=16):
    torch.manual_seed(0)
    layers = [nn.Linear(2, width), nn.Tanh()]
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(width, 1))


class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.h1, self.n1, self.h2, self.out = (
            nn.Linear(3, 5), nn.Linear(5, 5), nn.LayerNorm(5), nn.Linear(5, 5), nn.Linear(5, 1))

    def forward(self, x):
        h = F.relu(self.inp(x))
        h = torch.tanh(self.n1(self.h1(h)))
        h = self.h2(h).sigmoid()
        return self.out(h)


def test_sequential_spans_and_reference():
    net = nn.Sequential(
        nn.Linear(2, 16), nn.Tanh(),
        nn.Linear(16, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Dropout(0.1),
        nn.Linear(16, 16), nn.Tanh(),
        nn.Linear(16, 8), nn.ReLU(),
        nn.Linear(8, 8), nn.ReLU(),
        nn.Linear(8, 1)).eval()
    layers = [net[i] for i in (0, 2, 6, 8, 10, 12)]
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    rec = residual_(net, optimizer=opt)
    assert [(w.children, w.at, w.run) for w in rec] == [
        (("2", "3", "4", "5"), "2", 1), (("6", "7"), "3", 1), (("10", "11"), "6", 2)]
    assert [type(m).__name__ for m in net] == [
        "Linear", "Tanh", "Residual", "Residual", "Linear", "ReLU", "Residual", "Linear"]
    assert net[2].body[0] is layers[1]  # the same layer objects: the optimizer keeps working
    assert rec.added_to_optimizer == 0 and len(opt.param_groups) == 1
    # reference written out by hand (eval: dropout off, batchnorm with running stats)
    x = torch.randn(7, 2)
    h = torch.tanh(layers[0](x))
    bn = net[2].body[1]
    h = h + torch.tanh(bn(layers[1](h)))
    h = h + torch.tanh(layers[2](h))
    h = F.relu(layers[3](h))
    h = h + F.relu(layers[4](h))
    torch.testing.assert_close(net(x), layers[5](h))
    assert "run 1: <model>[2..5] (layer 2) -> 2 (sequential)" in str(rec)


def test_nested_sequential():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 8), nn.ReLU()),
                        nn.Linear(8, 2))
    rec = residual_(net)
    assert [(w.container, w.at) for w in rec] == [("2", "2.0")]
    assert isinstance(net[2][0], Residual)
    net(torch.randn(3, 4)).sum().backward()


def test_residual_keeps_gradient_alive_through_depth():
    deep = tanh_mlp(depth=30)
    with torch.no_grad():
        for m in deep:
            if isinstance(m, nn.Linear):
                m.weight.mul_(0.3)  # small weights: each tanh layer shrinks the gradient
    x = torch.randn(64, 2)

    def first_grad(net):
        net.zero_grad()
        net(x).pow(2).mean().backward()
        return net[0].weight.grad.norm().item()

    plain = first_grad(deep)
    residual_(deep)
    assert first_grad(deep) > 1e3 * plain


def test_custom_forward_through_fx():
    torch.manual_seed(0)
    model = Custom()
    rec = residual_(model)
    assert [(w.layer, w.children, w.at, w.how) for w in rec] == [
        ("h1", ("h1", "n1", "tanh"), "add", "fx"), ("h2", ("h2", "sigmoid"), "add_1", "fx")]
    assert [w.run for w in rec] == [1, 1]  # consecutive
    assert rec.rewritten == ("",)
    new = rec.model
    x = torch.randn(4, 3)
    h = F.relu(model.inp(x))
    h = h + torch.tanh(model.n1(model.h1(h)))
    h = h + torch.sigmoid(model.h2(h))
    torch.testing.assert_close(new(x), model.out(h))
    new(x).sum().backward()
    assert model.inp.weight.grad is not None


def test_conv_eligibility():
    assert keeps_shape(nn.Conv2d(8, 8, 3, padding=1))
    assert keeps_shape(nn.Conv2d(8, 8, 3, padding="same", dilation=2))
    assert keeps_shape(nn.Conv1d(8, 8, 5, padding=4, dilation=2))
    assert keeps_shape(nn.Conv2d(8, 8, 1))
    assert not keeps_shape(nn.Conv2d(8, 8, 3))  # valid padding shrinks
    assert not keeps_shape(nn.Conv2d(8, 8, 3, padding=1, stride=2))
    assert not keeps_shape(nn.Conv2d(8, 16, 3, padding=1))
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                        nn.BatchNorm2d(8), nn.ReLU())
    rec = residual_(net)
    assert [w.children for w in rec] == [("2", "3", "4")]
    assert net(torch.randn(2, 3, 6, 6)).shape == (2, 8, 6, 6)


def test_bert_pooler_is_the_only_square_block(make_bert):
    bert = make_bert()
    bert.eval()
    rec = residual_(bert)
    assert [(w.layer, w.at) for w in rec] == [("pooler.dense", "pooler.add")]
    assert rec.model is bert and isinstance(bert.pooler, torch.fx.GraphModule)
    out = bert(input_ids=torch.randint(0, 50, (2, 6)))
    first = out.last_hidden_state[:, 0]
    torch.testing.assert_close(out.pooler_output, first + torch.tanh(bert.pooler.dense(first)))
    out.pooler_output.sum().backward()


def test_no_eligible_block_is_a_clear_error():
    pyramid = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2), nn.ReLU(), nn.Linear(2, 1))
    with pytest.raises(UnsupportedModelError, match="keeps its input's shape") as info:
        residual_(pyramid)
    assert "Linear 8->4" in str(info.value) and "square" in info.value.hint
    with pytest.raises(UnsupportedModelError, match="no Linear/Conv followed by an activation"):
        residual_(nn.Linear(3, 3))
    with pytest.raises(UnsupportedModelError, match="needs an nn.Module"):
        residual_(None)
    with pytest.raises(ConfigError, match="optimizer= must be"):
        residual_(tanh_mlp(), optimizer=[1])


def test_record_prints_the_optimizer_line_like_the_other_records():
    # residual_ adds no parameters, but its record says so the way add_norm_'s does when it has
    from dataclasses import replace

    from gradprobe.remedies import add_norm_

    model = tanh_mlp()
    norm = add_norm_(model, "batch", optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    line = str(norm).splitlines()[-1]
    assert norm.added_to_optimizer > 0 and str(norm.added_to_optimizer) in line
    rec = residual_(tanh_mlp())
    assert line not in str(rec)
    moved = replace(rec, added_to_optimizer=norm.added_to_optimizer)
    assert str(moved).splitlines()[-1] == line
