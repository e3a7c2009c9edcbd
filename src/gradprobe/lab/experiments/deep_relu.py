"""deep-relu: a 30-layer ReLU MLP from Xavier vs He initialisation (He et al. 2015, figure 3).

With ``Var[W] = 1/n`` (Xavier on square layers, gain 1) each ReLU layer halves the second moment
of the signal, ``E[a_l²] = ½·n·Var[W]·E[a_(l-1)²]`` (He et al. 2015, eq. 10), so after ``L``
layers the activations have shrunk by ``2^-(L-1)`` in variance -- ``2^-29 ≈ 1.9e-9`` at 30 layers --
and the backward signal shrinks likewise. He et al. report that their 30-layer network from
Xavier initialisation "completely stalls" while ``Var[W] = 2/n`` trains. Here: a ``depth``-layer
ReLU MLP on ``load_digits`` trained with SGD + momentum (as in the paper), recorded with
:class:`gradprobe.Probe` (one record per epoch).

Example
    >>> import gradprobe as gp
    >>> r = gp.lab.run("deep-relu", depth=12, epochs=3)   # doctest: +SKIP
    >>> r.table[["init", "act_var_ratio", "test_acc"]]   # doctest: +SKIP
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
from gradprobe.lab.common import initialised_mlp, propagate
from gradprobe.lab.config_checks import need_at_least, need_positive, need_within

if TYPE_CHECKING:
    from matplotlib.figure import Figure

NAME = "deep-relu"

INITS: dict[str, tuple[str, dict[str, float]]] = {
    "Xavier": ("xavier_normal", {"gain": 1.0}),  # Var W = 2/(fi+fo) = 1/n on square layers
    "He": ("he_normal", {}),  # Var W = 2/fi
}


@dataclass(frozen=True)
class DeepReluConfig:
    depth: int = 30
    width: int = 64
    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    seed: int = 0

    def validate(self) -> None:
        need_at_least(NAME, self, 2, "depth")
        need_at_least(NAME, self, 1, "width", "batch_size", "epochs")
        need_positive(NAME, self, "lr")
        need_within(NAME, self, "momentum", 0, 1)


def run(config: DeepReluConfig, *, progress: Progress = no_progress,
        out: Path | None = None) -> LabResult:
    import gradprobe as gp

    config.validate()
    xtr, ytr, xte, yte = data.digits(seed=config.seed)
    rows: list[dict[str, Any]] = []
    act_vars: dict[str, list[float]] = {}
    curves: dict[str, list[float]] = {}
    grads: dict[str, pd.DataFrame] = {}
    profiles: dict[str, pd.DataFrame] = {}
    runs: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(prefix="gradprobe-deep-relu-") as tmp:
        for k, (label, (scheme, kwargs)) in enumerate(INITS.items()):
            progress(label, k, len(INITS))
            model, _ = initialised_mlp([xtr.shape[1]] + [config.width] * config.depth, "relu",
                                       scheme, seed=config.seed, bias=True, head=10,
                                       options=kwargs)
            sig = propagate(model, xtr, lambda o: torch.nn.functional.cross_entropy(o, ytr))
            var = [float(a.var()) for a in sig.acts]
            act_vars[label] = var
            norms = [float(g.norm()) for g in sig.weight_grads]
            profiles[label] = pd.DataFrame({
                "layer": np.arange(1, len(norms) + 1),
                "act_rms": [float(a.pow(2).mean().sqrt()) for a in sig.acts],
                "act_grad_norm": [float(g.norm()) for g in sig.act_grads],
                "weight_grad_norm": norms,
            })
            run_dir = (out / "runs" / label.lower()) if out is not None else Path(tmp) / label
            watch = _WeightGradNorms(model)
            try:
                fit = train.fit(
                    model, xtr, ytr, loss="cross_entropy", optimizer="momentum", lr=config.lr,
                    optimizer_options={"momentum": config.momentum}, epochs=config.epochs,
                    batch_size=config.batch_size, seed=config.seed, x_test=xte, y_test=yte,
                    run_dir=run_dir, probe_options={"kinds": ("grad",), "overwrite": True},
                )
            finally:
                watch.remove()
            scal = gp.Run.open(run_dir).scalars(kinds="grad")
            frame = scal[scal["layer"].str.startswith("fc")][["step", "layer", "norm"]]
            grads[label] = watch.frame(frame.rename(columns={"norm": "norm_w_and_b"}))
            curves[label] = fit.epoch_losses
            if out is not None:
                runs[label] = run_dir
            rows.append({
                "init": label, "act_var_first": var[0], "act_var_last": var[-1],
                "act_var_ratio": var[-1] / var[0],
                "theory_ratio": 2.0 ** -(config.depth - 1) if label == "Xavier" else 1.0,
                "grad_ratio_init": norms[0] / norms[-1] if norms[-1] > 0 else math.nan,
                "loss_first_epoch": fit.epoch_losses[0], "loss_last_epoch": fit.epoch_losses[-1],
                "train_acc": fit.accuracy_after, "test_acc": fit.test_accuracy_after,
            })
    progress("done", len(INITS), len(INITS))
    table = pd.DataFrame(rows)
    result = LabResult(NAME, config, {"main": table},
                       data={"act_var": act_vars, "loss_curves": curves, "grad_norms": grads,
                             "profiles": profiles},
                       runs=runs)
    result.claims = _claims(config, table, curves)
    return result


class _WeightGradNorms:
    """``‖∂L/∂W‖`` and ``‖∂L/∂b‖`` of every ``fc`` layer at every optimizer step, kept apart (the
    Probe records a module's weight and bias together). Tensor hooks append a norm (no host
    sync); :meth:`frame` stacks them once after training."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.names: list[str] = []
        self.norms: dict[tuple[str, str], list[torch.Tensor]] = {}
        self.handles = []
        for name, mod in model.named_children():
            if name.startswith("fc") and isinstance(mod, torch.nn.Linear):
                self.names.append(name)
                for kind, p in (("w", mod.weight), ("b", mod.bias)):
                    if p is not None:
                        store = self.norms.setdefault((name, kind), [])
                        self.handles.append(p.register_hook(
                            lambda g, store=store: store.append(g.detach().norm())))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def frame(self, recorded: pd.DataFrame) -> pd.DataFrame:
        """The Probe's rows (``step``, ``layer``, ``norm_w_and_b``) with the weight-only
        ``norm`` and the bias-only ``bias_norm`` of the same step added."""
        stacked = {k: torch.stack(v).tolist() for k, v in self.norms.items()}
        out = recorded.copy()
        out["norm"] = [stacked[(lay, "w")][int(st)] for st, lay in zip(out["step"], out["layer"])]
        out["bias_norm"] = [stacked[(lay, "b")][int(st)] if (lay, "b") in stacked else 0.0
                            for st, lay in zip(out["step"], out["layer"])]
        return out.reset_index(drop=True)


