"""A labelled suite of short runs that measures the diagnosis rules' precision and recall.

Each case builds a small model, trains it for a few dozen steps on generated data with
``gp.Probe`` attached, and carries the pathologies it was built to show. Every label is then
**confirmed by a direct measurement that does not use the Probe or the rules** (autograd on the
model before and after training, the whole data set pushed through it, the training loop's own
gradient norms and losses, retraining with another learning rate, the data itself):

==================  ==========================================================================
vanishing           RMS of ∂L/∂(output) of the first hidden weight layer / the last, by autograd
                    on a batch, ≤ 1e-2 after training and before it (or no gradient at all
                    reaching the hidden layers before it)
exploding           that ratio ≥ 1e2 before and after training, or the loop's gradient norm
                    (5-step running median) grows ≥ 100×, or the loop's loss reaches 10× its
                    first value (divergence)
nonfinite           a non-finite loss or parameter seen by the training loop
dead-relu           ≥ 50 % of a ReLU layer's units never positive on the whole data set, after
saturation          ≥ 50 % of a hidden sigmoid/tanh layer's outputs with derivative < 5 % of
                    its maximum on the whole data set, after training
symmetry            a hidden layer whose weight rows are all equal (to 1e-6 of their norm)
                    after training
loss-plateau        whole-data loss after training ≥ 0.95 × before, or (classification) stuck
                    at chance: the trained model's whole-data accuracy ≤ the majority
                    class's frequency + 0.05 and its loss within 10 % of ln C (it predicts
                    the prior)
learning-rate       retraining with the learning rate × 0.1 (too large) or at a standard rate
                    (too small or zero) ends with ≤ 1/2 the whole-data loss (or finite where
                    the original was not); checked for the cases built for it
input-scale         the inputs' RMS per feature outside [0.1, 10], or max|x| / RMS ≥ 50
==================  ==========================================================================

The built label that its measurement does not confirm is removed (the script says so; a case
left without a label and built as pathological is dropped); a pathology other than the built
ones that its measurement confirms is added (learning-rate excepted: it costs retraining). A
case built healthy whose measurements find anything is relabelled and said so.

Run: ``OMP_NUM_THREADS=1 python benchmarks/diagnosis_suite.py [--out DIR] [--only NAME...]``.
"""

from __future__ import annotations

import argparse
import copy
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import gradprobe as gp

PATHOLOGIES = ("vanishing-gradients", "exploding-gradients", "nonfinite", "dead-relu",
               "saturation", "symmetry", "loss-plateau", "learning-rate", "input-scale")

# ------------------------------------------------------------------ data


def blobs(n=512, d=8, classes=4, seed=0, noise=0.0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, d, generator=g) * 1.5
    y = torch.randint(0, classes, (n,), generator=g)
    x = centres[y] + torch.randn(n, d, generator=g)
    x = (x - x.mean(0)) / x.std(0)
    if noise:
        flip = torch.rand(n, generator=g) < noise
        y = torch.where(flip, torch.randint(0, classes, (n,), generator=g), y)
    return x, y


def images(n=384, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    proto = torch.randn(classes, 1, 8, 8, generator=g)
    x = proto[y] + 0.8 * torch.randn(n, 1, 8, 8, generator=g)
    return x, y


def sequences(n=384, t=10, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, t, d, generator=g)
    y = (x[:, :3, 0].sum(1) > 0).long()
    return x, y


def regression(n=512, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = torch.sin(x[:, :1] * 1.5) + 0.5 * x[:, 1:2]
    return x, y


# ------------------------------------------------------------------ models

ACTS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU,
        "leaky_relu": nn.LeakyReLU, "identity": nn.Identity}


def mlp(d_in, width, depth, act, out, bias=True):
    layers: list[nn.Module] = []
    d = d_in
    for _ in range(depth):
        layers += [nn.Linear(d, width, bias=bias), ACTS[act]()]
        d = width
    layers.append(nn.Linear(d, out, bias=bias))
    return nn.Sequential(*layers)


class ResMLP(nn.Module):
    def __init__(self, d_in, width, blocks, out):
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.ReLU(),
                          nn.Linear(width, width)) for _ in range(blocks))
        self.out = nn.Linear(width, out)

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = h + b(h)
        return self.out(h)


