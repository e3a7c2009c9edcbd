"""clipping: an exploding network cured (or not) by gradient clipping and by L2; L1 vs L2 weights.

Part 1 -- exploding gradients. A ReLU MLP of ``depth`` hidden layers whose weights are ``gain``
times He's (``W ~ N(0, gain²·2/fan_in)``): each layer multiplies the signal's scale by about
``gain``, so the loss at initialisation and the gradient of the first layer are ``~gain^depth``
too large, and plain SGD with momentum at learning rate ``lr`` overshoots into overflow. Cures
tried, each alone:

* **clip by norm** (Pascanu, Mikolov & Bengio 2013): ``g ← g · min(1, c/‖g‖)`` over all
  parameters -- the direction is kept, the step is at most ``lr·c``;
* **clip by value**: every component clamped to ``[-v, v]`` (Mikolov 2012) -- the direction
  changes, the step is at most ``lr·v·√P``;
* **L2** (weight decay ``λ``): ``g ← g + λ·w``. It pulls weights towards 0 over many steps but
  does nothing to bound the *first* steps' size, so it is not expected to stop an explosion that
  happens in the first few steps -- the experiment checks this rather than assumes it.

Every cure is attached to the optimizer by ``gp.remedies``: ``clip_gradients_(opt, max_norm=c)``,
``clip_gradients_(opt, max_value=v)``, ``regularize_(opt, l2=λ)`` (for SGD the same as
``weight_decay=λ``); the training loop is the same for all.

Part 2 -- L1 vs L2 on the weights. A healthy MLP (He init) trained with no penalty, with
``regularize_(opt, l1=...)`` (the gradient of ``l1·Σ|w|``) and with ``regularize_(opt, l2=...)``
(the gradient of ``(l2/2)·Σw²``), every parameter, plain SGD: the L1 penalty's
gradient ``l1·sign(w)`` has the same size however small ``w`` is, so it drives many weights to
(nearly) zero -- sparsity; the L2 penalty's gradient ``l2·w`` fades with ``w``, so it shrinks
all weights proportionally and rarely zeroes one (Tibshirani 1996; Goodfellow et al. 2016, 7.1).

Data: scikit-learn's 8x8 digits, standardised; cross-entropy; test accuracy on the held-out 30 %.

Example
    >>> import gradprobe as gp
    >>> r = gp.lab.run("clipping", steps=100)   # doctest: +SKIP
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
from gradprobe.lab.common import standardized_digits
from gradprobe.lab.config_checks import need_at_least, need_positive, need_within
from gradprobe.remedies import clip_gradients_, regularize_
from gradprobe.remedies.optim import total_norm

if TYPE_CHECKING:
    from matplotlib.figure import Figure

NAME = "clipping"
CURES = ("none", "clip by norm", "clip by value", "L2")
PENALTIES = ("none", "L1", "L2")
NEAR_ZERO = 1e-3
"""A weight counts as (nearly) zero when ``|w| < NEAR_ZERO``."""


@dataclass(frozen=True)
class ClippingConfig:
    depth: int = 8
    width: int = 64
    gain: float = 2.0
    lr: float = 0.05
    momentum: float = 0.9
    steps: int = 300
    batch: int = 64
    max_norm: float = 1.0
    max_value: float = 0.01
    weight_decay: float = 0.05
    l1: float = 1e-3
    l2: float = 2e-2
    reg_lr: float = 0.1
    reg_steps: int = 1000
    seed: int = 0

    def validate(self) -> None:
        need_at_least(NAME, self, 1, "depth", "width", "steps", "batch", "reg_steps")
        need_positive(NAME, self, "gain", "lr", "max_norm", "max_value", "reg_lr")
        need_within(NAME, self, "momentum", 0, 1)
        need_at_least(NAME, self, 0, "weight_decay", "l1", "l2")


def build(depth: int, width: int, gain: float, seed: int) -> nn.Sequential:
    """ReLU MLP 64 → width × depth → 10, ``W ~ N(0, gain²·2/fan_in)``, zero biases."""
    gen = torch.Generator().manual_seed(seed)
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    sizes = [64] + [width] * depth
    with torch.no_grad():
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
            layers[f"fc{i}"] = nn.Linear(a, b)
            layers[f"act{i}"] = nn.ReLU()
        layers["out"] = nn.Linear(width, 10)
        for mod in layers.values():
            if isinstance(mod, nn.Linear):
                mod.weight.normal_(0.0, gain * math.sqrt(2.0 / mod.in_features), generator=gen)
                mod.bias.zero_()
    return nn.Sequential(layers)


def _batches(n: int, batch: int, steps: int, seed: int) -> list[Tensor]:
    """The index of every mini-batch: shuffled epochs, ``steps`` batches in all."""
    out: list[Tensor] = []
    epoch = 0
    while len(out) < steps:
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
        out += list(torch.randperm(n, generator=gen).split(batch))
        epoch += 1
    return out[:steps]


def fit_cure(cure: str, x: Tensor, y: Tensor, config: ClippingConfig
             ) -> tuple[nn.Sequential, dict[str, np.ndarray]]:
    """SGD + momentum on the exploding network with one ``cure``; loss and the gradient norm
    (before clipping) per step. Training stops at the first non-finite loss."""
    model = build(config.depth, config.width, config.gain, config.seed)
    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    # each cure is a step pre-hook on the optimizer: the training loop is the same for all
    if cure == "clip by norm":
        clip_gradients_(opt, max_norm=config.max_norm)
    elif cure == "clip by value":
        clip_gradients_(opt, max_value=config.max_value)
    elif cure == "L2":
        regularize_(opt, l2=config.weight_decay)  # for SGD: weight_decay=config.weight_decay
    losses: list[float] = []
    norms: list[float] = []
    for idx in _batches(x.shape[0], config.batch, config.steps, config.seed):
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = total_norm([p.grad for p in model.parameters() if p.grad is not None])  # unclipped
        opt.step()
        # host sync once per step: the loop stops at the first non-finite loss
        value = float(loss.detach())
        losses.append(value)
        norms.append(float(norm))
        if not math.isfinite(value):
            break
    return model, {"loss": np.array(losses), "grad_norm": np.array(norms)}


def fit_penalty(penalty: str, x: Tensor, y: Tensor, config: ClippingConfig) -> nn.Sequential:
    """A healthy MLP (He init, depth 2) trained with plain SGD and ``penalty`` added by
    ``gp.remedies.regularize_`` (``g ← g + l1·sign(w)`` or ``g + l2·w`` for every parameter,
    biases included; plain SGD: the penalty's gradient acts as written, Adam would rescale it
    per weight)."""
    model = build(2, config.width, 1.0, config.seed)
    opt = torch.optim.SGD(model.parameters(), lr=config.reg_lr)
    if penalty == "L1":
        regularize_(opt, l1=config.l1)
    elif penalty == "L2":
        regularize_(opt, l2=config.l2)
    for idx in _batches(x.shape[0], config.batch, config.reg_steps, config.seed):
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model


def run(config: ClippingConfig, *, progress: Progress = no_progress, out: Path | None = None
        ) -> LabResult:
    config.validate()
    xtr, ytr, xte, yte = standardized_digits(config.seed)
    total = len(CURES) + len(PENALTIES)
    rows: list[dict[str, Any]] = []
    curves: dict[str, dict[str, np.ndarray]] = {}
    weights: dict[str, np.ndarray] = {}
    reg_rows: list[dict[str, Any]] = []
    with train.threads(1):
        for i, cure in enumerate(CURES):
            progress(cure, i, total)
            model, res = fit_cure(cure, xtr, ytr, config)
            curves[cure] = res
            loss = res["loss"]
            finite = bool(np.isfinite(loss).all() and len(loss) == config.steps)
            tail = loss[-max(1, config.steps // 10):]
            rows.append({
                "cure": cure, "loss_first": float(loss[0]), "largest_loss": float(np.nanmax(
                    np.where(np.isfinite(loss), loss, np.nan))) if np.isfinite(loss).any() else math.inf,
                "grad_norm_first": float(res["grad_norm"][0]),
                "final_train_loss": float(tail.mean()) if finite else math.inf,
                "diverged_at_step": math.nan if finite else int(len(loss)),
                "test_acc": train.accuracy(model, xte, yte) if finite else math.nan,
            })
        for j, penalty in enumerate(PENALTIES):
            progress(f"penalty {penalty}", len(CURES) + j, total)
            model = fit_penalty(penalty, xtr, ytr, config)
            w = torch.cat([m.weight.detach().flatten() for m in model if isinstance(m, nn.Linear)])
            weights[penalty] = w.numpy().astype(float)
            reg_rows.append({
                "penalty": penalty,
                "strength": {"none": 0.0, "L1": config.l1, "L2": config.l2}[penalty],
                "near_zero_fraction": float((w.abs() < NEAR_ZERO).double().mean()),
                "weight_l2_norm": float(w.norm()),
                "weight_l1_norm": float(w.abs().sum()),
                "largest_|w|": float(w.abs().max()),
                "test_acc": train.accuracy(model, xte, yte),
            })
    progress("done", total, total)
    table = pd.DataFrame(rows)
    reg = pd.DataFrame(reg_rows)
    result = LabResult(NAME, config, {"main": table, "l1_vs_l2": reg},
                       data={"curves": curves, "weights": weights})
    result.claims = _claims(config, table, reg)
    return result


def _claims(config: ClippingConfig, t: pd.DataFrame, reg: pd.DataFrame) -> list[Claim]:
    c = t.set_index("cure")

    def trains(cure: str) -> bool:
        return bool(math.isfinite(c.loc[cure, "final_train_loss"]) and c.loc[cure, "test_acc"] > 0.5)

    def describe(cure: str) -> str:
        row = c.loc[cure]
        if math.isfinite(row["final_train_loss"]):
            return f"{cure}: test accuracy {row['test_acc']:.3f}"
        return f"{cure}: loss not finite at step {int(row['diverged_at_step'])}"

    r = reg.set_index("penalty")
    l1, l2, none = r.loc["L1"], r.loc["L2"], r.loc["none"]
    return [
        Claim(f"without a cure, SGD (lr {config.lr:g}) on the gain-{config.gain:g} network "
              "diverges: the loss overflows to inf/NaN", not math.isfinite(c.loc["none",
              "final_train_loss"]), describe("none") + f"; first gradient norm "
              f"{c.loc['none', 'grad_norm_first']:.3g}"),
        Claim("clipping by norm cures it: the loss stays finite and test accuracy ends above 0.5",
              trains("clip by norm"), describe("clip by norm")),
        Claim("clipping by value cures it: the loss stays finite and test accuracy ends above 0.5",
              trains("clip by value"), describe("clip by value")),
        Claim(f"L2 regularisation (weight decay {config.weight_decay:g}) alone cures it too",
              trains("L2"), describe("L2")),
        Claim(f"L1 makes weights sparse: more than 3× the unpenalised fraction of weights have "
              f"|w| < {NEAR_ZERO:g}, and more than L2's",
              bool(l1["near_zero_fraction"] > 3 * none["near_zero_fraction"]
                   and l1["near_zero_fraction"] > l2["near_zero_fraction"]),
              f"none {none['near_zero_fraction']:.3f}, L1 {l1['near_zero_fraction']:.3f}, "
              f"L2 {l2['near_zero_fraction']:.3f}"),
        Claim("L2 shrinks weights: the weight norm is below the unpenalised one, with fewer "
              "near-zero weights than L1",
              bool(l2["weight_l2_norm"] < none["weight_l2_norm"]
                   and l2["near_zero_fraction"] < l1["near_zero_fraction"]),
              f"‖w‖₂: none {none['weight_l2_norm']:.3g}, L2 {l2['weight_l2_norm']:.3g}, "
              f"L1 {l1['weight_l2_norm']:.3g}"),
    ]


def plot(result: LabResult) -> dict[str, Figure]:
    from gradprobe.report import style

    config: ClippingConfig = result.config
    colors = style.category_colors(list(CURES))
    colors["L2"] = "0.1"  # far from "none"'s blue: the two curves can coincide
    fig, axes = style.figure(1, 2, size=(14, 4.6), title=(
        f"Exploding ReLU MLP ({config.depth} layers, weights {config.gain:g}× He), SGD + momentum, "
        f"lr {config.lr:g}"))
    curves = result.data["curves"]
    for ax, key, label in ((axes[0, 0], "loss", "training loss (cross-entropy, log)"),
                           (axes[0, 1], "grad_norm", "‖∂L/∂θ‖ before clipping (log)")):
        for cure in CURES:
            v = curves[cure][key]
            steps = np.arange(1, len(v) + 1)
            # L2 and no cure can coincide (weight decay barely changes the first steps): L2 is
            # drawn dashed on top so both stay visible
            ax.plot(steps, v, color=colors[cure], label=cure, linewidth=3.0 if cure == "none" else 1.4,
                    linestyle="--" if cure == "L2" else "-")
            if not np.isfinite(curves[cure]["loss"][-1]):
                last = np.flatnonzero(np.isfinite(v))
                if last.size:
                    ax.plot(steps[last[-1]], v[last[-1]], "x", color=colors[cure], markersize=9,
                            markeredgewidth=2)
        style.finish(ax, title=label.split(" (")[0], xlabel="SGD step (log)", ylabel=label,
                     scale="log")
        ax.set_xscale("log")
        ax.set_xlim(0.9, config.steps * 1.1)
    axes[0, 0].plot([], [], "x", color="0.3", label="last finite value (then inf/NaN)")
    axes[0, 1].axhline(config.max_norm, color="0.4", linestyle=":", linewidth=1,
                       label=f"clipping threshold max_norm = {config.max_norm:g}")
    # one legend for both panels, beside them: inside, it covered the curves at small sizes
    handles, labels = axes[0, 0].get_legend_handles_labels()
    h1, l1 = axes[0, 1].get_legend_handles_labels()
    extra = [(h, lab) for h, lab in zip(h1, l1) if lab not in labels]
    style.legend_outside(axes[0, 1], title="cure", handles=handles + [h for h, _ in extra],
                         labels=labels + [lab for _, lab in extra])

    weights = result.data["weights"]
    pcolors = style.category_colors(list(PENALTIES))
    wfig, waxes = style.figure(1, len(PENALTIES), size=(14, 4.2), title=(
        f"Weights after training with no penalty, L1 (λ={config.l1:g}) and L2 (λ={config.l2:g}): "
        "sparsity vs shrinkage"))
    reg = result.tables["l1_vs_l2"].set_index("penalty")
    lim = max(float(np.abs(w).max()) for w in weights.values())
    bins = np.linspace(-lim, lim, 81)
    for ax, penalty in zip(waxes[0], PENALTIES):
        ax.hist(weights[penalty], bins=bins, color=pcolors[penalty])
        ax.set_yscale("log")
        style.finish(ax, title=f"{penalty}: {reg.loc[penalty, 'near_zero_fraction']:.1%} of weights "
                     f"|w| < {NEAR_ZERO:g}, ‖w‖₂ = {reg.loc[penalty, 'weight_l2_norm']:.3g}",
                     xlabel="weight value w", ylabel="number of weights (log)", scale="log")
    ymax = max(ax.get_ylim()[1] for ax in waxes[0])
    for ax in waxes[0]:
        ax.set_ylim(0.8, ymax)
    return {"exploding": fig, "l1_vs_l2": wfig}


register(NAME, "an exploding MLP cured (or not) by clipping by norm, by value, and by L2; L1 vs L2 "
         "on the weights (sparsity vs shrinkage)", ClippingConfig, run, plot)
