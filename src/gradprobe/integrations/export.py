"""What the TensorBoard and W&B exporters share: which values of a run become which tags, and a
follower that turns the committed parts of a run directory into per-step records.

Tags (the same in TensorBoard and in W&B):

==================================  ===========================================================
tag                                 value
==================================  ===========================================================
``<kind>/<column>/<layer>``         a column of :meth:`gradprobe.Run.scalars`, e.g.
                                    ``grad/norm/encoder.0``, ``act/mean/2``, ``act/dead_frac/1``
``<kind>/ratio/<layer>``            kinds ``update``, ``drift``, ``spread``: their ratio (the
                                    ``norm`` column of the run, see :mod:`gradprobe.stats`)
``nonfinite/<kind>/<layer>``        how many NaN/Inf values that (step, layer, kind) held
``<kind>/hist/<layer>``             histogram: the run's stored bins, edges and counts as stored
``probe/loss``                      the mean of the losses observed in the step
``nonfinite/loss``                  1 where the step's loss was NaN/Inf, else 0
``events/nonfinite``                text: the step's non-finite event (first layer and pass)
``events/nonfinite_layers``         how many (layer, kind) records were non-finite that step
``probe/step``                      (W&B only) the step, the x axis of every tag above
==================================  ===========================================================

``<layer>`` is the layer's name in the run (the qualified module name; ``(model)`` for the
root). Only finite values are written: a moment made NaN by non-finite data (and a column that
does not apply, such as ``saturated_frac`` of a layer with no saturation rule) is left out, and
the ``nonfinite/...`` tag counts the non-finite values, at every recorded step (0 when there were
none). Histograms hold the finite values only (the stored bins count finite values; the stored
non-finite count is the ``nonfinite/...`` tag): nothing is re-binned, and NaN never reaches
TensorBoard's histogram code. The columns written per kind are :data:`DEFAULT_COLUMNS`;
``columns="all"`` writes every derived column.

The follower (:class:`Follower`) reads the run directory as the Probe writes it, so it needs no
change to the Probe: a flush is committed once its ``scalars`` part exists (the Probe writes a
flush's losses and histograms first, its ``scalars`` part last, each under a temporary name then
renamed, and appends the non-finite events of its steps before); each :meth:`Follower.poll` reads
the parts of the flushes committed since the last poll (only those: a poll costs the new steps,
not the whole run) and hands their steps, in order and each once, to a sink. A live view
therefore lags training by up to ``flush_every`` steps. A damaged part is skipped with a
:class:`~gradprobe.errors.RunDataWarning`, as :class:`gradprobe.Run` does.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import pandas as pd

from gradprobe.errors import ConfigError, RunDirError
from gradprobe.stats.schema import DERIVED_COLUMNS, KINDS, RATIO_KINDS, derive
from gradprobe.store import parts
from gradprobe.store.run import Run

DEFAULT_COLUMNS: dict[str, tuple[str, ...]] = {
    "grad": ("norm", "rms", "abs_max", "zero_frac"),
    "weight": ("norm", "rms", "abs_max"),
    "update": ("ratio",),
    "drift": ("ratio",),
    "spread": ("ratio",),
    "input": ("mean", "std", "abs_max"),
    "act": ("mean", "std", "abs_max", "zero_frac", "saturated_frac", "dead_frac"),
    "act_grad": ("rms", "abs_max"),
}
"""Columns written per kind by default: the ones the diagnosis reads."""

ALL_COLUMNS: dict[str, tuple[str, ...]] = {
    k: ("ratio",) if k in RATIO_KINDS
    else tuple(c for c in DERIVED_COLUMNS if c not in ("count", "nonfinite"))
    for k in KINDS
}
"""Every derived column (``nonfinite`` has its own tag, ``count`` never changes)."""

def columns_for(columns: Literal["default", "all"] | Mapping[str, Iterable[str]] | None,
                ) -> dict[str, tuple[str, ...]]:
    """The columns per kind: ``"default"`` (or None), ``"all"``, or a mapping ``kind -> columns``
    (kinds left out are not written). :class:`~gradprobe.ConfigError` names a bad kind or
    column."""
    if columns is None or columns == "default":
        return dict(DEFAULT_COLUMNS)
    if columns == "all":
        return dict(ALL_COLUMNS)
    if isinstance(columns, str) or not isinstance(columns, Mapping):
        raise ConfigError(f"columns must be 'default', 'all' or a mapping kind -> columns, "
                          f"got {columns!r}", hint="e.g. columns={'grad': ['norm', 'rms']}")
    out: dict[str, tuple[str, ...]] = {}
    for kind, cols in columns.items():
        if kind not in KINDS:
            raise ConfigError(f"unknown kind {kind!r} in columns", hint=f"choose from {list(KINDS)}")
        cols = (cols,) if isinstance(cols, str) else tuple(cols)
        bad = [c for c in cols if c not in ALL_COLUMNS[kind]]
        if bad:
            raise ConfigError(f"unknown columns {bad} for kind {kind!r}",
                              hint=f"choose from {list(ALL_COLUMNS[kind])}")
        out[kind] = cols
    return out


def layer_tag(name: Any) -> str:
    """``<layer>`` in a tag: the layer's name in the run."""
    return str(name)


