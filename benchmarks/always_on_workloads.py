"""The workloads of ``always_on.py``: models, synthetic batches, losses and optimizers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from overhead import mlp  # the MLP builder of the overhead benchmark

WORKLOADS = ("W1", "W2", "W3", "W4", "W5", "GPT2")

Batch = tuple[Tensor, Tensor]


def deep_narrow() -> nn.Sequential:
    net = mlp([16] * 301 + [10], nn.ReLU)
    for m in net:
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return net


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for c in (16, 32, 64):
            layers += [nn.Conv2d(cin, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                       nn.MaxPool2d(2)]
            cin = c
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(64, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x).mean((2, 3)))


class LSTMNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(32, 128, num_layers=2, batch_first=True)
        self.head = nn.Linear(128, 10)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


@dataclass(frozen=True)
class Workload:
    """A model, its optimizer, a pool of synthetic batches and its loss."""

    name: str
    title: str
    make: Callable[[], nn.Module]
    batch: Callable[[torch.Generator], Batch]
    loss: Callable[[nn.Module, Batch], Tensor]
    adam: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def model(self) -> nn.Module:
        torch.manual_seed(0)
        return self.make().to(self.device)

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        if self.adam:
            return torch.optim.Adam(model.parameters(), lr=1e-3)
        return torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def batches(self, n: int = 4) -> list[Batch]:
        g = torch.Generator().manual_seed(1)
        return [tuple(t.to(self.device) for t in self.batch(g)) for _ in range(n)]  # type: ignore[misc]


def _mse(model: nn.Module, b: Batch) -> Tensor:
    return nn.functional.mse_loss(model(b[0]), b[1])


def _ce(model: nn.Module, b: Batch) -> Tensor:
    return nn.functional.cross_entropy(model(b[0]), b[1])


def _lm(model: nn.Module, b: Batch) -> Tensor:
    return model(input_ids=b[0], labels=b[1]).loss  # type: ignore[no-any-return]


def _gpt2(small: bool) -> tuple[Callable[[], nn.Module], Callable[[torch.Generator], Batch], str]:
    from transformers import GPT2Config, GPT2LMHeadModel

    if small:
        cfg = GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
        batch, seq = 8, 512
    else:
        cfg = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=256, n_positions=64)
        batch, seq = 4, 32
    cfg.resid_pdrop = cfg.embd_pdrop = cfg.attn_pdrop = 0.0

    def data(g: torch.Generator) -> Batch:
        ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)
        return ids, ids

    title = (f"GPT-2 {'small' if small else 'tiny'} ({cfg.n_layer} layers, width {cfg.n_embd}, "
             f"vocabulary {cfg.vocab_size}), batch {batch} x {seq} tokens")
    return (lambda: GPT2LMHeadModel(cfg)), data, title


def workloads(names: list[str], device: torch.device) -> list[Workload]:
    def cls(n: int, k: int) -> Callable[[torch.Generator], Tensor]:
        return lambda g: torch.randint(0, k, (n,), generator=g)

    def randn(*shape: int) -> Callable[[torch.Generator], Tensor]:
        return lambda g: torch.randn(*shape, generator=g)

    def pair(x: Callable[[torch.Generator], Tensor],
             y: Callable[[torch.Generator], Tensor]) -> Callable[[torch.Generator], Batch]:
        return lambda g: (x(g), y(g))

    table: dict[str, Callable[[], Workload]] = {
        "W1": lambda: Workload("W1", "MLP 2-5-5-5-5-1 sigmoid, batch 32, SGD",
                               lambda: mlp([2, 5, 5, 5, 5, 1], nn.Sigmoid),
                               pair(randn(32, 2), randn(32, 1)), _mse, device=device),
        "W2": lambda: Workload("W2", "MLP 784 -> 10x512 ReLU -> 10, batch 128, SGD",
                               lambda: mlp([784] + [512] * 10 + [10], nn.ReLU),
                               pair(randn(128, 784), cls(128, 10)), _ce, device=device),
        "W3": lambda: Workload("W3", "CNN 3 blocks conv+BatchNorm+ReLU+pool, 3x32x32, batch 64, "
                               "Adam", ConvNet, pair(randn(64, 3, 32, 32), cls(64, 10)), _ce,
                               adam=True, device=device),
        "W4": lambda: Workload("W4", "LSTM 2 layers hidden 128, 50 steps, batch 32, Adam", LSTMNet,
                               pair(randn(32, 50, 32), cls(32, 10)), _ce, adam=True,
                               device=device),
        "W5": lambda: Workload("W5", "MLP depth 300 width 16 ReLU (He init), batch 64, SGD",
                               deep_narrow, pair(randn(64, 16), cls(64, 10)), _ce, device=device),
    }
    out = []
    for n in names:
        if n == "GPT2":
            make, data, title = _gpt2(small=device.type == "cuda")
            out.append(Workload("GPT2", title + ", Adam", make, data, _lm, adam=True,
                                device=device))
        else:
            out.append(table[n]())
    return out


__all__ = ["WORKLOADS", "Batch", "ConvNet", "LSTMNet", "Workload", "deep_narrow", "mlp", "workloads"]
