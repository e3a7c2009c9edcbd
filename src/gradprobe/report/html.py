"""``gp.report(run, "report.html")``: one self-contained HTML file that works offline.

The diagnosis comes first (findings, severity, layers, steps, evidence, explanation, remedies
with their code), then the figures of :mod:`gradprobe.report.figures`. The file holds no link
to anything outside itself: figures are data URIs, the style sheet is inline, fonts are the
reader's own. It is written to a temporary name and renamed, so it exists whole or not at all.

Example
    >>> import tempfile, torch, gradprobe as gp
    >>> d = tempfile.mkdtemp()
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> with gp.Probe(model, opt, run_dir=d + "/run") as probe:
    ...     for _ in range(5):
    ...         loss = model(torch.randn(8, 3)).pow(2).mean()
    ...         probe.observe_loss(loss)
    ...         loss.backward(); opt.step(); opt.zero_grad()
    >>> gp.report(probe.run, d + "/report.html").name
    'report.html'
"""

from __future__ import annotations

import datetime
import os
import time
from pathlib import Path
from typing import Any

import pandas as pd

from gradprobe.errors import ConfigError
from gradprobe.report import page as P

REPORT_KINDS = ("grad", "weight", "act", "act_grad")


def open_run(run_or_path: Any) -> Any:
    """A :class:`~gradprobe.Run` from a Run or a path (:class:`~gradprobe.RunDirError` if it is
    not a run)."""
    from gradprobe.store.run import Run

    if isinstance(run_or_path, Run):
        return run_or_path
    if not isinstance(run_or_path, (str, os.PathLike)):
        raise ConfigError(
            f"run must be a gp.Run or a path, got {type(run_or_path).__name__}",
            hint="pass gp.Run.open(path), probe.run, or the run_dir given to gp.Probe",
        )
    return Run.open(run_or_path)


def layer_info(run: Any) -> Any:
    """The run's layers for the figures (:class:`gradprobe.report.figures.Layers`): all of them,
    the weight layers and the activation modules, each in depth order (input first)."""
    from gradprobe.report.figures import Layers

    layers = run.layers.copy()
    layers["_d"] = layers["depth"].astype("Float64").fillna(float("inf"))
    layers = layers.sort_values(["_d", "layer_id"], kind="stable")
    names = [str(n) for n in layers["name"]]
    weights = [str(n) for n, s in zip(layers["name"], layers["param_shapes"]) if len(s or [])]
    acts = [str(n) for n, a in zip(layers["name"], layers["activation"]) if a]
    return Layers.of(names, [str(t) for t in layers["type"]], weights, acts)


def time_frame(run: Any) -> pd.DataFrame | None:
    """Per-time-step gradients of recurrent layers (``step, layer, t, norm``) from
    :meth:`Run.time_gradients` (``∂L/∂x_t``, which carries the gradient through time); None
    when the run recorded none (no recurrent layer, or no ``hist_every``)."""
    getter = getattr(run, "time_gradients", None)
    if not callable(getter):
        return None
    frame = getter()
    if frame is None or not len(frame):
        return None
    return frame.rename(columns={"grad_norm": "norm"})[["step", "layer", "t", "norm"]]


def _header(run: Any, title: str) -> str:
    meta = run.meta
    cfg = meta.get("config", {})
    steps = meta.get("steps")
    facts = [
        ("model", cfg.get("model", "?")),
        ("optimizer", cfg.get("optimizer", "?")),
        ("parameters", cfg.get("n_params", "?")),
        ("layers", len(meta.get("layers", []))),
        ("steps", steps if steps is not None else "?"),
        ("status", meta.get("status", "?")),
        ("gradprobe", meta.get("environment", {}).get("gradprobe", "?")),
    ]
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    items = " · ".join(f"{P.esc(k)} <b>{P.esc(v)}</b>" for k, v in facts)
    return (f"<h1>{P.esc(title)}</h1><div class=\"meta\">run <code>{P.esc(run.path)}</code>"
            f"<br>{items}<br>report written {P.esc(when)}</div>")


def _layer_table(run: Any, order: list[str]) -> str:
    rows = run.layers.set_index("name")
    body = "".join(
        f"<tr><td class=\"num\">{i}</td><td><code>{P.esc(n)}</code></td>"
        f"<td>{P.esc(rows.loc[n, 'type'])}</td><td>{P.esc(rows.loc[n, 'activation'] or '')}</td>"
        f"<td>{P.esc(' '.join(str(tuple(s)) for s in (rows.loc[n, 'param_shapes'] or [])))}"
        "</td></tr>"
        for i, n in enumerate(order)
    )
    return ("<details><summary>Layers in depth order</summary><table><tr><th>#</th><th>name"
            "</th><th>type</th><th>activation rule</th><th>parameter shapes</th></tr>"
            f"{body}</table></details>")


