"""init: the initialisation study -- symmetry, variance-preserving gains, and deep MLPs trained
from every common initialisation.

Three parts:

1. **Symmetry** (zeros). With every weight and bias 0, every hidden unit computes the same
   function and receives the same gradient, so no optimiser can tell them apart. On a balanced
   binary task it is stronger still: the logit is 0, ``p = σ(0) = ½``, the loss is
   ``-½ln½ - ½ln½ = ln 2``, and the output layer's gradient ``mean((p - y)·h)`` is exactly 0
   (``p - y = ±½`` in equal numbers, ``h`` the same for every example), so nothing moves: the loss
   stays exactly ln 2 (full batch, float64).
2. **Gain study.** Which gain ``g`` in ``W ~ N(0, g²/n)`` keeps the forward activation variance
   and the backward gradient variance constant across depth, for tanh, sigmoid and the centred
   sigmoid ``σ(x) - ½``? Glorot & Bengio (2010) derive their normalised initialisation for units
   in the linear regime with ``f'(0) = 1`` (tanh): ``Var[a_l] = n·Var[W]·φ'(0)²·Var[a_(l-1)]``.
   The same derivation with ``g = 1/φ'(0)`` gives 4 for sigmoid (``σ'(0) = ¼``); that factor is
   not in the paper but in the Theano tutorial that accompanied it (deeplearning.net,
   "Multilayer Perceptron"). PyTorch's ``calculate_gain('tanh') = 5/3`` is chosen for the
   forward fixed point. This part measures what each gain does (in float64, so no variance
   underflows to 0): :mod:`gradprobe.lab.gains`.
3. **Deep MLPs** (``depth`` hidden layers) with tanh, sigmoid and ReLU on ``load_digits`` or
   ``make_moons`` from zeros, N(0, 1), N(0, 0.01²), LeCun, Xavier uniform/normal, He
   uniform/normal and orthogonal, every scaled scheme with the activation's gain ``g`` from
   :mod:`gradprobe.activations` (tanh 5/3, ReLU √2, sigmoid 1). Rows are named by scheme and
   gain: on these square layers ``Xavier normal × g`` (``Var W = g²·2/(fan_in+fan_out)``) and
   ``He normal × g`` (``Var W = g²/fan_in``) are the *same* distribution, so for ReLU both are
   ``Var W = 2/n``; the Xavier that stalls in ``deep-relu`` is Xavier with gain 1. Measured: the ratio of the first to the last hidden layer's weight-gradient norm at
   initialisation, and the test accuracy after a fixed budget of Adam steps.

Findings are written up in ``docs/initialisation.md``.

Example
    >>> import gradprobe as gp
    >>> r = gp.lab.run("init", depth=6, epochs=2)          # doctest: +SKIP
    >>> r.claim("zeros").holds                             # doctest: +SKIP
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import torch
from torch import nn

from gradprobe import activations
from gradprobe.errors import ConfigError
from gradprobe.lab import data, train
from gradprobe.lab.base import Claim, LabResult, Progress, no_progress, register
from gradprobe.lab.common import (
    classification_data,
    initialised_mlp,
    propagate,
    sequential_mlp,
)
from gradprobe.lab.config_checks import need_at_least, need_positive
from gradprobe.lab.gains import GAIN_FUNCTIONS, gain_profile, gain_study
from gradprobe.remedies.init import init_

if TYPE_CHECKING:
    from matplotlib.figure import Figure

NAME = "init"

INITS: dict[str, tuple[str, str, dict[str, float]]] = {
    # key: (label, init_ scheme, init_ keyword arguments); gains from the activation table
    "zeros": ("zeros", "zeros", {}),
    "normal_1": ("N(0, 1)", "normal", {"std": 1.0}),
    "normal_0.01": ("N(0, 0.01²)", "normal", {"std": 0.01}),
    "lecun_normal": ("LeCun normal", "lecun_normal", {}),
    "xavier_uniform": ("Xavier uniform", "xavier_uniform", {}),
    "xavier_normal": ("Xavier normal", "xavier_normal", {}),
    "he_uniform": ("He uniform", "he_uniform", {}),
    "he_normal": ("He normal", "he_normal", {}),
    "orthogonal": ("orthogonal", "orthogonal", {}),
}
"""The initialisations compared (CLI: ``--inits zeros,he_normal``)."""

SCALED = ("lecun_normal", "xavier_uniform", "xavier_normal", "he_uniform", "he_normal", "orthogonal")
"""The variance-scaled initialisations (std ∝ 1/√fan)."""

RATIO_BAND = 4.0
"""A gradient that neither vanishes nor explodes over the hidden layers: first/last-layer norm
within this factor (measured 0.4-3.6 at the default size; N(0, 0.01²) and sigmoid are 1e-6 or
less, N(0, 1) with tanh over 10)."""

GAIN_SCHEMES = ("xavier_uniform", "xavier_normal", "he_uniform", "he_normal", "orthogonal")
"""The schemes that take the activation's gain g (LeCun's gain is 1 by definition)."""

HIGHLIGHT_GAINS = {1.0: "#1b6ca8", 5.0 / 3.0: "#d1495b", 4.0: "#edae49"}
"""The gains the text discusses (Glorot's 1, PyTorch's tanh 5/3, the factor 4), drawn in colour."""


def gain_text(g: float) -> str:
    """``5/3``, ``√2``, ``1``... for the gains the activation table uses.

    >>> gain_text(5 / 3), gain_text(2 ** 0.5), gain_text(1.0), gain_text(0.75)
    ('5/3', '√2', '1', '0.75')
    """
    for value, text in ((5 / 3, "5/3"), (2 ** 0.5, "√2"), (4.0, "4")):
        if math.isclose(g, value, rel_tol=1e-6):
            return text
    return f"{g:.3g}"


@dataclass(frozen=True)
class InitStudyConfig:
    dataset: Literal["digits", "moons"] = "digits"
    depth: int = 20
    width: int = 64
    activations: tuple[str, ...] = ("tanh", "sigmoid", "relu")
    inits: tuple[str, ...] = tuple(INITS)
    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    symmetry_steps: int = 30
    gain_depth: int = 30
    gain_width: int = 128
    gain_samples: int = 256
    gains: tuple[float, ...] = (1.0, 5.0 / 3.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0)
    seed: int = 0

    def validate(self) -> None:
        unknown = sorted(set(self.inits) - set(INITS))
        if unknown:
            raise ConfigError(f"init: unknown initialisation(s) {unknown}",
                              hint="choose from: " + ", ".join(INITS))
        for a in self.activations:
            activations.get(a)
        need_at_least(NAME, self, 2, "depth", "gain_depth")
        need_at_least(NAME, self, 1, "width", "gain_width", "gain_samples", "batch_size")
        need_at_least(NAME, self, 0, "epochs")
        need_positive(NAME, self, "gains")


# --------------------------------------------------------------------------------- the parts
def symmetry(activation: str, depth: int, width: int, steps: int, seed: int) -> dict[str, Any]:
    """Zero-initialised MLP on a balanced ``make_moons`` set, full-batch Adam in float64.

    Returns the loss at every step, and whether every hidden layer's units (weight rows, biases,
    activations) stayed identical to each other.

    Note:
        The set has 128 examples of each class, a power of two, so the output gradients
        ``±½·h/256`` and all their partial sums are exact binary fractions and cancel to exactly
        0. With, say, 200 per class the sum would leave a rounding residue of ~1e-19, and Adam,
        which divides by ``√v``, turns any residue into a full-size step (for sigmoid, whose
        ``h = ½`` is not 0): symmetry is exact in exact arithmetic only.
    """
    x, y, _, _ = data.moons(512, noise=0.1, seed=seed, test_fraction=0.0)
    pos, neg = (y[:, 0] == 1).nonzero()[:, 0], (y[:, 0] == 0).nonzero()[:, 0]
    k = 128
    keep = torch.cat([pos[:k], neg[:k]])
    x, y = x[keep].double(), y[keep].double()
    model = sequential_mlp([2] + [width] * depth, activation, bias=True, head=1).double()
    init_(model, "zeros")
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    for _ in range(steps + 1):
        loss = nn.functional.binary_cross_entropy_with_logits(model(x), y)
        losses.append(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    identical = True
    h = x
    with torch.no_grad():
        for mod in model:
            h = mod(h)
            if isinstance(mod, nn.Linear) and mod is not model.out:
                identical &= bool(torch.equal(mod.weight, mod.weight[:1].expand_as(mod.weight)))
                identical &= bool(torch.equal(mod.bias, mod.bias[:1].expand_as(mod.bias)))
            elif activations.spec_for_module(mod) is not None:
                identical &= bool(torch.equal(h, h[:, :1].expand_as(h)))
    values = torch.stack(losses).tolist()  # one host transfer, after the loop
    return {"losses": values, "identical": identical, "n_pos": k, "n_neg": k}


def run(config: InitStudyConfig, *, progress: Progress = no_progress,
        out: Path | None = None) -> LabResult:
    config.validate()
    xtr, ytr, xte, yte, n_out, loss_name = classification_data(config.dataset, config.seed)
    total = len(config.activations) * (len(config.inits) + 1) + 1
    done = 0

    # 1. symmetry
    sym_rows = []
    for act in config.activations:
        progress(f"symmetry {act}", done, total)
        s = symmetry(act, config.depth, min(config.width, 16), config.symmetry_steps, config.seed)
        sym_rows.append({"activation": act, "steps": config.symmetry_steps,
                         "loss_first": s["losses"][0], "loss_last": s["losses"][-1],
                         "loss_constant": len(set(s["losses"])) == 1,
                         "loss_minus_ln2": s["losses"][-1] - math.log(2.0),
                         "units_identical": s["identical"]})
        done += 1

    # 2. gain study
    progress("gain study", done, total)
    gain_rows, profiles = gain_study(config.gains, samples=config.gain_samples,
                                     width=config.gain_width, depth=config.gain_depth,
                                     seed=config.seed)
    done += 1

    # 3. deep MLPs
    rows, grad_profiles = [], {}
    for act in config.activations:
        for key in config.inits:
            label, scheme, kwargs = INITS[key]
            progress(f"{act} {label}", done, total)
            model, record = initialised_mlp([xtr.shape[1]] + [config.width] * config.depth, act,
                                            scheme, seed=config.seed, bias=True, head=n_out,
                                            options=kwargs)
            lossf = train.loss_function(loss_name)
            batch = slice(0, min(256, len(xtr)))
            sig = propagate(model, xtr[batch], lambda o: lossf(o, ytr[batch]))  # noqa: B023
            norms = [float(g.norm()) for g in sig.weight_grads]
            grad_profiles[(act, key)] = norms
            fit = train.fit(model, xtr, ytr, loss=loss_name, optimizer="adam", lr=config.lr,
                            epochs=config.epochs, batch_size=config.batch_size, seed=config.seed,
                            x_test=xte, y_test=yte)
            gain = record.entries[0].gain if key in GAIN_SCHEMES else math.nan
            rows.append({
                "activation": act, "init": label, "key": key, "gain": gain,
                "row": f"{label} × g" if key in GAIN_SCHEMES else label,
                "grad_first": norms[0], "grad_last": norms[-1],
                "grad_ratio": norms[0] / norms[-1] if norms[-1] > 0 else math.nan,
                "loss_before": fit.loss_before, "loss_after": fit.loss_after,
                "test_acc_before": fit.test_accuracy_before,
                "test_acc_after": fit.test_accuracy_after,
            })
            done += 1
    progress("done", total, total)
    main = pd.DataFrame(rows)
    result = LabResult(
        NAME, config,
        {"main": main, "gains": pd.DataFrame(gain_rows), "symmetry": pd.DataFrame(sym_rows)},
        data={"gain_profiles": profiles, "grad_profiles": grad_profiles},
    )
    result.claims = _claims(config, main, pd.DataFrame(gain_rows), pd.DataFrame(sym_rows))
    return result


# ------------------------------------------------------------------------------------- claims
def _claims(config: InitStudyConfig, main: pd.DataFrame, gains: pd.DataFrame,
            sym: pd.DataFrame) -> list[Claim]:
    claims = [Claim(
        "zeros: on a balanced binary task the loss stays exactly ln 2 and every hidden unit stays "
        "identical",
        bool(sym["loss_constant"].all() and sym["units_identical"].all()
             and (sym["loss_minus_ln2"].abs() < 1e-15).all()),
        "; ".join(f"{r.activation}: loss {r.loss_last:.17g} after {r.steps} steps"
                  for r in sym.itertuples()),
    )]

    def g(act: str, gain: float, col: str) -> float:
        t = gains[(gains["activation"] == act) & np.isclose(gains["gain"], gain, rtol=1e-3)]
        return float(t[col].iloc[0]) if len(t) else math.nan

    L = config.gain_depth
    have = {float(v) for v in config.gains}
    if {1.0, 4.0} <= have and any(math.isclose(v, 5 / 3, rel_tol=1e-3) for v in have):
        t1, t53, t4 = g("tanh", 1.0, "fwd_ratio"), g("tanh", 5 / 3, "fwd_ratio"), g("tanh", 4.0, "bwd_ratio")
        tanh = gains[gains["activation"] == "tanh"]
        best_b = float(tanh.iloc[int(np.argmin(np.abs(np.log(tanh["bwd_ratio"].clip(lower=1e-300)))))]["gain"])
        claims += [
            Claim(f"tanh, gain 1: the forward activation variance decays with depth (layer {L} "
                  "below 1/10 of layer 1)", t1 < 0.1, f"ratio {t1:.3g}"),
            Claim(f"tanh, gain 5/3: the forward activation variance is kept (layer {L} within a "
                  "factor 2 of layer 1)", 0.5 < t53 < 2.0, f"ratio {t53:.3g}"),
            Claim("tanh: gain 1 keeps the backward gradient variance best of the gains tried; "
                  "gain 4 (the copied table's tanh row) explodes it (layer 1 over 1e6 x layer "
                  f"{L})", bool(math.isclose(best_b, 1.0) and t4 > 1e6),
                  f"best gain {best_b:.4g}; gain 4 ratio {t4:.3g}"),
        ]
        s1, s4 = g("sigmoid", 1.0, "bwd_ratio"), g("sigmoid", 4.0, "bwd_ratio")
        c4, tb1 = g("sigmoid − ½", 4.0, "bwd_factor_per_layer"), g("tanh", 1.0, "bwd_factor_per_layer")
        smin = float(gains[gains["activation"] == "sigmoid"]["fwd_ratio"].min())
        claims += [
            Claim("sigmoid: gain 4 shrinks the backward gradient far less than gain 1 (by a factor "
                  f"over 1e6 more surviving at layer 1) but it still vanishes (below 1e-3 over {L} "
                  "layers): the mean ½ of every layer's input pushes units out of the linear "
                  "regime", s4 > 1e6 * s1 and s4 < 1e-3, f"gain 1: {s1:.3g}, gain 4: {s4:.3g}"),
            *_sigmoid_window(gains, L),
            Claim("sigmoid: the forward activation variance does not vanish for any gain tried "
                  f"(layer {L} above 1/10 of layer 1): the mean ½ feeds it",
                  smin > 0.1, f"smallest ratio {smin:.3g}"),
            Claim("σ(x) − ½ with gain 4 keeps the backward variance like tanh with gain 1 (per-layer "
                  "factor within 10 %): with the mean removed, the factor 4 = 1/σ'(0) is right for sigmoid",
                  abs(c4 / tb1 - 1) < 0.1, f"per-layer factors {c4:.3f} vs {tb1:.3f}"),
        ]

    def cell(act: str, keys: tuple[str, ...], col: str) -> pd.Series:
        return main[(main["activation"] == act) & main["key"].isin(keys)][col]

    chance = 1.0 / (10 if config.dataset == "digits" else 2)
    dead = ("zeros", "normal_0.01")
    if any(k in config.inits for k in dead):
        accs = main[main["key"].isin(dead)]["test_acc_after"]
        claims.append(Claim(f"zeros and N(0, 0.01²) do not train at depth {config.depth} (test "
                            f"accuracy below {chance + 0.1:.2f} for every activation)",
                            bool((accs < chance + 0.1).all()), f"max {accs.max():.3f}"))
    scaled = tuple(k for k in SCALED if k in config.inits)
    scaled_names = ", ".join(INITS[k][0] for k in scaled)
    for act in ("tanh", "relu"):
        if act in config.activations and scaled:
            acc = cell(act, scaled, "test_acc_after")
            ratio = cell(act, scaled, "grad_ratio")
            claims.append(Claim(
                f"{act}: every variance-scaled init ({scaled_names}) trains (test accuracy above 0.8) "
                f"with first/last-layer gradient ratio between 1/{RATIO_BAND:g} and {RATIO_BAND:g}",
                bool((acc > 0.8).all() and ratio.between(1 / RATIO_BAND, RATIO_BAND).all()),
                f"accuracy {acc.min():.3f}-{acc.max():.3f}, ratio {ratio.min():.3g}-{ratio.max():.3g}"))
    if "sigmoid" in config.activations and scaled:
        acc = cell("sigmoid", scaled, "test_acc_after")
        ratio = cell("sigmoid", scaled, "grad_ratio")
        claims.append(Claim(
            f"sigmoid at depth {config.depth}: with every variance-scaled init the first layer's "
            "gradient is below 1e-6 of the last layer's and the net stays near chance",
            bool((ratio < 1e-6).all() and (acc < chance + 0.1).all()),
            f"ratio up to {ratio.max():.3g}, accuracy up to {acc.max():.3f}"))
    return claims


def _sigmoid_window(gains: pd.DataFrame, L: int) -> list[Claim]:
    """The smallest tried gain whose backward factor per layer reaches 1, for sigmoid."""
    sig = gains[gains["activation"] == "sigmoid"].sort_values("gain")
    above = sig[sig["bwd_factor_per_layer"] >= 1.0]
    below = sig[sig["bwd_factor_per_layer"] < 1.0]
    if above.empty or below.empty:
        return []
    lo, hi = float(below["gain"].max()), float(above["gain"].min())
    sat = float(above.iloc[0]["saturated_last"])
    return [Claim(
        f"sigmoid: the gain that keeps the backward variance lies between {lo:.3g} and {hi:.3g}, "
        f"far above 4, and there {sat:.0%} of layer {L}'s units are saturated",
        bool(lo >= 4.0 and hi > lo), f"per-layer factor below 1 up to gain {lo:.3g}, "
        f"{float(above.iloc[0]['bwd_factor_per_layer']):.3f} at gain {hi:.3g}")]


# ------------------------------------------------------------------------------------ figures
def _gain_figure(result: LabResult) -> Figure:
    from gradprobe.report import style

    config: InitStudyConfig = result.config
    profiles = result.data["gain_profiles"]
    fig, axes = style.figure(2, len(GAIN_FUNCTIONS), size=(16, 8), sharex=True, title=(
        f"Gain study: W ~ N(0, g²/n), {config.gain_depth} square layers of {config.gain_width}, "
        "no bias, float64 (the gains discussed in colour)"))
    others = [g for g in config.gains if not any(math.isclose(g, h) for h in HIGHLIGHT_GAINS)]
    greys = {g: str(0.8 - 0.5 * k / max(len(others) - 1, 1)) for k, g in enumerate(sorted(others))}
    depth = np.arange(1, config.gain_depth + 1)
    zero = False
    for c, fname in enumerate(GAIN_FUNCTIONS):
        for gain in config.gains:
            hl = next((col for h, col in HIGHLIGHT_GAINS.items() if math.isclose(gain, h)), None)
            color = hl if hl is not None else greys[gain]
            width, z = (2.4, 3) if hl is not None else (1.0, 2)
            p = profiles[(fname, gain)]
            label = f"g = {gain_text(gain)}"
            for r, key in enumerate(("fwd_var", "bwd_var")):
                zero |= style.plot_positive(axes[r, c], depth, p[key], color=color, label=label,
                                            linewidth=width, zorder=z)
        style.finish(axes[0, c], title=f"{fname}: forward Var[a_l]", xlabel="",
                     ylabel="activation variance (log)", scale="log")
        style.finish(axes[1, c], title=f"{fname}: backward Var[∂L/∂a_l]", xlabel="layer (depth)",
                     ylabel="gradient variance (log)", scale="log")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda i: config.gains[i])
    note = ("\n▼ on the bottom edge: exactly 0\n(σ(x) − ½ rounds to 0 in float64\nfor |x| < 1e-16), not drawn"
            if zero else "")
    style.legend_outside(axes[0, -1], title="gain (grey: others, light = small)" + note,
                         handles=[handles[i] for i in order], labels=[labels[i] for i in order])
    return fig


def _heatmap(result: LabResult, col: str, title: str, *, log: bool) -> Figure:
    from gradprobe.report import style

    main = result.tables["main"]
    acts = list(dict.fromkeys(main["activation"]))
    rows = list(dict.fromkeys(main["row"]))
    grid = main.pivot(index="row", columns="activation", values=col).loc[rows, acts]
    gains = main.dropna(subset=["gain"]).drop_duplicates("activation").set_index("activation")["gain"]
    values = grid.to_numpy(dtype=float)
    shown = np.log10(np.clip(values, 1e-30, None)) if log else values
    fig, axes = style.figure(1, 1, size=(2.2 * len(acts) + 3.4, 0.45 * len(rows) + 2.4),
                             title=title)
    ax = axes[0, 0]
    im = ax.imshow(shown, cmap="RdBu_r" if log else "viridis", aspect="auto",
                   vmin=-8 if log else 0.0, vmax=8 if log else 1.0)
    for i in range(len(rows)):
        for j in range(len(acts)):
            v = values[i, j]
            text = "n/a" if not np.isfinite(v) else (f"{v:.1e}" if log else f"{v:.2f}")
            ax.text(j, i, text, ha="center", va="center", fontsize=8,
                    color="white" if (log and abs(shown[i, j]) > 4) or (not log and v < 0.5) else "black")
    ax.set_xticks(range(len(acts)),
                  [f"{a}\ng = {gain_text(gains[a])}" if a in gains else a for a in acts])
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("hidden activation (g: its gain)")
    ax.set_ylabel("initialisation (scheme × gain)")
    ax.set_title(("log10 colour scale, clipped at ±8. " if log else "")
                 + "On square layers Xavier × g and He × g are the same distribution",
                 fontsize="small")
    fig.colorbar(im, ax=ax, label="log10 ratio" if log else "test accuracy")
    return fig


def _profile_figure(result: LabResult) -> Figure:
    from matplotlib.ticker import MaxNLocator

    from gradprobe.report import style

    config: InitStudyConfig = result.config
    profiles = result.data["grad_profiles"]
    main = result.tables["main"].drop_duplicates("key").set_index("key")
    labels = {k: str(main.loc[k, "row"]) for k in config.inits}
    colors = style.distinct_colors(list(labels.values()))
    scaled = [k for k in config.inits if k in SCALED]
    nrows = 2 if scaled else 1
    fig, axes = style.figure(nrows, len(config.activations),
                             size=(4.6 * len(config.activations) + 2.4, 4.0 * nrows + 0.6),
                             sharex=True, title="Weight-gradient norm per hidden layer at "
                                                "initialisation")
    any_zero = False
    for c, act in enumerate(config.activations):
        for r, keys in enumerate([list(config.inits), scaled][:nrows]):
            ax = axes[r, c]
            for key in keys:
                any_zero |= style.plot_positive(
                    ax, np.arange(1, len(profiles[(act, key)]) + 1), profiles[(act, key)],
                    color=colors[labels[key]], label=labels[key], marker="o", markersize=3)
            style.finish(ax, title=f"{act}: " + ("every initialisation" if r == 0
                                                  else "variance-scaled only (zoom)"),
                         xlabel="hidden layer (depth)" if r == nrows - 1 else "",
                         ylabel="‖∂L/∂W_l‖ (log)", scale="log")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    style.legend_outside(axes[0, -1], title=style.ZERO_NOTE.replace(": ", ":\n", 1)
                         if any_zero else None)
    return fig


def plot(result: LabResult) -> dict[str, Figure]:
    config: InitStudyConfig = result.config
    return {
        "gain_study": _gain_figure(result),
        "accuracy": _heatmap(result, "test_acc_after",
                             f"Test accuracy after {config.epochs} epochs of Adam "
                             f"({config.depth} hidden layers, {config.dataset})", log=False),
        "grad_ratio": _heatmap(result, "grad_ratio",
                               "First / last hidden layer weight-gradient norm at initialisation",
                               log=True),
        "grad_profiles": _profile_figure(result),
    }


register(NAME, "initialisation study: zero-init symmetry, which gain keeps the variance "
         "(tanh 1 vs 5/3 vs 4, sigmoid), deep MLPs from 9 initialisations", InitStudyConfig, run, plot)

__all__ = [  # gain_profile is gradprobe.lab.gains', readable here as before
    "GAIN_FUNCTIONS", "INITS", "InitStudyConfig", "gain_profile", "gain_text", "plot", "run",
    "symmetry",
]