@dataclass(frozen=True)
class Histogram:
    """One stored histogram: ``edges`` (B+1), ``counts`` (B, finite values only), and the sum
    and sum of squares of those values (exact from the run's sums where the record held no
    non-finite value, else estimated from the bin midpoints)."""

    edges: np.ndarray
    counts: np.ndarray
    sum: float
    sum_squares: float

    @property
    def num(self) -> int:
        return int(self.counts.sum())


@dataclass
class StepRecord:
    """Everything written for one step."""

    step: int
    scalars: dict[str, float] = field(default_factory=dict)
    histograms: dict[str, Histogram] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)


class Sink(Protocol):
    """Where records go (a TensorBoard writer, a W&B run)."""

    def write(self, record: StepRecord) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


def _scalar_rows(raw: pd.DataFrame, columns: dict[str, tuple[str, ...]],
                 out: dict[int, StepRecord]) -> None:
    raw = raw[raw["kind"].isin(list(columns))].reset_index(drop=True)
    if raw.empty:
        return
    derived = derive(raw)
    values = {c: derived[c].to_numpy(dtype=float).tolist() for c in DERIVED_COLUMNS}
    values["ratio"] = values["norm"]
    kinds = raw["kind"].astype(str).tolist()
    layers = [layer_tag(n) for n in raw["layer"].tolist()]
    for i, step in enumerate(raw["step"].to_numpy(dtype=np.int64).tolist()):
        rec = out.get(step) or out.setdefault(step, StepRecord(step))
        kind, layer = kinds[i], layers[i]
        rec.scalars[f"nonfinite/{kind}/{layer}"] = values["nonfinite"][i]
        for col in columns[kind]:
            v = values[col][i]
            if math.isfinite(v):
                rec.scalars[f"{kind}/{col}/{layer}"] = v


def _hist_rows(hist: pd.DataFrame, raw: pd.DataFrame, kinds: Iterable[str],
               out: dict[int, StepRecord]) -> None:
    hist = hist[hist["kind"].isin(list(kinds))]
    if hist.empty:
        return
    sums: dict[tuple[int, int, str], tuple[float, float]] = {}
    if not raw.empty:
        exact = raw[raw["nonfinite"] == 0]
        for s, lid, k, a, b in zip(*(exact[c].tolist() for c in
                                     ("step", "layer_id", "kind", "sum", "sumsq"))):
            sums[(int(s), int(lid), str(k))] = (float(a), float(b))
    for s, lid, name, kind, edges, counts in zip(*(hist[c].tolist() for c in (
            "step", "layer_id", "layer", "kind", "bin_edges", "counts"))):
        e = np.asarray(edges, dtype=float)
        c = np.asarray(counts, dtype=np.int64)
        if c.sum() == 0 or not np.isfinite(e).all():
            continue  # nothing finite to draw; the nonfinite/... tag counts the values
        key = (int(s), int(lid), str(kind))
        if key in sums:
            total, squares = sums[key]
        else:
            mid = (e[1:] + e[:-1]) / 2
            total, squares = float(c @ mid), float(c @ (mid * mid))
        rec = out.setdefault(int(s), StepRecord(int(s)))
        rec.histograms[f"{kind}/hist/{layer_tag(name)}"] = Histogram(e, c, total, squares)