def cnn_bn(classes=3, ch=8):
    return nn.Sequential(
        nn.Conv2d(1, ch, 3, padding=1), nn.BatchNorm2d(ch), nn.ReLU(),
        nn.Conv2d(ch, ch, 3, padding=1), nn.BatchNorm2d(ch), nn.ReLU(),
        nn.Conv2d(ch, ch, 3, padding=1), nn.BatchNorm2d(ch), nn.ReLU(),
        nn.Flatten(), nn.Linear(ch * 64, classes))


class LSTMNet(nn.Module):
    def __init__(self, d=4, h=32, out=2):
        super().__init__()
        self.lstm = nn.LSTM(d, h, batch_first=True)
        self.head = nn.Linear(h, out)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


class Block(nn.Module):
    def __init__(self, d=4, dm=16, out=2):
        super().__init__()
        self.emb = nn.Linear(d, dm)
        self.enc = nn.TransformerEncoderLayer(dm, 2, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(dm, out)

    def forward(self, x):
        return self.head(self.enc(self.emb(x)).mean(1))


def init_linear(model, weight: Callable[[torch.Tensor], None], bias: float | None = None,
                hidden_bias: float | None = None):
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for i, m in enumerate(linears):
            weight(m.weight)
            if m.bias is not None:
                if bias is not None:
                    m.bias.fill_(bias)
                if hidden_bias is not None and i < len(linears) - 1:
                    m.bias.fill_(hidden_bias)
    return model


def normal(std):
    return lambda w: w.normal_(0.0, std)


def scaled(gain):  # std = gain / sqrt(fan_in)
    return lambda w: w.normal_(0.0, gain / math.sqrt(w.shape[1]))


def eye(a):
    return lambda w: w.copy_(a * torch.eye(*w.shape))


# ------------------------------------------------------------------ cases


@dataclass
class Case:
    name: str
    labels: frozenset[str]
    build: Callable[[], tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]]
    opt: str = "adam"
    lr: float = 1e-3
    steps: int = 60
    batch: int = 64
    loss: str = "ce"
    dtype: torch.dtype = torch.float32
    alt_lr: float | None = None  # the rate the learning-rate confirmation retrains with
    meta: dict = field(default_factory=dict)


def _c(name, labels, build, **kw):
    return Case(name, frozenset(labels), build, **kw)