def _claims(config: DeepReluConfig, t: pd.DataFrame, curves: dict[str, list[float]]) -> list[Claim]:
    x = t.set_index("init").loc["Xavier"]
    h = t.set_index("init").loc["He"]
    L = config.depth
    theory = 2.0 ** -(L - 1)
    ln10 = math.log(10.0)
    half = max(1, config.epochs // 2)
    k = max(1, config.epochs // 5)
    cx, ch = curves["Xavier"], curves["He"]
    stall = max(abs(v - ln10) / ln10 for v in cx[:half])
    he_end, xa_end = float(np.mean(ch[-k:])), float(np.mean(cx[-k:]))
    return [
        Claim(f"Xavier: the activation variance of layer {L} is 2^-{L - 1} = {theory:.2g} of "
              "layer 1's, within a factor 10", bool(theory / 10 < x["act_var_ratio"] < theory * 10),
              f"measured {x['act_var_ratio']:.3g}"),
        Claim(f"He: the activation variance of layer {L} is within a factor 3 of layer 1's",
              bool(1 / 3 < h["act_var_ratio"] < 3), f"measured {h['act_var_ratio']:.3g}"),
        Claim(f"Xavier stalls: its training loss stays within 1 % of ln 10 (chance) for the first "
              f"{half} epochs", bool(stall < 0.01), f"largest deviation {stall:.2%}"),
        Claim(f"He trains: its mean loss over the last {k} epochs is below 0.75·ln 10 and below "
              "Xavier's", bool(he_end < 0.75 * ln10 and he_end < xa_end),
              f"He {he_end:.4f} vs Xavier {xa_end:.4f} (ln 10 = {ln10:.4f})"),
    ]


def plot(result: LabResult) -> dict[str, Figure]:
    from gradprobe.report import style

    config: DeepReluConfig = result.config
    colors = style.category_colors(list(INITS))
    fig, axes = style.figure(1, 3, size=(17.0, 4.6),
                             title=f"{config.depth}-layer ReLU MLP: Xavier, gain 1 (Var W = 1/n) "
                                   "vs He (Var W = 2/n)")
    ax = axes[0, 0]
    for label, var in result.data["act_var"].items():
        ax.plot(np.arange(1, len(var) + 1), var, "o-", markersize=3, color=colors[label],
                label=label)
    theory = [result.data["act_var"]["Xavier"][0] * 2.0 ** -i for i in range(config.depth)]
    ax.plot(np.arange(1, config.depth + 1), theory, "k--", linewidth=1,
            label="Xavier theory: halves per layer")
    style.finish(ax, title="forward: activation variance at initialisation",
                 xlabel="layer (depth)", ylabel="Var[a_l] (log)", scale="log")
    style.legend_outside(ax)

    ax = axes[0, 1]
    for label, prof in result.data["profiles"].items():
        ax.plot(prof["layer"], prof["act_grad_norm"], "o-", markersize=3, color=colors[label],
                label=f"{label}: ‖∂L/∂a_l‖ (reaching layer l)")
        ax.plot(prof["layer"], prof["weight_grad_norm"], "s--", markersize=3, color=colors[label],
                label=f"{label}: ‖∂L/∂W_l‖ (weights)")
    style.finish(ax, title="backward at initialisation (cross-entropy on all of digits)",
                 xlabel="layer (depth)", ylabel="gradient norm (log)", scale="log")
    style.legend_outside(ax)

    ax = axes[0, 2]
    for label, curve in result.data["loss_curves"].items():
        ax.plot(np.arange(1, len(curve) + 1), curve, color=colors[label], label=label)
    ax.axhline(math.log(10.0), color="0.3", linestyle=":", label="ln 10 (chance)")
    style.finish(ax, title="training loss (SGD + momentum)", xlabel="epoch",
                 ylabel="cross-entropy")
    ax.set_ylim(bottom=0.0)
    style.legend_outside(ax)

    gfig, gaxes = style.figure(1, 2, sharex=True, sharey=True, size=(11.0, 4.4), title=(
        "Weight-gradient norm ‖∂L/∂W_l‖ per layer during training (weights only, biases apart; "
        "first step of each epoch)"))
    for c, (label, frame) in enumerate(result.data["grad_norms"].items()):
        layers = list(dict.fromkeys(frame["layer"]))
        series = {n: frame[frame["layer"] == n]["norm"].to_numpy() for n in layers}
        steps = frame[frame["layer"] == layers[0]]["step"].to_numpy()
        style.plot_layers(gaxes[0, c], steps, series, title=f"{label}", xlabel="optimizer step",
                          ylabel="‖∂L/∂W_l‖ (log)" if c == 0 else "", scale="log", legend=False)
    sm = _depth_colorbar(gfig, gaxes, config.depth)
    sm.set_label("layer depth (1 = input side)")
    return {"deep_relu": fig, "grad_norms": gfig}


def _depth_colorbar(fig: Figure, axes: Any, depth: int) -> Any:
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    from gradprobe.report import style

    mappable = ScalarMappable(norm=Normalize(1, depth / 0.9), cmap=colormaps[style.LAYER_CMAP])
    return fig.colorbar(mappable, ax=list(axes.ravel()), ticks=[1, depth // 2, depth])


register(NAME, "30-layer ReLU MLP, Xavier vs He (He et al. 2015): activation variance at init and "
         "loss curves", DeepReluConfig, run, plot)
