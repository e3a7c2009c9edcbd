"""The host-side frames of one flush: the Parquet tables of losses, histograms and scalars.

:class:`HostFlush` is what the training thread copied to the host (raw sufficient statistics,
laid out by :mod:`gradprobe.stats.schema`); :class:`Frames` turns it into the tables of the run
directory on the writer thread. No torch here: numpy and the schema; the tables are handed to
the writer as columns (numpy and pyarrow arrays), not DataFrames: pandas took half of the
writer thread's time on small flushes, and that thread shares the interpreter lock with
training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gradprobe.stats import schema as S
from gradprobe.store.writer import RunWriter

Columns = dict[str, Any]
"""A table as its columns: name to a numpy or pyarrow array, all of one length."""


def strings(names: list[str], codes: np.ndarray) -> pa.Array:
    """A string column from the index of each row's string in ``names`` (a C gather, where a
    Python list of strings costs a Python object per row)."""
    return pc.take(pa.array(names, type=pa.string()), pa.array(codes, type=pa.int64()))


@dataclass
class AlwaysFlush:
    """The always-on tier's rows of one flush (:mod:`gradprobe.capture.always`), one per step:
    ``values[i]`` = per layer the sum of its outputs (non-finite iff an output was), per
    tracked parameter its gradient's norm, then the loss sum and the AMP scale."""

    steps: np.ndarray
    full: np.ndarray
    """Whether each step was a full-tier step."""
    skipped: np.ndarray
    values: np.ndarray
    """``[n, L + P + 2]``."""
    layer_ids: list[int]
    param_layer: np.ndarray
    """Index (into ``layer_ids``) of each tracked parameter's layer."""
    has_loss: np.ndarray
    has_scale: bool

    def frames(self, act_bad: np.ndarray | None = None) -> tuple[Columns, Columns]:
        """The columns of the ``steps`` table (one row per step: ``step, tier, loss_nonfinite,
        scale, skipped``) and the ``norms`` table (one row per step and layer: ``step,
        layer_id, grad_norm, grad_nonfinite, act_nonfinite``; a layer's norm is that of all
        its parameters' gradients together, ``sqrt(Σ_p ‖g_p‖²)``). ``act_bad`` (``[n, L]``)
        marks outputs found non-finite by the full tier, whose steps have no always-on sum
        of the outputs the full tier recorded."""
        n, n_layers, n_params = len(self.steps), len(self.layer_ids), len(self.param_layer)
        v = self.values.reshape(n, n_layers + n_params + 2)
        loss = v[:, n_layers + n_params]
        steps = {
            "step": self.steps.astype(np.int64),
            "tier": strings(["always", "full"], self.full.astype(np.int64)),
            "loss_nonfinite": self.has_loss & ~np.isfinite(loss),
            "scale": v[:, -1] if self.has_scale else np.full(n, np.nan),
            "skipped": self.skipped.astype(bool),
        }
        g = v[:, n_layers : n_layers + n_params].astype(np.float64)
        sq = np.zeros((n, n_layers))
        np.add.at(sq.T, self.param_layer, (g * g).T)
        with_grad = np.zeros(n_layers, dtype=bool)
        with_grad[self.param_layer] = True
        norm = np.where(with_grad, np.sqrt(sq), np.nan)
        norms = {
            "step": np.repeat(self.steps.astype(np.int64), n_layers),
            "layer_id": np.tile(np.asarray(self.layer_ids, dtype=np.int64), n),
            "grad_norm": norm.reshape(-1),
            "grad_nonfinite": (with_grad & ~np.isfinite(sq)).reshape(-1),
            "act_nonfinite": (~np.isfinite(v[:, :n_layers]) | (False if act_bad is None
                                                                else act_bad)).reshape(-1),
        }
        return steps, norms