def cases() -> list[Case]:
    B = blobs
    H: list[Case] = [
        _c("mlp-relu-adam", [], lambda: (mlp(8, 64, 3, "relu", 4), B())),
        _c("mlp-relu-sgd-w128", [], lambda: (mlp(8, 128, 4, "relu", 4), B(seed=1)),
           opt="sgdm", lr=0.05),
        _c("mlp-tanh-sgd", [], lambda: (mlp(8, 64, 3, "tanh", 4), B(seed=2)), opt="sgd", lr=0.1),
        _c("mlp-gelu-d6-adam", [], lambda: (mlp(8, 64, 6, "gelu", 4), B(seed=3)), lr=3e-3),
        _c("mlp-relu-he-d8-sgd", [], lambda: (init_linear(mlp(8, 64, 8, "relu", 4), scaled(
            math.sqrt(2)), bias=0.0), B(seed=4)), opt="sgdm", lr=0.02),
        _c("mlp-sigmoid-d2-adam", [], lambda: (mlp(8, 32, 2, "sigmoid", 4), B(seed=5)), lr=1e-2),
        _c("resmlp-8-adam", [], lambda: (ResMLP(8, 64, 8, 4), B(seed=6))),
        _c("cnn-bn-adam", [], lambda: (cnn_bn(), images())),
        _c("cnn-bn-sgd", [], lambda: (cnn_bn(ch=12), images(seed=1)), opt="sgdm", lr=0.05),
        _c("lstm-adam", [], lambda: (LSTMNet(), sequences()), lr=1e-2),
        _c("transformer-adam", [], lambda: (Block(), sequences(seed=1)), lr=3e-3),
        _c("mlp-relu-sgd-large-lr", [], lambda: (mlp(8, 32, 2, "relu", 4), B(seed=7)),
           opt="sgd", lr=0.5),
        _c("mlp-relu-adam-large-lr", [], lambda: (mlp(8, 32, 2, "relu", 4), B(seed=8)), lr=2e-2),
        _c("mlp-leaky-w256-sgd-small-lr", [], lambda: (mlp(8, 256, 5, "leaky_relu", 4),
                                                      B(seed=9)), opt="sgdm", lr=0.01),
        _c("mlp-relu-batch16", [], lambda: (mlp(8, 64, 3, "relu", 4), B(seed=10)), batch=16),
        _c("mlp-relu-regression", [], lambda: (mlp(6, 64, 3, "relu", 1), regression()),
           loss="mse"),
        _c("mlp-tanh-float64", [], lambda: (mlp(8, 64, 4, "tanh", 4).double(), B(seed=11)),
           dtype=torch.float64),
        _c("mlp-relu-10class-sgd", [], lambda: (mlp(16, 128, 3, "relu", 10),
                                                B(d=16, classes=10, seed=12)), opt="sgdm",
           lr=0.05),
        _c("mlp-relu-sum-loss", [], lambda: (mlp(8, 64, 3, "relu", 4), B(seed=13)),
           loss="ce-sum", lr=1e-3),
    ]
    V = "vanishing-gradients"
    E = "exploding-gradients"
    P: list[Case] = [
        _c("sigmoid-d10-normal1-sgd", [V], lambda: (init_linear(mlp(8, 64, 10, "sigmoid", 4),
                                                               normal(1.0)), B(seed=20)),
           opt="sgd", lr=0.1),
        _c("sigmoid-d12-default-sgd", [V], lambda: (mlp(8, 64, 12, "sigmoid", 4), B(seed=21)),
           opt="sgd", lr=0.1),
        _c("sigmoid-d15-xavier-adam", [V], lambda: (init_linear(
            mlp(8, 128, 15, "sigmoid", 4), nn.init.xavier_normal_), B(seed=22)), lr=1e-3),
        _c("tanh-d8-small-init-sgd", [V], lambda: (init_linear(mlp(8, 64, 8, "tanh", 4),
                                                              scaled(0.3)), B(seed=23)),
           opt="sgd", lr=0.1),
        _c("relu-d30-xavier-sgd", [V], lambda: (init_linear(mlp(8, 64, 30, "relu", 4),
                                                           nn.init.xavier_normal_, bias=0.0),
                                                B(seed=24)), opt="sgd", lr=0.01),
        _c("linear-chain-0.5I-d12", [V], lambda: (init_linear(mlp(8, 32, 12, "identity", 4),
                                                             eye(0.5), bias=0.0), B(seed=25)),
           opt="sgd", lr=0.01),
        _c("sigmoid-d8-w256-adam", [V], lambda: (mlp(8, 256, 8, "sigmoid", 4), B(seed=26))),
        _c("linear-chain-1.5I-d16", [E], lambda: (init_linear(mlp(8, 32, 16, "identity", 4),
                                                             eye(1.5), bias=0.0), B(seed=30)),
           opt="sgd", lr=1e-6),
        _c("relu-d10-gain2-sgd", [E], lambda: (init_linear(mlp(8, 64, 10, "relu", 4),
                                                          scaled(2.0 * math.sqrt(2)), bias=0.0),
                                               B(seed=31)), opt="sgd", lr=1e-7),
        _c("relu-d15-gain1.6-adam", [E], lambda: (init_linear(mlp(8, 128, 15, "relu", 4),
                                                             scaled(1.6 * math.sqrt(2)),
                                                             bias=0.0), B(seed=32)), lr=1e-4),
        _c("relu-sgd-lr5", ["learning-rate"], lambda: (mlp(8, 64, 3, "relu", 4), B(seed=40)),
           opt="sgd", lr=5.0, alt_lr=0.5),
        _c("relu-adam-lr1", ["learning-rate"], lambda: (mlp(8, 64, 3, "relu", 4), B(seed=41)),
           lr=1.0, alt_lr=0.1),
        _c("tanh-sgd-lr20", ["learning-rate"], lambda: (mlp(8, 64, 2, "tanh", 4), B(seed=42)),
           opt="sgd", lr=20.0, alt_lr=2.0),
        _c("gelu-adam-lr3", ["learning-rate"], lambda: (mlp(8, 128, 4, "gelu", 4), B(seed=43)),
           lr=3.0, alt_lr=0.3),
        _c("relu-sgd-lr50-nan", ["nonfinite", "learning-rate"], lambda: (
            mlp(8, 64, 4, "relu", 4), B(seed=44)), opt="sgd", lr=50.0, alt_lr=0.05),
        _c("tanh-adam-log0-nan", ["nonfinite"], lambda: (mlp(8, 32, 2, "tanh", 4), B(seed=45)),
           loss="nll-raw"),
        _c("relu-bias-3-sgd", ["dead-relu"], lambda: (init_linear(mlp(8, 64, 3, "relu", 4),
                                                                 lambda w: None,
                                                                 hidden_bias=-3.0), B(seed=50)),
           opt="sgd", lr=0.05),
        _c("relu-bias-5-adam-w128", ["dead-relu"], lambda: (init_linear(
            mlp(8, 128, 4, "relu", 4), lambda w: None, hidden_bias=-5.0), B(seed=51))),
        _c("relu-bias-2-d2-sgdm", ["dead-relu"], lambda: (init_linear(
            mlp(8, 32, 2, "relu", 4), lambda w: None, hidden_bias=-2.0), B(seed=52)),
           opt="sgdm", lr=0.02),
        _c("zero-init-relu", ["symmetry"], lambda: (init_linear(mlp(8, 64, 3, "relu", 4),
                                                               nn.init.zeros_, bias=0.0),
                                                    B(seed=60)), opt="sgd", lr=0.1),
        _c("const-init-tanh", ["symmetry"], lambda: (init_linear(mlp(8, 64, 2, "tanh", 4),
                                                                lambda w: w.fill_(0.1),
                                                                bias=0.1), B(seed=61)),
           opt="sgd", lr=0.1),
        _c("zero-init-sigmoid-adam", ["symmetry"], lambda: (init_linear(
            mlp(8, 32, 3, "sigmoid", 4), nn.init.zeros_, bias=0.0), B(seed=62))),
        _c("tanh-normal1-w64", ["saturation"], lambda: (init_linear(mlp(8, 64, 3, "tanh", 4),
                                                                   normal(1.0)), B(seed=70)),
           opt="sgd", lr=0.01),
        _c("sigmoid-normal1-w128-d2", ["saturation"], lambda: (init_linear(
            mlp(8, 128, 2, "sigmoid", 4), normal(1.0)), B(seed=71)), lr=1e-3),
        _c("tanh-gain4-w256-adam", ["saturation"], lambda: (init_linear(
            mlp(8, 256, 2, "tanh", 4), scaled(4.0)), B(seed=72)), lr=1e-4),
        _c("inputs-x100-adam", ["input-scale"], lambda: (mlp(8, 64, 3, "relu", 4),
                                                         _scale(B(seed=80), 100.0))),
        _c("inputs-x1e-3-sgd", ["input-scale"], lambda: (mlp(8, 64, 3, "relu", 4),
                                                         _scale(B(seed=81), 1e-3)),
           opt="sgdm", lr=0.05),
        _c("inputs-outliers-adam", ["input-scale"], lambda: (mlp(8, 64, 3, "relu", 4),
                                                             _outliers(B(seed=82)))),
        _c("inputs-x50-cnn", ["input-scale"], lambda: (cnn_bn(), _scale(images(seed=2), 50.0))),
        _c("lr0-sgd", ["loss-plateau", "learning-rate"], lambda: (mlp(8, 64, 3, "relu", 4),
                                                                  B(seed=90)),
           opt="sgd", lr=0.0, alt_lr=0.1),
        _c("lr0-adam-cnn", ["loss-plateau", "learning-rate"], lambda: (cnn_bn(), images(seed=3)),
           lr=0.0, alt_lr=1e-3),
        _c("random-labels-adam", ["loss-plateau"], lambda: (mlp(8, 16, 2, "relu", 4),
                                                            B(n=2048, seed=91, noise=1.0))),
        _c("random-labels-sgd-10c", ["loss-plateau"], lambda: (
            mlp(16, 16, 2, "relu", 10), B(n=2048, d=16, classes=10, seed=92, noise=1.0)),
           opt="sgdm", lr=0.05),
        _c("lr-tiny-sgd", ["loss-plateau", "learning-rate"], lambda: (
            mlp(8, 64, 3, "relu", 4), B(seed=93)), opt="sgd", lr=1e-6, alt_lr=0.1),
    ]
    return H + P


