"""gp.remedies.pretrain_: greedy layer-wise autoencoders lower reconstruction error, touch only
the hidden layers, leave the model ready for fine-tuning; errors."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradprobe.errors import ConfigError, UnsupportedModelError
from gradprobe.remedies import pretrain_

torch.set_num_threads(1)


def data(n=512, d=8, seed=0):
    # inputs on a 2-D manifold in 8-D: there is structure for an autoencoder to find
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 2, generator=g)
    mix = torch.randn(2, d, generator=g)
    return torch.tanh(z @ mix) + 0.05 * torch.randn(n, d, generator=g)


def sigmoid_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 6), nn.Sigmoid(), nn.Dropout(0.1), nn.Linear(6, 4),
                         nn.Sigmoid(), nn.Linear(4, 1))


class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc, self.mid, self.head = nn.Linear(8, 6), nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.mid(torch.tanh(self.enc(x)))))


def test_sequential_mlp_reconstruction_improves_and_output_layer_untouched():
    net = sigmoid_mlp()
    out_w = net[5].weight.detach().clone()
    first_w = net[0].weight.detach().clone()
    rec = pretrain_(net, data(), epochs=30, lr=1e-2, batch_size=32,
                    generator=torch.Generator().manual_seed(0))
    assert [(e.layer, e.in_features, e.out_features, e.activation) for e in rec] == [
        ("0", 8, 6, "sigmoid"), ("3", 6, 4, "sigmoid")]
    for e in rec:
        assert e.loss_after < 0.5 * e.loss_before
        assert e.loss_after < e.baseline  # better than reconstructing every input by its mean
    assert torch.equal(net[5].weight, out_w)
    assert not torch.equal(net[0].weight, first_w)
    assert net.training and all(p.grad is None for p in net.parameters())
    assert rec.samples == 512 and "MSE before" in str(rec)


def test_reference_the_recorded_loss_is_the_encoders_reconstruction_error():
    # the first layer's "after" loss is reproducible from the final encoder and a decoder fitted
    # by least squares: the recorded loss cannot be below that optimum
    net = sigmoid_mlp()
    x = data()
    rec = pretrain_(net, x, epochs=20, lr=1e-2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h = torch.sigmoid(net[0](x))
        h1 = torch.cat([h, torch.ones(len(h), 1)], 1)
        best = torch.linalg.lstsq(h1, x).solution
        optimum = F.mse_loss(h1 @ best, x).item()
    assert rec.layers[0].loss_after >= optimum - 1e-5
    assert rec.layers[0].loss_after < rec.layers[0].baseline


def test_reproducible_with_a_generator():
    a, b = sigmoid_mlp(), sigmoid_mlp()
    ra = pretrain_(a, data(), epochs=2, generator=torch.Generator().manual_seed(3))
    rb = pretrain_(b, data(), epochs=2, generator=torch.Generator().manual_seed(3))
    assert ra == rb
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_custom_forward_and_dataloader_of_pairs():
    model = Custom().eval()
    x = data()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, torch.zeros(len(x))), batch_size=100)
    rec = pretrain_(model, loader, epochs=10, lr=1e-2, generator=torch.Generator().manual_seed(0))
    assert [(e.layer, e.activation) for e in rec] == [("enc", "tanh"), ("mid", "tanh")]
    assert all(e.loss_after < e.loss_before for e in rec)
    assert not model.training  # mode restored
    assert rec.samples == 512


def test_fine_tuning_after_pretraining_and_optimizer_state_cleared():
    net = sigmoid_mlp()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    x = data()
    y = x[:, :1].clone()
    F.mse_loss(net(x), y).backward()
    opt.step()
    opt.zero_grad()
    rec = pretrain_(net, x, epochs=3, optimizer=opt)
    assert rec.optimizer_state_cleared == 4  # weight and bias of the two hidden layers
    assert net[5].weight in opt.state and net[0].weight not in opt.state
    before = F.mse_loss(net(x), y).item()
    for _ in range(20):
        loss = F.mse_loss(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert F.mse_loss(net(x), y).item() < before


def test_not_an_mlp_is_a_clear_error(make_bert):
    bert = make_bert()
    with pytest.raises(UnsupportedModelError, match="Embedding with its own parameters"):
        pretrain_(bert, torch.randn(4, 6))
    with pytest.raises(UnsupportedModelError, match="Conv2d"):
        pretrain_(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2, 1)),
                  torch.randn(4, 1, 3, 3))
    with pytest.raises(UnsupportedModelError, match="no hidden layer"):
        pretrain_(nn.Sequential(nn.Linear(8, 1)), data())
    seq = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 1))
    with pytest.raises(UnsupportedModelError, match="3-D inputs"):
        pretrain_(seq, torch.randn(4, 5, 8))


@pytest.mark.parametrize("kwargs, match", [
    ({"epochs": 0}, "epochs must be"),
    ({"epochs": 2.5}, "epochs must be"),
    ({"lr": -1.0}, "lr must be"),
    ({"lr": float("nan")}, "lr must be"),
    ({"batch_size": 0}, "batch_size must be"),
    ({"optimizer": "adam"}, "optimizer= must be"),
], ids=["epochs0", "epochs-float", "lr-neg", "lr-nan", "batch", "optimizer"])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        pretrain_(sigmoid_mlp(), data(), **kwargs)


@pytest.mark.parametrize("bad, match", [
    ("inputs", "data must be a tensor"),
    (torch.arange(8).reshape(1, 8), "floating-point"),
    ([], "holds no batch"),
    (torch.randn(0, 8), "empty batch"),
    (torch.randn(4, 5), "expects 8 input features; the data brings it 5"),
], ids=["string", "integer", "empty-list", "empty-batch", "wrong-width"])
def test_bad_data(bad, match):
    net = sigmoid_mlp()
    weights = copy.deepcopy(net.state_dict())
    with pytest.raises(ConfigError, match=match):
        pretrain_(net, bad)
    assert all(torch.equal(weights[k], v) for k, v in net.state_dict().items())  # nothing changed


def test_data_the_model_rejects():
    net = nn.Sequential(nn.Unflatten(1, (2, 4)), nn.Flatten(), nn.Linear(8, 4), nn.ReLU(),
                        nn.Linear(4, 1))
    with pytest.raises(ConfigError, match=r"rejects a data batch of shape \(4, 5\)"):
        pretrain_(net, torch.randn(4, 5))