@dataclass
class HostFlush:
    """One flush on the host, as :meth:`Recorder.take` hands it to :meth:`Recorder.write`:
    arrays indexed by slot (``n`` recorded steps), owned by this object."""

    index: int
    """Part number of this flush (``part-{index:05d}.parquet``)."""
    steps: np.ndarray
    skipped: np.ndarray
    counts: np.ndarray
    """``[n, R]`` elements summarised per record."""
    units: np.ndarray
    touched: np.ndarray
    """``[n, R]`` records written in each step (others are not stored)."""
    stats: np.ndarray
    """``[n, R, N_STATS]`` raw sufficient statistics."""
    scale: np.ndarray
    loss_steps: np.ndarray
    losses: np.ndarray
    """Loss sums over the micro-batches of each of ``loss_steps``."""
    loss_count: np.ndarray
    hist_keys: list[tuple[int, int]]
    """``(slot, row)`` of each histogram, one row of :attr:`hist` each."""
    hist: np.ndarray
    """``[len(hist_keys), 2·bins + 2]``: bin edges, counts, non-finite count."""
    events: list[dict[str, Any]]
    """Non-finite events found in slots not checked before (already in ``events.jsonl``)."""
    nonfinite: bool
    """Whether a step the AMP scaler did not skip holds a NaN/Inf (checked or not)."""
    time_keys: list[tuple[int, int, str]] = field(default_factory=list)
    """``(slot, layer_id, wrt)`` of each per-time-step gradient profile of a recurrent layer."""
    time_lens: list[int] = field(default_factory=list)
    """Number of time steps of each profile; the profiles lie one after the other in :attr:`time`."""
    time: np.ndarray = field(default_factory=lambda: np.zeros(0))
    """``Σ grad²`` per time step of every profile, concatenated."""
    always: AlwaysFlush | None = None
    """The always-on tier's rows of every step of the flush (``None``: not recorded)."""

    @property
    def what(self) -> str:
        """Names the flush in error messages."""
        steps = self.steps if len(self.steps) else self.loss_steps
        if not len(steps) and self.always is not None:
            steps = self.always.steps
        return f"flush {self.index} (steps {int(steps[0])}-{int(steps[-1])})"


