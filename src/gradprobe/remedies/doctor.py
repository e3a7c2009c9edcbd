"""The doctor: diagnose a training run, try the remedies the findings name, re-run, rank.

::

    def make():                          # a fresh model and optimizer (the doctor seeds torch first)
        model = build(); return model, torch.optim.SGD(model.parameters(), lr=0.1)
    def train(model, optimizer, probe):  # the user's loop; returns the final validation loss or None
        ...
    cure = gp.doctor(make, train, out="runs/doctor")
    print(cure)                          # the table; cure.best is the remedy that helped most

Procedure
    1. *Baseline*: seed, ``make()``, seed again, ``train`` under a :class:`~gradprobe.Probe`
       writing ``out/baseline``; diagnose that run. A healthy baseline (no warning or error)
       ends here: "nothing to cure", nothing is tried.
    2. *Candidates*: the remedies the warning/error findings name, in order of severity and then
       of the diagnosis (a finding's remedies best first), deduplicated by ``(name, kwargs)``,
       at most ``max_remedies``. Only those: the doctor never tries a remedy no finding named.
       Remedies that are not gradprobe remedies (``"setting"``) or need ``data`` that was not
       given are listed as skipped, with the reason.
    3. *Treatment*, per candidate: seed, ``make()``, apply the remedy (model remedies get
       ``optimizer=`` when they accept it, so added parameters are trained; a remedy that returns
       a new module, e.g. an fx rewrite, replaces the model), seed again, ``train`` with the same
       budget under its own Probe (``out/NN-name``), diagnose. An exception while applying or
       training is recorded in the entry, not raised.
    4. *Ranking*: remedies that clear more of the baseline's pathologies (warning/error rules
       gone, minus new ones) first, then lower final loss. ``best`` is the first entry that
       improved on the baseline (fewer pathologies, or as many and a lower loss), else None.

The final loss is what ``train`` returned, else the mean of the last 10 % of the losses given to
``probe.observe_loss``. The gradient depth profile is each layer's median RMS of the
activation gradient ``∂L/∂a`` (kind ``act_grad``) over the run, in forward order; ``depth_ratio``
is first layer / last layer (≪ 1: vanishing towards the input, ≫ 1: exploding; Glorot & Bengio
2010 follow the same quantity across layers).

Note:
    With ``workers > 1`` candidates run in a pool of ``spawn``-ed processes, so ``make``,
    ``train``, ``data`` and an injected ``diagnose`` must be picklable: module-level functions
    of an importable module (not lambdas or functions defined in ``__main__`` of an interactive
    session). Each worker uses one torch thread.
    The Probe is attached after the remedy, so with ``clip_gradients_`` it records the clipped
    gradients; activation gradients are recorded in the backward pass, before any clipping.
"""

from __future__ import annotations

import inspect
import json
import pickle
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gradprobe.capture.probe import Probe
from gradprobe.diagnose.finding import Diagnosis, Finding, Remedy
from gradprobe.errors import ConfigError
from gradprobe.remedies.doctor_report import DoctorEntry, DoctorReport, rank
from gradprobe.store.run import Run

Make = Callable[[], tuple[nn.Module, torch.optim.Optimizer]]
Train = Callable[[nn.Module, torch.optim.Optimizer, Probe], Any]
Diagnose = Callable[[Run], Any]

DATA_NEEDS: dict[str, str] = {"standardize_inputs_": "x", "pretrain_": "data"}
"""Remedies that need data, and the keyword it is passed as (``x``: a batch of inputs)."""


HIST_EVERY = 10
"""The doctor's default ``hist_every``: every 10th step also records histograms and, for
recurrent layers, the gradient at every time step (vanishing or exploding through time)."""

def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 -- the user's code may draw from the legacy global RNG
    torch.manual_seed(seed)


