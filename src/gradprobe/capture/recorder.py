"""The device ring buffer of per-step statistics and its flush to the run directory.

Memory (bytes), fixed when the Probe attaches and never grown::

    stats   flush_every × R × 10 × 8          R = number of (layer, kind) records
    scale   flush_every × 8                   AMP loss scale of each recorded step
    loss    flush_every × every × 8           loss sums of every step between flushes
    hist    H × R_h × (2·bins + 2) × 8        H = histogram steps per flush, R_h = their records
    stage   ≤ _stage.MAX_ELEMS elements       small tensors of the staged steps (allocated at the
                                              first step; see :mod:`gradprobe.capture.stage`)

A flush copies everything to the host in **one** transfer (``torch.cat`` of the used slices,
then ``.cpu()``) on the training thread (:meth:`Recorder.take`), derives nothing, and hands the
raw sums to the run's writer thread, which builds the frames and writes the parts
(:meth:`Recorder.write`). Host memory: at most three host copies of the used buffer (one being
written, one waiting, one being handed over; see :data:`gradprobe.store.writer.MAX_PENDING`), each with
its ``flush_every × R × 17`` bytes of counts, units and touched flags.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gradprobe.capture.events import full_event
from gradprobe.capture.losses import LossBuffer, to_device
from gradprobe.capture.stage import Stage
from gradprobe.capture.staged import StagedSteps
from gradprobe.capture.summariser import Summariser
from gradprobe.capture.transfer import DeviceCopy, TakenFlush
from gradprobe.stats import batched as B
from gradprobe.stats import eager as E
from gradprobe.stats import schema as S
from gradprobe.store.frames import Frames, HostFlush
from gradprobe.store.writer import RunWriter

PENDING_LIMIT = 1 << 22
"""Elements of small tensors queued at most before they are summarised (32 MiB of float64)."""
Rule = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class RowInfo:
    """One (layer, kind) record of the buffer."""

    layer_id: int
    layer: str
    kind: str
    saturation_rule: bool
    dead_rule: bool


class Recorder:
    """Ring buffer of ``capacity`` recorded steps × ``len(rows)`` records on ``device``."""

    def __init__(self, rows: list[RowInfo], *, capacity: int, loss_capacity: int,
                 device: torch.device, writer: RunWriter, hist_bins: int) -> None:
        self.rows = rows
        self.capacity = capacity
        self.device = device
        self.writer = writer
        self.hist_bins = hist_bins
        self.summary = Summariser()
        r = len(rows)
        self._identity = E.empty_stats(r, device)
        self.buf = E.empty_stats(capacity * r, device).view(capacity, r, S.N_STATS)
        self._clean_from = 0  # slots from here on hold the identity and zero counts
        self.scale = torch.ones(capacity, dtype=torch.float64, device=device)
        self.counts = np.zeros((capacity, r))
        self.units = np.zeros((capacity, r))
        self.touched = np.zeros((capacity, r), dtype=bool)
        self.seq = np.zeros((capacity, r), dtype=np.int64)
        self.steps: list[int] = []
        self.skipped: list[bool] = []
        self.checked: list[bool] = []
        self.seq_counter = 0
        self.losses = LossBuffer(loss_capacity, device)
        # (slot, row) -> [edges, counts, nonfinite]
        self.hist: dict[tuple[int, int], list[Tensor]] = {}
        # (slot, layer_id, wrt) -> Σ over the other dimensions of grad² per time step [T]
        self.time: dict[tuple[int, int, str], Tensor] = {}
        self._unit_masks: dict[tuple[int, int], Tensor] = {}
        # small tensors waiting to be summarised together: (slot, row, tensor, saturation rule,
        # inactive rule)
        self._pending: list[tuple[int, int, Tensor, Rule | None, Rule | None]] = []
        self._pending_numel = 0
        self._vectors: list[tuple[int, int, Tensor]] = []
        # statistics matrices waiting to be merged into the buffer: (slot, rows, [k, N_STATS])
        self._mats: list[tuple[int, Tensor, Tensor]] = []
        self._unit_segments: dict[tuple[Any, ...], Tensor] = {}
        self.frames = Frames([r.layer_id for r in rows], [r.kind for r in rows],
                             [r.saturation_rule for r in rows], [r.dead_rule for r in rows],
                             hist_bins)
        self.immediate = False  # the open step has statistics outside the stage
        self.event_extra: dict[str, Any] = {}  # fields added to every non-finite event
        self.async_copy = False  # take(): copy to the host asynchronously (CUDA)
        # Under torch.distributed the finished steps' unit masks are kept until the flush, to be
        # ANDed across ranks (gradprobe.capture.distributed) instead of counted here.
        self.kept_units: list[tuple[int, int, Tensor]] | None = None
        # small tensors of the stage's device and dtype, summarised many steps at once
        self.staged = StagedSteps(self)

    @property
    def stage(self) -> Stage | None:
        """The stage's buffer and plans (``None`` until the Probe hands it parameters)."""
        return self.staged.stage

    @property
    def nbytes(self) -> int:
        return int(self.buf.numel() * 8 + self.scale.numel() * 8 + self.losses.sum.numel() * 8)

    # ------------------------------------------------------------------ writing into a slot

    def begin(self, step: int) -> int:
        """Start a recorded step; returns its slot (the caller flushes before it is full)."""
        slot = len(self.steps)
        if slot < self._clean_from:  # slots from _clean_from on are untouched since a reset
            if slot == 0:  # the first step after a flush: reset every slot at once
                self.buf.copy_(self._identity.expand_as(self.buf))
                self.scale.fill_(1.0)
                self.counts[:] = 0.0
                self.units[:] = 0.0
                self.touched[:] = False
            else:  # a slot reused after discard_open
                self.buf[slot].copy_(self._identity)
                self.scale[slot] = 1.0
                self.counts[slot] = 0.0
                self.units[slot] = 0.0
                self.touched[slot] = False
        self._clean_from = max(self._clean_from, slot + 1) if slot else 1
        self.steps.append(step)
        self.skipped.append(False)
        self.checked.append(False)
        return slot

    def full(self) -> bool:
        return len(self.steps) >= self.capacity

    def _touch(self, slot: int, row: int) -> bool:
        first = not self.touched[slot, row]
        if first:
            self.touched[slot, row] = True
            self.seq_counter += 1
            self.seq[slot, row] = self.seq_counter
        return first

    def add(self, slot: int, row: int, vec: Tensor, count: int) -> None:
        """Queue one statistics vector (``[N_STATS]``) for ``(slot, row)``; the queued vectors
        are merged into the buffer together by :meth:`process_pending` (three kernels)."""
        self.counts[slot, row] += count
        self._touch(slot, row)
        self.immediate = True
        self._vectors.append((slot, row, vec.to(self.device, non_blocking=True)))
        if len(self._vectors) >= 4096:
            self.process_pending()

    def add_many(self, slot: int, rows: list[int], rows_t: Tensor, mat: Tensor,
                 counts: list[int]) -> None:
        """Queue ``mat[i]`` for ``(slot, rows[i])`` for all ``i``; :meth:`process_pending`
        merges every queued matrix of a slot into the buffer in two kernels."""
        r = np.asarray(rows, dtype=np.int64)
        self.immediate = True
        np.add.at(self.counts[slot], r, counts)
        fresh = ~self.touched[slot, r]
        if fresh.any():
            for row in r[fresh]:
                self._touch(slot, int(row))
        self._mats.append((slot, rows_t, mat))

    def _merge_rows(self, slot: int, rows_t: Tensor, mat: Tensor) -> None:
        E.merge_rows_(self.buf[slot], rows_t, mat)

    def defer(self, slot: int, row: int, x: Tensor, saturated: Rule | None = None,
              inactive: Rule | None = None) -> None:
        """Queue a small tensor for :meth:`process_pending`, with the activation's saturation
        and dead-unit rules. ``x`` must not change before then (the hooks pass copies)."""
        self._touch(slot, row)
        self.immediate = True
        self._pending.append((slot, row, x, saturated, inactive))
        self._pending_numel += x.numel()
        if self._pending_numel > PENDING_LIMIT:
            self.process_pending()

    def observe(self, slot: int, row: int, x: Tensor, saturated: Rule | None = None,
                inactive: Rule | None = None) -> None:
        """Record a hooked tensor (an activation or activation gradient, detached) of the open
        step: the one choice of its path. Staged where the stage takes it (:meth:`StagedSteps.add`);
        else, small, a copy is deferred and summarised with the step's other small tensors (a
        copy: an in-place activation may overwrite the output later); else summarised at once
        by :class:`Summariser` (compiled where that serves the tensor, eager otherwise)."""
        if self.staged.add(slot, row, x, saturated, inactive, row):
            return
        if x.numel() <= B.SMALL:
            self.defer(slot, row, x.clone(), saturated, inactive)
            return
        with torch.no_grad():
            self.add(slot, row, self.summary.tensor(x, saturated), x.numel())
            if inactive is not None:
                self.and_units(slot, row, E.inactive_units(x, inactive))

    def process_pending(self) -> None:
        """Summarise the queued small tensors together (:func:`gradprobe.stats.eager.batched_stats`,
        saturation and unit rules once per group of equal shape) and merge every queued
        statistics vector and matrix into the buffer: a fixed number of kernels per step."""
        if self._vectors:
            vectors, self._vectors = self._vectors, []
            by_slot_v: dict[int, list[tuple[int, Tensor]]] = {}
            for slot, row, vec in vectors:
                by_slot_v.setdefault(slot, []).append((row, vec))
            for slot, items_v in by_slot_v.items():
                mat = torch.stack([v for _, v in items_v])
                rows_t = torch.tensor([r for r, _ in items_v], dtype=torch.long,
                                      device=mat.device)
                self._mats.append((slot, rows_t, mat))
        if self._pending:
            pending, self._pending, self._pending_numel = self._pending, [], 0
            by_slot: dict[tuple[int, torch.device], list[tuple[int, Tensor, Any, Any]]] = {}
            for slot, row, x, sat, ina in pending:  # batched per (slot, device)
                by_slot.setdefault((slot, x.device), []).append((row, x, sat, ina))
            for (slot, _), items in by_slot.items():
                self._summarise(slot, items)
        if self._mats:
            mats, self._mats = self._mats, []
            slots = dict.fromkeys(m[0] for m in mats)
            for slot in slots:
                part = [m for m in mats if m[0] == slot]
                if len(part) == 1:
                    self._merge_rows(slot, part[0][1], part[0][2])
                else:
                    self._merge_rows(slot, torch.cat([to_device(m[1], self.device) for m in part]),
                                     torch.cat([to_device(m[2], self.device) for m in part]))

    def settle(self) -> None:
        """Finish every queued computation so that :attr:`buf` is complete (before a flush)."""
        self.process_pending()
        self.staged.summarise()
        self.losses.settle()

    def _summarise(self, slot: int, items: list[tuple[int, Tensor, Any, Any]]) -> None:
        xs = [x for _, x, _, _ in items]
        mat = self.summary.batched(xs)
        sat_groups: dict[tuple[Any, int], list[int]] = {}
        unit_groups: dict[tuple[Any, tuple[int, ...]], list[int]] = {}
        for i, (_, x, sat, ina) in enumerate(items):
            if sat is not None:
                sat_groups.setdefault((sat, x.numel()), []).append(i)
            if ina is not None:
                unit_groups.setdefault((ina, tuple(x.shape)), []).append(i)
        for (rule, _), idx in sat_groups.items():
            blk = torch.stack([xs[i].reshape(-1) for i in idx])
            mat[idx, S.SATURATED] = rule(blk).sum(1).to(E.STAT_DTYPE)
        for (rule, _), idx in unit_groups.items():
            masks = E.inactive_units_batched(torch.stack([xs[i] for i in idx]), rule)
            for j, i in enumerate(idx):
                self.and_units(slot, items[i][0], masks[j], owned=True)
        rows = [row for row, _, _, _ in items]
        rows_t = torch.tensor(rows, dtype=torch.long, device=mat.device)
        self.add_many(slot, rows, rows_t, mat, [x.numel() for x in xs])

    def and_units(self, slot: int, row: int, mask: Tensor, owned: bool = False) -> None:
        """AND a per-unit ``inactive`` mask of one micro-batch into the step's mask (``owned``:
        the caller hands ``mask`` over, no copy needed)."""
        key = (slot, row)
        prev = self._unit_masks.get(key)
        if prev is None or prev.shape != mask.shape:
            if prev is not None:  # unit count changed inside a step: count both populations
                self._close_units(slot, row, prev)
            self._unit_masks[key] = mask if owned else mask.clone()
        else:
            prev.logical_and_(mask)

    def _close_units(self, slot: int, row: int, mask: Tensor) -> None:
        if self.kept_units is not None:  # counted at the flush, across ranks
            self.kept_units.append((slot, row, mask))
            return
        self.buf[slot, row, S.DEAD] += mask.sum().to(self.device, non_blocking=True)
        self.units[slot, row] += mask.numel()

    def end(self, slot: int, *, skipped: bool, scale: Tensor | None) -> None:
        """Finish a recorded step: turn unit masks into dead counts, store the AMP scale."""
        keys = [k for k in self._unit_masks if k[0] == slot]
        if len(keys) == 1 or (keys and self.kept_units is not None):
            for key in keys:
                self._close_units(slot, key[1], self._unit_masks.pop(key))
        elif keys:  # all layers at once: one concatenation, one segment sum
            masks = [self._unit_masks.pop(k).reshape(-1) for k in keys]
            rows = tuple(k[1] for k in keys)
            lens = tuple(m.numel() for m in masks)
            seg_key = (rows, lens, masks[0].device)
            seg = self._unit_segments.get(seg_key)
            if seg is None:
                if len(self._unit_segments) > 64:
                    self._unit_segments.clear()
                seg = torch.repeat_interleave(
                    torch.tensor(rows, device=masks[0].device),
                    torch.tensor(lens, device=masks[0].device))
                self._unit_segments[seg_key] = seg
            dead = torch.zeros(len(self.rows), dtype=E.STAT_DTYPE, device=masks[0].device)
            dead.index_add_(0, seg, torch.cat(masks).to(E.STAT_DTYPE))
            self.buf[slot, :, S.DEAD] += dead.to(self.device, non_blocking=True)
            for row, n in zip(rows, lens):
                self.units[slot, row] += n
        self.skipped[slot] = skipped
        if scale is not None:
            self.scale[slot].copy_(scale.reshape(()))

    def recorded(self, slot: int) -> bool:
        """Whether the open step ``slot`` holds anything (a forward or backward pass ran)."""
        return bool(self.touched[slot].any() or self.staged.holds(slot)
                    or any(p[0] == slot for p in self._pending)
                    or any(v[0] == slot for v in self._vectors)
                    or any(m[0] == slot for m in self._mats)
                    or any(k[0] == slot for k in self._unit_masks))

    def discard_open(self, slot: int) -> None:
        """Drop an unfinished step (detached between forward and optimizer step)."""
        self.staged.discard(slot)
        self._pending = [p for p in self._pending if p[0] != slot]
        self._vectors = [v for v in self._vectors if v[0] != slot]
        self._mats = [m for m in self._mats if m[0] != slot]
        if slot == len(self.steps) - 1:
            self.steps.pop()
            self.skipped.pop()
            self.checked.pop()
        for key in [k for k in self._unit_masks if k[0] == slot]:
            del self._unit_masks[key]
        if self.kept_units is not None:
            self.kept_units = [k for k in self.kept_units if k[0] != slot]
        for key in [k for k in self.hist if k[0] == slot]:
            del self.hist[key]
        for tkey in [k for k in self.time if k[0] == slot]:
            del self.time[tkey]

    def add_time(self, slot: int, layer_id: int, wrt: str, sumsq: Tensor) -> None:
        """Add a micro-batch's per-time-step ``Σ grad²`` (``[T]``, float64) of a recurrent
        layer's ``wrt`` (``"input"`` or ``"output"``) sequence. Sequences of another length in
        the same step are aligned at their first time step (the shorter one padded with 0)."""
        key = (slot, layer_id, wrt)
        v = sumsq.to(self.device, non_blocking=True)
        prev = self.time.get(key)
        if prev is None:
            self.time[key] = v
        elif prev.shape == v.shape:
            prev.add_(v)
        else:  # lengths are known on the host: no sync
            n = max(prev.numel(), v.numel())
            acc = torch.zeros(n, dtype=prev.dtype, device=prev.device)
            acc[: prev.numel()] += prev
            acc[: v.numel()] += v
            self.time[key] = acc

    def add_hist(self, slot: int, row: int, x: Tensor) -> None:
        from gradprobe.stats.hist import histogram

        key = (slot, row)
        prev = self.hist.get(key)
        edges, counts, nonfinite = histogram(x, self.hist_bins, None if prev is None else prev[0])
        if prev is None:
            self.hist[key] = [t.to(self.device, non_blocking=True)
                              for t in (edges, counts, nonfinite)]
        else:
            prev[1].add_(counts)
            prev[2].add_(nonfinite)

    # ------------------------------------------------------------------ non-finite events

    def slot_nonfinite(self, slot: int) -> np.ndarray:
        """Host copy of one slot's non-finite counts. This is a host sync (one per step); the
        Probe calls it only on CPU, where it costs nothing, or with ``on_nonfinite="raise"``."""
        self.checked[slot] = True
        return self.buf[slot, :, S.NONFINITE].cpu().numpy()

    def event_for(self, slot: int, nonfinite: np.ndarray, loss_bad: bool = False
                  ) -> dict[str, Any] | None:
        """The non-finite event of the open step ``slot`` (``loss_bad``: its loss was
        non-finite; :func:`gradprobe.capture.events.full_event`)."""
        return full_event(self.rows, self.steps[slot], nonfinite, self.touched[slot],
                          self.seq[slot], self.skipped[slot], self.event_extra, loss_bad)

    # ------------------------------------------------------------------ flush

    def flush(self) -> list[dict[str, Any]]:
        """Copy the finished slots to the host (one transfer), write the parts, reset.

        The synchronous form of :meth:`take` followed by :meth:`write`. Returns the non-finite
        events found in slots not checked before (already written).
        """
        data = self.take()
        if data is None:
            return []
        if isinstance(data, TakenFlush):
            data = data.resolve(self.writer)
        self.write(data)
        return data.events

    def take(self, always: Any = None) -> HostFlush | TakenFlush | None:
        """The training-thread half of a flush: finish queued work, start the one copy of the
        used slices of the buffers (and of ``always``, the always-on tier's rows: an object with
        ``piece() -> (Tensor | None, read)``) to the host (:mod:`gradprobe.capture.transfer`),
        and reset the ring. ``None`` if nothing was recorded since the last flush.

        Synchronous unless :attr:`async_copy`: the :class:`HostFlush`, whose non-finite events
        of slots not checked yet are already in ``events.jsonl``. Asynchronous: a
        :class:`TakenFlush` that :meth:`write` resolves on the writer thread. Either owns copies
        of everything :meth:`write` reads, so the recorder goes on recording meanwhile.
        """
        self.settle()
        n = len(self.steps)
        n_loss = len(self.losses.steps)
        a_flat, a_read = always.piece() if always is not None else (None, None)
        if n == 0 and n_loss == 0 and a_flat is None:
            return None
        hist_items = sorted(self.hist.items())
        time_items = sorted(self.time.items())
        pieces = [self.buf[:n].reshape(-1), self.scale[:n], self.losses.sum[:n_loss]]
        for _, (edges, counts, nonfinite) in hist_items:
            pieces += [edges, counts, nonfinite.reshape(1)]
        pieces += [v.to(self.buf.dtype) for _, v in time_items]
        if a_flat is not None:
            pieces.append(a_flat.to(self.buf.dtype))
        # the one device->host transfer of this flush (asynchronous on CUDA where asked)
        copy = DeviceCopy(torch.cat(pieces), asynchronous=self.async_copy)
        data = TakenFlush(
            index=self.writer.next_flush(), copy=copy, rows=self.rows,
            hist_bins=self.hist_bins, steps=np.asarray(self.steps, dtype=np.int64),
            skipped=np.asarray(self.skipped, dtype=bool),
            checked=np.asarray(self.checked, dtype=bool), counts=self.counts[:n].copy(),
            units=self.units[:n].copy(), touched=self.touched[:n].copy(),
            seq=self.seq[:n].copy(), loss_steps=np.asarray(self.losses.steps, dtype=np.int64),
            loss_count=self.losses.count[:n_loss].copy(),
            hist_keys=[key for key, _ in hist_items],
            time_keys=[key for key, _ in time_items],
            time_lens=[v.numel() for _, v in time_items],
            always=None if a_flat is None or a_read is None else (a_flat.numel(), a_read),
            extra=dict(self.event_extra))
        self.steps.clear()
        self.skipped.clear()
        self.checked.clear()
        self.losses.reset()
        self.hist.clear()
        self.time.clear()
        return data if self.async_copy else data.resolve(self.writer)

    def write(self, data: HostFlush | TakenFlush) -> None:
        """The host half of a flush: build the frames of ``data`` (waiting for its copy) and
        write its parts (losses, histograms, then scalars, which commits the flush). Reads only
        ``data`` and the recorder's fixed row table, so it may run on another thread than
        :meth:`take`."""
        if isinstance(data, TakenFlush):
            data = data.resolve(self.writer)
        self.frames.write(data, self.writer)


__all__ = ["HostFlush", "Recorder", "RowInfo", "Summariser"]  # HostFlush: gradprobe.store.frames
