"""rnn: vanishing and exploding gradients through time, and what LSTM, GRU, IRNN and clipping do.

A recurrent network applies the same ``W_hh`` at every step, ``h_t = φ(W_ih x_t + W_hh h_(t-1) + b)``,
so the gradient reaching step ``t`` from the loss at the last step ``T`` is a product of ``T - t``
Jacobians ``diag(φ'(z_k)) W_hh``. For a linear RNN it is ``(W_hhᵀ)^(T-t) ∂L/∂h_T``, whose norm
grows or decays like ``ρ^(T-t)`` with ``ρ`` the spectral radius (largest eigenvalue modulus) of
``W_hh``: ``ρ < 1`` is sufficient for vanishing, ``ρ > 1`` necessary for exploding (Bengio, Simard
& Frasconi 1994; Pascanu, Mikolov & Bengio 2013, section 2). ``tanh' ≤ 1`` can only shrink it further.

Tasks (Hochreiter & Schmidhuber 1997, as used by Le, Jaitly & Hinton 2015):

* **adding problem**: inputs ``(value ~ U(0, 1), marker)``; two markers, one in each half of the
  sequence; target the sum of the two marked values. Predicting the constant 1 gives
  ``MSE = Var(u₁ + u₂) = 2/12 ≈ 0.167``, the baseline a network must beat.
* **temporal order**: a distractor ``U(-1, 1)`` on channel 0 at every step; on channel 1 a symbol
  ``X = +1`` or ``Y = -1`` at one step in ``[0.1T, 0.2T)`` and one in ``[0.5T, 0.6T)``; four
  classes (XX, XY, YX, YY), chance accuracy 0.25.

Models (hidden size ``hidden``, read-out from the last step):

* ``tanh``: ``nn.RNN`` with PyTorch's default init, ``U(±1/√H)``;
* ``relu``: ``nn.RNN(nonlinearity="relu")`` with random ``W_hh ~ N(0, g²/H)``, spectral radius
  ``≈ g`` (circular law; ``g = relu_gain = 1.5`` by default): the forward state and the gradient
  explode;
* ``irnn``: ReLU RNN with ``W_hh = I``, input weights ``N(0, 0.001²)``, zero bias (Le et al.
  2015), via ``gp.remedies.init_(rnn, "identity")``;
* ``lstm``, ``gru``: PyTorch's defaults.

Each is trained with Adam (``lr``, ``steps`` steps) with and without gradient-norm clipping by
``gp.remedies.clip_gradients_`` (Pascanu et al. 2013: rescale the whole gradient to norm
``max_norm`` when it is larger; Le et al. 2015 clip their IRNNs too). Adam bounds each
parameter's step by about ``lr`` whatever the gradient's size, so an exploding gradient shows
there as a loss spike that throws the weights off (the IRNN's), not as overflow. Under plain SGD
the step is ``lr·g`` and an exploding gradient overflows: the random ReLU RNN is also trained with
SGD (``sgd_lr``, momentum 0.9, ``sgd_steps`` steps) with and without clipping.

The tasks, the models and the hand-stepped unroll are :mod:`gradprobe.lab.sequences` (imported
here under their names, so ``rnn.adding_problem`` and ``rnn.build`` still work); this module
holds the experiment: training, the spectral-radius study, the tables, the claims and the figures.

Example
    >>> import gradprobe as gp
    >>> r = gp.lab.run("rnn", lengths=(10,), steps=50)   # doctest: +SKIP
    >>> r.tables["adding"]                               # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from gradprobe.lab import train
from gradprobe.lab.base import Claim, LabResult, Progress, no_progress, register
from gradprobe.lab.common import running_mean
from gradprobe.lab.config_checks import need_at_least, need_positive
from gradprobe.lab.sequences import (
    ADDING_BASELINE,
    KINDS,
    TASKS,
    SequenceModel,
    adding_problem,
    build,
    gradient_through_time,
    task_loss,
    temporal_order,
    unroll,
)
from gradprobe.remedies import clip_gradients_
from gradprobe.remedies.optim import total_norm

if TYPE_CHECKING:
    from matplotlib.figure import Figure

NAME = "rnn"
LABELS = {"tanh": "tanh RNN", "relu": "ReLU RNN (random W)", "irnn": "IRNN (W = I)",
          "lstm": "LSTM", "gru": "GRU"}
SMOOTH = 10
"""Loss curves are drawn as running means over this many steps."""
SOLVED_MSE = 0.05
"""An adding-problem run counts as solved below this test MSE (30 % of the baseline)."""
FAILED_MSE = 0.10
"""... and as failed above this one (60 % of the baseline)."""


@dataclass(frozen=True)
class RnnConfig:
    """Sequence ``lengths`` T; ``steps`` Adam steps of ``batch`` fresh sequences per run of the
    adding problem (``order_steps`` for the temporal-order task, which is easier); ``sgd_steps`` SGD steps (``sgd_lr``) for the ReLU RNN's clipping comparison."""

    lengths: tuple[int, ...] = (10, 30)
    hidden: int = 64
    steps: int = 800
    order_steps: int = 300
    batch: int = 64
    lr: float = 0.01
    max_norm: float = 1.0
    sgd_lr: float = 0.01
    sgd_steps: int = 300
    relu_gain: float = 1.5
    temporal_order: bool = True
    spectral_length: int = 50
    radii: tuple[float, ...] = (0.8, 0.9, 0.95, 1.0, 1.05, 1.1, 1.2)
    seed: int = 0

    def validate(self) -> None:
        need_at_least(NAME, self, 4, "lengths")
        need_at_least(NAME, self, 1, "hidden", "steps", "order_steps", "sgd_steps", "batch")
        need_at_least(NAME, self, 2, "spectral_length")
        need_positive(NAME, self, "lr", "max_norm", "relu_gain", "sgd_lr", "radii")


