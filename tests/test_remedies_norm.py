"""gp.remedies.add_norm_: where norms go, identity at insertion, fx, transformers, errors."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradprobe.errors import ConfigError, UnsupportedModelError
from gradprobe.remedies import add_norm_
from gradprobe.remedies.norm import groups_for

torch.set_num_threads(1)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 64), nn.Tanh(),
                         nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Dropout(0.1)),
                         nn.Linear(48, 1))


class Custom(nn.Module):
    """fc1 -> relu (functional, wrapped); fc2's output also read by the skip (needs fx)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(3, 8), nn.Linear(8, 8), nn.Linear(8, 2)
        self.act = nn.Tanh()

    def forward(self, x):
        h = F.relu(self.fc1(x))
        z = self.fc2(h)
        return self.out(self.act(z) + z)


@pytest.mark.parametrize("channels, groups", [
    (64, 16), (48, 12), (32, 8), (128, 32), (100, 25), (36, 9), (6, 1), (7, 1), (3, 1), (256, 32)])
def test_groups_from_width(channels, groups):
    g = groups_for(channels)
    assert g == groups and channels % g == 0
    assert g == 1 or channels // g >= 4


def test_sequential_batchnorm_positions_and_identity_in_eval():
    net = mlp().eval()
    x = torch.randn(16, 4)
    before = net(x)
    rec = add_norm_(net, "batch")
    assert [(e.layer, e.activation, e.norm, e.module) for e in rec] == [
        ("0", "tanh", "1", "BatchNorm1d(64)"), ("2.0", "relu", "3.1", "BatchNorm1d(48)")]
    assert isinstance(net[1], nn.BatchNorm1d) and isinstance(net[3][1], nn.BatchNorm1d)
    assert not net[1].training  # inserted in the model's mode
    # fresh BatchNorm in eval: running mean 0, var 1, gamma 1, beta 0 -> x / sqrt(1 + eps)
    torch.testing.assert_close(net(x), before, rtol=1e-4, atol=1e-5)
    net.train()
    net(x).sum().backward()
    assert net[1].weight.grad is not None and net[0].weight.grad.abs().sum() > 0
    assert "after 0 -> tanh: BatchNorm1d(64) at 1 (sequential)" in str(rec)
    assert "after 2.0 -> relu: BatchNorm1d(48) at 3.1" in str(rec)


def test_after_activation_and_group_counts_stated():
    net = mlp()
    rec = add_norm_(net, "group", position="after_activation")
    assert [(e.norm, e.module, e.groups) for e in rec] == [
        ("2", "GroupNorm(16, 64)", 16), ("3.2", "GroupNorm(12, 48)", 12)]
    assert isinstance(net[1], nn.Tanh) and isinstance(net[2], nn.GroupNorm)
    assert "16 groups of 4" in str(rec)
    x = torch.randn(8, 4)
    h = net[1](net[0](x))
    torch.testing.assert_close(net[2](h), F.group_norm(h, 16))


def test_layernorm_matches_reference_and_already_normalised_is_skipped():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                        nn.Linear(8, 1))
    rec = add_norm_(net, "layer")
    assert [e.layer for e in rec] == ["3"] and [s.layer for s in rec.skipped] == ["0"]
    x = torch.randn(5, 4)
    h = F.relu(net[1](net[0](x)))
    ref = net[6](F.relu(F.layer_norm(net[3](h), (8,))))
    torch.testing.assert_close(net(x), ref)


def test_conv_kinds():
    torch.manual_seed(0)

    def conv():
        return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv1d(3, 3, 1), nn.ReLU())

    rec = add_norm_(conv(), "batch")
    assert [e.module for e in rec] == ["BatchNorm2d(16)", "BatchNorm1d(3)"]
    rec = add_norm_(conv(), "layer")  # LayerNorm over C x H x W = GroupNorm with one group
    assert [e.module for e in rec] == ["GroupNorm(1, 16)", "GroupNorm(1, 3)"]
    net = conv()
    rec = add_norm_(net, "instance")
    assert [e.module for e in rec] == ["InstanceNorm2d(16)", "InstanceNorm1d(3)"]
    assert net[1].affine
    net[:3](torch.randn(2, 3, 5, 5)).sum().backward()


def test_custom_forward_wraps_in_place_and_rewrites_where_needed():
    model = Custom()
    x = torch.randn(6, 3)
    fc2 = model.fc2
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    rec = add_norm_(model, "layer", optimizer=opt)
    by_layer = {e.layer: e for e in rec}
    assert by_layer["fc1"].how == "wrap" and by_layer["fc1"].norm == "fc1.1"
    assert by_layer["fc2"].how == "fx"  # fc2's output is read twice: only the tanh's input is normed
    assert rec.rewritten == ("",)
    new = rec.model
    assert isinstance(new, torch.fx.GraphModule) and new.fc2 is fc2
    # reference computed by hand from the same parameters
    fc1 = model.fc1[0]
    h = F.relu(F.layer_norm(fc1(x), (8,)))
    z = fc2(h)
    ref = model.out(torch.tanh(F.layer_norm(z, (8,))) + z)
    torch.testing.assert_close(new(x), ref)
    # the optimizer got exactly the norms' gamma and beta, with the first group's settings
    assert rec.added_to_optimizer == 4
    assert opt.param_groups[1]["momentum"] == 0.5
    new(x).sum().backward()
    opt.step()