def _loss_rows(losses: pd.DataFrame, out: dict[int, StepRecord]) -> None:
    for s, loss in zip(losses["step"], losses["loss"]):
        rec = out.setdefault(int(s), StepRecord(int(s)))
        finite = math.isfinite(float(loss))
        rec.scalars["nonfinite/loss"] = 0.0 if finite else 1.0
        if finite:
            rec.scalars["probe/loss"] = float(loss)


def describe_event(event: Mapping[str, Any]) -> str:
    """One line for a non-finite event of ``run.events()``."""
    text = (f"step {int(event['step'])}: first non-finite values in layer "
            f"'{layer_tag(event.get('layer'))}' ({event.get('pass')} pass, kind "
            f"{event.get('kind')}, {int(event.get('nonfinite', 0))} values); "
            f"{int(event.get('n_layers', 1))} (layer, kind) records non-finite")
    return text + (" (AMP step skipped)" if event.get("amp_skipped") else "")


def _event_rows(events: pd.DataFrame, out: dict[int, StepRecord]) -> None:
    for event in events.to_dict("records"):
        s = int(event["step"])
        rec = out.setdefault(s, StepRecord(s))
        line = describe_event(event)
        rec.texts["events/nonfinite"] = (rec.texts["events/nonfinite"] + "\n" + line
                                         if "events/nonfinite" in rec.texts else line)
        n = event.get("n_layers", 1)
        rec.scalars["events/nonfinite_layers"] = float(1 if pd.isna(n) else n)


def _between(frame: pd.DataFrame, after: int, upto: float) -> pd.DataFrame:
    if frame.empty or "step" not in frame:
        return frame
    steps = frame["step"].astype("int64")
    return frame[(steps > after) & (steps <= upto)]


def open_run(source: Any) -> Run:
    """A :class:`gradprobe.Run` from a Run, a path, or an object with a ``run_dir`` (a Probe)."""
    if isinstance(source, Run):
        return source
    path = getattr(source, "run_dir", source)
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigError(f"expected a run directory, a gp.Run or a gp.Probe, got "
                          f"{type(source).__name__}", hint="pass e.g. 'runs/demo' or the probe")
    if not Path(path).exists():
        raise RunDirError(f"run directory {str(path)!r} does not exist",
                          hint="pass the run_dir given to gp.Probe (see `gradprobe runs ls`)")
    return Run.open(Path(path))


def check_follow(source: Any, every_secs: float) -> None:
    """:class:`~gradprobe.ConfigError` for a ``source`` or ``every_secs`` a follower cannot use
    (checked before a sink is made)."""
    if isinstance(every_secs, bool) or not (isinstance(every_secs, (int, float))
                                            and every_secs > 0):
        raise ConfigError(f"every_secs must be a positive number, got {every_secs!r}",
                          hint="e.g. every_secs=10")
    if not isinstance(source, Run) and not isinstance(
            getattr(source, "run_dir", source), (str, os.PathLike)):
        open_run(source)  # raises the ConfigError naming the type


