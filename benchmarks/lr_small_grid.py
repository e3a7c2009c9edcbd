"""Held-out check of the "learning rate too small" finding: a grid of rates, optimisers and models.

The thresholds of :mod:`gradprobe.diagnose.slow` were chosen on the runs of
``benchmarks/diagnosis_suite.py`` and ``benchmarks/doctor_suite.py``; none of the runs here was
looked at before they were fixed. Each model is trained under ``gp.Probe`` (every step in full,
``budget=None``), diagnosed with ``gp.diagnose``, and the ``learning-rate`` finding's presence is
compared with how the run was built:

==============  ==============================================================================
good            the model's good rate (below) for the full budget (``STEPS``)
short           the good rate for ``SHORT`` steps: healthy, still descending
converged       the good rate for ``LONG`` steps: healthy, converged (or nearly)
/10             the good rate / 10, full budget (reported: whether it should fire is a
                judgement call; many models train acceptably at a tenth of their best rate)
/100, /1000     the good rate / 100 and / 1000, full budget: must fire
==============  ==============================================================================

Models (data generated or from scikit-learn, no download), each under plain SGD, SGD with
momentum 0.9 and Adam:

* ``mlp``: 2-64-64-1 ReLU MLP (He init), binary cross-entropy on ``make_moons`` (1000 points,
  noise 0.2, standardised);
* ``cnn``: two 3×3 ReLU convolutions (8 and 16 channels) and a linear head on
  ``load_digits`` (8×8 images, 10 classes, pixels / 16 standardised), cross-entropy;
* ``lstm``: a one-layer LSTM (32 units) reading 20 Gaussian steps, the label is the sign of the
  sum of the last 5 (binary cross-entropy);
* ``bert`` (``--archs`` to add it): a 2-layer ``BertForSequenceClassification`` built from a
  ``transformers`` config (hidden 32, 2 heads, no weights downloaded), classifying 12-token
  sequences by whether token 1 appears more often than token 2.

The good rate of each model and optimiser is measured first (:func:`good_rate`: the best
whole-data loss after the full budget over rates 1e-4 … 10 in half decades, no Probe; the
point below it when the next larger rate already ends worse than the smallest, the edge of
divergence); ``--sweep`` prints that sweep and stops.

Printed: one line per run (the loss shape and update ratio the rule reads, the warnings
fired), then the table of ``learning-rate`` findings by condition: from either rule (``any``:
``optimisation.py``'s too-large and fastest-layer tests included), from ``slow.py``
(``slow``), and what ``slow.py`` would say without its ratio gate ``SMALL`` (``ungated``:
the loss tests and the silencing by gradient-flow findings only). Run:
``OMP_NUM_THREADS=1 python benchmarks/lr_small_grid.py [--archs mlp,cnn,lstm,bert] [--seed 1]``
``[--sweep]``
(one thread; about 6 minutes for the three default models on a busy 2-core machine).
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import gradprobe as gp
from gradprobe.diagnose.frames import Frames
from gradprobe.diagnose.optimisation import LOW
from gradprobe.diagnose.slow import descending, loss_shape, step_ratios

STEPS, SHORT, LONG, BATCH = 300, 40, 1200, 64
CONDITIONS = {"good": (1.0, STEPS), "short": (1.0, SHORT), "converged": (1.0, LONG),
              "/10": (0.1, STEPS), "/100": (0.01, STEPS), "/1000": (0.001, STEPS)}
MUST_FIRE, MUST_NOT = {"/100", "/1000"}, {"good", "short", "converged"}
OPTIMS = ("sgd", "sgdm", "adam")
FLOW = {"nonfinite", "vanishing-gradients", "exploding-gradients", "dead-relu", "saturation",
        "symmetry", "input-scale"}
"""The rule names of ``slow.SILENCED_BY``."""
SWEEP = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0)


# ------------------------------------------------------------------------------ data
def _standardise(x: np.ndarray) -> torch.Tensor:
    return torch.tensor((x - x.mean(0)) / (x.std(0) + 1e-8), dtype=torch.float32)


def data(arch: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if arch == "mlp":
        from sklearn.datasets import make_moons

        x, y = make_moons(1000, noise=0.2, random_state=seed)
        return _standardise(x), torch.tensor(y, dtype=torch.float32)[:, None]
    if arch == "cnn":
        from sklearn.datasets import load_digits

        d = load_digits()
        x = _standardise(d.data / 16.0).reshape(-1, 1, 8, 8)
        return x, torch.tensor(d.target, dtype=torch.long)
    if arch == "lstm":
        x = torch.randn(1000, 20, 1, generator=g)
        return x, (x[:, -5:, 0].sum(1, keepdim=True) > 0).float()
    if arch == "bert":
        x = torch.randint(3, 20, (1000, 12), generator=g)
        x[torch.rand(1000, 12, generator=g) < 0.15] = 1
        x[torch.rand(1000, 12, generator=g) < 0.15] = 2
        return x, ((x == 1).sum(1) > (x == 2).sum(1)).long()
    raise ValueError(f"unknown arch {arch!r}: one of mlp, cnn, lstm, bert")


# ---------------------------------------------------------------------------- models
class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1)
        self.head = nn.Linear(16 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.c2(torch.relu(self.c1(x)))).flatten(1))


class LSTMNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm, self.head = nn.LSTM(1, 32, batch_first=True), nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0][:, -1])


class Bert(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from transformers import BertConfig, BertForSequenceClassification

        cfg = BertConfig(vocab_size=20, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=64,
                         max_position_embeddings=16)
        cfg.num_labels = 2
        self.bert = BertForSequenceClassification(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=x).logits


def model(arch: str) -> nn.Module:
    if arch == "mlp":
        m = nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 1))
        gp.remedies.init_(m, "he_normal")
        return m
    return {"cnn": CNN, "lstm": LSTMNet, "bert": Bert}[arch]()




def optimizer(name: str, params: Any, lr: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.SGD(params, lr=lr, momentum=0.9 if name == "sgdm" else 0.0)


def train(arch: str, opt_name: str, lr: float, steps: int, run_dir: Path | None,
          seed: int = 0) -> float:
    """Train with a fixed seed; under the Probe when ``run_dir`` is given. Returns the
    whole-data loss after training."""
    torch.manual_seed(seed)
    x, y = data(arch, seed)
    net = model(arch)
    opt = optimizer(opt_name, net.parameters(), lr)
    loss_fn: Callable[..., torch.Tensor] = (nn.functional.cross_entropy if y.dtype == torch.long
                                            else nn.functional.binary_cross_entropy_with_logits)
    g = torch.Generator().manual_seed(seed + 1)

    def loop(probe: Any) -> None:
        for _ in range(steps):
            idx = torch.randint(0, len(x), (BATCH,), generator=g)
            loss = loss_fn(net(x[idx]), y[idx])
            if probe is not None:
                probe.observe_loss(loss)
            loss.backward()
            opt.step()
            opt.zero_grad()

    if run_dir is None:
        loop(None)
    else:
        with gp.Probe(net, opt, run_dir=run_dir, overwrite=True, budget=None) as probe:
            loop(probe)
    with torch.no_grad():
        val = float(loss_fn(net(x), y))
    return val if math.isfinite(val) else math.inf


# ----------------------------------------------------------------------------- running
def good_rate(arch: str, opt_name: str, seed: int) -> float:
    """The best rate of ``SWEEP`` by the whole-data loss after ``STEPS`` steps (no Probe), or
    the one below it where the next larger rate ends worse than the smallest rate does (the
    best then sits at the edge of divergence, where a change of seed diverges)."""
    losses = [train(arch, opt_name, lr, STEPS, None, seed) for lr in SWEEP]
    i = int(np.argmin(losses))
    edge = i + 1 < len(SWEEP) and losses[i + 1] > losses[0] and i > 0
    good = SWEEP[i - 1] if edge else SWEEP[i]
    print(f"sweep {arch:5} {opt_name:5} good {good:<6g} " + "  ".join(
        f"{lr:g}:{v:.3g}" for lr, v in zip(SWEEP, losses, strict=True)), flush=True)
    return good


def diagnose_one(run_dir: Path) -> tuple[dict[str, float] | None, float, set[str], str, bool]:
    """The loss shape, the median layer's ratio, the warnings, which learning-rate branch
    fired, and whether the rule would fire without its ratio gate (``SMALL``)."""
    d = gp.diagnose(run_dir)
    fired = {f.rule for f in d if f.severity != "info"}
    lr = [f for f in d if f.rule == "learning-rate"]
    branch = ""
    if lr:
        names = " ".join(e.name for e in lr[0].evidence)
        branch = ("slow" if "t-statistic" in names else "fastest" if "fastest" in names
                  else "large")
    frames = Frames.of(gp.Run.open(run_dir))
    shape = loss_shape(frames)
    typical, fastest, _ = step_ratios(frames)
    ungated = shape is not None and descending(shape) and fastest > LOW and not fired & FLOW
    return shape, typical, fired, branch, ungated


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--archs", default="mlp,cnn,lstm",
                    help="comma-separated, from mlp, cnn, lstm, bert")
    ap.add_argument("--sweep", action="store_true", help="only the rate sweep")
    ap.add_argument("--seed", type=int, default=0, help="data, initialisation and batches")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    bad = [a for a in archs if a not in ("mlp", "cnn", "lstm", "bert")]
    if bad or not archs:
        ap.error(f"--archs: unknown {bad or 'none given'}; choose from mlp, cnn, lstm, bert")
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        ap.error(f"--out {args.out}: exists and is not a folder; give a folder for the runs")
    start = time.perf_counter()
    good = {(a, o): good_rate(a, o, args.seed) for a in archs for o in OPTIMS}
    if args.sweep:
        return
    out = args.out or Path(tempfile.mkdtemp(prefix="lr-small-grid-"))
    table: dict[str, list[int]] = {c: [0, 0, 0, 0] for c in CONDITIONS}
    for arch in archs:
        for o in OPTIMS:
            for cond, (scale, steps) in CONDITIONS.items():
                lr = good[arch, o] * scale
                run_dir = out / f"{arch}-{o}-{cond.replace('/', 'div')}"
                loss = train(arch, o, lr, steps, run_dir, args.seed)
                shape, ratio, fired, branch, ungated = diagnose_one(run_dir)
                hit = "learning-rate" in fired
                for i, v in enumerate((1, int(hit), int(branch == "slow"), int(ungated))):
                    table[cond][i] += v
                wrong = (cond in MUST_FIRE and not hit) or (cond in MUST_NOT and hit)
                s = (f"removed {shape['removed']:6.3f} share {shape['share']:5.2f} "
                     f"t {shape['t']:6.1f}" if shape else "no loss shape")
                print(f"{'MISS' if wrong else 'ok  '} {arch:5} {o:5} {cond:9} lr {lr:<8.2g} "
                      f"loss {loss:7.4f}  {s}  ratio {ratio:8.2e}  "
                      f"[{', '.join(sorted(fired)) or 'healthy'}]{' ' + branch if branch else ''}"
                      f"{'  (ungated: fires)' if ungated else ''}", flush=True)
    print(f"\nlearning-rate findings by condition, seed {args.seed} "
          f"({time.perf_counter() - start:.0f} s with the sweep)")
    print(f"{'condition':10} {'runs':>4} {'any':>4} {'slow':>4} {'ungated':>7}  expected")
    for cond, (n, hits, n_slow, n_ungated) in table.items():
        want = "fire" if cond in MUST_FIRE else "silent" if cond in MUST_NOT else "(judgement)"
        print(f"{cond:10} {n:4d} {hits:4d} {n_slow:4d} {n_ungated:7d}  {want}")
    print("any: a learning-rate warning from either rule (the too-large test included); slow: "
          "from slow.py; ungated: slow.py's loss tests and silencing without its ratio gate")
    print(f"runs under {out}")


if __name__ == "__main__":
    main()
