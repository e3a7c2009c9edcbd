"""depth-histograms: how the distribution of activations and their gradients changes with depth
under different initialisations (the kind of figure Glorot & Bengio 2010 draw in figures 6-7, which
compare their "standard" ``U(±1/√n)`` with the normalised initialisation; the initialisations
here are others).

2000 inputs of dimension 800 from N(0, 1) pass through 10 bias-free layers of widths 800, 750,
..., 300. A Gaussian gradient ``∂L/∂a₁₀ ~ N(0, 1)`` is sent back from the last layer, so the
backward histograms show how a unit-variance error signal is transformed on its way down.

* tanh, ``W ~ N(0, 0.01²)``: each layer multiplies the std by about ``√n · 0.01 ≈ 0.2-0.28``
  (tanh is the identity near 0), so activations collapse towards 0 geometrically -- by layer 10
  their std is below 10⁻⁴ of layer 1's -- and gradients shrink the same way going down.
* tanh, ``W ~ N(0, 1)``: pre-activations have std ``≈ √n ≈ 20``; nearly every unit sits at ±1,
  where ``tanh' ≈ 0``. Yet the activation gradient does not vanish: it *grows* going down, since
  the ``√n ≈ 20`` gain of ``N(0, 1)`` weights beats the small ``tanh'`` of the saturated units.
* tanh, Xavier normal (``Var W = 2/(fi+fo)``): the distribution stays spread over depth.
* ReLU, Xavier normal: ReLU zeroes half the signal, ``E[relu(h)²] = Var(h)/2``, so the variance
  roughly halves per layer (He et al. 2015, eq. 10).
* ReLU, He normal (``Var W = 2/fi``): the factor 2 compensates; the std stays constant.
* ReLU, Xavier × √2 (``Var W = 4/(fi+fo)``): the study notes' own ReLU demo uses this,
  ``√(4/(fan_in+fan_out))``, not plain Xavier; it is He's variance up to ``2fi/(fi+fo)``, and the
  activations do not collapse. Both are shown.

Example
    >>> import gradprobe as gp
    >>> r = gp.lab.run("depth-histograms", n_samples=200, width=120, step=8)   # doctest: +SKIP
    >>> r.claim("tanh N(0, 0.01²)").holds                                        # doctest: +SKIP
    True

The model and the measurement (:func:`~gradprobe.lab.common.initialised_mlp`,
:func:`~gradprobe.lab.common.propagate`) come from :mod:`gradprobe.lab.common`, shared with the
other initialisation experiments (init, activations, deep-relu).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from gradprobe.errors import ConfigError
from gradprobe.lab.base import Claim, LabResult, Progress, no_progress, register
from gradprobe.lab.common import initialised_mlp, propagate, saturated_fraction
from gradprobe.lab.config_checks import need_at_least

if TYPE_CHECKING:
    from matplotlib.figure import Figure

NAME = "depth-histograms"


# ------------------------------------------------------------------------------ the experiment
ROWS: tuple[tuple[str, str, str, dict[str, float]], ...] = (
    # (activation, label, scheme, init_ keyword arguments)
    ("tanh", "N(0, 0.01²)", "normal", {"std": 0.01}),
    ("tanh", "N(0, 1)", "normal", {"std": 1.0}),
    ("tanh", "Xavier normal", "xavier_normal", {"gain": 1.0}),
    ("relu", "Xavier normal", "xavier_normal", {"gain": 1.0}),
    ("relu", "Xavier × √2 (notes)", "xavier_normal", {"gain": math.sqrt(2.0)}),
    ("relu", "He normal", "he_normal", {}),
)


@dataclass(frozen=True)
class DepthHistogramsConfig:
    """``n_samples`` inputs of dimension ``width``; ``depth`` layers whose widths fall by ``step``."""

    n_samples: int = 2000
    width: int = 800
    step: int = 50
    depth: int = 10
    bins: int = 60
    seed: int = 0

    def validate(self) -> None:
        need_at_least(NAME, self, 2, "depth", "n_samples", "bins")
        need_at_least(NAME, self, 0, "step")
        if self.width - self.step * self.depth < 1:
            raise ConfigError(
                f"width {self.width} - step {self.step} x depth {self.depth} leaves no units",
                hint="make width larger than step x depth (default 800, 50, 10)",
            )

    @property
    def sizes(self) -> list[int]:
        return [self.width - self.step * i for i in range(self.depth + 1)]


def run(config: DepthHistogramsConfig, *, progress: Progress = no_progress,
        out: Path | None = None) -> LabResult:
    config.validate()
    x = torch.randn(config.n_samples, config.width,
                    generator=torch.Generator().manual_seed(config.seed))
    rows: list[dict[str, Any]] = []
    hists: dict[tuple[str, int, str], tuple[np.ndarray, np.ndarray]] = {}
    for k, (act, label, scheme, kwargs) in enumerate(ROWS):
        progress(f"{act} {label}", k, len(ROWS))
        model, _ = initialised_mlp(config.sizes, act, scheme, seed=config.seed, options=kwargs)
        sig = propagate(model, x, generator=torch.Generator().manual_seed(config.seed + 2))
        key = f"{act} {label}"
        values: dict[str, list[np.ndarray]] = {"act": [], "act_grad": []}
        for i, (spec, a, g) in enumerate(zip(sig.specs, sig.acts, sig.act_grads), start=1):
            rows.append({
                "init": key, "layer": i, "width": a.shape[1],
                "act_mean": float(a.mean()), "act_std": float(a.std()),
                "act_grad_std": float(g.std()),
                "saturated_frac": saturated_fraction(spec, a),
                "zero_frac": float((a == 0).double().mean()),
            })
            for kind, t in (("act", a), ("act_grad", g)):
                v = t.flatten().double().numpy()
                if kind == "act" and spec.inactive is not None:  # rectifier: zeros reported apart
                    v = v[v > 0]
                values[kind].append(v)
        # one range per row (the largest |value| over its layers), so that a layer whose values
        # collapse towards 0 shows as a spike in the middle, not as the same bell rescaled
        rectifier = sig.specs[0].inactive is not None
        for kind, per_layer in values.items():
            m = max((float(np.abs(v).max()) for v in per_layer if v.size), default=1.0)
            lo = 0.0 if kind == "act" and rectifier else -m
            for i, v in enumerate(per_layer, start=1):
                counts, edges = np.histogram(v, bins=config.bins, range=(lo, m))
                hists[(key, i, kind)] = (edges, counts)
    progress("done", len(ROWS), len(ROWS))
    table = pd.DataFrame(rows)
    wide = table.pivot(index="layer", columns="init", values="act_std")[[f"{a} {b}" for a, b, *_ in ROWS]]
    wide = wide.reset_index()
    result = LabResult(NAME, config, {"main": table, "act_std": wide},
                       data={"hist": hists, "rows": [f"{a} {b}" for a, b, *_ in ROWS]})
    result.claims = _claims(table, config.depth, config.sizes)
    return result


def _ratio(table: pd.DataFrame, key: str, col: str, depth: int, *, up: bool = False) -> float:
    t = table[table["init"] == key].set_index("layer")[col]
    return float(t[1] / t[depth]) if up else float(t[depth] / t[1])


def _he_prediction(sizes: list[int], depth: int, gain2_times: float) -> float:
    """He et al. 2015 eq. 10 for ReLU with ``Var W = c·2/(fi+fo)``: the second moment is
    multiplied by ``½·fi·Var W = c·fi/(fi+fo)`` per layer; the std ratio from layer 1 to ``depth``
    is the square root of the product over layers 2..depth."""
    f = [gain2_times * sizes[i - 1] / (sizes[i - 1] + sizes[i]) for i in range(2, depth + 1)]
    return float(np.sqrt(np.prod(f)))


def _claims(table: pd.DataFrame, depth: int, sizes: list[int] | None = None) -> list[Claim]:
    L = depth
    sizes = sizes or [800 - 50 * i for i in range(depth + 1)]
    small = _ratio(table, "tanh N(0, 0.01²)", "act_std", L)
    small_g = _ratio(table, "tanh N(0, 0.01²)", "act_grad_std", L, up=True)
    sat = table[table["init"] == "tanh N(0, 1)"]["saturated_frac"].min()
    big_g = _ratio(table, "tanh N(0, 1)", "act_grad_std", L, up=True)
    xav = _ratio(table, "tanh Xavier normal", "act_std", L)
    xav_sat = table[table["init"] == "tanh Xavier normal"]["saturated_frac"].max()
    rx = _ratio(table, "relu Xavier normal", "act_std", L)
    rx2 = _ratio(table, "relu Xavier × √2 (notes)", "act_std", L)
    rh = _ratio(table, "relu He normal", "act_std", L)
    px, px2 = _he_prediction(sizes, L, 1.0), _he_prediction(sizes, L, 2.0)
    return [
        Claim(f"tanh N(0, 0.01²): layer-{L} activation std is below 1e-4 of layer 1's",
              small < 1e-4, f"ratio {small:.3g}"),
        Claim(f"tanh N(0, 0.01²): layer-1 activation-gradient std is below 1e-4 of layer {L}'s",
              small_g < 1e-4, f"ratio {small_g:.3g}"),
        Claim("tanh N(0, 1): over 75 % of units are saturated in every layer",
              bool(sat > 0.75), f"least saturated layer: {sat:.1%}"),
        Claim(f"tanh N(0, 1): activation gradients still grow going down (layer-1 std above "
              f"layer {L}'s): the √n gain of N(0, 1) weights beats the small tanh' of saturated units",
              big_g > 1.0, f"ratio {big_g:.3g}"),
        Claim(f"tanh Xavier normal: activations stay spread (layer-{L} std above {XAVIER_KEEP:g} of "
              "layer 1's, under 5 % saturated in every layer)",
              bool(xav > XAVIER_KEEP and xav_sat < 0.05),
              f"ratio {xav:.3g}, most saturated {xav_sat:.1%}"),
        Claim(f"ReLU Xavier normal: activation std shrinks with depth as He's eq. 10 predicts for "
              f"Var W = 2/(fi+fo) (layer {L} / layer 1 = {px:.2g}, within a factor 1.5)",
              bool(px / 1.5 < rx < px * 1.5), f"ratio {rx:.3g}"),
        Claim(f"ReLU Xavier × √2 (the notes' demo): activation std is kept as predicted "
              f"(layer {L} / layer 1 = {px2:.2g}, within a factor 1.5)",
              bool(px2 / 1.5 < rx2 < px2 * 1.5), f"ratio {rx2:.3g}"),
        Claim(f"ReLU He normal: activation std is kept (layer {L} within 25 % of layer 1)",
              0.8 < rh < 1.25, f"ratio {rh:.3g}"),
    ]


XAVIER_KEEP = 0.33
"""tanh with Xavier (gain 1) decays slowly towards tanh's fixed point 0 (0.41 over 10 layers at
the default size); "stays spread" means it keeps over a third of layer 1's std, where
N(0, 0.01²) keeps 2e-6."""


# ------------------------------------------------------------------------------------- figures
def _grid(result: LabResult, kind: str, title: str) -> Figure:
    from matplotlib.ticker import MaxNLocator

    from gradprobe.report import style

    hists = result.data["hist"]
    rows: list[str] = result.data["rows"]
    colors = style.distinct_colors(rows)
    depth = result.config.depth
    table = result.tables["main"].set_index(["init", "layer"])
    std_col = "act_std" if kind == "act" else "act_grad_std"
    fig, axes = style.figure(len(rows), depth, size=(2.0 * depth + 0.6, 1.8 * len(rows) + 1.0),
                             sharex="row",
                             title=title + "  (x-axis shared along each row: a collapse towards "
                                           "0 shows as a narrowing spike)")
    for r, key in enumerate(rows):
        for c in range(depth):
            ax = axes[r][c]
            edges, counts = hists[(key, c + 1, kind)]
            ax.stairs(counts / max(counts.sum(), 1), edges, fill=True, color=colors[key], alpha=0.85)
            ax.set_yticks([])
            ax.set_ylim(0, 1.25 * max(counts.max() / max(counts.sum(), 1), 1e-12))
            ax.xaxis.set_major_locator(MaxNLocator(3, symmetric=kind != "act"
                                                   or not key.startswith("relu")))
            ax.tick_params(axis="x", labelsize=6)
            ax.xaxis.get_offset_text().set_fontsize(6)
            note = f"std {table.loc[(key, c + 1), std_col]:.1e}"
            if kind == "act" and key.startswith("relu"):
                note += f"\n{table.loc[(key, c + 1), 'zero_frac']:.0%} zeros\n(not drawn)"
            ax.text(0.97, 0.95, note, transform=ax.transAxes, fontsize=6.5, va="top", ha="right")
            if r == 0:
                ax.set_title(f"layer {c + 1} (n={table.loc[(key, c + 1), 'width']})", fontsize=8)
            if c == 0:
                ax.set_ylabel(key.replace(" ", "\n", 1), fontsize=8)
    fig.supxlabel("activation value" if kind == "act" else "∂L/∂activation", fontsize=9)
    fig.supylabel("fraction of the layer's values per bin (rows: activation and init)", fontsize=9)
    return fig


def _std_lines(result: LabResult) -> Figure:
    from gradprobe.report import style

    table = result.tables["main"]
    rows: list[str] = result.data["rows"]
    colors = style.distinct_colors(rows)
    fig, axes = style.figure(1, 2, size=(12.5, 4.4),
                             title="Standard deviation across depth at initialisation")
    for key in rows:
        t = table[table["init"] == key]
        axes[0, 0].plot(t["layer"], t["act_std"], "o-", color=colors[key], label=key)
        axes[0, 1].plot(t["layer"], t["act_grad_std"], "o-", color=colors[key], label=key)
    style.finish(axes[0, 0], title="activation std per layer", xlabel="layer (depth)",
                 ylabel="std (log scale)", scale="log")
    style.finish(axes[0, 1], title="activation-gradient std (N(0,1) sent back from the top)",
                 xlabel="layer (depth)", ylabel="std (log scale)", scale="log")
    style.legend_outside(axes[0, 1], title="activation + init",
                         handles=axes[0, 0].get_legend_handles_labels()[0],
                         labels=axes[0, 0].get_legend_handles_labels()[1])
    return fig


def plot(result: LabResult) -> dict[str, Figure]:
    return {
        "activations": _grid(result, "act", "Activation histograms per layer"),
        "activation_gradients": _grid(result, "act_grad", "Activation-gradient histograms per layer"),
        "std_by_depth": _std_lines(result),
    }


register(NAME, "10-layer tanh/ReLU nets: activation and gradient histograms per layer for "
         "N(0,0.01²), N(0,1), Xavier and He initialisation", DepthHistogramsConfig, run, plot)
