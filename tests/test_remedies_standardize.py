"""gp.remedies.standardize_inputs_: statistics against numpy-style references, Sequential and
pre-hook placement, robust option, remove(), errors."""

import pytest
import torch
from torch import nn

from gradprobe.errors import ConfigError, UnsupportedModelError
from gradprobe.remedies import Standardize, standardize_inputs_

torch.set_num_threads(1)


def inputs(n=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g) * torch.tensor([1.0, 100.0, 0.01]) + torch.tensor([5.0, -300.0, 0.0])


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))


class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x, scale=1.0):
        return self.fc(x) * scale


def test_sequential_gets_a_buffer_module_at_index_0():
    net = mlp()
    x = inputs()
    reference = net((x - x.mean(0)) / x.std(0, unbiased=False))
    rec = standardize_inputs_(net, x)
    assert isinstance(net[0], Standardize) and rec.where == "index 0 of the Sequential"
    torch.testing.assert_close(net(x), reference)
    assert rec.center == pytest.approx(x.double().mean(0).tolist())
    assert rec.scale == pytest.approx(x.double().std(0, unbiased=False).tolist())
    assert list(net[0].parameters()) == []  # fixed: buffers, not trained
    assert {"0.center", "0.scale"} <= set(net.state_dict())
    z = net[0](x)
    assert z.mean(0).abs().max() < 1e-4 and (z.std(0, unbiased=False) - 1).abs().max() < 1e-4
    rec.remove()
    assert isinstance(net[0], nn.Linear) and len(net) == 3
    assert "mean_std" in str(rec)


def test_median_iqr_ignores_outliers_and_clip_bounds_them():
    x = inputs()
    x_out = x.clone()
    x_out[:10, 1] = 1e6  # 1 % wild outliers in feature 1
    plain = standardize_inputs_(mlp(), x_out)
    robust = standardize_inputs_(mlp(), x_out, method="median_iqr", clip=5.0)
    # mean/std are dragged by the outliers; median/IQR barely move from the clean data's values
    assert plain.scale[1] > 500 * 100  # ~ sqrt(0.01) * 1e6
    q = torch.quantile(x_out[:, 1].double(), torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    assert robust.center[1] == pytest.approx(q[1].item())
    assert robust.scale[1] == pytest.approx(((q[2] - q[0]) / 1.3489795003921634).item())
    assert robust.scale[1] == pytest.approx(100.0, rel=0.1)  # Gaussian: IQR/1.349 = std
    net = mlp()
    standardize_inputs_(net, x_out, method="median_iqr", clip=5.0)
    assert net[0](x_out).abs().max().item() == pytest.approx(5.0)
    assert "clipped to ±5" in str(robust)


def test_custom_forward_uses_a_removable_pre_hook():
    model = Custom()
    x = inputs()
    before = model(x, scale=2.0)
    rec = standardize_inputs_(model, x)
    assert rec.handle is not None and model.input_standardizer is rec.module
    z = (x - x.mean(0)) / x.std(0, unbiased=False)
    torch.testing.assert_close(model(x, scale=2.0), model.fc(z) * 2.0)
    with pytest.raises(UnsupportedModelError, match="first positional tensor argument"):
        model(x=x)
    rec.remove()
    rec.remove()  # idempotent
    assert not hasattr(model, "input_standardizer")
    torch.testing.assert_close(model(x, scale=2.0), before)


def test_channels_and_constant_features():
    g = torch.Generator().manual_seed(0)
    img = torch.randn(16, 3, 5, 5, generator=g) * torch.tensor([1.0, 10.0, 0.1]).view(1, 3, 1, 1)
    net = nn.Sequential(nn.Conv2d(3, 2, 3))
    rec = standardize_inputs_(net, img)
    assert rec.features == 3
    z = net[0](img)
    assert (z.transpose(0, 1).reshape(3, -1).std(1, unbiased=False) - 1).abs().max() < 1e-4
    seq = torch.randn(8, 7, 4, generator=g)
    seq[..., 2] = 3.0  # a constant feature: scale 1, listed
    rec = standardize_inputs_(nn.Sequential(nn.Linear(4, 2)), seq, dim=-1)
    assert rec.dim == 2 and rec.constant_features == (2,)
    assert rec.scale[2] == 1.0 and "constant features" in str(rec)
    with pytest.raises(ConfigError, match="fitted on 4 features along dim 2"):
        rec.module(torch.randn(2, 7, 5))


def test_bert_token_ids_are_a_clear_error(make_bert):
    bert = make_bert()
    with pytest.raises(ConfigError, match="not integer data such as token ids") as info:
        standardize_inputs_(bert, torch.randint(0, 50, (4, 6)))
    assert "embeddings" in info.value.hint


@pytest.mark.parametrize("x, kwargs, match", [
    (inputs(), {"method": "zscore"}, "unknown method"),
    (inputs(), {"clip": 0}, "clip must be"),
    (inputs(), {"clip": True}, "clip must be"),
    (inputs().tolist(), {}, "x must be a tensor"),
    (inputs()[:1], {}, "at least 2 samples"),
    (torch.randn(5), {}, "at least 2 samples"),
    (inputs(), {"dim": 0}, "dim=0 is not a feature dimension"),
    (inputs(), {"dim": 2}, "dim=2 is not a feature dimension"),
    (torch.tensor([[1.0, float("nan"), 0.0], [0.0, 1.0, 2.0]]), {}, "NaN or Inf"),
], ids=["method", "clip0", "clip-bool", "list", "one-sample", "1-d", "dim0", "dim-out", "nan"])
def test_bad_arguments(x, kwargs, match):
    net = mlp()
    with pytest.raises(ConfigError, match=match):
        standardize_inputs_(net, x, **kwargs)
    assert isinstance(net[0], nn.Linear)  # nothing was added


def test_twice_and_not_a_module():
    net = mlp()
    standardize_inputs_(net, inputs())
    with pytest.raises(ConfigError, match="already has an input standardisation"):
        standardize_inputs_(net, inputs())
    with pytest.raises(UnsupportedModelError, match="needs an nn.Module"):
        standardize_inputs_(print, inputs())


def test_named_sequential_keeps_its_names_and_removes_cleanly():
    from collections import OrderedDict

    net = nn.Sequential(OrderedDict(fc1=nn.Linear(2, 4), act=nn.ReLU(), fc2=nn.Linear(4, 1)))
    x = torch.randn(50, 2) * 7 + 3
    before = net(x)
    record = standardize_inputs_(net, x)
    assert list(net._modules)[1:] == ["fc1", "act", "fc2"]
    z = (x - x.mean(0)) / x.std(0, unbiased=False)
    torch.testing.assert_close(net(x), nn.Sequential(net.fc1, net.act, net.fc2)(z))
    record.remove()
    assert list(net._modules) == ["fc1", "act", "fc2"]
    torch.testing.assert_close(net(x), before)
