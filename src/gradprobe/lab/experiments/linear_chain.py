"""``linear-chain``: exploding and vanishing in the simplest deep network, where the maths is exact.

Setting (Ng's deep-learning course notes, "vanishing / exploding gradients"): a deep *linear*
network of ``L`` layers, no bias, identity activation. The ``L - 1`` hidden layers have weight
``a·I``; the last layer is the read-out with weight ``I``. Then

    h_l = a^l · x                      (l = 1 .. L-1),        ŷ = h_L = a^(L-1) · x

so the output norm is ``‖ŷ‖ = a^(L-1)‖x‖``: it explodes for ``a > 1`` and vanishes for ``a < 1``
exponentially in depth. With a loss whose gradient at the output is a fixed ``u``
(``ℓ = Σ u ⊙ ŷ``), back-propagation multiplies by ``Wᵀ = a·I`` once per hidden layer:

    ∂ℓ/∂h_(l-1) = a^(L-l) · u          (the gradient reaching layer l's input; ∂ℓ/∂x = a^(L-1)·u)
    ∂ℓ/∂W_l = ∂ℓ/∂h_l · h_(l-1)ᵀ = a^(L-2) · uᵀx  (every hidden layer),  a^(L-1) · uᵀx (read-out)

(summing over the batch, ``uᵀx`` stands for ``Σ_b u_b x_bᵀ``). Every hidden weight receives the
*same* gradient norm: in a linear chain depth does not redistribute the gradient among layers, it
rescales all of them by ``a^(L-2)``, which is why a learning rate that suits one depth explodes or
stalls at another. The experiment measures all of this with autograd in float64 and compares with
the formulas; the relative error is rounding only (below 1e-9 by orders of magnitude).

>>> import gradprobe as gp
>>> r = gp.lab.run("linear-chain", depth=10, scales=(2.0,))
>>> float(r.table["output_ratio"].iloc[0])   # 2^(10-1)
512.0
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from torch import nn

from gradprobe.errors import ConfigError
from gradprobe.lab.base import Claim, LabResult, Progress, no_progress, register
from gradprobe.lab.config_checks import need_at_least, need_positive

if TYPE_CHECKING:
    from matplotlib.figure import Figure

NAME = "linear-chain"
TOLERANCE = 1e-9


@dataclass(frozen=True)
class LinearChainConfig:
    """``depth`` layers (``depth - 1`` hidden ``a·I`` plus an identity read-out) of ``width``
    units, for every ``a`` in ``scales``; ``batch`` inputs drawn from N(0, 1) with ``seed``."""

    depth: int = 50
    width: int = 2
    scales: tuple[float, ...] = (1.5, 1.0, 0.5)
    batch: int = 4
    seed: int = 0

    def validate(self) -> None:
        need_at_least(NAME, self, 2, "depth")
        need_at_least(NAME, self, 1, "width", "batch")
        need_positive(NAME, self, "scales")
        # float64 holds about 1e±308: the largest value computed is max(a, 1/a)^(depth-1) · |x|.
        worst = max(max(abs(np.log10(s)) for s in self.scales) * (self.depth - 1), 0.0)
        if worst > 290:
            raise ConfigError(
                f"scales {self.scales} over depth {self.depth} reach 1e±{worst:.0f}, beyond float64",
                hint="use a smaller depth or scales closer to 1",
            )


def chain(depth: int, width: int, a: float) -> nn.Sequential:
    """The network: ``depth - 1`` Linear layers with weight ``a·I`` and an identity read-out,
    no bias, float64."""
    layers: list[nn.Module] = []
    for i in range(depth):
        lin = nn.Linear(width, width, bias=False, dtype=torch.float64)
        with torch.no_grad():
            lin.weight.copy_(torch.eye(width, dtype=torch.float64) * (a if i < depth - 1 else 1.0))
        layers.append(lin)
    return nn.Sequential(*layers)


def measure(depth: int, width: int, a: float, x: torch.Tensor, u: torch.Tensor) -> pd.DataFrame:
    """Forward and backward through the chain; per layer the measured norms (autograd)."""
    model = chain(depth, width, a)
    hs = [x]
    h = x
    for layer in model:
        h = layer(h)
        h.retain_grad()
        hs.append(h)
    (u * h).sum().backward()
    grads_in = [x.grad] + [t.grad for t in hs[1:-1]]  # ∂ℓ/∂h_(l-1) for l = 1..L
    x_norm, u_norm = float(x.detach().norm()), float(u.norm())
    rows = []
    for idx, layer in enumerate(model, start=1):
        assert isinstance(layer, nn.Linear) and layer.weight.grad is not None
        g_in = grads_in[idx - 1]
        assert g_in is not None
        rows.append({
            "a": a,
            "layer": idx,
            "activation_ratio": float(hs[idx].detach().norm()) / x_norm,
            "gradient_ratio": float(g_in.norm()) / u_norm,
            "weight_grad_norm": float(layer.weight.grad.norm()),
        })
    return pd.DataFrame(rows)


def formulas(depth: int, a: float, ux_norm: float) -> pd.DataFrame:
    """The closed forms for every layer ``l = 1..L`` (see the module docstring)."""
    layers = np.arange(1, depth + 1)
    return pd.DataFrame({
        "layer": layers,
        "activation_formula": [a ** min(int(l_), depth - 1) for l_ in layers],
        "gradient_formula": [a ** (depth - int(l_)) for l_ in layers],
        "weight_grad_formula": [
            (a ** (depth - 2) if l_ < depth else a ** (depth - 1)) * ux_norm for l_ in layers
        ],
    })


def _rel(measured: pd.Series, formula: pd.Series) -> pd.Series:
    return (measured - formula).abs() / formula.abs()


def run(config: LinearChainConfig, *, progress: Progress = no_progress, out: Path | None = None
        ) -> LabResult:
    """Measure every layer of the chain for each ``a`` and compare with the closed forms."""
    config.validate()
    gen = torch.Generator().manual_seed(config.seed)
    x0 = torch.randn(config.batch, config.width, generator=gen, dtype=torch.float64)
    u = torch.randn(config.batch, config.width, generator=gen, dtype=torch.float64)
    ux_norm = float((u.T @ x0).norm())
    frames = []
    for i, a in enumerate(config.scales):
        progress(f"a = {a:g}", i, len(config.scales))
        x = x0.clone().requires_grad_(True)
        measured = measure(config.depth, config.width, float(a), x, u)
        frame = measured.merge(formulas(config.depth, float(a), ux_norm), on="layer")
        for q in ("activation", "gradient", "weight_grad"):
            frame[f"{q}_rel_err"] = _rel(
                frame[f"{q}_ratio" if q != "weight_grad" else "weight_grad_norm"],
                frame[f"{q}_formula"],
            )
        frames.append(frame)
    progress("done", len(config.scales), len(config.scales))
    layers = pd.concat(frames, ignore_index=True)
    layers = layers[[
        "a", "layer", "activation_ratio", "activation_formula", "activation_rel_err",
        "gradient_ratio", "gradient_formula", "gradient_rel_err",
        "weight_grad_norm", "weight_grad_formula", "weight_grad_rel_err",
    ]]
    err_cols = ["activation_rel_err", "gradient_rel_err", "weight_grad_rel_err"]
    L = config.depth
    main_rows = []
    for a, frame in layers.groupby("a", sort=False):
        last, first = frame[frame.layer == L].iloc[0], frame[frame.layer == 1].iloc[0]
        hidden = frame[frame.layer < L]["weight_grad_norm"]
        main_rows.append({
            "a": a,
            "L": L,
            "a^(L-1)": float(a) ** (L - 1),
            "output_ratio": last["activation_ratio"],
            "input_grad_ratio": first["gradient_ratio"],
            "hidden_dW_spread": float(hidden.max() / hidden.min()),
            "max_rel_err": float(frame[err_cols].to_numpy().max()),
        })
    main = pd.DataFrame(main_rows)
    max_err = float(layers[err_cols].to_numpy().max())
    act_err = float(layers["activation_rel_err"].max())
    grad_err = float(layers["gradient_rel_err"].max())
    w_err = float(layers["weight_grad_rel_err"].max())
    spread = float(main["hidden_dW_spread"].max())
    claims = [
        Claim(
            f"‖h_l‖/‖x‖ = a^l per layer and the output is a^(L-1)·x (relative error < {TOLERANCE:g})",
            act_err < TOLERANCE, f"largest relative error {act_err:.2e}",
        ),
        Claim(
            f"the gradient reaching layer l is a^(L-l) times the output gradient (relative error < {TOLERANCE:g})",
            grad_err < TOLERANCE, f"largest relative error {grad_err:.2e}",
        ),
        Claim(
            f"every hidden weight gets the same gradient norm a^(L-2)·‖uᵀx‖ (relative error < {TOLERANCE:g})",
            w_err < TOLERANCE and spread - 1.0 < TOLERANCE,
            f"largest relative error {w_err:.2e}; largest/smallest hidden-layer norm {spread:.12g}",
        ),
    ]
    growth = {float(a): float(r["input_grad_ratio"]) for a, r in main.set_index("a").iterrows()}
    if any(a > 1 for a in growth) and any(a < 1 for a in growth):
        big = max(growth)
        small = min(growth)
        claims.append(Claim(
            f"a > 1 explodes and a < 1 vanishes: over {L} layers the input gradient is scaled by "
            f"{growth[big]:.3g} (a={big:g}) and {growth[small]:.3g} (a={small:g})",
            growth[big] > 1.0 > growth[small],
            (f"a = 1 keeps it at {growth[1.0]:.3g}; " if 1.0 in growth else "")
            + f"largest relative error {max_err:.2e}",
        ))
    return LabResult(
        name=NAME, config=config, tables={"main": main, "layers": layers},
        data={"ux_norm": ux_norm}, claims=claims,
    )


def plot(result: LabResult) -> dict[str, Figure]:
    """Measured (open circles, every few layers) against the formula (black dashes, drawn on
    top) per layer, forward and backward, log scale."""
    from gradprobe.report import style

    layers: pd.DataFrame = result.tables["layers"]
    cfg: LinearChainConfig = result.config
    fig, axes = style.figure(1, 3, title=f"Deep linear chain, W = a·I, L = {cfg.depth} (float64)",
                             size=(15.5, 4.4))
    colors = style.category_colors([f"{a:g}" for a in layers["a"].unique()])
    panels = [
        ("activation_ratio", "activation_formula", "forward: ‖h_l‖ / ‖x‖", "‖h_l‖ / ‖x‖"),
        ("gradient_ratio", "gradient_formula", "backward: gradient reaching layer l",
         "‖∂ℓ/∂h_(l-1)‖ / ‖∂ℓ/∂ŷ‖"),
        ("weight_grad_norm", "weight_grad_formula", "weight gradient per layer", "‖∂ℓ/∂W_l‖"),
    ]
    for ax, (meas, form, title, ylabel) in zip(axes[0], panels):
        values = []
        every = max(1, cfg.depth // 12)  # a marker every few layers leaves the formula in view
        for a, frame in layers.groupby("a", sort=False):
            c = colors[f"{a:g}"]
            ax.plot(frame["layer"], frame[meas], color=c, linestyle="none", marker="o",
                    markersize=6, markerfacecolor="none", markeredgewidth=0.9, alpha=0.8,
                    markevery=every, zorder=2, label=f"a = {a:g}")
            ax.plot(frame["layer"], frame[form], color="black", linestyle="--", linewidth=1.1,
                    zorder=3)
            values += list(frame[meas]) + list(frame[form])
        style.finish(ax, title=title, xlabel="layer l", ylabel=ylabel,
                     scale=style.choose_scale(values))
    axes[0, -1].plot([], [], color="black", linestyle="--", label="formula a^(…)")
    style.legend_outside(axes[0, -1], title="measured (circles,\nevery few layers)")
    return {"linear_chain": fig}


register(
    NAME,
    "deep linear net W = a·I: output and gradients follow a^(L-1) exactly (float64)",
    LinearChainConfig,
    run,
    plot,
)
