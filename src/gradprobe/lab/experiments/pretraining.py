"""pretraining: greedy layer-wise autoencoder pretraining of a deep sigmoid MLP, the historical
cure, against random initialisation and against the modern baseline (ReLU + He).

Before rectifiers and careful initialisation, deep sigmoid networks trained from random weights
stalled; Hinton, Osindero & Teh (2006) and Bengio, Lamblin, Popovici & Larochelle (2007,
"Greedy layer-wise training of deep networks") pretrained one layer at a time, unsupervised,
then fine-tuned the whole network (Erhan et al. 2010 measured why it helps). Here, on
``load_digits`` (1258 training images, 539 test images, 10 classes, cross-entropy):

* **sigmoid, random init**: ``depth`` hidden sigmoid layers of ``width`` units with PyTorch's
  default initialisation (weights and biases ``U(±1/√fan_in)``, the ``U(±1/√k)`` of Bengio et al.
  2007), fine-tuned directly;
* **sigmoid, pretrained**: the same network (same initial weights) after
  :func:`gradprobe.remedies.pretrain_` -- each hidden layer in turn trained as the encoder of an
  autoencoder with a linear decoder, MSE, Adam (``pretrain_lr``) for ``pretrain_epochs`` passes --
  then fine-tuned;
* **ReLU, He init**: the same shape with ReLU and He-normal weights (``Var W = 2/fan_in``, He et
  al. 2015), no pretraining: the modern baseline.

Fine-tuning is SGD with momentum ``momentum`` for ``epochs`` epochs, batch 32; the sigmoid
networks with ``lr_sigmoid``, the ReLU network with ``lr_relu`` (each a learning rate that
network trains with: ReLU + He at the sigmoid's 0.1 diverged in 2 of 3 seeds on the development
machine). Everything over ``seeds`` seeds; "before" is after pretraining, before fine-tuning
(the output layer is still random there, so accuracy is near chance).

Example
    >>> import gradprobe as gp
    >>> r = gp.lab.run("pretraining", depth=3, epochs=5, seeds=1)   # doctest: +SKIP
    >>> r.table[["model", "test_acc_after"]]                         # doctest: +SKIP
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from gradprobe.lab import data, train, zoo
from gradprobe.lab.base import Claim, LabResult, Progress, no_progress, register
from gradprobe.lab.config_checks import need_at_least, need_positive, need_within
from gradprobe.remedies.init import init_
from gradprobe.remedies.pretrain import pretrain_

if TYPE_CHECKING:
    from matplotlib.figure import Figure

NAME = "pretraining"

RANDOM, PRETRAINED, RELU = "sigmoid, random init", "sigmoid, pretrained", "ReLU, He init"
MODELS = (RANDOM, PRETRAINED, RELU)
TRAINED_LOSS = 0.5
"""'Has trained': the epoch's mean training cross-entropy is below 0.5 (ln 10 ≈ 2.30 is chance)."""


@dataclass(frozen=True)
class PretrainingConfig:
    depth: int = 5
    width: int = 100
    epochs: int = 30
    pretrain_epochs: int = 20
    pretrain_lr: float = 0.01
    lr_sigmoid: float = 0.1
    lr_relu: float = 0.01
    momentum: float = 0.9
    batch_size: int = 32
    seeds: int = 3
    seed: int = 0

    def validate(self) -> None:
        need_at_least(NAME, self, 1, "depth", "width", "epochs", "pretrain_epochs", "batch_size",
                      "seeds")
        need_positive(NAME, self, "pretrain_lr", "lr_sigmoid", "lr_relu")
        need_within(NAME, self, "momentum", 0, 1)


