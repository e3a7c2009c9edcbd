"""normalization: none vs BatchNorm, LayerNorm, InstanceNorm and GroupNorm over batch sizes.

Every normaliser computes ``y = γ·(x - μ)/√(σ² + ε) + β``; they differ in *which* values the
mean and variance ``μ, σ²`` are taken over (Wu & He 2018, figure 2):

* **BatchNorm** (Ioffe & Szegedy 2015): each channel over the batch (and positions). In training
  mode it uses the *batch's* statistics and updates running estimates; in eval mode it uses the
  running estimates. With a batch of 2, ``μ`` and ``σ²`` are estimated from 2 samples: noisy in
  training, and a poor match for the running estimates used at test time.
* **LayerNorm** (Ba et al. 2016): each sample over its features (for a CNN: over all channels
  and positions, ``GroupNorm(1, C)``). Independent of the batch.
* **InstanceNorm** (Ulyanov et al. 2016): each sample and channel over positions (CNN only).
* **GroupNorm** (Wu & He 2018): each sample over groups of channels -- between the two. Its
  result does not depend on the batch size, which is Wu & He's point: it stays stable at batch
  sizes where BatchNorm degrades. How few values a BatchNorm statistic is estimated from is what
  matters: in the MLP, ``batch``; in the CNN, ``batch × 64`` (each channel over the batch and the
  8×8 positions), so batch 2 still gives 128 -- the experiment claims degradation for the MLP
  and measures its absence for the CNN.

Setting: scikit-learn's 8x8 digits (standardised with the training set's per-pixel mean and
std), a deep ReLU MLP (``mlp_depth`` hidden layers of ``width``) and a deep CNN (``cnn_depth``
3x3 convolutions of ``channels`` channels, global average pooling, Linear read-out; both
``nn.Sequential`` with named children: ``lab.zoo.mlp`` for the MLP), PyTorch's
default initialisation, the norms inserted before every activation by
``gp.remedies.add_norm_``; Adam for ``epochs`` epochs at each batch size (the same examples seen, ``epochs·n/batch``
steps); accuracy on the held-out
30 % in eval mode.

Then BatchNorm's two modes on the trained batch-64 CNN: the same image gives different outputs in
training mode depending on which batch it is in; and predictions made one image at a time with
the model left in training mode (``model.eval()`` forgotten) are normalised with that one image's
own statistics.

Example
    >>> import gradprobe as gp
    >>> r = gp.lab.run("normalization", batch_sizes=(2, 64), epochs=1)   # doctest: +SKIP
    >>> r.table                                                          # doctest: +SKIP
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from gradprobe.errors import ConfigError
from gradprobe.lab import train, zoo
from gradprobe.lab.base import Claim, LabResult, Progress, no_progress, register
from gradprobe.lab.common import adam_curve, running_mean, standardized_digits
from gradprobe.lab.config_checks import need_at_least, need_positive
from gradprobe.remedies.norm import add_norm_

if TYPE_CHECKING:
    from matplotlib.figure import Figure

NAME = "normalization"
NORMS: dict[str, tuple[str, ...]] = {
    "MLP": ("none", "batch", "layer", "group"),  # InstanceNorm needs positions: CNN only
    "CNN": ("none", "batch", "layer", "instance", "group"),
}
SMOOTH = 20
"""Loss curves are drawn as running means over this many steps."""
LABELS = {"none": "none", "batch": "BatchNorm", "layer": "LayerNorm", "instance": "InstanceNorm",
          "group": "GroupNorm"}


@dataclass(frozen=True)
class NormalizationConfig:
    batch_sizes: tuple[int, ...] = (2, 8, 64)
    epochs: int = 2
    lr: float = 1e-3
    mlp_depth: int = 10
    width: int = 64
    cnn_depth: int = 6
    channels: int = 16
    seed: int = 0

    def validate(self) -> None:
        if not self.batch_sizes or min(self.batch_sizes) < 2:
            raise ConfigError(f"normalization: batch sizes must be >= 2 (BatchNorm needs two "
                              f"samples to train), got {self.batch_sizes}", hint="e.g. 2,8,64")
        need_at_least(NAME, self, 1, "epochs", "mlp_depth", "width", "cnn_depth", "channels")
        need_positive(NAME, self, "lr")


def build(arch: str, norm: str, config: NormalizationConfig) -> nn.Module:
    """The MLP or CNN (PyTorch's default init from ``seed``), with ``norm`` inserted by
    ``add_norm_`` before every activation."""
    with train.seeded(config.seed):
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        if arch == "MLP":  # fc1, act1, ..., out
            model = zoo.mlp([64] + [config.width] * config.mlp_depth + [10], "relu")
        else:
            layers["unflatten"] = nn.Unflatten(1, (1, 8, 8))
            chans = [1] + [config.channels] * config.cnn_depth
            for i, (a, b) in enumerate(zip(chans[:-1], chans[1:]), start=1):
                layers[f"conv{i}"] = nn.Conv2d(a, b, 3, padding=1)
                layers[f"act{i}"] = nn.ReLU()
            layers["pool"] = nn.AdaptiveAvgPool2d(1)
            layers["flatten"] = nn.Flatten()
            layers["out"] = nn.Linear(config.channels, 10)
            model = nn.Sequential(layers)
    if norm != "none":
        record = add_norm_(model, norm)  # type: ignore[arg-type]
        assert record.model is model  # a Sequential is changed in place
    return model


def fit(model: nn.Module, x: Tensor, y: Tensor, *, batch: int, epochs: int, lr: float, seed: int
        ) -> np.ndarray:
    """Adam on shuffled mini-batches of ``batch`` (a new permutation every epoch) for ``epochs``
    epochs -- every batch size sees the same examples, in ``epochs·n/batch`` steps; the loss per
    step. A last batch of one example is skipped: BatchNorm cannot train on it."""
    return adam_curve(model, x, y, batch=batch, lr=lr, seed=seed, epochs=epochs, min_batch=2)


def run(config: NormalizationConfig, *, progress: Progress = no_progress,
        out: Path | None = None) -> LabResult:
    config.validate()
    xtr, ytr, xte, yte = standardized_digits(config.seed)
    plan = [(arch, norm, b) for arch, norms in NORMS.items() for norm in norms
            for b in config.batch_sizes]
    rows: list[dict[str, Any]] = []
    curves: dict[tuple[str, str, int], np.ndarray] = {}
    keep: nn.Module | None = None
    with train.threads(1):
        for i, (arch, norm, b) in enumerate(plan):
            progress(f"{arch} {norm} batch {b}", i, len(plan))
            model = build(arch, norm, config)
            curve = fit(model, xtr, ytr, batch=b, epochs=config.epochs, lr=config.lr,
                        seed=config.seed)
            curves[(arch, norm, b)] = curve
            tail = curve[-max(1, len(curve) // 10):]
            rows.append({"arch": arch, "norm": norm, "batch": b,
                         "final_train_loss": float(tail.mean()),
                         "test_acc": train.accuracy(model, xte, yte)})
            if arch == "CNN" and norm == "batch" and b == max(config.batch_sizes):
                keep = model
        assert keep is not None
        modes = train_vs_eval(keep, xte, yte, seed=config.seed)
    progress("done", len(plan), len(plan))
    runs = pd.DataFrame(rows)
    main = runs.pivot_table(index=["arch", "norm"], columns="batch", values="test_acc",
                            sort=False).reset_index()
    main.columns = [c if isinstance(c, str) else f"batch {c}" for c in main.columns]
    main["norm"] = main["norm"].map(LABELS)
    result = LabResult(NAME, config, {"main": main, "runs": runs, "train_vs_eval": modes["table"]},
                       data={"curves": curves, "modes": modes,
                             "smoothed": {k: running_mean(c, SMOOTH) for k, c in curves.items()}})
    result.claims = _claims(config, runs, modes)
    return result


@torch.no_grad()
def train_vs_eval(model: nn.Module, x: Tensor, y: Tensor, *, seed: int) -> dict[str, Any]:
    """BatchNorm's modes on a trained model (a copy: a train-mode forward updates the running
    statistics, a side effect of its own).

    * the first test image, in training mode, inside 20 different random batches of 16: the
      spread of its logits;
    * test accuracy (a) in eval mode, (b) in training mode on the whole test set as one batch,
      (c) in training mode one image at a time (``model.eval()`` forgotten at prediction time),
      (d) in eval mode one image at a time (equals (a): eval mode is per-sample).
    """
    m = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed + 11)
    n = x.shape[0]
    m.train()
    logits = []
    for _ in range(20):
        others = torch.randperm(n - 1, generator=gen)[:15] + 1
        logits.append(m(torch.cat([x[:1], x[others]]))[0])
    batch_logits = torch.stack(logits)
    m.eval()
    eval_logits = m(x[:1])[0]
    acc = lambda out: float((out.argmax(1) == y).double().mean())  # noqa: E731
    m = copy.deepcopy(model).eval()
    a_eval = acc(m(x))
    a_eval_single = acc(torch.cat([m(x[i:i + 1]) for i in range(n)]))
    m = copy.deepcopy(model).train()
    a_train_batch = acc(m(x))
    m = copy.deepcopy(model).train()
    a_train_single = acc(torch.cat([m(x[i:i + 1]) for i in range(n)]))
    table = pd.DataFrame([
        {"prediction": "eval mode, whole test set", "test_acc": a_eval},
        {"prediction": "eval mode, one image at a time", "test_acc": a_eval_single},
        {"prediction": "train mode, whole test set as one batch", "test_acc": a_train_batch},
        {"prediction": "train mode, one image at a time (eval forgotten)", "test_acc": a_train_single},
    ])
    spread = float((batch_logits - batch_logits.mean(0)).abs().max())
    return {"table": table, "batch_logits": batch_logits.numpy(), "eval_logits": eval_logits.numpy(),
            "label": int(y[0]), "logit_spread": spread, "acc": {
                "eval": a_eval, "eval_single": a_eval_single, "train_batch": a_train_batch,
                "train_single": a_train_single}}


def _claims(config: NormalizationConfig, runs: pd.DataFrame, modes: dict[str, Any]) -> list[Claim]:
    small, large = min(config.batch_sizes), max(config.batch_sizes)
    acc = runs.set_index(["arch", "norm", "batch"])["test_acc"]
    claims = []
    for arch in ("MLP",):
        bn_drop = float(acc[(arch, "batch", large)] - acc[(arch, "batch", small)])
        gn_drop = float(acc[(arch, "group", large)] - acc[(arch, "group", small)])
        gn_vs_bn = float(acc[(arch, "group", small)] - acc[(arch, "batch", small)])
        claims.append(Claim(
            f"{arch}: at batch {small} GroupNorm beats BatchNorm by more than 0.05 test accuracy, "
            f"and BatchNorm loses more than GroupNorm going from batch {large} to {small}",
            bool(gn_vs_bn > 0.05 and bn_drop > gn_drop),
            f"batch {small}: GroupNorm {acc[(arch, 'group', small)]:.3f}, BatchNorm "
            f"{acc[(arch, 'batch', small)]:.3f}; drop from batch {large}: BatchNorm {bn_drop:+.3f}, "
            f"GroupNorm {gn_drop:+.3f}"))
    bn_small, bn_large = float(acc[("CNN", "batch", small)]), float(acc[("CNN", "batch", large)])
    claims.append(Claim(
        f"CNN: BatchNorm2d takes each channel's statistics over the batch *and* the 8×8 = 64 "
        f"positions, so at batch {small} ({64 * small} values per statistic, against {small} in "
        f"the MLP) it does not degrade: its test accuracy at batch {small} is at least its "
        f"accuracy at batch {large} minus 0.05",
        bool(bn_small >= bn_large - 0.05),
        f"BatchNorm CNN: batch {small} {bn_small:.3f}, batch {large} {bn_large:.3f}"))
    a = modes["acc"]
    claims.append(Claim(
        "BatchNorm in training mode: the same image's logits change with the batch it is in "
        "(spread > 0.01), in eval mode they do not (one image alone = in the whole set)",
        bool(modes["logit_spread"] > 0.01 and abs(a["eval"] - a["eval_single"]) < 1e-9),
        f"largest logit deviation over 20 batches {modes['logit_spread']:.3g}; eval accuracy "
        f"{a['eval']:.3f} whole set, {a['eval_single']:.3f} one at a time"))
    claims.append(Claim(
        "forgetting model.eval(): predicting one image at a time in training mode loses more than "
        "0.2 test accuracy against eval mode",
        bool(a["eval"] - a["train_single"] > 0.2),
        f"eval {a['eval']:.3f}, train mode one at a time {a['train_single']:.3f}, train mode "
        f"whole test set {a['train_batch']:.3f}"))
    return claims


def plot(result: LabResult) -> dict[str, Figure]:
    from gradprobe.report import style

    config: NormalizationConfig = result.config
    runs: pd.DataFrame = result.tables["runs"]
    # explicit colours: none grey, the four norms far apart (the palette's blue and teal are close)
    colors = {"none": "0.45", "batch": "#d1495b", "layer": "#edae49", "instance": "#7b3294",
              "group": "#00a36c"}
    fig, axes = style.figure(1, 2, size=(12.5, 4.6), title=(
        f"Test accuracy against batch size (digits, Adam, {config.epochs} epochs, eval mode)"))
    for ax, arch in zip(axes[0], NORMS):
        for norm in NORMS[arch]:
            g = runs[(runs.arch == arch) & (runs.norm == norm)]
            ax.plot(g["batch"], g["test_acc"], "o-", color=colors[norm], label=LABELS[norm])
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(config.batch_sizes), [str(b) for b in config.batch_sizes])
        depth = config.mlp_depth if arch == "MLP" else config.cnn_depth
        style.finish(ax, title=f"{arch}, {depth} hidden layers", xlabel="batch size (log 2)",
                     ylabel="test accuracy")
        ax.set_ylim(0, 1.02)
        ax.axhline(0.1, color="0.5", linestyle=":", linewidth=1)
    axes[0, 1].plot([], [], color="0.5", linestyle=":", label="chance (0.1)")
    axes[0, 1].legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))

    curves = result.data["curves"]
    lfig, laxes = style.figure(2, len(config.batch_sizes), sharex=False, size=(
        3.6 * len(config.batch_sizes) + 1.8, 7.2), title="Training loss per step (running mean "
        f"over {SMOOTH} steps), per batch size")
    vals = [v for c in curves.values() for v in c]
    smoothed = result.data["smoothed"]
    for r, arch in enumerate(NORMS):
        for c_i, b in enumerate(config.batch_sizes):
            ax = laxes[r, c_i]
            for norm in NORMS[arch]:
                curve = smoothed[(arch, norm, b)]
                ax.plot(np.arange(1, len(curve) + 1), curve, color=colors[norm],
                        label=LABELS[norm], linewidth=1.3)
            style.finish(ax, title=f"{arch}, batch {b}", xlabel="Adam step",
                         ylabel="cross-entropy (log)", scale="log")
            ax.set_ylim(max(min(vals), 1e-4) / 1.5, max(vals) * 1.5)
            ax.axhline(math.log(10), color="0.5", linestyle=":", linewidth=1)
        laxes[r, -1].legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))

    modes = result.data["modes"]
    mfig, maxes = style.figure(1, 2, size=(12.5, 4.4), title=(
        f"BatchNorm CNN (trained at batch {max(config.batch_sizes)}): training vs eval mode"))
    ax = maxes[0, 0]
    bl = modes["batch_logits"]
    classes = np.arange(bl.shape[1])
    for k in range(bl.shape[0]):
        ax.plot(classes, bl[k], color="#d1495b", alpha=0.35, linewidth=1,
                label="train mode, in 20 different batches" if k == 0 else None)
    ax.plot(classes, modes["eval_logits"], "k-o", markersize=4, label="eval mode")
    ax.set_xticks(classes)
    style.finish(ax, title=f"one test image (a {modes['label']}): its logits",
                 xlabel="class", ylabel="logit")
    ax.legend(fontsize="small", loc="best")
    ax = maxes[0, 1]
    table = result.tables["train_vs_eval"]
    labels = ["eval\nwhole set", "eval\none at a time", "train mode\nwhole set",
              "train mode\none at a time"]
    bars = ax.bar(labels, table["test_acc"], color=["#1b6ca8", "#1b6ca8", "#edae49", "#d1495b"])
    ax.bar_label(bars, fmt="%.3f", fontsize="small")
    ax.axhline(0.1, color="0.5", linestyle=":", linewidth=1, label="chance (0.1)")
    style.finish(ax, title="test accuracy by how predictions are made", xlabel="prediction",
                 ylabel="test accuracy")
    ax.set_ylim(0, 1.1)
    ax.legend(fontsize="small", loc="upper right")
    return {"batch_size": fig, "loss_curves": lfig, "train_vs_eval": mfig}


register(NAME, "none vs Batch/Layer/Instance/GroupNorm in a deep MLP and CNN on digits over batch "
         "sizes 2-64 (Wu & He 2018); BatchNorm train vs eval mode", NormalizationConfig, run, plot)