def _scale(data, s):
    x, y = data
    return x * s, y


def _outliers(data, frac=0.02, size=1000.0):
    x, y = data
    g = torch.Generator().manual_seed(7)
    rows = torch.rand(len(x), generator=g) < frac
    x = x.clone()
    x[rows] = x[rows] * size
    return x, y


# ------------------------------------------------------------------ training


def _nll_raw(out, y):
    """NLL of a softmax whose logits are pushed to -inf for one class: log 0 = -inf."""
    logp = torch.log(torch.softmax(out * 1e4, dim=1))
    return nn.functional.nll_loss(logp, y)


def _loss_fn(kind):
    if kind == "nll-raw":
        return _nll_raw
    if kind == "mse":
        return nn.MSELoss()
    if kind == "ce-sum":
        return nn.CrossEntropyLoss(reduction="sum")
    return nn.CrossEntropyLoss()


def _optimizer(kind, params, lr):
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr)
    if kind == "sgdm":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    return torch.optim.SGD(params, lr=lr)


def train(case: Case, model, data, *, run_dir: str | None, lr: float | None = None):
    """Train; with ``run_dir`` under a Probe. Returns the loop's own record."""
    x, y = data
    x = x.to(case.dtype)
    if case.loss == "mse":
        y = y.to(case.dtype)
    loss_fn = _loss_fn(case.loss)
    opt = _optimizer(case.opt, model.parameters(), case.lr if lr is None else lr)
    g = torch.Generator().manual_seed(123)
    grad_norms, losses, nonfinite = [], [], False
    probe = (gp.Probe(model, opt, run_dir=run_dir, overwrite=True, **PROBE_KWARGS).attach()
             if run_dir else None)
    try:
        for _ in range(case.steps):
            idx = torch.randint(0, len(x), (case.batch,), generator=g)
            loss = loss_fn(model(x[idx]), y[idx])
            if probe is not None:
                probe.observe_loss(loss)
            loss.backward()
            grads = [p.grad.detach().flatten() for p in model.parameters() if p.grad is not None]
            gn = float(torch.cat(grads).norm()) if grads else 0.0
            grad_norms.append(gn)
            losses.append(float(loss.detach()))
            nonfinite |= not math.isfinite(losses[-1]) or not math.isfinite(gn)
            opt.step()
            opt.zero_grad()
    finally:
        if probe is not None:
            probe.detach()
    nonfinite |= any(not torch.isfinite(p).all() for p in model.parameters())
    return {"grad_norms": grad_norms, "losses": losses, "nonfinite": nonfinite}