class Frames:
    """Builds the frames of a flush for a fixed table of records: per record its layer id,
    kind, and whether it has a saturation and a dead-unit rule."""

    def __init__(self, layer_ids: list[int], kinds: list[str], saturation: list[bool],
                 dead: list[bool], hist_bins: int) -> None:
        self.layer_ids = layer_ids
        self.kind_col = kinds
        self._layer_id = np.asarray(layer_ids, dtype=np.int64)
        self._kind_names = sorted(set(kinds))
        self._kind_code = np.array([self._kind_names.index(k) for k in kinds], dtype=np.int64)
        self.hist_bins = hist_bins
        self._sat = np.array(saturation, dtype=bool)
        self._dead = np.array(dead, dtype=bool)
        self._ratio = np.array([k in S.RATIO_KINDS for k in kinds], dtype=bool)
        self._act_grad = np.array([k == "act_grad" for k in kinds], dtype=bool)
        self._act_rows = np.array([r for r, k in enumerate(kinds) if k == "act"], dtype=np.int64)

    def write(self, data: HostFlush, writer: RunWriter) -> None:
        """The host half of a flush: build the frames of ``data`` and write its parts (losses,
        histograms, then scalars, which commits the flush). Reads only ``data`` and the
        recorder's fixed row table, so it may run on another thread than :meth:`take`."""
        if len(data.loss_steps):
            losses = {
                "step": data.loss_steps,
                "loss": data.losses / np.maximum(data.loss_count, 1),
                "count": data.loss_count,
            }
            writer.write_part("losses", losses, data.index)
        if data.hist_keys:
            writer.write_part("hist", self._hist_columns(data), data.index)
        if data.time_keys:
            writer.write_part("time", self._time_columns(data), data.index)
        if data.always is not None:
            steps, norms = data.always.frames(self._act_bad(data))
            writer.write_part("norms", norms, data.index)
            writer.write_part("steps", steps, data.index)
        # The scalars part is written last: it commits the flush (readers ignore loss and
        # histogram parts whose scalars part is missing, e.g. after a SIGKILL in between).
        writer.write_part("scalars", self._scalar_columns(data), data.index)

    def _act_bad(self, data: HostFlush) -> np.ndarray | None:
        """``[n, L]`` of the always-on rows: the layers whose outputs the full tier found
        non-finite at its steps (the hooks leave those outputs' always-on sums to the full
        tier where it checks them on the host: :mod:`gradprobe.capture.forward`)."""
        a = data.always
        if a is None or not len(self._act_rows) or not len(data.steps) or not a.full.any():
            return None
        col_of = {lid: c for c, lid in enumerate(a.layer_ids)}
        pairs = [(r, col_of[self.layer_ids[r]]) for r in self._act_rows
                 if self.layer_ids[r] in col_of]
        # the slot of each full always-on step (the full tier's steps, in any order)
        order = np.argsort(data.steps, kind="stable")
        known = np.asarray(data.steps)[order]
        at = np.flatnonzero(a.full)
        pos = np.minimum(np.searchsorted(known, a.steps[at]), len(known) - 1)
        found_at = known[pos] == a.steps[at]
        at, slots = at[found_at], order[pos[found_at]]
        if not pairs or not len(at):
            return None
        rows, cols = (np.array(x, dtype=np.int64) for x in zip(*pairs))
        bad = np.zeros((len(a.steps), len(a.layer_ids)), dtype=bool)
        found = data.stats[slots[:, None], rows[None, :], S.NONFINITE] > 0  # [hit, pairs]
        found &= data.touched[slots[:, None], rows[None, :]]
        bad[at[:, None], cols[None, :]] = found
        return bad

    def _hist_columns(self, data: HostFlush) -> Columns:
        """One row per histogram: ``step, layer_id, kind, bin_edges, counts, nonfinite``
        (edges of activation gradients unscaled like their statistics)."""
        b = self.hist_bins
        slots = np.array([k[0] for k in data.hist_keys], dtype=np.int64)
        rows = np.array([k[1] for k in data.hist_keys], dtype=np.int64)
        h = np.asarray(data.hist, dtype=np.float64).reshape(len(rows), 2 * b + 2)
        edges = h[:, : b + 1] / np.where(self._act_grad[rows], data.scale[slots], 1.0)[:, None]
        counts = h[:, b + 1 : 2 * b + 1].astype(np.int64)

        def lists(values: np.ndarray) -> pa.Array:
            width = values.shape[1]
            offsets = pa.array(np.arange(len(values) + 1, dtype=np.int32) * width)
            return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1)))

        return {
            "step": data.steps[slots].astype(np.int64),
            "layer_id": self._layer_id[rows],
            "kind": strings(self._kind_names, self._kind_code[rows]),
            "bin_edges": lists(edges),
            "counts": lists(counts),
            "nonfinite": h[:, 2 * b + 1].astype(np.int64),
        }

    def _time_columns(self, data: HostFlush) -> Columns:
        """One row per (step, layer, wrt, t): ``sumsq`` = ``Σ grad²`` over the batch and
        features of time step ``t`` (gradients of an AMP-scaled loss unscaled)."""
        lens = np.asarray(data.time_lens, dtype=np.int64)
        slots = np.repeat([k[0] for k in data.time_keys], lens)
        scale = data.scale[slots] if len(slots) else np.ones(0)
        wrt = [k[2] for k in data.time_keys]
        names = sorted(set(wrt))
        return {
            "step": data.steps[slots].astype(np.int64),
            "layer_id": np.repeat([k[1] for k in data.time_keys], lens).astype(np.int64),
            "wrt": strings(names, np.repeat([names.index(w) for w in wrt], lens)),
            "t": np.concatenate([np.arange(n) for n in lens]).astype(np.int64),
            "sumsq": data.time[: int(lens.sum())] / (scale * scale),
        }

    def _scalar_columns(self, data: HostFlush) -> Columns:
        slot_idx, row_idx = np.nonzero(data.touched)
        st = data.stats[slot_idx, row_idx]  # [k, N_STATS]
        sc = data.scale[slot_idx]
        ag = self._act_grad[row_idx]
        # Activation gradients were taken from the scaled loss of an AMP GradScaler: unscale.
        div = np.where(ag, sc, 1.0)
        nan = math.nan
        return {
            "step": data.steps[slot_idx],
            "layer_id": self._layer_id[row_idx],
            "kind": strings(self._kind_names, self._kind_code[row_idx]),
            "count": data.counts[slot_idx, row_idx],
            "sum": st[:, S.SUM] / div,
            "sumsq": st[:, S.SUMSQ] / (div * div),
            "abs_sum": st[:, S.ABS_SUM] / div,
            "nonzero": st[:, S.NONZERO],
            "nonfinite": st[:, S.NONFINITE],
            "saturated": np.where(self._sat[row_idx], st[:, S.SATURATED], nan),
            "dead": np.where(self._dead[row_idx], st[:, S.DEAD], nan),
            "units": np.where(self._dead[row_idx], data.units[slot_idx, row_idx], 0.0),
            "ref_sumsq": np.where(self._ratio[row_idx], st[:, S.REF_SUMSQ], nan),
            "min": -st[:, S.NEG_MIN] / div,
            "max": st[:, S.MAX] / div,
            "skipped": data.skipped[slot_idx],
            "scale": sc,
        }


__all__ = ["AlwaysFlush", "Frames", "HostFlush"]