def run(config: PretrainingConfig, *, progress: Progress = no_progress,
        out: Path | None = None) -> LabResult:
    config.validate()
    xtr, ytr, xte, yte = data.digits(seed=config.seed)
    sizes = [int(xtr.shape[1])] + [config.width] * config.depth + [10]
    seeds = [config.seed + k for k in range(config.seeds)]
    total = len(seeds) * (len(MODELS) + 1)
    done = 0
    rows: list[dict[str, Any]] = []
    curves: list[dict[str, Any]] = []
    recon: list[dict[str, Any]] = []
    for seed in seeds:
        with train.seeded(seed):
            random_net = zoo.mlp(sizes, "sigmoid")
            relu_net = zoo.mlp(sizes, "relu")
        init_(relu_net, "he_normal", bias=0.0, generator=torch.Generator().manual_seed(seed + 1))
        pre_net = copy.deepcopy(random_net)
        progress(f"pretraining seed {seed}", done, total)
        with train.threads(1):  # small matrices: one thread, as train.fit does
            record = pretrain_(pre_net, xtr, epochs=config.pretrain_epochs,
                               lr=config.pretrain_lr, batch_size=config.batch_size,
                               generator=torch.Generator().manual_seed(seed + 2))
        done += 1
        for e in record:
            recon.append({"seed": seed, "layer": e.layer, "mse_before": e.loss_before,
                          "mse_after": e.loss_after, "input_variance": e.baseline,
                          "after_over_variance": e.loss_after / e.baseline})
        for label, model in ((RANDOM, random_net), (PRETRAINED, pre_net), (RELU, relu_net)):
            progress(f"{label} seed {seed}", done, total)
            fit = train.fit(
                model, xtr, ytr, loss="cross_entropy", optimizer="momentum",
                lr=config.lr_relu if label == RELU else config.lr_sigmoid,
                optimizer_options={"momentum": config.momentum}, epochs=config.epochs,
                batch_size=config.batch_size, seed=seed, x_test=xte, y_test=yte,
            )
            below = [i + 1 for i, v in enumerate(fit.epoch_losses) if v < TRAINED_LOSS]
            rows.append({"model": label, "seed": seed,
                         "test_acc_before": fit.test_accuracy_before,
                         "train_loss_before": fit.loss_before,
                         "test_acc_after": fit.test_accuracy_after,
                         "train_loss_after": fit.loss_after,
                         "epochs_to_loss_0.5": below[0] if below else math.nan})
            curves.extend({"model": label, "seed": seed, "epoch": i + 1, "loss": v}
                          for i, v in enumerate(fit.epoch_losses))
            done += 1
    progress("done", total, total)
    per_seed = pd.DataFrame(rows)
    result = LabResult(NAME, config, {
        "main": _main_table(per_seed), "seeds": per_seed, "curves": pd.DataFrame(curves),
        "curve_summary": _curve_summary(pd.DataFrame(curves)), "reconstruction": pd.DataFrame(recon)})
    result.claims = _claims(config, per_seed, pd.DataFrame(recon))
    return result


def _curve_summary(curves: pd.DataFrame) -> pd.DataFrame:
    """Per (model, epoch): the training loss's mean, minimum and maximum over seeds (the figure
    draws a min–max band: on a log axis mean ± std would cross zero)."""
    g = curves.groupby(["model", "epoch"], sort=False)["loss"]
    return pd.DataFrame({"loss_mean": g.mean(), "loss_min": g.min(),
                         "loss_max": g.max()}).reset_index()


def _main_table(per_seed: pd.DataFrame) -> pd.DataFrame:
    out = []
    for label, f in per_seed.groupby("model", sort=False):
        row: dict[str, Any] = {"model": label}
        for c in ("test_acc_before", "train_loss_before", "test_acc_after", "train_loss_after"):
            row[c] = float(f[c].mean())
            row[f"{c}_std"] = float(f[c].std(ddof=1)) if len(f) > 1 else 0.0
        reached = f["epochs_to_loss_0.5"].dropna()
        row["epochs_to_loss_0.5"] = float(reached.mean()) if len(reached) else math.nan
        row["seeds_reaching_0.5"] = f"{len(reached)}/{len(f)}"
        out.append(row)
    return pd.DataFrame(out)


def _claims(config: PretrainingConfig, s: pd.DataFrame, recon: pd.DataFrame) -> list[Claim]:
    def col(label: str) -> pd.DataFrame:
        return s[s.model == label].set_index("seed")

    rnd, pre, relu = col(RANDOM), col(PRETRAINED), col(RELU)
    ln10 = math.log(10.0)
    stall = (rnd["train_loss_after"] - ln10).abs() / ln10
    gain = pre["test_acc_after"] - rnd["test_acc_after"]
    # a seed that never reaches the threshold counts as epochs + 1
    never = config.epochs + 1
    t_relu = relu["epochs_to_loss_0.5"].fillna(never)
    t_pre = pre["epochs_to_loss_0.5"].fillna(never)

    def per(v: pd.Series, fmt: str = ".3f") -> str:
        return ", ".join(format(x, fmt) for x in v)

    return [
        Claim(f"Random init: the {config.depth}-layer sigmoid net stalls (training loss after "
              "fine-tuning within 5 % of ln 10, every seed)", bool((stall < 0.05).all()),
              f"loss per seed {per(rnd['train_loss_after'])} (ln 10 = {ln10:.3f})"),
        Claim("Pretraining helps the deep sigmoid net: test accuracy ≥ 0.2 above random init's "
              "(every seed)", bool((gain >= 0.2).all()),
              f"pretrained {per(pre['test_acc_after'])} vs random {per(rnd['test_acc_after'])}"),
        Claim("Pretraining does its own job: every layer reconstructs its input with an MSE below "
              "the best constant's (the input variance), every seed",
              bool((recon["after_over_variance"] < 1).all()),
              f"MSE / variance from {recon['after_over_variance'].min():.3g} to "
              f"{recon['after_over_variance'].max():.3g}"),
        Claim("Against the modern baseline it does not help: ReLU + He without pretraining ends at "
              "least as accurate (mean test accuracy over seeds)",
              bool(relu["test_acc_after"].mean() >= pre["test_acc_after"].mean()),
              f"ReLU + He {relu['test_acc_after'].mean():.3f} vs pretrained sigmoid "
              f"{pre['test_acc_after'].mean():.3f}"),
        Claim(f"ReLU + He trains sooner: its training loss falls below {TRAINED_LOSS} in fewer "
              "epochs than the pretrained sigmoid net's (every seed)",
              bool((t_relu < t_pre).all()),
              f"epochs: ReLU {per(t_relu, '.0f')} vs pretrained {per(t_pre, '.0f')} "
              f"({never} = never)"),
    ]