def full_loss(case, model, data):
    x, y = data
    x = x.to(case.dtype)
    if case.loss == "mse":
        y = y.to(case.dtype)
    with torch.no_grad():
        return float(_loss_fn("mse" if case.loss == "mse" else "ce")(model(x), y))


def at_chance(case, model, data):
    """Whole-data accuracy minus the majority class's frequency (classification only; NaN
    unless the whole-data cross-entropy is within 10 % of ln C: the prior is predicted)."""
    x, y = data
    if case.loss == "mse" or y.dim() != 1:
        return float("nan")
    with torch.no_grad():
        out = model(x.to(case.dtype))
    if out.dim() != 2 or out.shape[1] < 2 or not bool(torch.isfinite(out).all()):
        return float("nan")
    ce = float(nn.functional.cross_entropy(out.double(), y))
    if abs(ce - math.log(out.shape[1])) > 0.1 * math.log(out.shape[1]):
        return float("nan")
    acc = float((out.argmax(1) == y).double().mean())
    prior = float(torch.bincount(y).max()) / len(y)
    return acc - prior


# ------------------------------------------------------------------ direct measurements

WEIGHT_TYPES = (nn.Linear, nn.Conv2d)
PROBE_KWARGS: dict = {"budget": None}
"""How the suite's runs are recorded: every step in full (the rules' reference, the same steps
whatever the machine's load); ``--default-attach``: the Probe's default budget."""


