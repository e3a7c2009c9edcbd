"""``compare(runs, "compare.html")``: several runs side by side (e.g. before and after a remedy).

One self-contained HTML page like the report: a table of each run's final loss, findings and
first/last layer gradient RMS, then overlaid figures: the loss curves, the depth profiles of
activation gradients at each run's last step, and the gradient RMS of the first and last weight
layers over steps. Compared panels share their axes. Runs may differ in depth (a remedy that
adds normalisation layers): depth profiles are drawn over each run's weight layers, input first.

Example
    >>> import tempfile, torch, gradprobe as gp
    >>> from gradprobe.report import compare
    >>> d = tempfile.mkdtemp()
    >>> for name, lr in [("a", 0.01), ("b", 0.1)]:
    ...     model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    ...     opt = torch.optim.SGD(model.parameters(), lr=lr)
    ...     with gp.Probe(model, opt, run_dir=f"{d}/{name}") as probe:
    ...         for _ in range(4):
    ...             loss = model(torch.randn(8, 3)).pow(2).mean()
    ...             probe.observe_loss(loss)
    ...             loss.backward(); opt.step(); opt.zero_grad()
    >>> compare([f"{d}/a", f"{d}/b"], f"{d}/compare.html").name
    'compare.html'
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gradprobe.errors import ConfigError
from gradprobe.report import page as P
from gradprobe.report.html import layer_info, open_run

TABLE_COLUMNS = ("run", "steps", "last-step loss", "findings", "rules", "first layer",
                 "first-layer grad RMS", "last layer", "last-layer grad RMS")


class _Frames:
    """What one run contributes to the comparison (read once)."""

    def __init__(self, run: Any, label: str, diagnosis: Any) -> None:
        self.run, self.label, self.diagnosis = run, label, diagnosis
        self.info = layer_info(run)
        self.scalars = run.scalars(kinds=["grad", "act_grad"])
        self.losses = run.losses()
        grads = self.scalars[self.scalars["kind"] == "grad"]
        weight_layers = [n for n in self.info.order if n in set(grads["layer"])]
        self.first = weight_layers[0] if weight_layers else None
        self.last = weight_layers[-1] if weight_layers else None


def _labels(runs: Sequence[Any], labels: Sequence[str] | None) -> list[str]:
    if labels is not None:
        if len(labels) != len(runs):
            raise ConfigError(f"labels: {len(labels)} labels for {len(runs)} runs",
                              hint="give one label per run, in the same order")
        return [str(x) for x in labels]
    names = [Path(r.path).name for r in runs]
    if len(set(names)) < len(names):
        names = [str(r.path) for r in runs]
    return names


def _last(frame: pd.DataFrame, layer: str | None, column: str) -> float:
    rows = frame[frame["layer"] == layer] if layer is not None else frame.iloc[:0]
    return float(rows[column].iloc[-1]) if len(rows) else math.nan


def rows(frames: Sequence[_Frames]) -> list[dict[str, Any]]:
    """One dict per run with :data:`TABLE_COLUMNS` (values at each run's last recorded step)."""
    out = []
    for f in frames:
        grads = f.scalars[f.scalars["kind"] == "grad"]
        d = f.diagnosis
        out.append({
            "run": f.label,
            "steps": int(grads["step"].max()) + 1 if len(grads) else 0,
            "last-step loss": float(f.losses["loss"].iloc[-1]) if len(f.losses) else math.nan,
            "findings": None if d is None else len(d),
            "rules": None if d is None else ", ".join(dict.fromkeys(x.rule for x in d)) or "none",
            "first layer": f.first or "-",
            "first-layer grad RMS": _last(grads, f.first, "rms"),
            "last layer": f.last or "-",
            "last-layer grad RMS": _last(grads, f.last, "rms"),
        })
    return out


def fmt(value: Any) -> str:
    """A table cell: floats with 4 significant digits, missing values as a dash."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _run_colors(n: int) -> list[str]:
    from gradprobe.report import style

    return [style.CATEGORY_COLORS[i % len(style.CATEGORY_COLORS)] for i in range(n)]


def loss_figure(frames: Sequence[_Frames]) -> Any:
    from gradprobe.report import figures as F
    from gradprobe.report import style

    if all(f.losses.empty for f in frames):
        return None
    fig, axes = style.figure(1, 1, size=(9.5, 3.8))
    ax, values, notes = axes[0, 0], [], []
    for f, color in zip(frames, _run_colors(len(frames))):
        if f.losses.empty:
            continue
        steps = F.thin_steps(f.losses["step"])
        shown = f.losses[f.losses["step"].isin(steps)]
        ax.plot(shown["step"], shown["loss"], color=color, linewidth=1.5, label=F.text(f.label))
        values.append(shown["loss"].to_numpy(dtype=float))
        notes.append(F.thin_note(f.losses["step"].to_numpy(), steps))
    used = F.scale_y(ax, np.concatenate(values))
    style.finish(ax, title="Training loss", xlabel="optimizer step",
                 ylabel="loss (mean over the step's batches)", scale=used)
    _run_legend(ax)
    return F.Plot(fig, next((n for n in notes if n), ""))


def _run_legend(ax: Any) -> None:
    ax.legend(title="run", fontsize="small", title_fontsize="small", frameon=False,
              loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)


def profile_figure(frames: Sequence[_Frames]) -> Any:
    from gradprobe.report import figures as F
    from gradprobe.report import style

    fig, axes = style.figure(1, 1, size=(9.5, 4.2))
    ax, values, drawn = axes[0, 0], [], False
    for f, color in zip(frames, _run_colors(len(frames))):
        act = f.scalars[f.scalars["kind"] == "act_grad"]
        if act.empty:
            continue
        present = set(act["layer"].unique())
        layers = [n for n in f.info.weights if n in present] or \
            [n for n in f.info.order if n in present]
        last = act["step"].max()
        table = F.pivot(act, "act_grad", "rms", layers, np.array([last]))
        y = table.iloc[0].to_numpy(dtype=float)
        ax.plot(np.arange(len(y)), y, color=color, marker="o", markersize=3 if len(y) <= 40 else 0,
                linewidth=1.6, label=f"{F.text(f.label)} (step {int(last)})")
        values.append(y)
        drawn = True
    if not drawn:
        return None
    used = F.scale_y(ax, np.concatenate(values))
    style.finish(ax, title="Back-propagated gradient across depth, last step of each run",
                 xlabel="weight layer, input → output (index)",
                 ylabel="RMS of ∂L/∂(layer output)", scale=used)
    ax.xaxis.get_major_locator().set_params(integer=True)
    _run_legend(ax)
    return F.Plot(fig, "Each run's weight layers in depth order (all layers when a run has no "
                       "weight-layer activation gradients).")


def first_last_figure(frames: Sequence[_Frames]) -> Any:
    from gradprobe.report import figures as F
    from gradprobe.report import style

    if all(f.first is None for f in frames):
        return None
    fig, axes = style.figure(1, 2, size=(11.5, 3.9), sharex=True)
    axes[0, 1].sharey(axes[0, 0])
    values, notes = [], []
    for f, color in zip(frames, _run_colors(len(frames))):
        grads = f.scalars[f.scalars["kind"] == "grad"]
        steps = F.thin_steps(grads["step"])
        notes.append(F.thin_note(grads["step"].to_numpy(), steps))
        for ax, layer in zip(axes[0], (f.first, f.last)):
            if layer is None:
                continue
            sel = grads[(grads["layer"] == layer) & grads["step"].isin(steps)]
            ax.plot(sel["step"], sel["rms"], color=color, linewidth=1.4,
                    label=f"{F.text(f.label)}: {F.text(layer)}")
            values.append(sel["rms"].to_numpy(dtype=float))
    used = F.scale_y(axes[0, 0], np.concatenate(values))
    for ax, which in zip(axes[0], ("First", "Last")):
        style.finish(ax, title=f"{which} weight layer", xlabel="optimizer step",
                     ylabel="RMS of ∂L/∂θ (weights and biases)", scale=used)
        ax.legend(fontsize="small", frameon=False, loc="best")
    return F.Plot(fig, next((n for n in notes if n), ""))


def _table_html(table: list[dict[str, Any]]) -> str:
    head = "".join(f"<th>{P.esc(c)}</th>" for c in TABLE_COLUMNS)
    body = "".join(
        "<tr>" + "".join(
            f'<td class="{"num" if isinstance(r[c], (int, float)) else ""}">{P.esc(fmt(r[c]))}</td>'
            for c in TABLE_COLUMNS) + "</tr>"
        for r in table
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def load(runs: Sequence[Any], labels: Sequence[str] | None = None,
         diagnoses: Sequence[Any] | None = None) -> list[_Frames]:
    """Open and read the runs (checks: at least two, labels and diagnoses one per run)."""
    if isinstance(runs, (str, os.PathLike)) or len(runs) < 2:
        raise ConfigError("compare needs at least two runs",
                          hint="pass two or more run directories, e.g. before and after a fix")
    opened = [open_run(r) for r in runs]
    names = _labels(opened, labels)
    if diagnoses is not None and len(diagnoses) != len(opened):
        raise ConfigError(f"diagnoses: {len(diagnoses)} for {len(opened)} runs",
                          hint="give one diagnosis (or None) per run, in the same order")
    diags = list(diagnoses) if diagnoses is not None else [None] * len(opened)
    diags = [d if d is not None else P.auto_diagnose(r) for d, r in zip(diags, opened)]
    return [_Frames(r, n, d) for r, n, d in zip(opened, names, diags)]


def compare(runs: Sequence[Any], out: str | os.PathLike[str] = "compare.html", *,
            labels: Sequence[str] | None = None, diagnoses: Sequence[Any] | None = None,
            frames: Sequence[_Frames] | None = None, title: str | None = None,
            summary: tuple[str, str] | None = None) -> Path:
    """Write the comparison page of ``runs`` (Runs or paths, at least two) to ``out``.

    ``labels`` name the runs (default: their folder names); ``diagnoses`` are their
    Diagnosis objects (default: each run diagnosed, when this gradprobe can). ``frames`` are
    runs already read with :func:`load` (the CLI reads them once for its table and the page).
    ``title`` replaces the heading; ``summary`` is a ``(heading, plain text)`` section shown
    first, as preformatted text (the doctor's ranking).
    """
    path = P.check_out(out, "compare.html")
    frames = list(frames) if frames is not None else load(runs, labels, diagnoses)
    heading = title or "gradprobe comparison: " + " vs ".join(f.label for f in frames)
    body = [P.section("summary", summary[0], f"<pre>{P.esc(summary[1])}</pre>")] if summary else []
    body += [P.section("table", "Runs", _table_html(rows(frames)) +
                      '<p class="muted">Gradient RMS at each run\'s last recorded step; first and '
                      "last layer are its first and last weight layers in depth order.</p>")]
    for f in frames:
        body.append(f'<details><summary>Diagnosis of {P.esc(f.label)}</summary>'
                    f"{P.diagnosis_html(f.diagnosis)}</details>")
    figs = [
        ("loss", "Loss", loss_figure(frames), "No run recorded its loss."),
        ("act-grad-profile", "Activation gradients across depth", profile_figure(frames),
         "No run recorded activation gradients."),
        ("first-last", "Gradient RMS of the first and last layer", first_last_figure(frames),
         "No run recorded parameter gradients."),
    ]
    for sec_id, sec_title, plot, missing in figs:
        content = (P.figure_block(plot, sec_id, sec_title) if plot is not None
                   else P.empty(missing))
        body.append(P.section(sec_id, sec_title, content))
    nav = ([("summary", summary[0])] if summary else []) + [("table", "Runs")] + [
        (s[0], s[1]) for s in figs]
    head = (f"<h1>{P.esc(heading)}</h1><div class=\"meta\">"
            + "<br>".join(f"{P.esc(f.label)}: <code>{P.esc(Path(f.run.path).resolve())}</code>"
                         for f in frames)
            + "</div>")
    return P.write_atomic(path, P.page(heading, head, nav, "\n".join(body)))


__all__ = ["TABLE_COLUMNS", "compare", "fmt", "load", "rows"]
