"""activations: nine activation functions in the same deep MLP.

Sigmoid, tanh, ReLU, Leaky ReLU (slope 0.01), PReLU, RReLU, ELU, SELU and GELU, each with the
initialisation the activation table recommends and its gain (sigmoid: Xavier, gain 1; tanh:
Xavier, gain 5/3; rectifiers and GELU: He, gain √2 or √(2/(1+α²)); SELU: LeCun normal,
Klambauer et al. 2017), ``depth`` hidden layers of ``width`` units, trained with Adam on
``load_digits`` (or ``make_moons``). Measured at initialisation and after training, on the
training set in evaluation mode (RReLU at its mean slope):

* **dead-unit fraction**: units whose activation is inactive (ReLU: output ≤ 0) for *every*
  example (Lu et al. 2019); ``NaN`` where the activation has a non-zero slope everywhere and so
  cannot die (leaky variants, ELU, SELU, GELU, sigmoid, tanh);
* **saturated fraction**: entries whose local derivative is below 5 % of its maximum (the rule of
  :mod:`gradprobe.activations`; defined for sigmoid and tanh);
* **first/last gradient ratio**: ``‖∂L/∂W_1‖ / ‖∂L/∂W_L‖`` over the hidden layers: ≪ 1 means the
  gradient vanishes on its way down;
* **test accuracy** after ``epochs`` epochs.

Example
    >>> import gradprobe as gp
    >>> r = gp.lab.run("activations", depth=4, epochs=2)   # doctest: +SKIP
    >>> r.table[["activation", "grad_ratio_init", "test_acc"]]   # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from torch import Tensor, nn

from gradprobe import activations
from gradprobe.errors import ConfigError
from gradprobe.lab import train
from gradprobe.lab.base import Claim, LabResult, Progress, no_progress, register
from gradprobe.lab.common import (
    classification_data,
    dead_fraction,
    initialised_mlp,
    propagate,
    saturated_fraction,
)
from gradprobe.lab.config_checks import need_at_least

if TYPE_CHECKING:
    from matplotlib.figure import Figure

NAME = "activations"

DEFAULT_ACTIVATIONS = ("sigmoid", "tanh", "relu", "leaky_relu", "prelu", "rrelu", "elu", "selu", "gelu")


@dataclass(frozen=True)
class ActivationStudyConfig:
    dataset: Literal["digits", "moons"] = "digits"
    activations: tuple[str, ...] = DEFAULT_ACTIVATIONS
    depth: int = 20
    width: int = 64
    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0

    def validate(self) -> None:
        if not self.activations:
            raise ConfigError("activations: give at least one activation",
                              hint="e.g. activations=relu,tanh")
        for a in self.activations:
            activations.get(a)
        need_at_least(NAME, self, 2, "depth")
        need_at_least(NAME, self, 1, "width", "batch_size")
        need_at_least(NAME, self, 0, "epochs")
        if self.dataset not in ("digits", "moons"):
            raise ConfigError(f"activations: unknown dataset {self.dataset!r}",
                              hint="use 'digits' or 'moons'")


def measure(model: nn.Sequential, x: Tensor, y: Tensor, loss: str) -> dict[str, float | list[float]]:
    """Dead and saturated fractions (mean over hidden layers) and the gradient profile, in
    evaluation mode (the mode is restored)."""
    lossf = train.loss_function(loss)
    was = model.training
    model.eval()
    try:
        sig = propagate(model, x, lambda o: lossf(o, y))
    finally:
        model.train(was)
    norms = [float(g.norm()) for g in sig.weight_grads]
    dead = [dead_fraction(s, a) for s, a in zip(sig.specs, sig.acts)]
    sat = [saturated_fraction(s, a) for s, a in zip(sig.specs, sig.acts)]
    return {
        "dead": float(np.mean(dead)), "saturated": float(np.mean(sat)),
        "dead_last": dead[-1], "grad_norms": norms,
        "grad_ratio": norms[0] / norms[-1] if norms[-1] > 0 else math.nan,
    }


def run(config: ActivationStudyConfig, *, progress: Progress = no_progress,
        out: Path | None = None) -> LabResult:
    config.validate()
    xtr, ytr, xte, yte, n_out, loss = classification_data(config.dataset, config.seed)
    rows, profiles, curves = [], {}, {}
    for k, name in enumerate(config.activations):
        spec = activations.get(name)
        progress(name, k, len(config.activations))
        model, record = initialised_mlp([xtr.shape[1]] + [config.width] * config.depth,
                                        spec.name, spec.recommended_init, seed=config.seed,
                                        bias=True, head=n_out)
        before = measure(model, xtr, ytr, loss)
        with train.seeded(config.seed + k):  # RReLU draws its slopes from the global RNG
            fit = train.fit(model, xtr, ytr, loss=loss, optimizer="adam", lr=config.lr,
                            epochs=config.epochs, batch_size=config.batch_size, seed=config.seed,
                            x_test=xte, y_test=yte)
        after = measure(model, xtr, ytr, loss)
        profiles[spec.name] = (before["grad_norms"], after["grad_norms"])
        curves[spec.name] = fit.epoch_losses
        rows.append({
            "activation": spec.name, "init": spec.recommended_init, "gain": record.entries[0].gain,
            "dead_init": before["dead"], "dead_after": after["dead"],
            "saturated_init": before["saturated"], "saturated_after": after["saturated"],
            "grad_ratio_init": before["grad_ratio"], "grad_ratio_after": after["grad_ratio"],
            "loss_after": fit.loss_after, "test_acc": fit.test_accuracy_after,
        })
    progress("done", len(config.activations), len(config.activations))
    table = pd.DataFrame(rows)
    result = LabResult(NAME, config, {"main": table},
                       data={"grad_profiles": profiles, "loss_curves": curves})
    result.claims = _claims(config, table)
    return result


def _claims(config: ActivationStudyConfig, t: pd.DataFrame) -> list[Claim]:
    claims: list[Claim] = []
    by = t.set_index("activation")
    chance = 0.1 if config.dataset == "digits" else 0.5
    if "sigmoid" in by.index:
        r, a = by.loc["sigmoid", "grad_ratio_init"], by.loc["sigmoid", "test_acc"]
        claims.append(Claim(
            f"sigmoid at depth {config.depth}: the first layer's gradient is below 1e-6 of the last "
            "layer's at initialisation and the net stays near chance",
            bool(r < 1e-6 and a < chance + 0.1), f"ratio {r:.3g}, accuracy {a:.3f}"))
    good = [a for a in ("tanh", "relu", "leaky_relu", "prelu", "rrelu", "elu", "selu", "gelu")
            if a in by.index]
    if good:
        r = by.loc[good, "grad_ratio_init"]
        acc = by.loc[good, "test_acc"]
        claims.append(Claim(
            "tanh, the ReLU family, ELU, SELU and GELU (each with its recommended init): first/last "
            "gradient ratio between 0.1 and 10 at initialisation, test accuracy above 0.8",
            bool(r.between(0.1, 10).all() and (acc > 0.8).all()),
            f"ratio {r.min():.3g}-{r.max():.3g}, accuracy {acc.min():.3f}-{acc.max():.3f}"))
    cannot_die = [a for a in by.index if activations.get(a).inactive is None]
    if cannot_die:
        claims.append(Claim(
            "only rectifiers with a zero slope (ReLU) can have dead units; the others report none",
            bool(by.loc[cannot_die, ["dead_init", "dead_after"]].isna().all().all()),
            "no dead-unit rule for " + ", ".join(cannot_die)))
    return claims


def plot(result: LabResult) -> dict[str, Figure]:
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    from gradprobe.report import style

    t = result.tables["main"]
    names = list(t["activation"])
    colors = style.distinct_colors(names)
    fig, axes = style.figure(1, 3, size=(18.5, 4.8), title=(
        f"{result.config.depth} hidden layers of {result.config.width}, each activation with its "
        "recommended initialisation"))
    any_zero = False
    for name in names:
        before, _ = result.data["grad_profiles"][name]
        any_zero |= style.plot_positive(axes[0, 0], np.arange(1, len(before) + 1), before,
                                        color=colors[name], label=name, marker="o", markersize=3)
        curve = result.data["loss_curves"][name]
        axes[0, 1].plot(np.arange(1, len(curve) + 1), curve, color=colors[name], label=name)
    style.finish(axes[0, 0], title="weight-gradient norm per layer at initialisation"
                 + ("\n" + style.ZERO_NOTE if any_zero else ""),
                 xlabel="hidden layer (depth)", ylabel="‖∂L/∂W_l‖ (log)", scale="log")
    style.finish(axes[0, 1], title="training loss", xlabel="epoch", ylabel="loss (log)",
                 scale="log")
    for ax in axes[0, :2]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    style.legend_outside(axes[0, 1], title="activation (both panels)")
    ax = axes[0, 2]
    x = np.arange(len(names))
    ax.bar(x - 0.2, t["test_acc"], 0.4, color=[colors[n] for n in names], edgecolor="black",
           linewidth=0.6)
    ax.bar(x + 0.2, t["dead_after"].fillna(0.0), 0.4, color="0.3")
    ax.bar(x + 0.2, t["saturated_after"].fillna(0.0), 0.4, bottom=t["dead_after"].fillna(0.0),
           color="0.7")
    for i in range(len(names)):
        if np.isnan(t["dead_after"].iloc[i]) and np.isnan(t["saturated_after"].iloc[i]):
            ax.text(x[i] + 0.2, 0.01, "no rule", rotation=90, fontsize=7, ha="center", va="bottom")
    ax.set_xticks(x, names, rotation=45, ha="right")
    style.finish(ax, title="accuracy, dead and saturated units after training",
                 xlabel="activation", ylabel="fraction")
    ax.set_ylim(0, 1.05)
    handles = [Patch(facecolor="white", edgecolor="black", linewidth=0.6),
               Patch(facecolor="0.3"), Patch(facecolor="0.7")]
    style.legend_outside(ax, handles=handles, labels=[
        "test accuracy\n(left bar, in the\nactivation's colour)", "dead-unit fraction\n(after)",
        "saturated fraction\n(after)"])
    return {"activations": fig}


register(NAME, "sigmoid, tanh, ReLU, Leaky ReLU, PReLU, RReLU, ELU, SELU, GELU in one deep MLP: "
         "dead and saturated units, gradient ratio, accuracy", ActivationStudyConfig, run, plot)