def act_grad_ratio(case, model, data, n=256):
    """RMS of ∂L/∂(output) of the first hidden weight layer over the last hidden one, by
    autograd on ``n`` examples (hooks of our own; the output layer is left out)."""
    mods = [m for m in model.modules() if isinstance(m, WEIGHT_TYPES)]
    if len(mods) < 4:
        return float("nan")
    outs: dict[nn.Module, torch.Tensor] = {}

    def keep(m, _i, o):
        if o.requires_grad:
            o.retain_grad()
            outs.setdefault(m, o)

    handles = [m.register_forward_hook(keep) for m in mods[:-1]]
    try:
        x, y = data
        x = x[:n].to(case.dtype)
        y = y[:n].to(case.dtype) if case.loss == "mse" else y[:n]
        model.zero_grad()
        _loss_fn(case.loss)(model(x), y).backward()
        model.zero_grad()
    finally:
        for h in handles:
            h.remove()
    hidden = [outs[m] for m in mods[:-1] if m in outs]
    rms = [float(t.grad.double().pow(2).mean().sqrt()) for t in hidden if t.grad is not None]
    if len(rms) < 3 or rms[-1] == 0 or not all(math.isfinite(r) for r in rms):
        return float("nan")
    return rms[0] / rms[-1]


def unit_fractions(case, model, data):
    """Per hidden activation module, on the whole data set: the fraction of ReLU units never
    positive, and of sigmoid/tanh outputs whose derivative is < 5 % of its maximum."""
    dead, sat = [], []
    acts = [m for m in model.modules() if isinstance(m, (nn.ReLU, nn.Sigmoid, nn.Tanh))]
    outs = {}
    handles = [m.register_forward_hook(lambda m, i, o: outs.__setitem__(m, o.detach()))
               for m in acts]
    try:
        with torch.no_grad():
            model(data[0].to(case.dtype))
    finally:
        for h in handles:
            h.remove()
    for m, o in outs.items():
        if isinstance(m, nn.ReLU):
            flat = o.reshape(o.shape[0], -1) if o.dim() == 2 else o.transpose(0, 1).flatten(1).T
            dead.append(float((flat.max(0).values <= 0).double().mean()))
        elif isinstance(m, nn.Sigmoid):
            sat.append(float(((o * (1 - o)) < 0.05 * 0.25).double().mean()))
        else:
            sat.append(float(((1 - o * o) < 0.05).double().mean()))
    return max(dead, default=0.0), max(sat, default=0.0)