class Follower:
    """Reads a run directory as it is written and hands each new step to ``sink`` once, in
    order: call :meth:`poll`, or :meth:`start` a background thread that polls every
    ``every_secs``; :meth:`close` stops it, exports what is left and closes the sink.

    ``source`` is a run directory, a :class:`gradprobe.Run` or a :class:`gradprobe.Probe`; the
    run may not exist yet when the follower is made (it is opened at the first poll that finds
    it), but :meth:`close` raises :class:`~gradprobe.RunDirError` if it never appeared.
    """

    def __init__(self, source: Any, sink: Sink, *, every_secs: float = 30.0,
                 columns: Literal["default", "all"] | Mapping[str, Iterable[str]] | None = None,
                 ) -> None:
        check_follow(source, every_secs)
        self.source = source
        self.sink = sink
        self.every_secs = float(every_secs)
        self.columns = columns_for(columns)
        self.last_step = -1
        """The last step handed to the sink (-1: none yet)."""
        self._flush = -1  # the last flush (scalars part number) read
        self._run: Run | None = source if isinstance(source, Run) else None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._closed = False

    def _open(self) -> Run | None:
        if self._run is None:
            try:
                self._run = open_run(self.source)
            except RunDirError:
                return None  # not written yet
        return self._run

    def _flushes(self, run: Run) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
        """``(raw scalars, histograms, losses)`` of the flushes committed since the last call
        (a flush is committed once its ``scalars`` part exists: it is written last)."""
        last = max((i for p in parts.part_files(run.path, "scalars")
                    if (i := parts.part_index(p)) is not None), default=-1)
        if last <= self._flush:
            empty = pd.DataFrame()
            return empty, empty, empty
        span, self._flush = (self._flush, last), last
        names = {int(r["layer_id"]): r["name"] for r in run.meta.get("layers", [])}
        damage: list[parts.Damage] = []
        frames = []
        for kind in ("scalars", "hist", "losses"):
            frame, bad = parts.read_parts_checked(run.path, kind, flushes=span)
            damage += bad
            if "layer_id" in frame:
                frame["layer"] = frame["layer_id"].map(names)
            frames.append(frame)
        parts.warn_damage(run.path, damage, stacklevel=5)
        return frames[0], frames[1], frames[2]

    def records(self, *, final: bool = False) -> list[StepRecord]:
        """The records of the flushes committed since the last call, in step order, with the
        non-finite events of their steps (with ``final=True``: every event not yet written)."""
        run = self._open()
        if run is None:
            return []
        raw, hist, losses = self._flushes(run)
        out: dict[int, StepRecord] = {}
        if not raw.empty:
            _scalar_rows(raw, self.columns, out)
        if not losses.empty:
            _loss_rows(losses.sort_values("step"), out)
        if not hist.empty:
            _hist_rows(hist, raw, self.columns, out)
        upto = math.inf if final else max(out, default=self.last_step)
        _event_rows(_between(run.events(), self.last_step, upto), out)
        if out:
            self.last_step = max(self.last_step, *out)
        return [out[s] for s in sorted(out)]

    def poll(self, *, final: bool = False) -> int:
        """Write the new committed steps to the sink; returns how many steps were written."""
        with self._lock:
            recs = self.records(final=final)
            for rec in recs:
                self.sink.write(rec)
            if recs:
                self.sink.flush()
            return len(recs)

    def _loop(self) -> None:
        while not self._stop.wait(self.every_secs):
            try:
                self.poll()
            except BaseException as exc:  # surfaced by close(); the thread stops
                self._error = exc
                return

    def start(self) -> Follower:
        """Poll from a daemon thread every ``every_secs`` until :meth:`close`."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="gradprobe-follower",
                                            daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop the thread, write every step on disk, close the sink. Call it after the Probe
        detached to export the last flush; an error of the thread is raised here."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            if self._error is not None:
                raise self._error
            self.poll(final=True)
            if self._run is None:
                path = getattr(self.source, "run_dir", self.source)
                raise RunDirError(f"no run appeared in {str(path)!r}: nothing was exported",
                                  hint="attach a gp.Probe with run_dir= that directory")
        finally:
            self.sink.close()

    def __enter__(self) -> Follower:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def export(source: Any, sink: Sink, *,
           columns: Literal["default", "all"] | Mapping[str, Iterable[str]] | None = None,
           ) -> int:
    """Write every step of a run to ``sink`` and close it; returns the number of steps."""
    run = open_run(source)
    follower = Follower(run, sink, columns=columns)
    try:
        n = follower.poll(final=True)
    finally:
        sink.close()
    return n


__all__ = ["ALL_COLUMNS", "DEFAULT_COLUMNS", "Follower", "Histogram", "Sink", "StepRecord",
           "check_follow", "columns_for", "describe_event", "export", "layer_tag", "open_run"]