# -------------------------------------------------------------------------------- training
def fit(model: SequenceModel, task: str, length: int, config: RnnConfig, *, clip: bool,
        seed: int, optimizer: str = "adam") -> dict[str, Any]:
    """Adam (``lr``, ``steps``) or SGD with momentum 0.9 (``sgd_lr``, ``sgd_steps``) on fresh
    batches, clipped by ``gp.remedies.clip_gradients_`` when ``clip``; the loss and the
    (unclipped) gradient norm per step, and the final test metric."""
    make, _ = TASKS[task]
    opt: torch.optim.Optimizer
    if optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=config.lr)
        steps = config.steps if task == "adding" else config.order_steps
    else:
        opt = torch.optim.SGD(model.parameters(), lr=config.sgd_lr, momentum=0.9)
        steps = config.sgd_steps
    if clip:
        clip_gradients_(opt, max_norm=config.max_norm)  # a step pre-hook: the loop is unchanged
    gen = torch.Generator().manual_seed(seed)
    losses: list[Tensor] = []
    grad_norms: list[Tensor] = []
    for _ in range(steps):
        x, y = make(config.batch, length, gen)
        loss = task_loss(task, model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norms.append(total_norm([p.grad for p in model.parameters() if p.grad is not None]))
        opt.step()
        losses.append(loss.detach())
    curve = torch.stack(losses).numpy().astype(float)  # one host transfer per run
    gnorm = torch.stack(grad_norms).numpy().astype(float)
    xt, yt = make(2000, length, torch.Generator().manual_seed(10_000 + seed))
    with torch.no_grad():
        out = model(xt)
        if task == "adding":
            metric = float(nn.functional.mse_loss(out, yt))
        else:
            metric = float((out.argmax(1) == yt).double().mean())
    return {"curve": curve, "grad_norm": gnorm, "metric": metric}


def _final(curve: np.ndarray) -> float:
    """Mean training loss over the last 10 % of steps (inf if any of them is not finite)."""
    tail = curve[-max(1, len(curve) // 10):]
    return float(tail.mean()) if np.isfinite(tail).all() else math.inf


# ---------------------------------------------------------------------- spectral radius study
def spectral_study(config: RnnConfig) -> pd.DataFrame:
    """Linear and tanh RNNs with ``W_hh`` scaled to each spectral radius ρ in ``radii``.

    ``W_hh = ρ·W₀/ρ(W₀)`` with ``W₀ ~ N(0, 1/H)``; inputs from the adding problem through
    ``W_ih ~ N(0, 0.1²)``; ``L = Σ u ⊙ h_T`` with a fixed Gaussian ``u``. Per ρ and step t the
    gradient ``‖∂L/∂h_t‖ / ‖∂L/∂h_T‖``, measured with autograd in float64.
    """
    T, H = config.spectral_length, config.hidden
    gen = torch.Generator().manual_seed(config.seed + 7)
    w0 = torch.randn(H, H, generator=gen, dtype=torch.float64) / math.sqrt(H)
    w0 = w0 / torch.linalg.eigvals(w0).abs().max()
    w_ih = (torch.randn(H, 2, generator=gen, dtype=torch.float64) * 0.1).requires_grad_(True)
    x, _ = adding_problem(16, T, gen)
    x = x.double()
    u = torch.randn(16, H, generator=gen, dtype=torch.float64)
    rows = []
    for act in ("linear", "tanh"):
        for rho in config.radii:
            w = rho * w0
            h = torch.zeros(16, H, dtype=torch.float64)
            states = []
            for t in range(T):
                z = x[:, t] @ w_ih.T + h @ w.T
                h = z if act == "linear" else torch.tanh(z)
                h.retain_grad()
                states.append(h)
            (u * h).sum().backward()
            top = float(states[-1].grad.norm())  # type: ignore[union-attr]
            for t, s in enumerate(states, start=1):
                rows.append({"activation": act, "rho": float(rho), "t": t,
                             "ratio": float(s.grad.norm()) / top})  # type: ignore[union-attr]
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------- run
def run(config: RnnConfig, *, progress: Progress = no_progress, out: Path | None = None
        ) -> LabResult:
    config.validate()
    tasks = ["adding"] + (["temporal order"] if config.temporal_order else [])
    # the temporal-order task only with clipping (the comparison of interest there is between
    # architectures; it halves the run time)
    plan = [(task, T, kind, clip) for task in tasks for T in config.lengths for kind in KINDS
            for clip in ((False, True) if task == "adding" else (True,))]
    rows: list[dict[str, Any]] = []
    curves: dict[tuple[str, int, str, bool], np.ndarray] = {}
    through_time: dict[str, np.ndarray] = {}
    long_t = max(config.lengths)
    with train.threads(1):
        for i, (task, T, kind, clip) in enumerate(plan):
            progress(f"{task} T={T} {kind}{' clip' if clip else ''}", i, len(plan))
            make, n_out = TASKS[task]
            model = build(kind, 2, config.hidden, n_out, relu_gain=config.relu_gain,
                          seed=config.seed)
            if task == "adding" and T == long_t and not clip:
                x, y = make(256, T, torch.Generator().manual_seed(config.seed + 3))
                through_time[kind] = gradient_through_time(model, x, y, task)
            res = fit(model, task, T, config, clip=clip, seed=config.seed)
            curves[(task, T, kind, clip)] = res["curve"]
            final = _final(res["curve"])
            metric = res["metric"]
            rows.append({
                "task": task, "T": T, "model": kind, "clip": clip,
                "final_train_loss": final,
                "test_mse" if task == "adding" else "test_acc": metric,
                "max_train_loss": _max_finite(res["curve"]),
                "max_grad_norm": _max_finite(res["grad_norm"]),
                "diverged": bool(not math.isfinite(final) or not math.isfinite(metric)),
            })
        sgd: dict[bool, dict[str, Any]] = {}
        for clip in (False, True):
            progress(f"ReLU RNN SGD{' clip' if clip else ''}", len(plan), len(plan) + 1)
            model = build("relu", 2, config.hidden, 1, relu_gain=config.relu_gain,
                          seed=config.seed)
            res = fit(model, "adding", long_t, config, clip=clip, seed=config.seed,
                      optimizer="sgd")
            curves[("adding SGD", long_t, "relu", clip)] = res["curve"]
            finite = np.isfinite(res["curve"])
            sgd[clip] = {"clip": "by norm" if clip else "no", "test_mse": res["metric"],
                         "first_nonfinite_step": int(np.argmin(finite)) + 1
                         if not finite.all() else None,
                         "max_finite_loss": float(res["curve"][finite].max()),
                         "max_grad_norm": _max_finite(res["grad_norm"])}
        progress("spectral radius", len(plan), len(plan) + 1)
        spectral = spectral_study(config)
    progress("done", len(plan) + 1, len(plan) + 1)
    runs = pd.DataFrame(rows)
    sgd_table = pd.DataFrame([sgd[False], sgd[True]]).astype({"first_nonfinite_step": "Int64"})
    tables = {"main": _pivot(runs, "adding", "test_mse"), "runs": runs, "relu_sgd": sgd_table,
              "spectral": _spectral_table(spectral, config.spectral_length)}
    if config.temporal_order:
        tables["temporal_order"] = _pivot(runs, "temporal order", "test_acc")
    result = LabResult(NAME, config, tables, data={
        "curves": curves, "smoothed": {k: running_mean(c, SMOOTH) for k, c in curves.items()},
        "through_time": through_time,
        "relative_through_time": {k: v / v[-1] for k, v in through_time.items()},
        "spectral": spectral})
    result.claims = _claims(config, runs, sgd, through_time, tables["spectral"])
    return result


def _max_finite(values: np.ndarray) -> float:
    """The largest finite value (inf if there is none)."""
    finite = values[np.isfinite(values)]
    return float(finite.max()) if finite.size else math.inf


def _pivot(runs: pd.DataFrame, task: str, col: str) -> pd.DataFrame:
    """One row per model (and clipping), one column per length: the test metric."""
    sub = runs[runs["task"] == task]
    wide = sub.pivot_table(index=["model", "clip"], columns="T", values=col, sort=False,
                           dropna=False)
    wide.columns = [f"T={c}" for c in wide.columns]
    wide = wide.reset_index()
    wide["model"] = wide["model"].map(LABELS)
    wide["clip"] = wide["clip"].map({False: "no", True: "by norm"})
    return wide


def _spectral_table(frame: pd.DataFrame, T: int) -> pd.DataFrame:
    """Per activation and ρ: the gradient ratio over T-1 steps, ρ^(T-1), and the per-step factor."""
    rows = []
    for (act, rho), g in frame.groupby(["activation", "rho"], sort=False):
        ratio = float(g[g.t == 1]["ratio"].iloc[0])
        rows.append({"activation": act, "rho": rho, "rho^(T-1)": rho ** (T - 1),
                     "grad_ratio h_1/h_T": ratio,
                     "per_step_factor": ratio ** (1.0 / (T - 1)) if ratio > 0 else 0.0})
    return pd.DataFrame(rows)


def _claims(config: RnnConfig, runs: pd.DataFrame, sgd: dict[bool, dict[str, Any]],
            through_time: dict[str, np.ndarray], spectral: pd.DataFrame) -> list[Claim]:
    T = max(config.lengths)
    add = runs[(runs["task"] == "adding") & (runs["T"] == T)].set_index(["model", "clip"])

    def mse(kind: str, clip: bool) -> float:
        return float(add.loc[(kind, clip), "test_mse"])

    tanh = min(mse("tanh", False), mse("tanh", True))
    lstm = min(mse("lstm", False), mse("lstm", True))
    irnn = min(mse("irnn", False), mse("irnn", True))
    gru = min(mse("gru", False), mse("gru", True))
    claims = [
        Claim(f"adding problem, T = {T}: the tanh RNN fails (test MSE > {FAILED_MSE}) where LSTM "
              f"and IRNN succeed (< {SOLVED_MSE}), with or without clipping (best of the two)",
              bool(tanh > FAILED_MSE and lstm < SOLVED_MSE and irnn < SOLVED_MSE),
              f"tanh {tanh:.3g}, LSTM {lstm:.3g}, IRNN {irnn:.3g} (baseline 0.167)"),
        Claim(f"adding problem, T = {T}: the GRU succeeds (test MSE < {SOLVED_MSE}) where the tanh "
              f"RNN fails (> {FAILED_MSE})", bool(tanh > FAILED_MSE and gru < SOLVED_MSE),
              f"GRU {gru:.3g}, tanh {tanh:.3g}"),
    ]
    i0, i1 = add.loc[("irnn", False)], add.loc[("irnn", True)]
    claims.append(Claim(
        f"adding problem, T = {T}, Adam: clipping turns the IRNN's failure (test MSE > "
        f"{FAILED_MSE} without clipping) into training (< {SOLVED_MSE} with it)",
        bool(i0["test_mse"] > FAILED_MSE and i1["test_mse"] < SOLVED_MSE),
        f"without clipping {i0['test_mse']:.3g} (largest gradient norm {i0['max_grad_norm']:.3g}, "
        f"largest batch loss {i0['max_train_loss']:.3g}); with clipping {i1['test_mse']:.3g}"))
    s0, s1 = sgd[False], sgd[True]
    claims.append(Claim(
        f"adding problem, T = {T}, plain SGD: the random ReLU RNN's loss becomes inf/NaN without "
        "clipping and stays finite with it",
        bool(s0["first_nonfinite_step"] is not None and s1["first_nonfinite_step"] is None),
        f"without clipping: first non-finite loss at step {s0['first_nonfinite_step']} (largest "
        f"gradient norm {s0['max_grad_norm']:.3g}); with clipping: "
        + ("finite at every step" if s1["first_nonfinite_step"] is None
           else f"non-finite from step {s1['first_nonfinite_step']}")))
    claims.append(Claim(
        f"... but clipping does not make it learn: the clipped random ReLU RNN ends near the "
        f"constant predictor (test MSE > 0.9 × {ADDING_BASELINE:.3f}) -- clipping bounds the step, "
        "not the spectral radius",
        bool(not s1["test_mse"] < 0.9 * ADDING_BASELINE),
        f"clipped SGD test MSE {s1['test_mse']:.3g}"))
    ratio = {k: float(v[0] / v[-1]) for k, v in through_time.items()}
    claims.append(Claim(
        f"at initialisation, T = {T}: ‖∂L/∂h_1‖/‖∂L/∂h_T‖ < 1e-2 for the tanh RNN (vanishes), "
        "> 1e2 for the random ReLU RNN (explodes) and within [0.1, 10] for the IRNN",
        bool(ratio["tanh"] < 1e-2 and ratio["relu"] > 1e2 and 0.1 <= ratio["irnn"] <= 10),
        ", ".join(f"{k} {v:.3g}" for k, v in ratio.items())))
    lin = spectral[spectral.activation == "linear"]
    err = float((lin["per_step_factor"] / lin["rho"] - 1).abs().max())
    claims.append(Claim(
        f"linear RNN, T = {config.spectral_length}: the gradient changes by the spectral radius ρ "
        "per step (per-step factor within 10 % of ρ for every ρ): ρ > 1 explodes, ρ < 1 vanishes",
        bool(err < 0.10), f"largest relative deviation {err:.3f}"))
    th = spectral[spectral.activation == "tanh"]
    above = bool((th["per_step_factor"] <= th["rho"] * 1.02).all())
    claims.append(Claim(
        "tanh RNN: since tanh' ≤ 1, the gradient's per-step factor never exceeds ρ (2 % slack)",
        above, ", ".join(f"ρ={r:g}: {f:.3f}" for r, f in zip(th["rho"], th["per_step_factor"]))))
    return claims


# ------------------------------------------------------------------------------------ plot
def plot(result: LabResult) -> dict[str, Figure]:
    from gradprobe.report import style

    config: RnnConfig = result.config
    T = max(config.lengths)
    colors = dict(zip(KINDS, ("#1b6ca8", "#d1495b", "#edae49", "#66a182", "#2e4057")))

    # gradient through time at initialisation
    fig, axes = style.figure(1, 1, title=f"Gradient through time at initialisation "
                                        f"(adding problem, T = {T})", size=(7.5, 4.6))
    ax = axes[0, 0]
    for kind, rel in result.data["relative_through_time"].items():
        ax.plot(np.arange(1, len(rel) + 1), rel, color=colors[kind], label=LABELS[kind])
    style.finish(ax, title="‖∂L/∂h_t‖ relative to the last step (L at step T)",
                 xlabel="time step t", ylabel="‖∂L/∂h_t‖ / ‖∂L/∂h_T‖ (log)", scale="log")
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))

    # spectral radius
    spec: pd.DataFrame = result.data["spectral"]
    table: pd.DataFrame = result.tables["spectral"]
    sfig, saxes = style.figure(1, 3, size=(16.5, 4.6), title=(
        f"Spectral radius ρ of W_hh decides vanishing (ρ < 1) or exploding (ρ > 1), "
        f"T = {config.spectral_length}"))
    rho_colors = dict(zip(config.radii, style.diverging_colors(len(config.radii))))
    for ax, act in zip(saxes[0, :2], ("linear", "tanh")):
        for rho, g in spec[spec.activation == act].groupby("rho"):
            ax.plot(g["t"], g["ratio"], color=rho_colors[float(rho)], label=f"ρ = {rho:g}")
        style.finish(ax, title=f"{act} RNN: gradient through time",
                     xlabel="time step t", ylabel="‖∂L/∂h_t‖ / ‖∂L/∂h_T‖ (log)", scale="log")
    lo = min(spec["ratio"].min(), table["rho^(T-1)"].min())
    hi = max(spec["ratio"].max(), table["rho^(T-1)"].max())
    for ax in saxes[0, :2]:
        ax.set_ylim(lo / 2, hi * 2)
    saxes[0, 0].legend(fontsize="small", title="spectral radius", title_fontsize="small",
                       loc="upper right")
    ax = saxes[0, 2]
    for act, marker in (("linear", "o"), ("tanh", "s")):
        g = table[table.activation == act]
        ax.plot(g["rho^(T-1)"], g["grad_ratio h_1/h_T"], marker=marker, linestyle="none",
                markerfacecolor="none", label=f"{act} RNN (measured)")
    ax.plot([lo, hi], [lo, hi], "k--", linewidth=1, label="ratio = ρ^(T-1)")
    ax.set_xscale("log")
    style.finish(ax, title="gradient ratio over T-1 steps against ρ^(T-1)",
                 xlabel="ρ^(T-1) (log)", ylabel="‖∂L/∂h_1‖ / ‖∂L/∂h_T‖ (log)", scale="log")
    ax.legend(fontsize="small", loc="upper left")

    # loss curves: adding without and with clipping, temporal order (with clipping)
    panels = [("adding", False), ("adding", True)]
    if config.temporal_order:
        panels.append(("temporal order", True))
    lfig, laxes = style.figure(1, len(panels) + 1, size=(5.2 * (len(panels) + 1) + 1.8, 4.4),
                               title=(
        f"Training loss at T = {T} (Adam, lr {config.lr:g}; clipping: gradient norm at most "
        f"{config.max_norm:g}); running mean over {SMOOTH} steps"))
    curves = result.data["curves"]
    smoothed = result.data["smoothed"]
    for ax, (task, clip) in zip(laxes[0], panels):
        vals = [v for k, c in curves.items() if k[0] == task and k[1] == T
                for v in c[np.isfinite(c)]]
        for kind in KINDS:
            curve = smoothed[(task, T, kind, clip)]
            ax.plot(np.arange(1, len(curve) + 1), curve, color=colors[kind],
                    label=LABELS[kind], linewidth=1.3)
        base = ADDING_BASELINE if task == "adding" else math.log(4)
        ax.axhline(base, color="0.3", linestyle=":", linewidth=1.2)
        ylabel = "MSE (log)" if task == "adding" else "cross-entropy (log)"
        style.finish(ax, title=f"{task}, {'with' if clip else 'no'} clipping",
                     xlabel="Adam step", ylabel=ylabel, scale="log")
        if vals:
            ax.set_ylim(max(min(vals), 1e-5) / 1.5, min(max(vals), 1e6) * 1.5)
        ax.text(0.99, base, "predict 1: 0.167" if task == "adding" else "chance: ln 4",
                transform=ax.get_yaxis_transform(), ha="right", va="bottom", fontsize="small",
                color="0.3")
    laxes[0, 1].sharey(laxes[0, 0])  # the adding panels are compared: same y range
    # plain SGD: the random ReLU RNN with and without clipping
    ax = laxes[0, -1]
    sgd = result.tables["relu_sgd"].set_index("clip")
    for clip, ls in ((False, "-"), (True, "--")):
        curve = smoothed[("adding SGD", T, "relu", clip)]
        label = "by norm" if clip else "no"
        ax.plot(np.arange(1, len(curve) + 1), curve, color=colors["relu"], linestyle=ls,
                linewidth=1.3, label=f"{LABELS['relu']}, {'clipped' if clip else 'not clipped'}")
        stop = sgd.loc[label, "first_nonfinite_step"]
        if not pd.isna(stop):  # the last finite loss, marked: the curve ends there
            ax.plot([int(stop) - 1], [curve[int(stop) - 2]], "o", color=colors["relu"])
            ax.axvline(int(stop), color=colors["relu"], linestyle=":", linewidth=1)
            ax.text(int(stop), 0.97, f" loss inf/NaN\n from step {int(stop)}",
                    transform=ax.get_xaxis_transform(), va="top", fontsize="small")
    ax.axhline(ADDING_BASELINE, color="0.3", linestyle=":", linewidth=1.2)
    style.finish(ax, title=f"adding, plain SGD (lr {config.sgd_lr:g}, momentum 0.9)",
                 xlabel="SGD step", ylabel="MSE (log)", scale="log")
    style.legend_outside(ax)
    style.legend_outside(laxes[0, 0])
    return {"gradient_through_time": fig, "spectral_radius": sfig, "loss_curves": lfig}


register(NAME, "recurrent nets on the adding and temporal-order tasks: tanh, ReLU, IRNN, LSTM, GRU, "
         "with and without clipping; gradient through time and spectral radius", RnnConfig, run,
         plot)

__all__ = [  # the tasks and models of gradprobe.lab.sequences stay readable as rnn.*
    "ADDING_BASELINE", "KINDS", "TASKS", "RnnConfig", "SequenceModel", "adding_problem", "build",
    "fit", "gradient_through_time", "plot", "run", "spectral_study", "temporal_order", "unroll",
]
