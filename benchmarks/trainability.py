"""Does preflight's verdict at initialisation predict whether training then works?

Run by hand: ``OMP_NUM_THREADS=1 python benchmarks/trainability.py`` (``--quick``: depths 6 and
12, width 64, 150 steps). One thread throughout.

Set-up (issue 19): ``sklearn.datasets.load_digits`` (1797 images, 64 features) standardised with
the training split's mean and standard deviation (1297 training, 500 validation examples, seeded
split); ``mlp([64] + [128] * depth + [10], act)`` for depth 10 and 30 hidden layers and act in
tanh, ReLU, sigmoid; weights ``N(0, 0.01²)``, ``N(0, 1)``, Xavier (``xavier_normal_``, gain 1),
He (``kaiming_normal_``, fan-in, ReLU gain) and LeCun (``N(0, 1/fan_in)``), zero biases.
Preflight runs once at initialisation with the real loss (cross-entropy) on 256 training
examples. Training: 300 steps of SGD (lr 0.01, momentum 0.9, mini-batches of 128, seeded).
"Trains" means the validation loss after training is below ``ln(10) / 2`` (half of chance);
a non-finite loss does not train. Preflight predicts "trains" when ``report.trainable`` is true
(before issue 19: when ``report.verdict == "fine"``).
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import gradprobe as gp
from gradprobe.lab.zoo import mlp

INITS = ("N(0,0.01^2)", "N(0,1)", "xavier", "he", "lecun")
ACTIVATIONS = ("tanh", "relu", "sigmoid")
CHANCE = math.log(10)


def digits(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    perm = np.random.default_rng(seed).permutation(len(x))
    x, y = x[perm], y[perm]
    xtr, xva, ytr, yva = x[:-500], x[-500:], y[:-500], y[-500:]
    mean, std = xtr.mean(0), xtr.std(0)
    std[std == 0] = 1.0
    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.tensor((a - mean) / std, dtype=torch.float32)
    return tensor(xtr), torch.tensor(ytr), tensor(xva), torch.tensor(yva)


def initialise(net: nn.Module, init: str, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if not isinstance(m, nn.Linear):
                continue
            w = m.weight
            if init == "N(0,0.01^2)":
                nn.init.normal_(w, std=0.01, generator=gen)
            elif init == "N(0,1)":
                nn.init.normal_(w, std=1.0, generator=gen)
            elif init == "xavier":
                nn.init.xavier_normal_(w, generator=gen)
            elif init == "he":
                nn.init.kaiming_normal_(w, nonlinearity="relu", generator=gen)
            elif init == "lecun":
                nn.init.normal_(w, std=m.in_features ** -0.5, generator=gen)
            nn.init.zeros_(m.bias)
    return net


def train(net, data, *, steps: int, lr: float, batch: int, seed: int,
          losses: list[float] | None = None) -> float:
    """Validation loss after ``steps`` of SGD with momentum (``inf`` when it became non-finite);
    each step's training loss is appended to ``losses`` when given."""
    xtr, ytr, xva, yva = data
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(xtr), (batch,), generator=gen)
        loss = F.cross_entropy(net(xtr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if losses is not None:
            losses.append(float(loss.detach()))
    with torch.no_grad():
        val = float(F.cross_entropy(net(xva), yva))
    return val if math.isfinite(val) else math.inf


def predicts_training(report) -> bool:
    return bool(getattr(report, "trainable", report.verdict == "fine"))


def run(depths, width, steps, lr, batch, seeds) -> None:
    data = digits()
    xtr, ytr = data[0], data[1]
    print(f"\n## preflight at initialisation vs training (load_digits, width {width}, "
          f"{steps} steps SGD lr {lr} m0.9, batch {batch}; trains = val loss < ln10/2)\n")
    print("| act | init | depth | seed | verdict | G | phase | chi1 | L/xi_c | sat. | shift | "
          "predicts | val loss | trains | agree |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    agree = total = 0
    misses = []
    for act in ACTIVATIONS:
        for init in INITS:
            for depth in depths:
                for seed in seeds:
                    torch.manual_seed(seed)
                    net = initialise(mlp([64] + [width] * depth + [10], act), init, seed)
                    report = gp.preflight(net, xtr[:256], F.cross_entropy, ytr[:256])
                    pred = predicts_training(report)
                    val = train(net, data, steps=steps, lr=lr, batch=batch, seed=seed)
                    trains = val < CHANCE / 2
                    ok = pred == trains
                    agree += ok
                    total += 1
                    if not ok:
                        misses.append((act, init, depth, seed))
                    g = (report.predicted_log_gain if report.verdict_basis == "theory"
                         else report.measured_log_gain)
                    mfd = report.meanfield
                    chi = f"{mfd.chi1:.3g}" if mfd else "-"
                    lx = f"{depth / mfd.xi_c:.3g}" if mfd and mfd.xi_c > 0 else "-"
                    sat = getattr(report, "saturation", math.nan)
                    shift = getattr(report, "mean_shift", math.nan)
                    print(f"| {act} | {init} | {depth} | {seed} | {report.verdict} | {g:+.1f} | "
                          f"{report.phase} | {chi} | {lx} | {sat:.2f} | {shift:.2f} | "
                          f"{'trains' if pred else 'fails'} | {val:.3g} | "
                          f"{'yes' if trains else 'no'} | {'yes' if ok else 'NO'} |", flush=True)
    print(f"\nAgreement: {agree} of {total}.")
    for m in misses:
        print("  disagreement:", *m)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="depths 6, 12; width 64; 150 steps")
    parser.add_argument("--seeds", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    if args.quick:
        run((6, 12), 64, 150, 0.01, 128, range(args.seeds))
    else:
        run((10, 30), 128, 300, 0.01, 128, range(args.seeds))
    print(f"\n(total {time.time() - t0:.0f} s, torch {torch.__version__}, 1 thread)")


if __name__ == "__main__":
    main()