def equal_rows(model):
    """True when some hidden Linear layer's weight rows are all equal (to 1e-6 of the norm)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)][:-1]
    for m in linears:
        w = m.weight.detach().double()
        if w.shape[0] > 1 and not torch.isfinite(w).all():
            continue
        spread = float((w - w[:1]).norm())
        if w.shape[0] > 1 and spread <= 1e-6 * max(float(w.norm()), 1e-300):
            return True
    return False


def running_growth(norms, k=5):
    vals = [v for v in norms if math.isfinite(v)]
    if len(vals) < 2 * k:
        return float("nan")
    start = sorted(vals[:k])[k // 2]
    med = [sorted(vals[i - k:i])[k // 2] for i in range(k, len(vals) + 1)]
    return max(med) / start if start > 0 else float("inf")


def measure(case, before, after, data, rec):
    """The direct measurements: {pathology: (confirmed, number)}."""
    out = {}
    r0, r1 = act_grad_ratio(case, before, data), act_grad_ratio(case, after, data)
    # no gradient at all at initialisation (nan) and a collapse after training also counts
    out["vanishing-gradients"] = ((r0 <= 1e-2 or math.isnan(r0)) and r1 <= 1e-2, r1)
    growth = running_growth(rec["grad_norms"])
    losses = [v for v in rec["losses"] if math.isfinite(v)]
    diverged = bool(losses) and max(losses) >= 10 * losses[0]
    out["exploding-gradients"] = ((r0 >= 1e2 and r1 >= 1e2) or growth >= 100 or diverged,
                                  r0 if r0 >= 1e2 else growth)
    out["nonfinite"] = (rec["nonfinite"], float(rec["nonfinite"]))
    dead, sat = unit_fractions(case, after, data)
    out["dead-relu"] = (dead >= 0.5, dead)
    out["saturation"] = (sat >= 0.5, sat)
    out["symmetry"] = (equal_rows(after), float(equal_rows(after)))
    l0, l1 = full_loss(case, before, data), full_loss(case, after, data)
    plateau = not math.isfinite(l1) or l1 >= 0.95 * l0 or at_chance(case, after, data) <= 0.05
    out["loss-plateau"] = (plateau and not rec["nonfinite"], l1 / l0)
    x = data[0].double()
    rms = x.pow(2).mean(0).sqrt()
    peak = float(x.abs().max() / x.pow(2).mean().sqrt())
    out["input-scale"] = (bool((rms > 10).any() or (rms < 0.1).any()) or peak >= 50,
                          float(rms.max()))
    return out


def confirm_lr(case, before, data, end_loss):
    alt = copy.deepcopy(before)
    rec = train(case, alt, data, run_dir=None, lr=case.alt_lr)
    alt_loss = full_loss(case, alt, data)
    if not math.isfinite(end_loss):
        return math.isfinite(alt_loss), alt_loss
    return alt_loss <= 0.5 * end_loss and not rec["nonfinite"], alt_loss


# ------------------------------------------------------------------ the suite


def run_case(case: Case, out: Path, index: int) -> dict:
    torch.manual_seed(1000 + index)
    model, data = case.build()
    before = copy.deepcopy(model)
    t = time.perf_counter()
    rec = train(case, model, data, run_dir=str(out / case.name))
    seconds = time.perf_counter() - t
    found = measure(case, before, model, data, rec)
    notes = []
    labels = set()
    for p, (ok, value) in found.items():
        if p in case.labels and not ok:
            notes.append(f"built {p} not confirmed ({value:.3g}): label removed")
        elif p not in case.labels and ok:
            notes.append(f"{p} confirmed ({value:.3g}): label added")
        if ok:
            labels.add(p)
    if "learning-rate" in case.labels:
        ok, alt = confirm_lr(case, before, data, full_loss(case, model, data))
        if ok:
            labels.add("learning-rate")
        else:
            notes.append(f"learning-rate not confirmed (loss at lr {case.alt_lr}: {alt:.3g})")
    diagnosis = gp.diagnose(out / case.name)
    fired = {f.rule for f in diagnosis if f.severity != "info"}
    return {"case": case, "labels": labels, "fired": fired, "notes": notes,
            "seconds": seconds, "diagnosis": diagnosis,
            "dropped": bool(case.labels) and not labels}


def table(results: list[dict]) -> str:
    kept = [r for r in results if not r["dropped"]]
    lines = [f"{'pathology':22} {'runs':>4} {'TP':>3} {'FP':>3} {'FN':>3} {'precision':>9} "
             f"{'recall':>6}"]
    for p in PATHOLOGIES:
        tp = sum(p in r["labels"] and p in r["fired"] for r in kept)
        fp = sum(p not in r["labels"] and p in r["fired"] for r in kept)
        fn = sum(p in r["labels"] and p not in r["fired"] for r in kept)
        prec = tp / (tp + fp) if tp + fp else float("nan")
        rec = tp / (tp + fn) if tp + fn else float("nan")
        lines.append(f"{p:22} {tp + fn:4d} {tp:3d} {fp:3d} {fn:3d} {prec:9.2f} {rec:6.2f}")
    healthy = [r for r in kept if not r["labels"]]
    warned = [r for r in healthy if r["fired"]]
    lines.append(f"healthy runs: {len(healthy)}, with any warning: {len(warned)}"
                 + "".join(f"\n  {r['case'].name}: {sorted(r['fired'])}" for r in warned))
    lines.append(f"runs: {len(results)} built, {len(kept)} kept")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="where the runs go (default: a temp dir)")
    parser.add_argument("--only", nargs="*", default=None, help="case names to run")
    parser.add_argument("--verbose", action="store_true", help="print each diagnosis")
    parser.add_argument("--default-attach", action="store_true",
                        help="record with the Probe's default budget=0.05 (its full steps "
                        "depend on the measured cost) instead of every step in full")
    args = parser.parse_args(argv)
    if args.default_attach:
        PROBE_KWARGS.clear()
    torch.set_num_threads(1)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="gp-suite-"))
    results = []
    all_cases = cases()
    for i, case in enumerate(all_cases):
        if args.only and case.name not in args.only:
            continue
        r = run_case(case, out, i)
        results.append(r)
        mark = "ok " if r["labels"] == r["fired"] else "MISMATCH"
        drop = " (dropped)" if r["dropped"] else ""
        print(f"{mark} {case.name:30} labels={sorted(r['labels'])} fired={sorted(r['fired'])}"
              f" {r['seconds']:.1f}s{drop}")
        for n in r["notes"]:
            print(f"     note: {n}")
        if args.verbose and r["labels"] != r["fired"]:
            print("     " + str(r["diagnosis"]).replace("\n", "\n     "))
    print()
    print(table(results))
    if not args.out:
        shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
