"""Speed of gp.remedies.init_ against the plain torch.nn.init loop a user would write.

Run by hand:  .venv/bin/python benchmarks/init_speed.py [--repeats 7]

Models:
  1. MLP, 30 hidden layers of 1024, ReLU (31.5M weights): He normal.
  2. MLP, 30 hidden layers of 64, tanh (small: the fixed cost of tracing and bookkeeping shows),
     with activation="auto" (torch.fx trace) and with activation="tanh" (no trace).
  3. LSTM, 2 layers, 512 hidden units (per-gate orthogonal blocks, 8 QR factorisations a layer).
Baseline: ``for m in model.modules(): if isinstance(m, nn.Linear): nn.init.kaiming_normal_(...)``
(resp. ``orthogonal_`` on each gate block), measured in the same process. The variants alternate
within each repeat; medians are reported with the ratio init_ / baseline. Both draw the same
numbers (same generator), which is checked once.

Timings on a shared machine are noisy: read the ratios, not the absolute seconds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from gradprobe.remedies import init_


def mlp(width: int, depth: int, act: type[nn.Module]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), act()]
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


def baseline_linear(model: nn.Module, nonlinearity: str, gen: torch.Generator) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, nonlinearity=nonlinearity, generator=gen)
                nn.init.zeros_(m.bias)


def baseline_lstm(model: nn.LSTM, gen: torch.Generator) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("weight"):
                for gate, block in zip("ifgo", p.chunk(4)):
                    nn.init.orthogonal_(block, gain=5 / 3 if gate == "g" else 1.0, generator=gen)
            else:
                p.zero_()


def timed(fn: Callable[[], None]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench(name: str, model: nn.Module, ours: Callable[[torch.Generator], None],
          base: Callable[[torch.Generator], None], repeats: int) -> None:
    ours(torch.Generator().manual_seed(0))
    a = [p.detach().clone() for p in model.parameters()]
    base(torch.Generator().manual_seed(0))
    same = all(torch.equal(x, p) for x, p in zip(a, model.parameters()))
    t_ours, t_base = [], []
    for r in range(repeats):
        pair = [("ours", ours), ("base", base)]
        for label, fn in pair if r % 2 == 0 else pair[::-1]:
            dt = timed(lambda fn=fn, r=r: fn(torch.Generator().manual_seed(r)))
            (t_ours if label == "ours" else t_base).append(dt)
    mo, mb = statistics.median(t_ours), statistics.median(t_base)
    print(f"{name:42s} init_ {mo * 1e3:9.2f} ms   torch.nn.init loop {mb * 1e3:9.2f} ms   "
          f"ratio {mo / mb:5.2f}   same draws: {same}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, repeats {args.repeats}")

    big = mlp(1024, 30, nn.ReLU)
    bench("MLP 30 x 1024 ReLU, he_normal", big,
          lambda g: init_(big, "he_normal", generator=g) and None,
          lambda g: baseline_linear(big, "relu", g), args.repeats)
    small = mlp(64, 30, nn.Tanh)
    bench("MLP 30 x 64 tanh, he_normal (gain 5/3)", small,
          lambda g: init_(small, "he_normal", generator=g) and None,
          lambda g: baseline_linear(small, "tanh", g), args.repeats)
    bench("MLP 30 x 64 tanh, he_normal, activation='tanh'", small,
          lambda g: init_(small, "he_normal", activation="tanh", generator=g) and None,
          lambda g: baseline_linear(small, "tanh", g), args.repeats)
    lstm = nn.LSTM(512, 512, num_layers=2)
    bench("LSTM 2 x 512, orthogonal per gate", lstm,
          lambda g: init_(lstm, "orthogonal", generator=g) and None,
          lambda g: baseline_lstm(lstm, g), args.repeats)


if __name__ == "__main__":
    main()
