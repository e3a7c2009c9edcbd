"""The deep sigmoid network of the circles study, as a user would write it.

Two concentric circles (scikit-learn's ``make_circles``, 1000 training and 1000 held-out
points), sigmoid hidden units of width 5 with ``N(0, 1)`` weights, RMSprop, batch 32: the
set-up of the tutorial "Visualizing the vanishing gradient problem" (after Glorot & Bengio
2010), with 10 hidden layers instead of the study's 4. At 4 layers the activation gradient
loses 1.7 decades from the last hidden layer to the first and the loss sits at ln 2; at 10 it
loses nearly 4 decades, so the vanishing gradient itself is unmistakable. It defines ``make`` and ``train`` the way ``gradprobe doctor`` expects:

    gradprobe doctor examples/deep_sigmoid.py --out results/doctor

Run directly, it trains once under the Probe and writes the run to the directory given:

    python examples/deep_sigmoid.py results/deep-sigmoid/run
"""

from __future__ import annotations

import os
import sys

import torch
from sklearn.datasets import make_circles
from torch import nn

EPOCHS = int(os.environ.get("DEEP_SIGMOID_EPOCHS", 30))
WIDTH = 5
DEPTH = 10  # hidden layers (the study's network has 4: there the gradient loses 1.7 decades)


def _data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = make_circles(n_samples=1000, factor=0.5, noise=0.1, random_state=seed)
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)[:, None]


X, Y = _data(0)
X_VAL, Y_VAL = _data(1)
data = X  # sample inputs for remedies that need them (standardize_inputs_, pretrain_)


def make() -> tuple[nn.Module, torch.optim.Optimizer]:
    """A fresh model and optimizer (the doctor seeds torch before each call)."""
    sizes = [2] + [WIDTH] * DEPTH
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(fan_in, fan_out), nn.Sigmoid()]
    layers.append(nn.Linear(WIDTH, 1))
    model = nn.Sequential(*layers)
    for m in model:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 1.0)
            nn.init.zeros_(m.bias)
    return model, torch.optim.RMSprop(model.parameters(), lr=1e-3, alpha=0.9, eps=1e-7)


def train(model: nn.Module, optimizer: torch.optim.Optimizer, probe) -> float:
    """The user's loop, unchanged by the Probe; returns the held-out loss."""
    loss_fn = nn.BCEWithLogitsLoss()
    for _ in range(EPOCHS):
        order = torch.randperm(len(X))
        for i in range(0, len(X), 32):
            idx = order[i:i + 32]
            loss = loss_fn(model(X[idx]), Y[idx])
            probe.observe_loss(loss)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    with torch.no_grad():
        return float(loss_fn(model(X_VAL), Y_VAL))


if __name__ == "__main__":
    import gradprobe as gp

    if len(sys.argv) != 2:
        sys.exit("usage: python examples/deep_sigmoid.py RUN_DIR")
    torch.manual_seed(0)
    model, optimizer = make()
    with gp.Probe(model, optimizer, run_dir=sys.argv[1], hist_every=60, overwrite=True) as probe:
        val = train(model, optimizer, probe)
    print(f"held-out loss {val:.3f} (chance: ln 2 = 0.693); run written to {sys.argv[1]}")
