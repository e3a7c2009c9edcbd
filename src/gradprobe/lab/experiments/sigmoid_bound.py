"""``sigmoid-bound``: why deep sigmoid networks lose their gradient, measured against the bound.

The sigmoid's derivative ``σ'(z) = σ(z)(1 - σ(z))`` is at most ``1/4`` (at ``z = 0``). Back-
propagation through an activation layer multiplies the incoming gradient elementwise by
``φ'(z)``, so for every layer

    ‖∂ℓ/∂z_l‖ ≤ max φ' · ‖∂ℓ/∂a_l‖                          (a_l = φ(z_l))

and over ``L`` sigmoid layers the activations alone scale the gradient by at most
``0.25^L`` (``0.25^10 ≈ 9.5e-7``). The weight matrices multiply in their own factors
``‖W_lᵀ g‖ / ‖g‖``; with LeCun-normal weights ``N(0, 1/fan_in)`` on square layers these are about 1,
which isolates the activation's effect. tanh (``max φ' = 1``) and ReLU (``φ' ∈ {0, 1}``, about
half the units active, so ≈ ``1/√2`` in norm) lose far less per layer.

Measured per activation layer ``l`` at initialisation, with autograd:

* activation factor ``‖∂ℓ/∂z_l‖ / ‖∂ℓ/∂a_l‖`` (must be ≤ max φ');
* cumulative attenuation ``‖∂ℓ/∂a_(l-1)‖ / ‖∂ℓ/∂a_L‖`` from the last hidden layer down to layer
  ``l``'s input (``a_0 = x``), the quantity a learner sees as "vanishing".

Sources: the bound is the argument of Hochreiter (1991) and Bengio, Simard & Frasconi (1994);
Glorot & Bengio (2010) measured it in deep sigmoid networks.

>>> import gradprobe as gp
>>> r = gp.lab.run("sigmoid-bound", depth=4, width=16, batch=64)
>>> r.claim("every sigmoid layer").holds
True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from torch import nn

from gradprobe import activations
from gradprobe.errors import ConfigError
from gradprobe.lab.base import Claim, LabResult, Progress, no_progress, register
from gradprobe.lab.config_checks import need_at_least

if TYPE_CHECKING:
    from matplotlib.figure import Figure

NAME = "sigmoid-bound"

MAX_DERIVATIVE = {"sigmoid": 0.25, "tanh": 1.0, "relu": 1.0}
"""sup φ' of the activations this experiment compares (σ' ≤ 1/4 at 0, tanh' ≤ 1 at 0, ReLU' ∈ {0,1})."""


@dataclass(frozen=True)
class SigmoidBoundConfig:
    """``depth`` hidden layers of ``width`` units for each activation; LeCun-normal weights, zero
    bias, inputs N(0, 1); a linear read-out to one output and loss ``ℓ = Σ ŷ``."""

    depth: int = 10
    width: int = 128
    batch: int = 512
    activations: tuple[str, ...] = ("sigmoid", "tanh", "relu")
    seed: int = 0

    def validate(self) -> None:
        need_at_least(NAME, self, 1, "depth", "width", "batch")
        unknown = [a for a in self.activations if a not in MAX_DERIVATIVE]
        if unknown or not self.activations:
            raise ConfigError(
                f"activations={self.activations}: this experiment compares "
                + ", ".join(MAX_DERIVATIVE) + (f", not {unknown}" if unknown else ""),
                hint="e.g. --activations sigmoid,tanh,relu",
            )


def network(depth: int, width: int, activation: str) -> nn.Sequential:
    """``depth`` × (Linear(width, width) → φ), then Linear(width, 1); LeCun normal, zero bias,
    float64. Build it under :func:`gradprobe.lab.train.seeded` for a fixed draw."""
    spec = activations.get(activation)
    layers: list[nn.Module] = []
    for _ in range(depth):
        lin = nn.Linear(width, width, dtype=torch.float64)
        layers += [lin, spec.factory()]
    layers.append(nn.Linear(width, 1, dtype=torch.float64))
    with torch.no_grad():
        for m in layers:
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, 1.0 / math.sqrt(m.in_features))
                m.bias.zero_()
    return nn.Sequential(*layers)


def measure(model: nn.Sequential, x: torch.Tensor, activation: str) -> pd.DataFrame:
    """Per activation layer: activation factor and cumulative attenuation (autograd)."""
    pre: list[torch.Tensor] = []
    post: list[torch.Tensor] = [x]
    h = x
    for layer in model:
        h = layer(h)
        if isinstance(layer, nn.Linear) and len(pre) < (len(model) - 1) // 2:
            pre.append(h)
        elif not isinstance(layer, nn.Linear):
            post.append(h)
        h.retain_grad()
    h.sum().backward()
    top = float(post[-1].grad.norm())  # type: ignore[union-attr]
    rows = []
    for i, (z, a) in enumerate(zip(pre, post[1:]), start=1):
        assert z.grad is not None and a.grad is not None
        below = post[i - 1].grad
        assert below is not None
        rows.append({
            "activation": activation,
            "layer": i,
            "activation_factor": float(z.grad.norm() / a.grad.norm()),
            "cumulative": float(below.norm()) / top,
            "saturated_frac": _saturated(activation, a.detach()),
        })
    return pd.DataFrame(rows)


def _saturated(activation: str, a: torch.Tensor) -> float:
    spec = activations.get(activation)
    mask = spec.saturated(a) if spec.saturated is not None else (
        spec.inactive(a) if spec.inactive is not None else torch.zeros_like(a, dtype=torch.bool)
    )
    return float(mask.double().mean())


def run(config: SigmoidBoundConfig, *, progress: Progress = no_progress, out: Path | None = None
        ) -> LabResult:
    """Measure each activation's network at initialisation and compare with ``(max φ')^L``."""
    from gradprobe.lab.train import seeded

    config.validate()
    L = config.depth
    gen = torch.Generator().manual_seed(config.seed)
    x = torch.randn(config.batch, config.width, generator=gen, dtype=torch.float64)
    frames = []
    for i, act in enumerate(config.activations):
        progress(act, i, len(config.activations))
        with seeded(config.seed):
            model = network(L, config.width, act)
        frames.append(measure(model, x.clone().requires_grad_(True), act))
    progress("done", len(config.activations), len(config.activations))
    layers = pd.concat(frames, ignore_index=True)

    rows = []
    for act, frame in layers.groupby("activation", sort=False):
        f = frame["activation_factor"].to_numpy()
        bound = MAX_DERIVATIVE[str(act)] ** L
        rows.append({
            "activation": act,
            "max φ'": MAX_DERIVATIVE[str(act)],
            "mean factor per layer": float(np.exp(np.log(f).mean())),
            "largest factor": float(f.max()),
            "product of factors": float(np.prod(f)),
            "bound (max φ')^L": bound,
            "input/top gradient": float(frame[frame.layer == 1]["cumulative"].iloc[0]),
            "saturated or dead units": float(frame["saturated_frac"].mean()),
        })
    main = pd.DataFrame(rows)
    claims: list[Claim] = []
    by = main.set_index("activation")
    if "sigmoid" in by.index:
        s = by.loc["sigmoid"]
        claims.append(Claim(
            "every sigmoid layer scales the gradient by at most 0.25",
            bool(s["largest factor"] <= 0.25 + 1e-12),
            f"largest per-layer factor {s['largest factor']:.4f}",
        ))
        claims.append(Claim(
            f"over {L} sigmoid layers the activations scale the gradient by at most 0.25^{L} = {0.25 ** L:.2g}",
            bool(s["product of factors"] <= 0.25 ** L),
            f"measured product {s['product of factors']:.3g}",
        ))
        others = [a for a in by.index if a != "sigmoid"]
        if others:
            ratios = {a: float(by.loc[a, "input/top gradient"] / s["input/top gradient"]) for a in others}
            claims.append(Claim(
                "the sigmoid network's input receives a smaller gradient than "
                + " and ".join(others),
                all(r > 1 for r in ratios.values()),
                "; ".join(f"{a}: {r:.3g}x more" for a, r in ratios.items()),
            ))
    return LabResult(name=NAME, config=config, tables={"main": main, "layers": layers}, claims=claims)


def plot(result: LabResult) -> dict[str, Figure]:
    """Per-layer activation factors against max φ', and cumulative attenuation against the bound."""
    from gradprobe.report import style

    layers: pd.DataFrame = result.tables["layers"]
    cfg: SigmoidBoundConfig = result.config
    L = cfg.depth
    fig, axes = style.figure(
        1, 2, size=(12.5, 4.6),
        title=f"Gradient through {L} activation layers at initialisation "
              f"(width {cfg.width}, LeCun-normal weights)",
    )
    acts = list(layers["activation"].unique())
    colors = style.category_colors(acts)
    ax = axes[0, 0]
    for act in acts:
        frame = layers[layers.activation == act]
        ax.plot(frame["layer"], frame["activation_factor"], marker="o", color=colors[act], label=act)
    ax.axhline(0.25, color=colors.get("sigmoid", "black"), linestyle=":", linewidth=1.2,
               label="σ' ≤ 0.25")
    style.finish(ax, title="activation factor ‖∂ℓ/∂z_l‖ / ‖∂ℓ/∂a_l‖ per layer", xlabel="layer l",
                 ylabel="factor")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize="small")

    ax = axes[0, 1]
    values: list[float] = []
    for act in acts:
        frame = layers[layers.activation == act]
        ax.plot(frame["layer"], frame["cumulative"], marker="o", color=colors[act], label=act)
        values += list(frame["cumulative"])
    ls = np.arange(1, L + 1)
    bound = 0.25 ** (L - ls + 1)
    ax.plot(ls, bound, color="black", linestyle="--", linewidth=1.0,
            label="0.25^(L-l+1): sigmoid bound (‖W‖ ≈ 1)")
    style.finish(ax, title="gradient reaching layer l, relative to the top",
                 xlabel="layer l (input side = 1)", ylabel="‖∂ℓ/∂a_(l-1)‖ / ‖∂ℓ/∂a_L‖",
                 scale="log")
    ax.legend(fontsize="small")
    return {"sigmoid_bound": fig}


register(
    NAME,
    "deep sigmoid vs tanh vs ReLU at init: per-layer gradient attenuation vs the 0.25^L bound",
    SigmoidBoundConfig,
    run,
    plot,
)