def _make(make: Make, seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    _seed(seed)
    made = make()
    if (not isinstance(made, tuple) or len(made) != 2 or not isinstance(made[0], nn.Module)
            or not isinstance(made[1], torch.optim.Optimizer)):
        got = (f"a tuple of ({', '.join(type(m).__name__ for m in made)})"
               if isinstance(made, tuple) else type(made).__name__)
        raise ConfigError(f"make() must return (model, optimizer), got {got}",
                          hint="end make() with `return model, torch.optim.SGD(model.parameters(), lr=...)`")
    return made


def _real_diagnose(run: Run) -> Any:
    from gradprobe.diagnose.api import diagnose

    return diagnose(run)


def _findings(diagnosis: Any) -> tuple[Finding, ...]:
    """The findings as plain records (remedy kwargs as dicts, so they pickle)."""
    out = []
    for f in diagnosis:
        rems = tuple(replace(r, kwargs=dict(r.kwargs)) for r in f.remedies)
        out.append(replace(f, remedies=rems))
    return tuple(out)


def _final_loss(value: Any, run: Run) -> float | None:
    if value is not None:
        try:
            return float(value)  # end of training: one host read
        except (TypeError, ValueError) as err:
            raise ConfigError(f"train() must return the final loss (a number) or None, got "
                              f"{type(value).__name__}") from err
    losses = run.losses()["loss"].to_numpy()
    if len(losses) == 0:
        return None
    return float(np.mean(losses[-max(1, len(losses) // 10):]))


def depth_profile(run: Run) -> tuple[tuple[str, float], ...]:
    """``(layer, median act_grad RMS over the run)`` per layer, in forward (depth) order."""
    df = run.scalars(kinds="act_grad")
    if df.empty:
        return ()
    med = df.groupby("layer", sort=False)["rms"].median()  # scalars() is sorted by step, depth
    return tuple((str(k), float(v)) for k, v in med.items())


def _inputs(data: Any) -> Any:
    """A batch of inputs from ``data``: the tensor itself, ``data[0]``, or a loader's first batch."""
    if isinstance(data, torch.Tensor):
        return data
    if isinstance(data, (tuple, list)):
        return data[0]
    batch = next(iter(data))
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def label(remedy: Remedy) -> str:
    """``init_(scheme='xavier_uniform')``: the remedy as a call, without its target."""
    args = ", ".join(f"{k}={v!r}" for k, v in remedy.kwargs.items())
    return f"{remedy.name}({args})"


def _apply(remedy: Remedy, model: nn.Module, opt: torch.optim.Optimizer, data: Any
           ) -> tuple[nn.Module, Any]:
    import gradprobe.remedies as remedies
    from gradprobe.remedies import TARGETS

    fn = getattr(remedies, remedy.name, None)
    if fn is None:
        raise ConfigError(f"gradprobe.remedies has no {remedy.name} in this installation")
    kwargs = dict(remedy.kwargs)
    if TARGETS[remedy.name] == "optimizer":
        return model, fn(opt, **kwargs)
    params = inspect.signature(fn).parameters
    if "optimizer" in params and "optimizer" not in kwargs:
        kwargs["optimizer"] = opt
    need = DATA_NEEDS.get(remedy.name)
    if need is not None and need not in kwargs:
        kwargs[need] = _inputs(data) if need == "x" else data
    record = fn(model, **kwargs)
    if isinstance(record, nn.Module):  # the remedy built a new module (fx): train that one
        return record, record
    new = getattr(record, "model", None)
    return (new if isinstance(new, nn.Module) else model), record


@dataclass(frozen=True)
class _Task:
    make: Make
    train: Train
    remedy: Remedy | None
    run_dir: Path
    seed: int
    probe_kwargs: dict[str, Any]
    data: Any
    diagnose: Diagnose | None
    before: tuple[Finding, ...] = ()
    loss_before: float | None = None
    in_worker: bool = False


def _treat(task: _Task) -> DoctorEntry:
    """Apply ``task.remedy`` (None: the baseline) to a fresh model, train, diagnose."""
    name = "baseline" if task.remedy is None else label(task.remedy)
    start = time.perf_counter()
    record: Any = None
    stage = "make"
    try:
        model, opt = _make(task.make, task.seed)
        if task.remedy is not None:
            stage = "apply"
            model, record = _apply(task.remedy, model, opt, task.data)
        stage = "train"
        _seed(task.seed)
        with Probe(model, opt, run_dir=task.run_dir, overwrite=True, **task.probe_kwargs) as probe:
            value = task.train(model, opt, probe)
        run = Run.open(task.run_dir)
        stage = "diagnose"
        findings = _findings((task.diagnose or _real_diagnose)(run))
        loss = _final_loss(value, run)
        profile = depth_profile(run)
        error = None
    except Exception as exc:
        if task.remedy is None:
            raise
        findings, loss, profile = (), None, ()
        error = f"{stage}: {type(exc).__name__}: {exc}".splitlines()[0]
    if task.in_worker and record is not None:
        try:
            pickle.dumps(record)
        except Exception:  # e.g. a record holding the model: send its description instead
            record = str(record)
    if isinstance(record, nn.Module):
        record = f"new model {type(record).__name__}"
    return DoctorEntry(
        label=name, remedy=task.remedy, record=record, findings_before=task.before,
        findings=findings, loss_before=task.loss_before, final_loss=loss, depth_profile=profile,
        run_dir=task.run_dir, error=error, seconds=time.perf_counter() - start,
    )


def _init_worker() -> None:
    torch.set_num_threads(1)


def candidates(diagnosis: Sequence[Finding], *, allowed: Sequence[str] | None = None
               ) -> tuple[list[Remedy], list[tuple[Remedy, str]]]:
    """The remedies to try, in order, and those named but not applicable (with the reason)."""
    from gradprobe.remedies import TARGETS

    order = {"error": 0, "warning": 1, "info": 2}
    ranked = sorted(enumerate(diagnosis), key=lambda p: (order.get(p[1].severity, 3), p[0]))
    seen: set[tuple[str, str]] = set()
    chosen: list[Remedy] = []
    skipped: list[tuple[Remedy, str]] = []
    for _, finding in ranked:
        if finding.severity == "info":
            continue
        for r in finding.remedies:
            key = (r.name, json.dumps(dict(r.kwargs), sort_keys=True, default=repr))
            if key in seen:
                continue
            seen.add(key)
            r = replace(r, kwargs=dict(r.kwargs))
            if r.name not in TARGETS:
                skipped.append((r, f"not a gradprobe remedy ({finding.rule}): {r.code or r.why}"))
            elif allowed is not None and r.name not in allowed:
                skipped.append((r, "left out by remedies="))
            else:
                chosen.append(r)
    return chosen, skipped


def _slug(i: int, remedy: Remedy) -> str:
    """``NN-name-key-value...``: the run directory of candidate ``i``. ``+`` is kept, so an
    exponent keeps its sign (``max_norm=1.5e+19`` must not read ``1.5e-19``)."""
    text = "-".join([remedy.name.rstrip("_"), *(f"{k}-{v}" for k, v in remedy.kwargs.items())])
    return f"{i:02d}-" + re.sub(r"[^A-Za-z0-9.+]+", "-", text).strip("-")[:60]


def doctor(
    make: Make,
    train: Train,
    *,
    out: str | Path = "runs/doctor",
    remedies: Sequence[str] | None = None,
    max_remedies: int = 6,
    workers: int = 1,
    probe_kwargs: dict[str, Any] | None = None,
    data: Any = None,
    seed: int = 0,
    diagnose: Diagnose | None = None,
) -> DoctorReport:
    """Diagnose ``train``'s run of ``make()``'s model, try the named remedies, rank them.

    Args:
        make: ``make() -> (model, optimizer)``, a fresh pair on each call (seeded by the doctor).
        train: ``train(model, optimizer, probe)`` runs the user's loop (calling
            ``probe.observe_loss(loss)`` is recommended) and returns the final validation loss or
            None. The same budget for every run: the doctor does not change it.
        out: directory for the runs (``out/baseline``, ``out/01-init-...``) and ``doctor.json``;
            the doctor overwrites its own runs there.
        remedies: remedy names to restrict the candidates to (e.g. ``["init_", "clip_gradients_"]``);
            None: every remedy the findings name.
        max_remedies: the most candidates to try.
        workers: processes for the candidates (1: in this process). See the Note on pickling.
        probe_kwargs: extra :class:`~gradprobe.Probe` arguments (``every=``, ``kinds=``, ...);
            ``hist_every`` defaults to :data:`HIST_EVERY`, so histograms and the gradients
            through time of recurrent layers (which the diagnosis of RNNs needs) are recorded,
            and ``budget`` to ``None``: every step in full, so each run's diagnosis reads the
            same steps whatever the machine's load (a budgeted schedule follows the Probe's
            measured cost, and its sparser full steps changed two of the 13 doctor-suite
            verdicts); pass ``budget=0.05`` to record as the Probe's default does.
        data: sample data for remedies that need it: ``standardize_inputs_`` gets a batch of
            inputs (``data`` if a tensor, else ``data[0]``, else a loader's first batch);
            ``pretrain_`` gets ``data`` as given. Without it those remedies are skipped.
        seed: seed of python, numpy and torch before each ``make()`` and each ``train``.
        diagnose: the diagnosis function (default :func:`gradprobe.diagnose.diagnose`).

    Returns:
        :class:`DoctorReport` (``print`` it for the table; ``.best``, ``.to_dict()``, ``.html()``).

    Raises:
        ConfigError: bad arguments, ``make()`` returning something else than
            ``(model, optimizer)``; errors of the *baseline* run propagate (nothing to compare).
    """
    if not callable(make) or not callable(train):
        raise ConfigError("doctor needs make() and train(model, optimizer, probe) functions")
    for name, value in (("max_remedies", max_remedies), ("workers", workers)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    kwargs = {"hist_every": HIST_EVERY, "budget": None, **(probe_kwargs or {})}
    if {"run_dir", "overwrite"} & set(kwargs):
        raise ConfigError("probe_kwargs must not set run_dir or overwrite: the doctor chooses them",
                          hint="pass out= for the directory")
    if remedies is not None:
        from gradprobe.remedies import TARGETS

        remedies = [remedies] if isinstance(remedies, str) else list(remedies)
        unknown = [r for r in remedies if r not in TARGETS]
        if unknown:
            raise ConfigError(f"unknown remedies {unknown}", hint=f"choose from {sorted(TARGETS)}")
    out = Path(out)
    start = time.perf_counter()
    base = _treat(_Task(make, train, None, out / "baseline", seed, kwargs, data, diagnose))
    base = replace(base, findings_before=base.findings, loss_before=base.final_loss)
    diag = Diagnosis(list(base.findings))
    tried: list[Remedy] = []
    skipped: list[tuple[Remedy, str]] = []
    if not diag.healthy:
        chosen, skipped = candidates(base.findings, allowed=remedies)
        for r in chosen:
            if r.name in DATA_NEEDS and DATA_NEEDS[r.name] not in r.kwargs and data is None:
                skipped.append((r, f"needs data (pass data= to doctor for {r.name})"))
            elif len(tried) < max_remedies:
                tried.append(r)
            else:
                skipped.append((r, f"beyond max_remedies={max_remedies}"))
    tasks = [_Task(make, train, r, out / _slug(i, r), seed, kwargs, data, diagnose,
                   base.findings, base.final_loss, workers > 1) for i, r in enumerate(tried, 1)]
    if workers > 1 and len(tasks) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(workers, len(tasks)), mp_context=ctx,
                                 initializer=_init_worker) as pool:
            entries = list(pool.map(_treat, tasks))
    else:
        entries = [_treat(replace(t, in_worker=False)) for t in tasks]
    report = DoctorReport(
        baseline=base, entries=rank(entries), skipped=tuple(skipped), out=out,
        healthy=diag.healthy, seconds=time.perf_counter() - start,
    )
    (out / "doctor.json").write_text(json.dumps(report.to_dict(), indent=2, default=str))
    return report


__all__ = ["DATA_NEEDS", "HIST_EVERY", "DoctorEntry", "DoctorReport", "candidates", "depth_profile", "doctor",
           "label"]
