"""drift: which layers leave their initialisation, under SGD and Adam, in a vanishing network and
a healthy one.

The study notes say that in a network whose gradients vanish "the early layers stay near their
initial values". The quantity is the relative drift ``‖W_t − W_0‖ / ‖W_0‖`` of each layer's
weight, recorded by :class:`gradprobe.Probe` (kind ``drift``) once per epoch, after the epoch's
first step (the table's values are those of the last record: ``epochs − 1`` epochs and one
step). Four settings, over ``seeds`` seeds, on ``load_digits`` (cross-entropy, batch 32):

* **vanishing**: ``depth`` sigmoid layers of ``width`` units, Xavier-normal weights
  (``Var W = 2/(fan_in + fan_out)``). ``σ' ≤ 1/4``, so the gradient reaching layer ``l`` is
  about ``4^-(L-l)`` of the top layer's (see ``sigmoid-bound``);
* **healthy**: the same shape with ReLU and He-normal weights (``Var W = 2/fan_in``), whose
  backward signal keeps its size with depth (see ``deep-relu``);
* each trained with plain **SGD** (``lr_sgd``) and with **Adam** (``lr_adam``).

Under SGD a layer's update is ``lr · ∂L/∂W``: a layer that receives ``10^-5`` of the top layer's
gradient moves ``10^-5`` as far. Adam divides each parameter's step by the root of its own
running second moment (``m̂ / (√v̂ + ε)``, Kingma & Ba 2015), so the step size is about ``lr``
whatever the gradient's scale, and a vanishing gradient no longer means a vanishing update --
as long as the gradient stays above ``ε`` (``1e-7`` here, Keras' default). Moving is not
learning, though: the table also shows the test accuracy.

Layers have no bias, so the Probe's per-module statistic is exactly the weight matrix's drift.

Example
    >>> import gradprobe as gp
    >>> r = gp.lab.run("drift", depth=6, epochs=5, seeds=1)       # doctest: +SKIP
    >>> r.table[["network", "optimizer", "first_over_out"]]       # doctest: +SKIP
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from gradprobe.lab import data, train
from gradprobe.lab.base import Claim, LabResult, Progress, no_progress, register
from gradprobe.lab.common import sequential_mlp
from gradprobe.lab.config_checks import need_at_least, need_positive
from gradprobe.remedies.init import init_

if TYPE_CHECKING:
    from matplotlib.figure import Figure

NAME = "drift"

NETWORKS: dict[str, tuple[str, str]] = {
    # label: (activation, init_ scheme)
    "vanishing (sigmoid, Xavier)": ("sigmoid", "xavier_normal"),
    "healthy (ReLU, He)": ("relu", "he_normal"),
}
OPTIMIZERS = ("sgd", "adam")
SMALL_RATIO = 0.01
"""'Stays near its initial value': the first layer drifts less than 1 % as far as the output layer."""
COMPARABLE_RATIO = 0.3
"""'Moves too': the first layer drifts at least 30 % as far as the output layer."""


@dataclass(frozen=True)
class DriftConfig:
    depth: int = 10
    width: int = 64
    epochs: int = 30
    batch_size: int = 32
    lr_sgd: float = 0.1
    lr_adam: float = 1e-3
    seeds: int = 3
    seed: int = 0

    def validate(self) -> None:
        need_at_least(NAME, self, 1, "depth", "width", "epochs", "batch_size", "seeds")
        need_positive(NAME, self, "lr_sgd", "lr_adam")


def _build(cfg: DriftConfig, activation: str, scheme: str, seed: int) -> torch.nn.Sequential:
    with train.seeded(seed):
        model = sequential_mlp([64] + [cfg.width] * cfg.depth, activation, bias=False, head=10)
    init_(model, scheme, generator=torch.Generator().manual_seed(seed + 1))  # type: ignore[arg-type]
    return model


def run(config: DriftConfig, *, progress: Progress = no_progress,
        out: Path | None = None) -> LabResult:
    import gradprobe as gp

    config.validate()
    xtr, ytr, xte, yte = data.digits(seed=config.seed)
    seeds = [config.seed + k for k in range(config.seeds)]
    total = len(NETWORKS) * len(OPTIMIZERS) * len(seeds)
    done = 0
    per_seed: list[dict[str, Any]] = []
    curves: list[pd.DataFrame] = []
    runs: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(prefix="gradprobe-drift-") as tmp:
        for net, (act, scheme) in NETWORKS.items():
            for opt in OPTIMIZERS:
                for seed in seeds:
                    progress(f"{act} {opt} seed {seed}", done, total)
                    model = _build(config, act, scheme, seed)
                    key = f"{act}-{opt}-seed{seed}"
                    run_dir = (out / "runs" / key) if out is not None else Path(tmp) / key
                    fit = train.fit(
                        model, xtr, ytr, loss="cross_entropy", optimizer=opt,
                        lr=config.lr_sgd if opt == "sgd" else config.lr_adam,
                        epochs=config.epochs, batch_size=config.batch_size, seed=seed,
                        x_test=xte, y_test=yte, run_dir=run_dir,
                        probe_options={"kinds": ("drift",), "overwrite": True},
                    )
                    frame = gp.Run.open(run_dir).scalars(kinds="drift")[["step", "layer", "norm"]]
                    frame = frame.assign(network=net, optimizer=opt, seed=seed,
                                         epochs_trained=(frame["step"] + 1) / fit.steps_per_epoch)
                    curves.append(frame.rename(columns={"norm": "drift"}))
                    last = frame[frame["step"] == frame["step"].max()]
                    for depth, (layer, value) in enumerate(zip(last["layer"], last["norm"]), 1):
                        per_seed.append({"network": net, "optimizer": opt, "seed": seed,
                                         "layer": layer, "depth": depth, "drift": float(value),
                                         "test_acc": fit.test_accuracy_after,
                                         "loss_last_epoch": fit.epoch_losses[-1]})
                    if out is not None:
                        runs[key] = run_dir
                    done += 1
    progress("done", total, total)
    layers = pd.DataFrame(per_seed)
    table = _main_table(layers)
    result = LabResult(NAME, config, {"main": table, "layers": layers, "by_depth": _by_depth(layers),
                                      "curves": pd.concat(curves, ignore_index=True)}, runs=runs)
    result.claims = _claims(config, layers)
    return result


def _by_depth(layers: pd.DataFrame) -> pd.DataFrame:
    """Per (network, optimizer, depth): the drift's geometric mean, minimum and maximum over
    seeds (drifts span decades, so the geometric mean is the centre the log axis shows)."""
    g = layers.assign(log_drift=np.log(layers["drift"])).groupby(
        ["network", "optimizer", "depth"], sort=False)
    return pd.DataFrame({"drift_geomean": np.exp(g["log_drift"].mean()),
                         "drift_min": g["drift"].min(), "drift_max": g["drift"].max()}).reset_index()


def _ratios(layers: pd.DataFrame) -> pd.DataFrame:
    """Per (network, optimizer, seed): the first layer's drift over the output layer's, and the
    rank correlation of drift with depth."""
    rows = []
    for (net, opt, seed), f in layers.groupby(["network", "optimizer", "seed"], sort=False):
        f = f.sort_values("depth")
        d = f["drift"].to_numpy()
        rows.append({"network": net, "optimizer": opt, "seed": seed,
                     "first_over_out": d[0] / d[-1], "rank_corr": _spearman(f["depth"].to_numpy(), d),
                     "test_acc": f["test_acc"].iloc[0]})
    return pd.DataFrame(rows)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (no ties expected in drifts)."""
    if len(a) < 2:
        return math.nan
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def _main_table(layers: pd.DataFrame) -> pd.DataFrame:
    ratios = _ratios(layers)
    rows = []
    for (net, opt), f in layers.groupby(["network", "optimizer"], sort=False):
        last = int(f["depth"].max())
        mid = max(1, (last + 1) // 2)
        r = ratios[(ratios.network == net) & (ratios.optimizer == opt)]

        def mean_at(depth: int, f: pd.DataFrame = f) -> float:
            return float(f[f["depth"] == depth]["drift"].mean())

        rows.append({
            "network": net, "optimizer": opt,
            "drift_layer1": mean_at(1), "drift_middle": mean_at(mid),
            "drift_out": mean_at(last),
            # ratios span decades: geometric mean over seeds, and the largest seed
            "first_over_out": float(np.exp(np.log(r["first_over_out"]).mean())),
            "first_over_out_max": float(r["first_over_out"].max()),
            "rank_corr_depth": float(r["rank_corr"].mean()),
            "test_acc": float(r["test_acc"].mean()), "test_acc_std": float(r["test_acc"].std(ddof=1))
            if len(r) > 1 else 0.0,
        })
    return pd.DataFrame(rows)


def _claims(config: DriftConfig, layers: pd.DataFrame) -> list[Claim]:
    r = _ratios(layers)
    van, healthy = list(NETWORKS)

    def pick(net: str, opt: str) -> pd.DataFrame:
        return r[(r.network == net) & (r.optimizer == opt)]

    vs, va, hs = pick(van, "sgd"), pick(van, "adam"), pick(healthy, "sgd")
    ha = pick(healthy, "adam")
    n = len(vs)

    def fmt(f: pd.DataFrame) -> str:
        return ", ".join(f"{v:.2g}" for v in f["first_over_out"])

    acc_gap = float(ha["test_acc"].mean() - va["test_acc"].mean())
    return [
        Claim(f"Vanishing net under SGD: the first layer stays near its initial value (drift < "
              f"{SMALL_RATIO:g} × the output layer's, every seed)",
              bool((vs["first_over_out"] < SMALL_RATIO).all()),
              f"first/out drift per seed: {fmt(vs)} ({n} seeds)"),
        Claim("Vanishing net under SGD: drift grows with depth (rank correlation of drift with "
              "depth ≥ 0.9, every seed)", bool((vs["rank_corr"] >= 0.9).all()),
              "rank correlation per seed: " + ", ".join(f"{v:.2f}" for v in vs["rank_corr"])),
        Claim(f"Vanishing net under Adam: the first layer moves too (drift ≥ {COMPARABLE_RATIO:g} × "
              "the output layer's, every seed)",
              bool((va["first_over_out"] >= COMPARABLE_RATIO).all()),
              f"first/out drift per seed: {fmt(va)}"),
        Claim(f"Healthy net under SGD: the first layer moves too (drift ≥ {COMPARABLE_RATIO:g} × "
              "the output layer's, every seed)",
              bool((hs["first_over_out"] >= COMPARABLE_RATIO).all()),
              f"first/out drift per seed: {fmt(hs)}"),
        Claim("Moving is not learning: the vanishing net under Adam ends ≥ 0.3 below the healthy "
              "net under Adam in test accuracy (mean over seeds)", bool(acc_gap >= 0.3),
              f"test accuracy {va['test_acc'].mean():.3f} vs {ha['test_acc'].mean():.3f}"),
    ]


def plot(result: LabResult) -> dict[str, Figure]:
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.ticker import MaxNLocator

    from gradprobe.report import style

    cfg: DriftConfig = result.config
    layers: pd.DataFrame = result.tables["layers"]
    by_depth: pd.DataFrame = result.tables["by_depth"]
    curves: pd.DataFrame = result.tables["curves"]
    nets = list(NETWORKS)
    colors = style.category_colors(nets)
    lo = float(min(layers["drift"].min(), curves["drift"][curves["drift"] > 0].min()))
    hi = float(max(layers["drift"].max(), curves["drift"].max()))
    ylim = (10 ** math.floor(math.log10(lo)), 10 ** math.ceil(math.log10(hi)))
    # the end-of-training figure spans the decades its own data needs (every seed's layer, so
    # the min–max bands fit), not those of the whole training run
    end = layers["drift"][layers["drift"] > 0]
    end_ylim = (float(end.min()) / 2.0, float(end.max()) * 2.0)

    fig, axes = style.figure(1, 2, size=(14.0, 4.4), title=(
        f"How far each layer's weight moved from its initialisation by the start of epoch {cfg.epochs} "
        f"({cfg.depth} hidden layers, load_digits, {cfg.seeds} seeds)"))
    fig.axes[1].sharey(fig.axes[0])
    for j, opt in enumerate(OPTIMIZERS):
        ax = axes[0, j]
        for net in nets:
            f = by_depth[(by_depth.network == net) & (by_depth.optimizer == opt)]
            f = f.sort_values("depth")
            depth = f["depth"].to_numpy()
            ax.fill_between(depth, f["drift_min"].to_numpy(), f["drift_max"].to_numpy(),
                            color=colors[net], alpha=0.2, linewidth=0)
            ax.plot(depth, f["drift_geomean"].to_numpy(), "o-", color=colors[net], markersize=3.5,
                    label=net)
        names = list(dict.fromkeys(layers["layer"]))
        lr = cfg.lr_sgd if opt == "sgd" else cfg.lr_adam
        style.finish(ax, title=f"{'SGD' if opt == 'sgd' else 'Adam'} (lr {lr:g})",
                     xlabel=f"layer depth (1 = input side, {len(names)} = output layer)",
                     ylabel="‖W − W₀‖ / ‖W₀‖ (log)", scale="log")
        ax.set_ylim(*end_ylim)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if j == 1:  # one legend for both panels, beside them (inside, it covered the curves)
            ax.plot([], [], " ", label="line: geometric mean,\nband: min–max over seeds")
            style.legend_outside(ax, title="network")
    figures = {"drift_by_layer": fig}

    # drift over training, one panel per (network, optimizer), first seed, layers coloured by depth
    first = curves[curves.seed == cfg.seed]
    gfig, gaxes = style.figure(2, 2, sharex=True, size=(11.5, 7.4), title=(
        f"Drift of every layer over training (seed {cfg.seed}; colour = depth)"))
    for ax in gaxes.ravel()[1:]:
        ax.sharey(gaxes[0, 0])
    for i, net in enumerate(nets):
        for j, opt in enumerate(OPTIMIZERS):
            f = first[(first.network == net) & (first.optimizer == opt)]
            names = list(dict.fromkeys(f["layer"]))
            series = {n: f[f["layer"] == n]["drift"].to_numpy() for n in names}
            epochs = f[f["layer"] == names[0]]["epochs_trained"].to_numpy()
            style.plot_layers(gaxes[i, j], epochs, series, scale="log", legend=False,
                              title=f"{net}, {'SGD' if opt == 'sgd' else 'Adam'}",
                              xlabel="epochs trained" if i == 1 else "", ylabel="‖W − W₀‖ / ‖W₀‖ (log)")
    gaxes[0, 0].set_ylim(*ylim)
    n_layers = int(layers["depth"].max())
    mappable = ScalarMappable(norm=Normalize(1, n_layers / 0.9), cmap=colormaps[style.LAYER_CMAP])
    bar = gfig.colorbar(mappable, ax=list(gaxes.ravel()), ticks=[1, max(1, n_layers // 2), n_layers])
    bar.set_label(f"layer depth (1 = input side, {n_layers} = output)")
    figures["drift_over_training"] = gfig
    return figures


register(NAME, "which layers leave their initialisation (‖W − W₀‖/‖W₀‖): deep sigmoid vs ReLU+He, "
         "SGD vs Adam", DriftConfig, run, plot)