def report(run_or_path: Any, out: str | os.PathLike[str] = "report.html", *,
           diagnosis: Any = None, title: str | None = None) -> Path:
    """Write the HTML report of a run to ``out`` and return its path.

    Args:
        run_or_path: a :class:`~gradprobe.Run` or its directory.
        out: the HTML file to write (its folder must exist); a folder means ``out/report.html``.
        diagnosis: a :class:`~gradprobe.diagnose.Diagnosis`; when None, the run is diagnosed
            with ``gradprobe.diagnose.diagnose`` if this gradprobe has it.
        title: the page's heading (default: ``gradprobe report: <run folder name>``).
    """
    from gradprobe.report import figures as F
    from gradprobe.report.select import grad_every_step

    run = open_run(run_or_path)
    path = P.check_out(out, "report.html")
    started = time.perf_counter()
    if diagnosis is None:
        diagnosis = P.auto_diagnose(run)
    info = layer_info(run)
    kinds = set(run.meta.get("config", {}).get("kinds", REPORT_KINDS))
    scalars = run.scalars(kinds=[k for k in REPORT_KINDS if k in kinds])
    by_kind = {k: scalars[scalars["kind"] == k] for k in REPORT_KINDS}  # split once
    del scalars
    grad_steps = grad_every_step(run, by_kind["grad"])  # every step where the run has it
    hist = run.histograms()
    losses = run.losses()
    tframe = time_frame(run)

    def fig(sec_id: str, title: str, plot: Any, intro: str, missing: str) -> str:
        content = P.figure_block(plot, sec_id, title, intro) if plot is not None \
            else P.empty(missing)
        plot_close(plot)
        return P.section(sec_id, title, content)

    no_grad = "No parameter gradients recorded (kinds without 'grad')."
    sections = [
        ("grad-rms", "Gradient RMS per layer",
         F.grad_rms(grad_steps, info),
         "Each line is one layer's parameter-gradient RMS; darker lines are nearer the input. "
         "Lines spread apart by decades when gradients vanish or explode with depth.", no_grad),
        ("grad-heatmap", "Gradient heat map",
         F.grad_heatmap(grad_steps, info),
         "The same values as a layer x step image on a log colour scale.", no_grad),
        ("act-grad-profile", "Activation gradients across depth",
         F.act_grad_profile(by_kind["act_grad"], info), "",
         "No activation gradients recorded (kinds without 'act_grad')."),
        ("weights", "Weights per layer",
         F.weight_stats(by_kind["weight"], info),
         "Mean and standard deviation of each layer's parameters (weights and biases together).",
         "No weight statistics recorded (kinds without 'weight')."),
        ("act-hist", "Activation histograms",
         F.act_histograms(hist, info), "",
         "This run has no histograms: record them with gp.Probe(..., hist_every=N)."),
        ("dead-saturated", "Dead and saturated units",
         F.dead_saturated(by_kind["act"], info),
         "Dead: ReLU-like units inactive on every example of the batch. Saturated: outputs in "
         "the flat region of a sigmoid-like activation, where its derivative is near zero.",
         "No activation module with a dead-unit or saturation rule was recorded."),
        ("loss", "Loss", F.loss_curve(losses), "",
         "No loss recorded: call probe.observe_loss(loss) in the training loop."),
    ]
    body = [P.section("diagnosis", "Diagnosis", P.diagnosis_html(diagnosis))]
    body += [fig(*s) for s in sections]
    nav = [("diagnosis", "Diagnosis")] + [(s[0], s[1]) for s in sections]
    time_plot = F.time_grads(tframe, info) if tframe is not None else None
    if time_plot is not None:
        body.append(fig("time-grads", "Gradients through time (recurrent layers)", time_plot,
                        "Norm of the loss gradient with respect to each time step's input to "
                        "the recurrent layer: it carries the gradient back through time, so its "
                        "decay towards early steps is the vanishing gradient through time.", ""))
        nav.append(("time-grads", "Through time"))
    body.append(P.section("layers", "Layers", _layer_table(run, info.order)))
    elapsed = time.perf_counter() - started
    body.append(f'<p class="muted">Drawn in {elapsed:.1f} s from {P.esc(run.path)}.</p>')
    heading = title or f"gradprobe report: {Path(run.path).name}"
    return P.write_atomic(path, P.page(heading, _header(run, heading), nav, "\n".join(body)))


def plot_close(plot: Any) -> None:
    """Drop the figure's canvas references (figures are not pyplot-managed; this frees them)."""
    if plot is not None:
        plot.figure.clear()


__all__ = ["layer_info", "open_run", "report", "time_frame"]