def test_custom_forward_after_functional_activation():
    model = Custom()
    rec = add_norm_(model, "layer", position="after_activation")
    by_layer = {e.layer: e for e in rec}
    assert by_layer["fc1"].how == "fx" and by_layer["fc2"].how == "wrap"
    x = torch.randn(4, 3)
    h = F.layer_norm(F.relu(model.fc1(x)), (8,))
    z = model.fc2(h)
    ref = model.out(F.layer_norm(torch.tanh(z), (8,)) + z)
    torch.testing.assert_close(rec.model(x), ref)


def test_bert_layernorm_works_batchnorm_is_a_clear_error(make_bert):
    bert = make_bert()
    rec = add_norm_(bert, "layer")
    assert [e.layer for e in rec] == ["encoder.layer.0.intermediate.dense",
                                      "encoder.layer.1.intermediate.dense", "pooler.dense"]
    assert [e.activation for e in rec] == ["gelu", "gelu", "tanh"]
    assert any("does not trace" in s.reason for s in rec.skipped)  # the attention modules
    ids = torch.randint(0, 50, (2, 6))
    bert(input_ids=ids).last_hidden_state.sum().backward()
    assert bert.encoder.layer[0].intermediate.dense[1].weight.grad is not None

    bert = make_bert()
    add_norm_(bert, "batch")
    with pytest.raises(UnsupportedModelError, match="3-D output") as info:
        bert(input_ids=ids)
    assert "'layer'" in info.value.hint


@pytest.mark.parametrize("args, kwargs, error, match", [
    (("weight",), {}, ConfigError, "unknown norm kind"),
    (("batch",), {"position": "between"}, ConfigError, "unknown position"),
    (("instance",), {}, ConfigError, "instance norm does not apply after Linear"),
    (("batch",), {"optimizer": object()}, ConfigError, "optimizer= must be"),
], ids=["kind", "position", "instance-linear", "optimizer"])
def test_bad_arguments(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        add_norm_(mlp(), *args, **kwargs)


def test_nothing_to_normalise():
    with pytest.raises(UnsupportedModelError, match="no Linear/Conv layer whose output feeds an activation"):
        add_norm_(nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1)), "layer")
    with pytest.raises(UnsupportedModelError, match="needs an nn.Module"):
        add_norm_("model", "layer")


def test_custom_module_inside_a_sequential_that_shifts():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), Custom())
    rec = add_norm_(net, "layer")
    assert [(e.layer, e.norm) for e in rec] == [
        ("0", "1"), ("2.fc1", "3.fc1.1"), ("2.fc2", "3.fc2_norm")]
    assert isinstance(net[3], torch.fx.GraphModule)  # the rewritten Custom, at its new index
    assert net(torch.randn(4, 3)).shape == (4, 2)


def named_mlp():
    from collections import OrderedDict
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict([
        ("fc1", nn.Linear(4, 16)), ("act1", nn.ReLU()), ("fc2", nn.Linear(16, 8)),
        ("act2", nn.Tanh()), ("out", nn.Linear(8, 2))]))


@pytest.mark.parametrize("position, names", [
    ("before_activation", ["fc1", "fc1_norm", "act1", "fc2", "fc2_norm", "act2", "out"]),
    ("after_activation", ["fc1", "act1", "fc1_norm", "fc2", "act2", "fc2_norm", "out"])])
def test_named_sequential_keeps_names(position, names):
    # Sequential(OrderedDict(...)) (as lab.zoo.mlp builds): nn.Sequential.insert needs integer
    # names, so the children are rebuilt in order with every name kept
    net = named_mlp()
    reference = named_mlp()
    x = torch.randn(32, 4)
    rec = add_norm_(net, "layer", position=position)
    assert rec.model is net and [n for n, _ in net.named_children()] == names
    assert [(e.layer, e.norm, e.module) for e in rec] == [
        ("fc1", "fc1_norm", "LayerNorm(16)"), ("fc2", "fc2_norm", "LayerNorm(8)")]
    assert net.fc1 is net[0] and isinstance(net.fc1_norm, nn.LayerNorm)
    # against the same network with the norms written out by hand
    h = reference.fc1(x)
    if position == "before_activation":
        h = reference.act1(F.layer_norm(h, (16,)))
        h = reference.act2(F.layer_norm(reference.fc2(h), (8,)))
    else:
        h = F.layer_norm(reference.act1(h), (16,))
        h = F.layer_norm(reference.act2(reference.fc2(h)), (8,))
    torch.testing.assert_close(net(x), reference.out(h))
    assert isinstance(add_norm_(named_mlp(), "batch").model.fc2_norm, nn.BatchNorm1d)


def test_named_sequential_norm_name_taken_and_last_activation():
    from collections import OrderedDict
    net = nn.Sequential(OrderedDict([("fc", nn.Linear(3, 8)), ("fc_norm", nn.Dropout(0.0)),
                                     ("lin", nn.Linear(8, 8)), ("act", nn.ReLU())]))
    rec = add_norm_(net, "layer", position="after_activation")  # after the last child
    assert [n for n, _ in net.named_children()] == ["fc", "fc_norm", "lin", "act", "lin_norm"]
    assert [e.norm for e in rec] == ["lin_norm"]
    net = nn.Sequential(OrderedDict([("lin_norm", nn.Dropout(0.0)), ("lin", nn.Linear(3, 8)),
                                     ("act", nn.ReLU())]))
    rec = add_norm_(net, "batch")  # the name is taken: the next free one
    assert [n for n, _ in net.named_children()] == ["lin_norm", "lin", "lin_norm_1", "act"]
    assert [e.norm for e in rec] == ["lin_norm_1"]