def plot(result: LabResult) -> dict[str, Figure]:
    from matplotlib.ticker import MaxNLocator

    from gradprobe.report import style

    cfg: PretrainingConfig = result.config
    curves: pd.DataFrame = result.tables["curve_summary"]
    means = result.table.set_index("model")
    per_seed: pd.DataFrame = result.tables["seeds"]
    recon: pd.DataFrame = result.tables["reconstruction"]
    colors = style.category_colors(list(MODELS))
    fig, axes = style.figure(1, 3, size=(16.0, 4.6), title=(
        f"{cfg.depth}-layer MLP on load_digits: greedy autoencoder pretraining vs random init vs "
        f"ReLU + He ({cfg.seeds} seeds)"))

    ax = axes[0, 0]
    for label in MODELS:
        f = curves[curves.model == label].sort_values("epoch")
        epochs = f["epoch"].to_numpy()
        # a log axis: the band is min–max over seeds (mean ± std would cross zero)
        ax.fill_between(epochs, f["loss_min"].to_numpy(), f["loss_max"].to_numpy(),
                        color=colors[label], alpha=0.2, linewidth=0)
        ax.plot(epochs, f["loss_mean"].to_numpy(), color=colors[label], linewidth=1.8,
                label=label)
    ax.axhline(math.log(10), color="black", linestyle=":", linewidth=0.9, zorder=0.5,
               label="ln 10 (chance)")
    style.finish(ax, title="fine-tuning: training loss per epoch (mean, min–max)", xlabel="epoch",
                 ylabel="cross-entropy (log)", scale="log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize="small", loc="lower left")

    ax = axes[0, 1]
    width = 0.38
    for i, label in enumerate(MODELS):
        f = per_seed[per_seed.model == label]
        for k, (stage, column) in enumerate((("before", "test_acc_before"),
                                             ("after", "test_acc_after"))):
            x = i + (k - 0.5) * width
            ax.bar(x, means.loc[label, column], width=width * 0.92, color=colors[label],
                   alpha=0.3 if stage == "before" else 0.75,
                   hatch="//" if stage == "before" else None, edgecolor=colors[label])
            ax.plot(np.full(len(f), x) + np.linspace(-0.08, 0.08, len(f)), f[column], "o",
                    color=colors[label], markeredgecolor="black", markeredgewidth=0.4,
                    markersize=3.5)
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [Patch(facecolor="0.85", hatch="//", edgecolor="0.4", label="before fine-tuning"),
               Patch(facecolor="0.45", label="after fine-tuning"),
               Line2D([], [], marker="o", linestyle="", color="0.5", markeredgecolor="black",
                      markeredgewidth=0.4, label="one seed (bar: mean)")]
    ax.axhline(0.1, color="black", linestyle=":", linewidth=0.9)
    ax.set_xticks(range(len(MODELS)), [m.replace(", ", ",\n") for m in MODELS])
    style.finish(ax, title="test accuracy (dotted: chance, 0.1)",
                 xlabel="model (activation, initialisation)",
                 ylabel="test accuracy")
    ax.set_ylim(0, 1.25)
    ax.legend(handles=handles, fontsize="small", loc="upper center", ncol=2)

    ax = axes[0, 2]
    layers = list(dict.fromkeys(recon["layer"]))
    for name, f in recon.groupby("seed"):
        ax.plot(range(1, len(f) + 1), f["after_over_variance"], "o-", color=colors[PRETRAINED],
                alpha=0.8, markersize=3.5, label="one seed" if name == cfg.seed else None)
    ax.axhline(1.0, color="black", linestyle=":", linewidth=0.9,
               label="the best constant reconstruction")
    style.finish(ax, title="pretraining: each layer's autoencoder after training", xlabel="hidden layer "
                 "(1 = input side)", ylabel="reconstruction MSE / input variance (log)",
                 scale="log")
    ax.set_xticks(range(1, len(layers) + 1))
    ratio = recon["after_over_variance"]
    ax.set_ylim(10 ** math.floor(math.log10(float(ratio.min()))),
                2 * max(1.0, float(ratio.max())))  # the constant's line stays inside the axes
    ax.legend(fontsize="small", loc="upper left")
    return {"pretraining": fig}


register(NAME, "deep sigmoid MLP: random init vs greedy autoencoder pretraining vs ReLU + He "
         "(digits, seeds)", PretrainingConfig, run, plot)
