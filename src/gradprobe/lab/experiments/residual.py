"""residual: plain vs residual networks from depth 10 to 100, at initialisation and in training.

A plain network's gradient reaching layer ``l`` is a product of one Jacobian per layer above it,
``∂L/∂a_l = J_(l+1)ᵀ ⋯ J_Lᵀ ∂L/∂a_L``, so it shrinks or grows geometrically with depth. A
residual block computes ``a_(l+1) = a_l + f(a_l)``, whose Jacobian is ``I + ∂f/∂a``: the product
then contains the identity path, and the gradient at an early layer is the top gradient *plus*
terms through the blocks -- it cannot vanish geometrically (He et al. 2016, "Identity Mappings in
Deep Residual Networks", eq. 5; Veit et al. 2016). The price, with an unscaled initialisation,
is that the blocks' contributions add up: the forward signal and the backward gradient *grow*
with depth (the reason for Fixup, Zhang et al. 2019, and SkipInit, De & Smith 2020).

Setting: a ReLU MLP on scikit-learn's 8x8 digits (standardised), ``fc1: 64 → width`` then
``depth - 1`` square hidden layers and a read-out, PyTorch's default initialisation
(``U(±1/√fan_in)``, ``Var W = 1/(3·fan_in)``, which shrinks a ReLU layer's signal by about
``1/6`` in variance); the residual network is the same model after
``gp.remedies.residual_`` (every square Linear+ReLU block becomes ``x + f(x)`` -- with the
default width 64, the digits' input size, that includes the first; the weights are the same
tensors); the *scaled* residual network multiplies each block's Linear by ``1/√L`` at
initialisation, so the block computes ``x + f(x)/√L`` (see :func:`build`). At initialisation:
``‖∂L/∂a_l‖`` for every hidden layer's output (cross-entropy on a batch of training data). Then
Adam for ``steps`` steps; test accuracy.

Example
    >>> import gradprobe as gp
    >>> r = gp.lab.run("residual", depths=(10, 30), steps=100)   # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from gradprobe.lab import train
from gradprobe.lab.base import Claim, LabResult, Progress, no_progress, register
from gradprobe.lab.common import adam_curve, running_mean, standardized_digits
from gradprobe.lab.config_checks import need_at_least, need_positive
from gradprobe.remedies.residual import Residual, residual_

if TYPE_CHECKING:
    from matplotlib.figure import Figure

NAME = "residual"
SMOOTH = 10
"""Loss curves are drawn as running means over this many steps."""
VARIANTS = ("plain", "residual", "residual, scaled")
"""``plain``; ``residual``: ``x + f(x)``; ``residual, scaled``: ``x + f(x)/√L`` at initialisation."""


@dataclass(frozen=True)
class ResidualConfig:
    depths: tuple[int, ...] = (10, 25, 50, 100)
    width: int = 64
    steps: int = 300
    batch: int = 64
    lr: float = 1e-3
    seed: int = 0

    def validate(self) -> None:
        need_at_least(NAME, self, 2, "depths")
        need_at_least(NAME, self, 1, "width", "steps", "batch")
        need_positive(NAME, self, "lr")


def build(depth: int, width: int, residual: bool, seed: int, *, scaled: bool = False
          ) -> nn.Sequential:
    """``fc1, act1, ..., fc{depth}, act{depth}, out``; with ``residual`` the square blocks
    ``fc_l, act_l`` become ``x + f(x)`` via :func:`gradprobe.remedies.residual_`.

    ``scaled``: each block's Linear (weight and bias) is then multiplied by ``1/√L``, ``L`` the
    number of blocks. ReLU is positively homogeneous, so the block computes ``x + f(x)/√L`` at
    initialisation: the residual branches' variances add up to a constant instead of growing
    with ``L`` (the ``1/√L`` branch scale of Hanin & Rolnick 2018 and Hayou et al. 2021, "Stable
    ResNet"; Fixup, Zhang et al. 2019, and SkipInit, De & Smith 2020, scale the branch down at
    initialisation for the same reason -- Fixup's zero-initialised last layer would leave this
    one-layer ``Linear → ReLU`` branch with ReLU'(0) = 0, no gradient)."""
    with train.seeded(seed):
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for i in range(1, depth + 1):
            layers[f"fc{i}"] = nn.Linear(64 if i == 1 else width, width)
            layers[f"act{i}"] = nn.ReLU()
        layers["out"] = nn.Linear(width, 10)
        model = nn.Sequential(layers)
    if residual:
        record = residual_(model)
        # fc1 (64 -> width) is square too when width = 64, the digits' input size
        assert len(record) == depth - (width != 64), str(record)
        if scaled:
            blocks = [m for m in model.modules() if isinstance(m, Residual)]
            with torch.no_grad():
                for block in blocks:
                    for lin in block.modules():
                        if isinstance(lin, nn.Linear):
                            lin.weight.mul_(1 / math.sqrt(len(blocks)))
                            if lin.bias is not None:
                                lin.bias.mul_(1 / math.sqrt(len(blocks)))
    return model


def hidden_outputs(model: nn.Sequential, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    """The logits and every hidden layer's output ``a_1..a_L`` (``retain_grad`` on each): the
    output of each ReLU in the plain network, of each block ``x + f(x)`` in the residual one."""
    h = x
    outs: list[Tensor] = []
    children = list(model.children())
    for mod in children[:-1]:
        h = mod(h)
        if isinstance(mod, nn.ReLU | Residual):
            h.retain_grad()
            outs.append(h)
    return children[-1](h), outs


def gradient_profile(model: nn.Sequential, x: Tensor, y: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``‖∂L/∂a_l‖`` and the RMS of ``a_l`` for every hidden layer (cross-entropy on ``(x, y)``)."""
    logits, outs = hidden_outputs(model, x)
    loss = nn.functional.cross_entropy(logits, y)
    model.zero_grad(set_to_none=True)
    loss.backward()
    grads = torch.stack([o.grad.norm() if o.grad is not None else torch.zeros(()) for o in outs])
    rms = torch.stack([o.detach().pow(2).mean().sqrt() for o in outs])
    model.zero_grad(set_to_none=True)
    return grads.numpy().astype(float), rms.numpy().astype(float)


def fit(model: nn.Module, x: Tensor, y: Tensor, config: ResidualConfig) -> np.ndarray:
    """Adam for ``steps`` steps on shuffled mini-batches; the loss per step."""
    return adam_curve(model, x, y, batch=config.batch, lr=config.lr, seed=config.seed,
                      steps=config.steps)


def run(config: ResidualConfig, *, progress: Progress = no_progress, out: Path | None = None
        ) -> LabResult:
    config.validate()
    xtr, ytr, xte, yte = standardized_digits(config.seed)
    xb, yb = xtr[:256], ytr[:256]
    plan = [(d, v) for d in config.depths for v in VARIANTS]
    rows: list[dict[str, Any]] = []
    profiles: dict[tuple[int, str], np.ndarray] = {}
    rms_profiles: dict[tuple[int, str], np.ndarray] = {}
    curves: dict[tuple[int, str], np.ndarray] = {}
    with train.threads(1):
        for i, (depth, variant) in enumerate(plan):
            progress(f"depth {depth} {variant}", i, len(plan))
            model = build(depth, config.width, variant != "plain", config.seed,
                          scaled=variant == "residual, scaled")
            grads, rms = gradient_profile(model, xb, yb)
            profiles[(depth, variant)] = grads
            rms_profiles[(depth, variant)] = rms
            acc_before = train.accuracy(model, xte, yte)
            curve = fit(model, xtr, ytr, config)
            curves[(depth, variant)] = curve
            tail = curve[-max(1, len(curve) // 10):]
            final = float(tail.mean()) if np.isfinite(tail).all() else math.inf
            rows.append({
                "depth": depth, "network": variant,
                "grad_first/last": float(grads[0] / grads[-1]),
                "rms_last/first": float(rms[-1] / rms[0]),
                "final_train_loss": final,
                "test_acc_before": acc_before,
                "test_acc": train.accuracy(model, xte, yte),
            })
    progress("done", len(plan), len(plan))
    table = pd.DataFrame(rows)
    result = LabResult(NAME, config, {"main": table}, data={
        "profiles": profiles, "rms": rms_profiles, "curves": curves,
        "smoothed": {k: running_mean(c, SMOOTH) for k, c in curves.items()}})
    result.claims = _claims(config, table)
    return result


def _claims(config: ResidualConfig, t: pd.DataFrame) -> list[Claim]:
    idx = t.set_index(["depth", "network"])
    deep = max(config.depths)
    shallow = min(config.depths)
    plain_ratio = float(idx.loc[(deep, "plain"), "grad_first/last"])
    res = t[t.network != "plain"]
    plain_acc = float(idx.loc[(deep, "plain"), "test_acc"])
    res_acc = float(idx.loc[(deep, "residual"), "test_acc"])
    scaled_acc = float(idx.loc[(deep, "residual, scaled"), "test_acc"])
    shallow_plain = float(idx.loc[(shallow, "plain"), "test_acc"])
    res_rms = float(idx.loc[(deep, "residual"), "rms_last/first"])
    scaled_rms = float(idx.loc[(deep, "residual, scaled"), "rms_last/first"])
    return [
        Claim(f"at initialisation the plain network's gradient vanishes with depth: at depth "
              f"{deep} the first hidden layer gets less than 1e-3 of the last one's gradient",
              bool(plain_ratio < 1e-3), f"‖∂L/∂a_1‖/‖∂L/∂a_L‖ = {plain_ratio:.3g}"),
        Claim("at initialisation the residual networks' gradient never vanishes: the first hidden "
              "layer gets at least the last one's gradient at every depth, scaled or not",
              bool((res["grad_first/last"] >= 1.0).all()),
              ", ".join(f"depth {d} {v}: {r:.3g}" for d, v, r in
                        zip(res["depth"], res["network"], res["grad_first/last"]))),
        Claim(f"in training, at depth {deep} the residual network with 1/√L-scaled branches beats "
              "the plain one by more than 0.2 test accuracy", bool(scaled_acc - plain_acc > 0.2),
              f"scaled residual {scaled_acc:.3f}, plain {plain_acc:.3f} (unscaled residual "
              f"{res_acc:.3f})"),
        Claim(f"at depth {shallow} the plain network trains (test accuracy > 0.8)",
              bool(shallow_plain > 0.8), f"{shallow_plain:.3f}"),
        Claim(f"the price of unscaled residual blocks: at depth {deep} the forward signal's RMS "
              "grows more than 10× from the first to the last hidden layer", bool(res_rms > 10),
              f"RMS(a_L)/RMS(a_1) = {res_rms:.3g}"),
        Claim(f"scaling each branch by 1/√L keeps the forward signal's growth at depth {deep} "
              "below 10×", bool(scaled_rms < 10), f"RMS(a_L)/RMS(a_1) = {scaled_rms:.3g}"),
    ]


def plot(result: LabResult) -> dict[str, Figure]:
    from gradprobe.report import style

    config: ResidualConfig = result.config
    depths = list(config.depths)
    colors = style.layer_colors([str(d) for d in depths])
    fig, axes = style.figure(1, len(VARIANTS), size=(17, 4.8), title=(
        "Gradient reaching each hidden layer at initialisation (ReLU MLP, PyTorch default init)"))
    values = [v for p in result.data["profiles"].values() for v in p if v > 0]
    floor = min(values) / 3
    underflow = False
    for ax, variant in zip(axes[0], VARIANTS):
        for d in depths:
            g = result.data["profiles"][(d, variant)]
            ax.plot(np.arange(1, d + 1), g, color=colors[str(d)], label=f"depth {d}")
            zero = np.flatnonzero(g == 0)
            if zero.size:  # float32 underflow: exactly 0, which a log axis cannot show
                underflow = True
                ax.plot(zero + 1, np.full(zero.size, floor * 1.6), "v", color=colors[str(d)],
                        markersize=3)
        style.finish(ax, title=variant + {"plain": "", "residual": " (x + f(x))",
                                          "residual, scaled": " (x + f(x)/√L)"}[variant],
                     xlabel="hidden layer l (1 = input side)",
                     ylabel="‖∂L/∂a_l‖ (log)", scale="log")
        ax.set_ylim(floor, max(values) * 3)
    for ax in axes[0, 1:]:  # the panels are compared: one y axis
        ax.sharey(axes[0, 0])
    if underflow:
        axes[0, 0].plot([], [], "v", color="0.3", markersize=4,
                        label="exactly 0 (float32 underflow)")
        axes[0, 0].legend(fontsize="small", loc="lower right")
    axes[0, -1].legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5),
                      title="network depth", title_fontsize="small")

    table: pd.DataFrame = result.tables["main"]
    tfig, taxes = style.figure(1, 2, size=(13, 4.6), title=(
        f"Training: Adam, lr {config.lr:g}, {config.steps} steps of batch {config.batch}"))
    vcolors = style.category_colors(list(VARIANTS))
    ax = taxes[0, 0]
    for variant in VARIANTS:
        g = table[table.network == variant]
        ax.plot(g["depth"], g["test_acc"], "o-", color=vcolors[variant], label=variant)
    ax.axhline(0.1, color="0.5", linestyle=":", linewidth=1, label="chance (0.1)")
    style.finish(ax, title="test accuracy after training", xlabel="depth (hidden layers)",
                 ylabel="test accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_xticks(depths)
    ax.legend(fontsize="small", loc="center left")
    ax = taxes[0, 1]
    curves = result.data["smoothed"]
    for d in depths:
        for variant, ls in zip(VARIANTS, ("--", ":", "-")):
            c = curves[(d, variant)]
            ax.plot(np.arange(1, len(c) + 1), c, color=colors[str(d)], linestyle=ls,
                    linewidth=1.3, label=f"depth {d}, {variant}")
    finite = [v for c in curves.values() for v in c if np.isfinite(v)]
    style.finish(ax, title=f"training loss (running mean over {SMOOTH} steps)", xlabel="Adam step",
                 ylabel="cross-entropy (log)", scale="log")
    ax.set_ylim(max(min(finite), 1e-4) / 1.5, max(finite) * 1.5)
    ax.legend(fontsize="x-small", loc="center left", bbox_to_anchor=(1.01, 0.5), ncol=1)
    return {"gradient_profile": fig, "training": tfig}


register(NAME, "plain vs residual ReLU MLPs, depth 10-100: gradient depth profile at "
         "initialisation and training (gp.remedies.residual_)", ResidualConfig, run, plot)
