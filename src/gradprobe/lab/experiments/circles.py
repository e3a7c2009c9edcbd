"""``circles``: the classic vanishing-gradient study on two concentric circles.

Follows the tutorial "Visualizing the vanishing gradient problem" (Adrian Tam, 2021), itself
after Glorot & Bengio, "Understanding the difficulty of training deep feedforward neural
networks" (AISTATS 2010). Data: ``make_circles(n_samples=1000, factor=0.5, noise=0.1)``, all
1000 points used for training as in the tutorial (so one epoch is 32 steps of batch 32), plus
a fresh draw of 1000 points as a held-out test set. Binary cross-entropy on a sigmoid output.

Part 1 (Keras defaults: Glorot-uniform weights, zero biases; Adam, lr 1e-3, batch 32,
100 epochs): 2-5-1 ReLU vs 2-5-1 sigmoid vs 2-5-5-5-1 sigmoid; accuracy and loss.

Part 2 (weights ``N(0, 1)``, zero biases, as Keras' ``RandomNormal`` kernel
initialiser; RMSprop with Keras' defaults lr 1e-3, ρ 0.9, ε 1e-7; batch 32, 100 epochs):
2-5-5-5-5-1 with hidden sigmoid / tanh / ReLU. Every run is recorded by :class:`gradprobe.Probe`
once per epoch (its first step, as the tutorial records): per layer the mean, standard deviation
and mean absolute value of the gradient. The weight matrices' mean and standard deviation are
taken at initialisation and at the end of every epoch (so the last point is the trained network).
With a sigmoid, the derivative ``σ' ≤ 1/4`` shrinks the gradient at every layer on its way down
(``|∂ℓ/∂W_1|`` ends up orders of magnitude below ``|∂ℓ/∂W_out|``). A small gradient is not a
frozen layer, though: RMSprop divides each step by the gradient's running RMS, so fc1, with the
smallest gradient, still takes lr-sized steps, and its weight std is the one that grows most
(see ``part2_weights``); what the network lacks is a *useful* direction, not movement.
``N(0, 1)`` weights also push pre-activations into the flat tails.

Everything is repeated over ``seeds`` seeds (data, initialisation and shuffling all depend on
the seed) and reported as mean ± standard deviation, since single runs of such small networks
vary a lot. Part 1 trains its seeds together as one stacked model
(:class:`gradprobe.lab.train.StackedMLP`: numerically the same as separate runs, faster).

Note:
    The gradient statistics are over *all* the layer's parameters (weight and bias), as the
    Probe records them per module (the figure's labels say "W and b"); the weight statistics
    are over the weight matrix alone, as the tutorial plotted them (kernels).

>>> import gradprobe as gp
>>> r = gp.lab.run("circles", epochs=3, seeds=2, part1=False)   # doctest: +SKIP
>>> r.table[["model", "acc_after"]]                             # doctest: +SKIP
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import torch
from torch import nn

from gradprobe import activations
from gradprobe.errors import ConfigError
from gradprobe.lab import data as lab_data
from gradprobe.lab import train, zoo
from gradprobe.lab.base import Claim, LabResult, Progress, no_progress, register
from gradprobe.lab.config_checks import need_at_least, need_positive, need_within

if TYPE_CHECKING:
    from matplotlib.figure import Figure

NAME = "circles"

PART1 = [  # (label, sizes, activation, tutorial's accuracy after 100 epochs, Keras evaluate)
    ("2-5-1 relu", (2, 5, 1), "relu", 0.973),
    ("2-5-1 sigmoid", (2, 5, 1), "sigmoid", 0.654),
    ("2-5-5-5-1 sigmoid", (2, 5, 5, 5, 1), "sigmoid", 0.533),
]
RATIO_GAP = 10.0
"""How much smaller the sigmoid network's fc1/out gradient ratio must be than the other networks'
(the tutorial's figure shows a decade or more between layers; equal ratios would mean no vanishing)."""

TUTORIAL_PART2 = {"sigmoid": 0.652, "tanh": 0.994, "relu": 0.995}
"""The tutorial's accuracy after its hand-written RMSprop loop, N(0,1) weights (one run each)."""


@dataclass(frozen=True)
class CirclesConfig:
    """Options of the circles study (defaults: the tutorial's settings, five seeds)."""

    epochs: int = 100
    batch_size: int = 32
    seeds: int = 5
    seed: int = 0
    n_samples: int = 1000
    noise: float = 0.1
    factor: float = 0.5
    width: int = 5
    weight_std: float = 1.0
    part1: bool = True
    activations: tuple[str, ...] = ("sigmoid", "tanh", "relu")

    def validate(self) -> None:
        need_at_least(NAME, self, 1, "epochs", "batch_size", "seeds", "n_samples", "width")
        need_positive(NAME, self, "weight_std")
        need_within(NAME, self, "factor", 0, 1, closed=(False, False))
        need_at_least(NAME, self, 0, "noise")
        if not self.activations:
            raise ConfigError("activations is empty", hint="e.g. --activations sigmoid,tanh,relu")
        for act in self.activations:
            activations.get(act)  # raises ConfigError naming the unknown activation


def _datasets(cfg: CirclesConfig, seed: int) -> tuple[torch.Tensor, ...]:
    """Training set (``n_samples`` points) and a held-out draw of the same size."""
    x, y, _, _ = lab_data.circles(cfg.n_samples, factor=cfg.factor, noise=cfg.noise, seed=seed,
                                  test_fraction=0.0)
    xt, yt, _, _ = lab_data.circles(cfg.n_samples, factor=cfg.factor, noise=cfg.noise,
                                    seed=seed + 7919, test_fraction=0.0)
    return x, y, xt, yt


def _init_(model: nn.Module, scheme: str, std: float = 1.0) -> nn.Module:
    """Keras-style initialisation: ``glorot_uniform`` (Dense default) or ``normal`` N(0, std²)
    kernels, zero biases."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                if scheme == "glorot_uniform":
                    nn.init.xavier_uniform_(m.weight)
                else:
                    m.weight.normal_(0.0, std)
                if m.bias is not None:
                    m.bias.zero_()
    return model


def _build(sizes: tuple[int, ...], act: str, scheme: str, seed: int, std: float = 1.0
           ) -> nn.Sequential:
    with train.seeded(seed):
        model = zoo.mlp(list(sizes), act)
        _init_(model, scheme, std)
    return model


def _seed_list(cfg: CirclesConfig) -> list[int]:
    return [cfg.seed + k for k in range(cfg.seeds)]


def run(config: CirclesConfig, *, progress: Progress = no_progress, out: Path | None = None
        ) -> LabResult:
    """Train every network over every seed; Part 2 runs are recorded by ``gp.Probe``."""
    with train.threads(1):  # tiny networks: one intra-op thread (see train.threads)
        return _run(config, progress, out)


def _run(config: CirclesConfig, progress: Progress, out: Path | None) -> LabResult:
    import gradprobe as gp

    config.validate()
    seeds = _seed_list(config)
    n_part1 = len(PART1) if config.part1 else 0
    total = (n_part1 + len(config.activations) * len(seeds)) * config.epochs
    done = 0

    def tick(label: str) -> Any:
        def on_epoch(epoch: int, epochs: int) -> None:
            progress(label, done + epoch, total)
        return on_epoch

    data = {s: _datasets(config, s) for s in seeds}
    per_seed: list[dict[str, Any]] = []
    curves: list[dict[str, Any]] = []

    # Part 1: Keras defaults, Adam; all seeds of one network trained together.
    for label, sizes, act, tutorial in PART1[:n_part1]:
        models = [_build(sizes, act, "glorot_uniform", s) for s in seeds]
        results = train.fit_stacked(
            models, [(data[s][0], data[s][1]) for s in seeds], seeds=seeds, loss="bce",
            optimizer="adam", batch_size=config.batch_size, epochs=config.epochs,
            on_epoch=tick(f"part 1: {label}"),
        )
        done += config.epochs
        for s, model, res in zip(seeds, models, results):
            per_seed.append({
                "part": 1, "model": label, "activation": act, "seed": s,
                "acc_before": res.accuracy_before, "acc_after": res.accuracy_after,
                "test_acc": train.accuracy(model, data[s][2], data[s][3]),
                "loss_after": res.loss_after, "tutorial": tutorial,
            })
            curves += [{"part": 1, "model": label, "seed": s, "epoch": e + 1, "loss": v}
                       for e, v in enumerate(res.epoch_losses)]

    # Part 2: N(0, std²) weights, RMSprop, every run recorded by the Probe.
    runs_root = (out / "runs") if out is not None else Path(tempfile.mkdtemp(prefix="gradprobe-circles-"))
    sizes2 = (2,) + (config.width,) * 4 + (1,)
    arch = "-".join(str(v) for v in sizes2)
    runs: dict[str, Path] = {}
    layer_frames: list[pd.DataFrame] = []
    kernel_frames: list[pd.DataFrame] = []
    for act in config.activations:
        label = f"{arch} {act}, N(0,{config.weight_std:g}²)"
        for s in seeds:
            model = _build(sizes2, act, "normal", s, config.weight_std)
            run_dir = runs_root / f"{act}-seed{s}"
            x, y, xt, yt = data[s]
            kernels = _KernelStats(model)
            res = train.fit(
                model, x, y, loss="bce", optimizer="rmsprop", batch_size=config.batch_size,
                epochs=config.epochs, seed=s, x_test=xt, y_test=yt, run_dir=run_dir,
                probe_options={"kinds": ("grad", "weight"), "overwrite": True},
                on_epoch=kernels.after(tick(f"part 2: {act} seed {s}")),
            )
            kernel_frames.append(kernels.frame(act, s))
            done += config.epochs
            runs[f"{act}-seed{s}"] = run_dir
            recorded = gp.Run.open(run_dir)
            stats = recorded.scalars(kinds=["grad", "weight"])
            stats = stats[["step", "layer", "kind", "mean", "std", "abs_mean"]].copy()
            stats.insert(0, "seed", s)
            stats.insert(0, "activation", act)
            stats.insert(2, "epoch", stats["step"] // res.steps_per_epoch + 1)
            layer_frames.append(stats)
            step_losses = recorded.losses()
            epoch_losses = step_losses.groupby(step_losses["step"] // res.steps_per_epoch)["loss"].mean()
            curves += [{"part": 2, "model": label, "seed": s, "epoch": int(e) + 1, "loss": float(v)}
                       for e, v in epoch_losses.items()]
            per_seed.append({
                "part": 2, "model": label, "activation": act, "seed": s,
                "acc_before": res.accuracy_before, "acc_after": res.accuracy_after,
                "test_acc": res.test_accuracy_after, "loss_after": res.loss_after,
                "tutorial": TUTORIAL_PART2.get(act, float("nan")) if config.weight_std == 1.0
                else float("nan"),
            })
    progress("done", total, total)

    seeds_table = pd.DataFrame(per_seed)
    main = (
        seeds_table.groupby(["part", "model"], sort=False)
        .agg(acc_before=("acc_before", "mean"), acc_after=("acc_after", "mean"),
             acc_after_std=("acc_after", "std"), test_acc=("test_acc", "mean"),
             test_acc_std=("test_acc", "std"), loss_after=("loss_after", "mean"),
             worst=("acc_after", "min"), best=("acc_after", "max"), tutorial=("tutorial", "first"))
        .reset_index()
    )
    main["acc_after_std"] = main["acc_after_std"].fillna(0.0)
    main["test_acc_std"] = main["test_acc_std"].fillna(0.0)
    curves_table = pd.DataFrame(curves)
    layers = pd.concat(layer_frames, ignore_index=True) if layer_frames else pd.DataFrame()
    kernels = pd.concat(kernel_frames, ignore_index=True) if kernel_frames else pd.DataFrame()
    gradient_ratio = _gradient_ratio(layers)
    claims = _claims(config, seeds_table, gradient_ratio)
    return LabResult(
        name=NAME, config=config,
        tables={"main": main, "seeds": seeds_table, "curves": curves_table,
                "loss_by_epoch": _loss_by_epoch(curves_table), "layers": layers,
                "kernels": kernels, "gradient_ratio": gradient_ratio},
        claims=claims, runs=runs,
    )


class _KernelStats:
    """Mean and standard deviation of every Linear's weight matrix (kernel, no bias) at
    initialisation (epoch 0) and at the end of every epoch, so the last point is the trained
    network. One host transfer after training (:meth:`frame`)."""

    def __init__(self, model: nn.Module) -> None:
        self.names = [n for n, m in model.named_children() if isinstance(m, nn.Linear)]
        self.weights = [m.weight for m in model.children() if isinstance(m, nn.Linear)]
        self.snaps: list[torch.Tensor] = []
        self.snapshot()

    def snapshot(self) -> None:
        with torch.no_grad():
            self.snaps.append(torch.stack([torch.stack([w.mean(), w.std(unbiased=False)])
                                           for w in self.weights]))

    def after(self, on_epoch: Any) -> Any:
        def both(epoch: int, epochs: int) -> None:
            self.snapshot()
            on_epoch(epoch, epochs)
        return both

    def frame(self, activation: str, seed: int) -> pd.DataFrame:
        values = torch.stack(self.snaps).tolist()
        return pd.DataFrame([
            {"activation": activation, "seed": seed, "epoch": e, "layer": name,
             "mean": v[0], "std": v[1]}
            for e, per_layer in enumerate(values) for name, v in zip(self.names, per_layer)])


def _loss_by_epoch(curves: pd.DataFrame) -> pd.DataFrame:
    """Per network and epoch: the training loss's mean and standard deviation over seeds
    (0 for a single seed), the band the loss figure draws."""
    if curves.empty:
        return pd.DataFrame(columns=["part", "model", "epoch", "loss_mean", "loss_std"])
    bands = (curves.groupby(["part", "model", "epoch"], sort=False)["loss"]
             .agg(loss_mean="mean", loss_std="std").reset_index())
    bands["loss_std"] = bands["loss_std"].fillna(0.0)
    return bands


def _gradient_ratio(layers: pd.DataFrame) -> pd.DataFrame:
    """Per activation and seed: median over epochs of mean|∂ℓ/∂θ| of the first layer divided by
    that of the output layer (how much of the gradient reaches the bottom of the network)."""
    if layers.empty:
        return pd.DataFrame(columns=["activation", "seed", "first_over_last"])
    g = layers[layers.kind == "grad"]
    rows = []
    for (act, seed), frame in g.groupby(["activation", "seed"], sort=False):
        first = frame[frame.layer == "fc1"].set_index("epoch")["abs_mean"]
        last = frame[frame.layer == "out"].set_index("epoch")["abs_mean"]
        ratio = (first / last).replace([np.inf, -np.inf], np.nan).dropna()
        rows.append({"activation": act, "seed": seed,
                     "first_over_last": float(ratio.median()) if len(ratio) else float("nan")})
    return pd.DataFrame(rows)


def _claims(cfg: CirclesConfig, seeds_table: pd.DataFrame, ratio: pd.DataFrame) -> list[Claim]:
    claims: list[Claim] = []
    part2 = seeds_table[seeds_table.part == 2].groupby("activation", sort=False)["acc_after"]
    mean2, std2 = part2.mean(), part2.std().fillna(0.0)
    n = cfg.seeds
    if "sigmoid" in mean2.index and len(mean2) > 1:
        others = [a for a in mean2.index if a != "sigmoid"]
        claims.append(Claim(
            f"part 2: the deep sigmoid network ends less accurate than {' and '.join(others)} "
            f"({n}-seed mean)",
            all(mean2["sigmoid"] < mean2[a] for a in others),
            "; ".join(f"{a} {mean2[a]:.3f} ± {std2[a]:.3f}" for a in mean2.index),
        ))
    if not ratio.empty and "sigmoid" in set(ratio.activation) and ratio.activation.nunique() > 1:
        geo = ratio.groupby("activation", sort=False)["first_over_last"].apply(
            lambda v: float(np.exp(np.log(v).mean())))
        others = [a for a in geo.index if a != "sigmoid"]
        claims.append(Claim(
            "part 2: in the sigmoid network the first layer's gradient, relative to the output "
            f"layer's, is over {RATIO_GAP:g} times smaller than in the {' and '.join(others)} "
            "networks (vanishing)",
            all(geo["sigmoid"] * RATIO_GAP < geo[a] for a in others),
            "mean|∂ℓ/∂θ| fc1 / out: " + "; ".join(f"{a} {geo[a]:.2g}" for a in geo.index),
        ))
    part1 = seeds_table[seeds_table.part == 1].groupby("model", sort=False)["acc_after"].mean()
    if len(part1) == len(PART1):
        relu, sig = part1[PART1[0][0]], part1[PART1[1][0]]
        claims.append(Claim(
            f"part 1: 2-5-1 ReLU ends more accurate than 2-5-1 sigmoid ({n}-seed mean)",
            bool(relu > sig),
            "; ".join(f"{m} {v:.3f}" for m, v in part1.items()),
        ))
        deep = part1[PART1[2][0]]
        claims.append(Claim(
            f"part 1: more layers is even worse: 2-5-5-5-1 sigmoid ends less accurate than 2-5-1 "
            f"sigmoid ({n}-seed mean)",
            bool(deep < sig), f"{PART1[2][0]} {deep:.3f} vs {PART1[1][0]} {sig:.3f}",
        ))
    return claims


GRAD_PANELS: tuple[tuple[str, str, str, Literal["linear", "log"]], ...] = (
    # rows of the gradient figure: (recorded column, panel title, y label, y scale)
    ("mean", "gradient mean", "mean ∂ℓ/∂θ (W and b)", "linear"),
    ("std", "gradient std", "std ∂ℓ/∂θ (W and b, log)", "log"),
    ("abs_mean", "mean |gradient|", "mean |∂ℓ/∂θ| (W and b, log)", "log"),
)
WEIGHT_PANELS = (("mean", "weight mean", "mean of W (weights only)"),
                 ("std", "weight std", "std of W (weights only)"))


def plot(result: LabResult) -> dict[str, Figure]:
    """Accuracy over seeds; loss curves; Part 2 weights and gradients per layer per epoch."""
    import math

    from matplotlib.ticker import MaxNLocator

    from gradprobe.report import style

    cfg: CirclesConfig = result.config
    figures: dict[str, Figure] = {}
    seeds_table: pd.DataFrame = result.tables["seeds"]
    summary = result.tables["main"].set_index("model")
    bands: pd.DataFrame = result.tables["loss_by_epoch"]
    ln2 = math.log(2.0)
    models = list(dict.fromkeys(seeds_table["model"]))
    colors = style.category_colors(models)
    parts = list(dict.fromkeys(seeds_table["part"]))
    part_name = {1: "part 1: Glorot-uniform init, Adam",
                 2: f"part 2: N(0,{cfg.weight_std:g}²) init, RMSprop"}

    # accuracy (mean ± std bars, every seed a dot, the tutorial's value) and one loss panel per part
    fig, axes = style.figure(1, 1 + len(parts), size=(5.6 + 4.6 * len(parts), 4.8),
                             title=f"Two circles: accuracy and loss over {cfg.seeds} seeds")
    ax = axes[0, 0]
    for i, m in enumerate(models):
        frame = seeds_table[seeds_table.model == m]
        ax.bar(i, summary.loc[m, "acc_after"], yerr=summary.loc[m, "acc_after_std"],
               color=colors[m], alpha=0.55, capsize=4)
        ax.plot(np.full(len(frame), i) + np.linspace(-0.15, 0.15, len(frame)), frame["acc_after"],
                "o", color=colors[m], markersize=4, markeredgecolor="black", markeredgewidth=0.4)
        tut = frame["tutorial"].iloc[0]
        if np.isfinite(tut):
            ax.plot([i - 0.35, i + 0.35], [tut, tut], color="black", linestyle=":", linewidth=1.2)
    ax.plot([], [], color="black", linestyle=":", label="tutorial (one run)")
    ax.plot([], [], "o", color="grey", markeredgecolor="black", markeredgewidth=0.4,
            label="one seed")
    ax.plot([], [], color="grey", linewidth=0.8, label="chance (0.5)")
    ax.set_xticks(range(len(models)), [m.replace(", ", "\n") for m in models], fontsize="small",
                  rotation=20, ha="right")
    ax.axhline(0.5, color="grey", linewidth=0.8)
    if len(parts) == 2:  # separate the two studies
        n1 = int((seeds_table.drop_duplicates("model")["part"] == 1).sum())
        ax.axvline(n1 - 0.5, color="black", linewidth=0.8)
    style.finish(ax, title="training accuracy after training (bar: mean ± std)",
                 xlabel="network (part 1 | part 2)", ylabel="accuracy")
    ax.set_ylim(0.4, 1.02)
    style.legend_outside(ax)

    for k, part in enumerate(parts, start=1):
        ax = axes[0, k]
        if k > 1:
            ax.sharey(axes[0, 1])
        for m in dict.fromkeys(seeds_table[seeds_table.part == part]["model"]):
            band = bands[bands.model == m]
            style.band(ax, band["epoch"].to_numpy(), band["loss_mean"].to_numpy(),
                       band["loss_std"].to_numpy(), color=colors[m], label=m)
        ax.axhline(ln2, color="black", linestyle="--", linewidth=1.0, label="ln 2 (chance)")
        style.finish(ax, title=f"{part_name[part]}: training loss (mean ± std)",
                     xlabel="epoch", ylabel="binary cross-entropy")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(bottom=0.0)
        style.legend_outside(ax)
    figures["accuracy_loss"] = fig

    layers: pd.DataFrame = result.tables["layers"]
    kernels: pd.DataFrame = result.tables["kernels"]
    if layers.empty:
        return figures
    first_seed = cfg.seed
    acts = list(dict.fromkeys(layers["activation"]))
    one = layers[layers.seed == first_seed]
    names = list(dict.fromkeys(one["layer"]))
    lcolors = style.layer_colors(names)
    lstyles = style.layer_linestyles(names)
    legend_title = "layer (input → output)"

    # weights (kernels only): mean and std per layer, epoch 0 = initialisation, last = trained
    fig, axes = style.figure(2, len(acts), size=(4.4 * len(acts) + 1.8, 7.2), sharey="row",
                             sharex=True, title=(
        f"Part 2 weights per layer (N(0,{cfg.weight_std:g}²) init, RMSprop, seed {first_seed}): "
        "weight matrices only, biases excluded"))
    kone = kernels[kernels.seed == first_seed]
    for j, act in enumerate(acts):
        frame = kone[kone.activation == act]
        for i, (column, title, ylabel) in enumerate(WEIGHT_PANELS):
            sub = frame.pivot(index="epoch", columns="layer", values=column)
            style.plot_layers(axes[i, j], sub.index.to_numpy(),
                              {n: sub[n].to_numpy() for n in names if n in sub},
                              title=f"{act}: {title}", ylabel=ylabel if j == 0 else "",
                              xlabel="epoch (0 = initialisation, last = end of training)"
                              if i == 1 else "",
                              colors=lcolors, linestyles=lstyles, scale="linear", legend=False)
            axes[i, j].xaxis.set_major_locator(MaxNLocator(integer=True))
    style.legend_outside(axes[0, -1], title=legend_title)
    figures["part2_weights"] = fig

    # gradients: mean, std (log), mean |g| (log) per layer, rows sharing their y-axis; the loss
    fig, axes = style.figure(4, len(acts), size=(4.4 * len(acts) + 1.8, 13.0), sharex=True,
                             sharey="row", title=(
        f"Part 2 gradients per layer per epoch (first step of each epoch, seed {first_seed})"))
    for j, act in enumerate(acts):
        frame = one[(one.activation == act) & (one.kind == "grad")]
        for i, (column, title, ylabel, scale) in enumerate(GRAD_PANELS):
            sub = frame.pivot(index="epoch", columns="layer", values=column)
            style.plot_layers(axes[i, j], sub.index.to_numpy(),
                              {n: sub[n].to_numpy() for n in names if n in sub},
                              title=f"{act}: {title}", xlabel="", ylabel=ylabel if j == 0 else "",
                              colors=lcolors, linestyles=lstyles, scale=scale, legend=False)
        model = next(m for m in models if f" {act}," in m)
        band = bands[(bands.part == 2) & (bands.model == model)]
        style.band(axes[3, j], band["epoch"].to_numpy(), band["loss_mean"].to_numpy(),
                   band["loss_std"].to_numpy(), color="black", label=f"mean ± std, {cfg.seeds} seeds")
        axes[3, j].axhline(ln2, color="black", linestyle="--", linewidth=1.0, label="ln 2 (chance)")
        style.finish(axes[3, j], title=f"{act}: training loss", xlabel="epoch",
                     ylabel="binary cross-entropy" if j == 0 else "")
        axes[3, j].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[3, 0].set_ylim(bottom=0.0)
    style.legend_outside(axes[0, -1], title=legend_title)
    style.legend_outside(axes[3, -1])
    figures["part2_gradients"] = fig
    return figures


register(
    NAME,
    "two circles: sigmoid vs tanh vs ReLU MLPs, weights and gradients per layer per epoch, "
    "5 seeds (the tutorial study)",
    CirclesConfig,
    run,
    plot,
)
