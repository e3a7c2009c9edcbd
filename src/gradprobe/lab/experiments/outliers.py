"""outliers: a few extreme input rows blow up the loss and the first layer's gradient; which
input scaling cures it.

A Linear layer's weight gradient is ``∂L/∂W = δ xᵀ`` (``δ`` the gradient at its output), so it is
proportional to the input: a row whose features are ``magnitude`` times too large (a unit error,
a glitching sensor) gives the first layer a gradient about ``magnitude`` times too large, and in a
ReLU network, which is positively homogeneous, a logit about ``magnitude`` times too large too --
the loss of that batch spikes and one SGD step throws the weights far away (LeCun, Bottou, Orr &
Müller 1998, "Efficient BackProp", §4.3, on input scaling).

Data: ``make_moons`` (``n_samples`` points, noise 0.2), half for training, half a clean test set.
In the training set a fraction ``outlier_fraction`` of the rows (chosen at random, labels kept)
is multiplied by ``magnitude``. A ReLU MLP ``2-width-width-1`` (PyTorch's default initialisation)
is trained with plain SGD (``lr``, batch 32, binary cross-entropy) in five settings:

* ``clean``: no outlier, raw inputs (the reference; moons' features are already of order 1);
* ``outliers``: raw inputs with the outlier rows;
* ``outliers + mean/std``: :func:`gradprobe.remedies.standardize_inputs_` fitted on the training
  inputs. The outliers inflate the standard deviation (``≈ magnitude·√fraction``) and the normal
  rows are squeezed towards a constant;
* ``outliers + median/IQR``: the robust scaler; the normal rows are standardised properly, but
  the outlier rows remain ``≈ magnitude/IQR`` large;
* ``outliers + median/IQR, clip``: the robust scaler with the standardised values clamped to
  ``±clip``.

Every run is recorded by :class:`gradprobe.Probe` at every step (kind ``grad``) with its loss.
The first layer's gradient is that of the whole module ``fc1`` (weight and bias).

Example
    >>> import gradprobe as gp
    >>> r = gp.lab.run("outliers", epochs=5, seeds=1)           # doctest: +SKIP
    >>> r.table[["setting", "test_acc", "max_grad_fc1"]]         # doctest: +SKIP
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from gradprobe import activations
from gradprobe.lab import data, train
from gradprobe.lab.base import Claim, LabResult, Progress, no_progress, register
from gradprobe.lab.config_checks import need_at_least, need_positive, need_within
from gradprobe.remedies.standardize import standardize_inputs_

if TYPE_CHECKING:
    from matplotlib.figure import Figure

NAME = "outliers"

SETTINGS: dict[str, tuple[bool, str | None, bool]] = {
    # label: (outliers in the training inputs, standardize_inputs_ method, clip)
    "clean": (False, None, False),
    "outliers": (True, None, False),
    "outliers + mean/std": (True, "mean_std", False),
    "outliers + median/IQR": (True, "median_iqr", False),
    "outliers + median/IQR, clip": (True, "median_iqr", True),
}


@dataclass(frozen=True)
class OutliersConfig:
    magnitude: float = 10000.0
    outlier_fraction: float = 0.005
    n_samples: int = 2000
    width: int = 32
    epochs: int = 30
    batch_size: int = 32
    lr: float = 0.1
    clip: float = 5.0
    activation: Literal["relu", "tanh"] = "relu"
    seeds: int = 3
    seed: int = 0

    def validate(self) -> None:
        need_at_least(NAME, self, 20, "n_samples")
        need_at_least(NAME, self, 1, "width", "epochs", "batch_size", "seeds")
        need_within(NAME, self, "outlier_fraction", 0, 0.5, closed=(False, False))
        need_positive(NAME, self, "magnitude", "lr", "clip")
        activations.get(self.activation)


class MLP(nn.Module):
    """``fc1 → act1 → fc2 → act2 → out``, written out (not a Sequential): the standardisation
    then goes in front through :func:`standardize_inputs_`'s forward pre-hook and the layers keep
    their names in every setting."""

    def __init__(self, width: int, activation: str) -> None:
        super().__init__()
        spec = activations.get(activation)
        self.fc1 = nn.Linear(2, width)
        self.act1 = spec.factory()
        self.fc2 = nn.Linear(width, width)
        self.act2 = spec.factory()
        self.out = nn.Linear(width, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.act2(self.fc2(self.act1(self.fc1(x)))))


def corrupt(x: Tensor, fraction: float, magnitude: float, seed: int) -> tuple[Tensor, Tensor]:
    """A copy of ``x`` with ``round(fraction·n)`` (at least one) random rows multiplied by
    ``magnitude``, and the indices of those rows."""
    n = int(x.shape[0])
    k = max(1, int(round(fraction * n)))
    rows = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 104_729))[:k]
    out = x.clone()
    out[rows] = out[rows] * magnitude
    return out, rows


def run(config: OutliersConfig, *, progress: Progress = no_progress,
        out: Path | None = None) -> LabResult:
    import gradprobe as gp

    config.validate()
    seeds = [config.seed + k for k in range(config.seeds)]
    total = len(SETTINGS) * len(seeds)
    done = 0
    rows: list[dict[str, Any]] = []
    steps: list[pd.DataFrame] = []
    runs: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(prefix="gradprobe-outliers-") as tmp:
        for seed in seeds:
            xtr, ytr, xte, yte = data.moons(config.n_samples, noise=0.2, seed=seed)
            xbad, bad_rows = corrupt(xtr, config.outlier_fraction, config.magnitude, seed)
            clean_rows = torch.ones(len(xtr), dtype=torch.bool)
            clean_rows[bad_rows] = False
            for k, (label, (with_outliers, method, clip)) in enumerate(SETTINGS.items()):
                progress(f"{label} seed {seed}", done, total)
                x = xbad if with_outliers else xtr
                with train.seeded(seed):
                    model = MLP(config.width, config.activation)
                if method is not None:
                    standardize_inputs_(model, x, method=method,  # type: ignore[arg-type]
                                        clip=config.clip if clip else None)
                key = f"setting{k}-seed{seed}"
                run_dir = (out / "runs" / key) if out is not None else Path(tmp) / key
                fit = train.fit(
                    model, x, ytr, loss="bce", optimizer="sgd", lr=config.lr,
                    epochs=config.epochs, batch_size=config.batch_size, seed=seed,
                    x_test=xte, y_test=yte, run_dir=run_dir, probe_every=1,
                    probe_options={"kinds": ("grad",), "overwrite": True},
                )
                rec = gp.Run.open(run_dir)
                grad = rec.scalars(kinds="grad", layers="fc1")[["step", "norm"]]
                loss = rec.losses()
                frame = loss.merge(grad, on="step", how="outer").rename(
                    columns={"norm": "grad_fc1"})
                steps.append(frame.assign(setting=label, seed=seed))
                if out is not None:
                    runs[key] = run_dir
                finite = frame["loss"].replace([np.inf, -np.inf], np.nan)
                rows.append({
                    "setting": label, "seed": seed, "outlier_rows": int(len(bad_rows))
                    if with_outliers else 0,
                    "test_acc": fit.test_accuracy_after,
                    "train_loss_clean_rows": train.loss_value(model, xtr[clean_rows],
                                                              ytr[clean_rows], "bce"),
                    "max_batch_loss": float(finite.max()),
                    "median_grad_fc1": float(frame["grad_fc1"].median()),
                    "max_grad_fc1": float(frame["grad_fc1"].max()),
                })
                done += 1
    progress("done", total, total)
    per_seed = pd.DataFrame(rows)
    table = _main_table(per_seed)
    result = LabResult(NAME, config, {"main": table, "seeds": per_seed,
                                      "steps": pd.concat(steps, ignore_index=True)}, runs=runs)
    result.claims = _claims(config, per_seed)
    return result


def _main_table(per_seed: pd.DataFrame) -> pd.DataFrame:
    out = []
    for label, f in per_seed.groupby("setting", sort=False):

        def std(c: str, f: pd.DataFrame = f) -> float:
            return float(f[c].std(ddof=1)) if len(f) > 1 else 0.0

        out.append({
            "setting": label, "outlier_rows": int(f["outlier_rows"].iloc[0]),
            "test_acc": float(f["test_acc"].mean()), "test_acc_std": std("test_acc"),
            "train_loss_clean_rows": float(f["train_loss_clean_rows"].mean()),
            "train_loss_clean_rows_std": std("train_loss_clean_rows"),
            "max_batch_loss": float(f["max_batch_loss"].max()),
            "median_grad_fc1": float(f["median_grad_fc1"].median()),
            "max_grad_fc1": float(f["max_grad_fc1"].max()),
        })
    return pd.DataFrame(out)


def _claims(config: OutliersConfig, s: pd.DataFrame) -> list[Claim]:
    def col(label: str) -> pd.DataFrame:
        return s[s.setting == label].set_index("seed")

    clean, raw = col("clean"), col("outliers")
    ms, rob, clip = (col("outliers + mean/std"), col("outliers + median/IQR"),
                     col("outliers + median/IQR, clip"))
    grad_factor = raw["max_grad_fc1"] / clean["max_grad_fc1"]
    loss_factor = raw["max_batch_loss"] / clean["max_batch_loss"]
    acc_clean = float(clean["test_acc"].mean())

    def acc(f: pd.DataFrame) -> str:
        return f"{f['test_acc'].mean():.3f}"

    rob_factor = rob["max_grad_fc1"] / clean["max_grad_fc1"]
    clip_factor = clip["max_grad_fc1"] / clean["max_grad_fc1"]
    return [
        Claim("Outliers blow up the first layer's gradient: its largest norm is ≥ 100× the clean "
              "run's (every seed)", bool((grad_factor >= 100).all()),
              "factor per seed: " + ", ".join(f"{v:.3g}" for v in grad_factor)),
        Claim("Outliers blow up the loss: the largest batch loss is ≥ 10× the clean run's (every "
              "seed)", bool((loss_factor >= 10).all()),
              "factor per seed: " + ", ".join(f"{v:.3g}" for v in loss_factor)),
        Claim("Outliers ruin training: test accuracy ≥ 0.1 below the clean run's (mean over seeds)",
              bool(acc_clean - raw["test_acc"].mean() >= 0.1),
              f"{acc(raw)} vs clean {acc_clean:.3f}"),
        Claim("mean/std scaling does not cure it: the outliers inflate the std, the normal rows "
              "are squeezed and test accuracy stays ≥ 0.1 below the clean run's",
              bool(acc_clean - ms["test_acc"].mean() >= 0.1), f"{acc(ms)} vs clean {acc_clean:.3f}"),
        Claim("median/IQR alone does not cure it: the outlier rows stay large and the first "
              "layer's largest gradient is still ≥ 100× the clean run's (every seed)",
              bool((rob_factor >= 100).all()),
              "factor per seed: " + ", ".join(f"{v:.3g}" for v in rob_factor)),
        Claim(f"median/IQR with clipping at ±{config.clip:g} cures it: test accuracy at most 0.02 "
              "below the clean run's and the largest first-layer gradient within 10× (every seed)",
              bool(clip["test_acc"].mean() >= acc_clean - 0.02 and (clip_factor <= 10).all()),
              f"{acc(clip)} vs clean {acc_clean:.3f}; gradient factor per seed: "
              + ", ".join(f"{v:.2g}" for v in clip_factor)),
    ]


def plot(result: LabResult) -> dict[str, Figure]:
    from gradprobe.report import style

    cfg: OutliersConfig = result.config
    steps: pd.DataFrame = result.tables["steps"]
    per_seed: pd.DataFrame = result.tables["seeds"]
    mean_acc = result.table.set_index("setting")["test_acc"]
    labels = list(SETTINGS)
    colors = style.category_colors(labels)
    one = steps[steps.seed == cfg.seed]
    spe = math.ceil(cfg.n_samples / 2 / cfg.batch_size)

    n = len(labels)
    fig, axes = style.figure(2, n, size=(3.3 * n + 2.8, 6.4), sharex=True, title=(
        f"{int(per_seed['outlier_rows'].max())} of {cfg.n_samples // 2} training rows ×"
        f"{cfg.magnitude:g}: batch loss and first-layer gradient at every SGD step "
        f"(seed {cfg.seed}; grey: the clean run)"))
    for ax in axes.ravel()[1:n]:
        ax.sharey(axes[0, 0])
    for ax in axes.ravel()[n + 1:]:
        ax.sharey(axes[1, 0])
    ref = one[one.setting == "clean"]
    limits = {}
    for column in ("loss", "grad_fc1"):
        v = steps[column].replace([np.inf, -np.inf], np.nan).dropna()
        v = v[v > 0]
        top = 2.0 * float(v.max())
        # the clean run sets the lowest bottom: a decade (gradient: three) below its smallest
        # value; smaller values (a network that died: gradient ≈ 0) are drawn on the bottom edge.
        # The axis goes no lower than the data, so it spans the decades the data needs.
        margin = 1 if column == "loss" else 3
        floor = float(ref[column][ref[column] > 0].min()) / 10 ** margin
        bottom = max(floor, float(v.min()) / 2.0)
        limits[column] = (bottom, top)
    for j, label in enumerate(labels):
        f = one[one.setting == label]
        for i, (column, ylabel) in enumerate([
                ("loss", "batch loss (BCE, log)"),
                ("grad_fc1", "‖∂L/∂θ_fc1‖ (W and b, log)")]):
            ax = axes[i, j]
            bottom, top = limits[column]
            if label != "clean":
                ax.plot(ref["step"] / spe, ref[column], color="0.6", linewidth=0.6,
                        label="the clean run (for reference)")
            values = f[column].to_numpy()
            ax.plot(f["step"] / spe, np.clip(values, bottom, None), color=colors[label],
                    linewidth=0.7, label="the run named above the column")
            if column == "loss":
                ax.axhline(math.log(2), color="black", linestyle=":", linewidth=0.9, zorder=0.5,
                           label="ln 2: the loss of a constant\n50 % prediction")
            if (values < bottom).any():
                ax.text(0.97, 0.03, f"values < {bottom:.0e} (≈ 0)\ndrawn on the bottom edge",
                        transform=ax.transAxes, ha="right", va="bottom", fontsize="x-small",
                        bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "none"})
            style.finish(ax, title=label if i == 0 else "", xlabel="epoch" if i == 1 else "",
                         ylabel=ylabel if j == 0 else "", scale="log")
            ax.set_ylim(bottom, top)
    # one legend for all panels, beside the last column (inside, it would cover the spikes)
    handles, names = axes[0, 1].get_legend_handles_labels()
    style.legend_outside(axes[0, n - 1], handles=handles, labels=names)
    figures = {"loss_and_gradient": fig}

    afig, aaxes = style.figure(1, 1, size=(7.5, 4.2), title=(
        f"Test accuracy on clean data after {cfg.epochs} epochs ({cfg.seeds} seeds; clip at "
        f"±{cfg.clip:g})"))
    ax = aaxes[0, 0]
    for i, label in enumerate(labels):
        f = per_seed[per_seed.setting == label]
        ax.bar(i, mean_acc[label], color=colors[label], alpha=0.55)
        ax.plot(np.full(len(f), i) + np.linspace(-0.15, 0.15, len(f)), f["test_acc"], "o",
                color=colors[label], markeredgecolor="black", markeredgewidth=0.4, markersize=4)
    ax.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xticks(range(n), [lab.replace(" + ", "\n+ ") for lab in labels], fontsize="small")
    ax.plot([], [], "o", color="grey", label="one seed (bar: mean)")
    ax.plot([], [], ":", color="grey", label="chance (0.5)")
    style.finish(ax, title="", xlabel="training setting (outliers: a few rows ×"
                 f"{cfg.magnitude:g}; then the input scaling)", ylabel="test accuracy")
    ax.set_ylim(0, 1.18)
    ax.legend(fontsize="small", loc="upper center", ncol=2)
    figures["accuracy"] = afig
    return figures


register(NAME, "a few ×10⁴ input rows blow up loss and first-layer gradients; mean/std vs "
         "median/IQR (+ clip) input scaling", OutliersConfig, run, plot)
