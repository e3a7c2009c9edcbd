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

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gradprobe.capture import stage as _stage
from gradprobe.capture.stage import STATS, WPRE, Entry, ParamSet, Stage
from gradprobe.stats import batched as B
from gradprobe.stats import eager as E
from gradprobe.stats import schema as S
from gradprobe.stats.compiled import KERNELS, CompiledKernels
from gradprobe.store.frames import Frames, HostFlush
from gradprobe.store.writer import RunWriter

PASS_OF_KIND = {"act": "forward", "act_grad": "act_grad", "grad": "grad", "weight": "weight",
                "update": "weight", "drift": "weight"}
PENDING_LIMIT = 1 << 22
"""Elements of small tensors queued at most before they are summarised (32 MiB of float64)."""
PASS_ORDER = {"forward": 0, "act_grad": 1, "grad": 2, "weight": 3}
Rule = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class RowInfo:
    """One (layer, kind) record of the buffer."""

    layer_id: int
    layer: str
    kind: str
    saturation_rule: bool
    dead_rule: bool


class Summariser:
    """How each tensor is summarised, decided in one place: the compiled one-pass kernels
    (:mod:`gradprobe.stats.compiled`) where they serve the tensor, the eager kernels otherwise;
    small tensors together (:mod:`gradprobe.stats.batched`). Owns the kernels' workspace."""

    def __init__(self, kernels: CompiledKernels = KERNELS) -> None:
        self.kernels = kernels
        self.ws = E.Workspace()

    def _compiled(self, ts: Sequence[Tensor], saturated: Rule | None = None) -> Tensor | None:
        """The compiled rows (exact counts) where the compiled path serves every tensor."""
        if ts and all(self.kernels.usable(t) for t in ts):
            return self.kernels.rows(ts, saturated)
        return None

    def tensor(self, x: Tensor, saturated: Rule | None = None) -> Tensor:
        """``[N_STATS]`` of one tensor with exact counts (:func:`gradprobe.stats.eager.tensor_stats`)."""
        with torch.no_grad():
            xd = x.detach()
            fused = self._compiled([xd], saturated)
            if fused is not None:
                return fused[0]
            return E.tensor_stats(xd, saturated, self.ws)

    def large(self, tensors: Sequence[Tensor]) -> Tensor:
        """``[k, N_STATS]`` of large tensors, exact counts."""
        with torch.no_grad():
            ds = [t.detach() for t in tensors]
            fused = self._compiled(ds)
            return fused if fused is not None else E.large_stats(ds, self.ws)

    def group(self, tensors: Sequence[Tensor]) -> Tensor:
        """:func:`gradprobe.stats.batched.param_group_stats` with this choice for large ones."""
        return B.param_group_stats(tensors, self.ws, large=self.large)

    def batched(self, tensors: Sequence[Tensor]) -> Tensor:
        return B.batched_stats(tensors, self.ws)

    def sumsq_group(self, tensors: Sequence[Tensor]) -> Tensor:
        return B.sumsq_group(tensors, self.ws)

    def large_weight(self, x: Tensor) -> Tensor:
        """``[N_STATS]`` of a large tensor, where the eager path leaves the non-finite count 0
        (fill it with :func:`gradprobe.stats.eager.fix_nonfinite_` over a stack of such
        vectors, one check for all; the compiled path's exact count passes unchanged)."""
        with torch.no_grad():
            xd = x.detach()
            fused = self._compiled([xd])
            if fused is not None:
                return fused[0]
            return E.chunked_stats([E.as_float(xd)], None, self.ws)[0]

    def weight(self, w: Tensor, prev: Tensor | None, init: Tensor | None) -> Tensor | None:
        """``[N_STATS + 2]``: the statistics of a large weight ``w`` (exact counts), then
        ``Σ (w − prev)²`` and ``Σ (w − init)²`` from one compiled pass; ``None`` where the
        compiled path does not serve ``w`` (the caller takes the eager path)."""
        with torch.no_grad():
            wd = w.detach()
            if not self.kernels.usable(wd):
                return None
            return self.kernels.weight_stats(wd, prev, init)


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
        self._seq_counter = 0
        self.loss_sum = torch.zeros(loss_capacity, dtype=torch.float64, device=device)
        self.loss_count = np.zeros(loss_capacity, dtype=np.int64)
        self.loss_steps: list[int] = []
        self._losses: list[tuple[int, Tensor]] = []  # (index into loss_sum, detached loss)
        self._loss_started = np.zeros(loss_capacity, dtype=bool)
        self._loss_index: dict[int, int] = {}
        # (slot, row) -> [edges, counts, nonfinite]
        self.hist: dict[tuple[int, int], list[Tensor]] = {}
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
        # staged small tensors (see gradprobe.capture.stage): the open step's entries
        self.stage: Stage | None = None
        self._open: list[tuple[Any, ...]] = []  # (row, shape, sat, ina, tensor, source, version, key, seq)
        self._open_keys: list[tuple[Any, ...]] = []
        self._open_slot: int | None = None
        self._staged_row = False  # the open step has a row in the stage
        self._immediate = False  # the open step has statistics outside the stage
        self._copy_keys: set[Any] = set()  # hook sites whose tensors change in place later
        self._seen_keys: set[Any] = set()
        self._stage_params: list[Tensor] = []
        self._grad_rows: list[int] = []
        self._weight_rows: list[int] = []
        self._n_pre = 0
        self._plan: Any = None
        self._open_numel = 0
        self._param_width = 0
        self._pre_seqs: list[int] = []
        self._books: list[tuple[int, list[int], int, Any]] = []

    @property
    def nbytes(self) -> int:
        return int(self.buf.numel() * 8 + self.scale.numel() * 8 + self.loss_sum.numel() * 8)

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
            self._seq_counter += 1
            self.seq[slot, row] = self._seq_counter
        return first

    def add(self, slot: int, row: int, vec: Tensor, count: int) -> None:
        """Queue one statistics vector (``[N_STATS]``) for ``(slot, row)``; the queued vectors
        are merged into the buffer together by :meth:`process_pending` (three kernels)."""
        self.counts[slot, row] += count
        self._touch(slot, row)
        self._immediate = True
        self._vectors.append((slot, row, vec.to(self.device, non_blocking=True)))
        if len(self._vectors) >= 4096:
            self.process_pending()

    def add_many(self, slot: int, rows: list[int], rows_t: Tensor, mat: Tensor,
                 counts: list[int]) -> None:
        """Queue ``mat[i]`` for ``(slot, rows[i])`` for all ``i``; :meth:`process_pending`
        merges every queued matrix of a slot into the buffer in two kernels."""
        r = np.asarray(rows, dtype=np.int64)
        self._immediate = True
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
        self._immediate = True
        self._pending.append((slot, row, x, saturated, inactive))
        self._pending_numel += x.numel()
        if self._pending_numel > PENDING_LIMIT:
            self.process_pending()

    def observe(self, slot: int, row: int, x: Tensor, saturated: Rule | None = None,
                inactive: Rule | None = None) -> None:
        """Record a hooked tensor (an activation or activation gradient, detached) of the open
        step: the one choice of its path. Staged where the stage takes it (:meth:`stage_add`);
        else, small, a copy is deferred and summarised with the step's other small tensors (a
        copy: an in-place activation may overwrite the output later); else summarised at once
        by :class:`Summariser` (compiled where that serves the tensor, eager otherwise)."""
        if self.stage_add(slot, row, x, saturated, inactive, row):
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
                    self._merge_rows(slot, torch.cat([_to(m[1], self.device) for m in part]),
                                     torch.cat([_to(m[2], self.device) for m in part]))

    # ------------------------------------------------------------------ staged small tensors

    def stage_setup(self, device: torch.device, dtype: torch.dtype, params: list[Tensor],
                    grad_rows: list[int], weight_rows: list[int], param_set: ParamSet) -> None:
        """Stage the small tensors of ``device`` and ``dtype``: activations, activation
        gradients, and the gradients and weights of ``params`` (rows ``-1``: kind not
        recorded). ``param_set`` carries the update/drift rows and W0."""
        self.stage = Stage(device, dtype, param_set if params else None, self.capacity)
        self._stage_params = params
        self._grad_rows = grad_rows
        self._weight_rows = weight_rows
        # the parameters' share of a row: gradients, weights before and after the step
        self._open_numel = 3 * sum(p.numel() for p in params)
        self._param_width = self._open_numel

    def stage_add(self, slot: int, row: int, x: Tensor, saturated: Rule | None,
                  inactive: Rule | None, key: Any) -> bool:
        """Stage a small activation (or activation gradient) of the open step. ``key`` names
        the hook site: the first time a site is seen its tensor is copied, and if the tensor
        was changed in place before the step ended (an in-place activation after it), the site
        is copied from then on; otherwise later steps keep a reference until the step's row
        is written. Returns False, staging nothing, when ``x`` does not go to the stage: another
        device or dtype than the stage's, more than :data:`gradprobe.stats.eager.SMALL` elements, not
        strided, or no room left in the step's row (:data:`gradprobe.capture.stage.MAX_ELEMS`)."""
        st = self.stage
        if (st is None or x.dtype != st.dtype or x.device != st.device
                or x.numel() > B.SMALL or x.layout != torch.strided):
            return False
        if self._open_slot != slot:
            self._open.clear()
            self._open_keys.clear()
            self._open_slot = slot
            self._open_numel = self._param_width
        if self._open_numel + x.numel() > _stage.MAX_ELEMS:
            return False
        self._open_numel += x.numel()
        self._seq_counter += 1
        t = x.clone() if key in self._copy_keys or key not in self._seen_keys else x
        entry = (row, tuple(x.shape), saturated, inactive)
        self._open_keys.append(entry)
        self._open.append((*entry, t, x, x._version, key, self._seq_counter))
        return True

    def stage_pre(self, slot: int, grads: Sequence[Tensor | None] | None,
                  wpre: Sequence[Tensor] | None) -> None:
        """Write the open step's activations, the parameters' gradients and the weights before
        the update (``None``: not recorded, or the optimizer skipped the step) into its row."""
        st = self.stage
        assert st is not None
        if self._staged_row:  # a step whose optimizer step never finished: drop its row
            st.slots.pop()
            self._staged_row = False
        if self._open_slot != slot:
            self._open.clear()
            self._open_keys.clear()
            self._open_slot = slot
        ok = self._open
        keys = tuple(self._open_keys)
        if any(e[5]._version != e[6] or e[4] is not e[5] for e in ok):
            ok, keys = self._check_versions(ok)
        self._open = []
        self._open_keys = []
        self._open_slot = None
        self._open_numel = self._param_width
        params = self._stage_params
        gmask: tuple[bool, ...] = ()
        gl: list[Tensor] = []
        if grads is not None:
            gmask = tuple(g is not None and g.layout == torch.strided and g.dtype == st.dtype
                          for g in grads)
            gl = [g for g, m in zip(grads, gmask) if m]  # type: ignore[misc]
            if len(gl) != len(grads):  # sparse or other-dtype gradients: summarised at the step
                for g, m, r in zip(grads, gmask, self._grad_rows):
                    if g is not None and not m:
                        v = g.coalesce().values() if g.is_sparse else g
                        self.defer(slot, r, v.detach().clone())
        key = (keys, gmask, wpre is not None)
        plan = st.plan_for(key, lambda: self._entries(ok, gmask, wpre is not None))
        if not st.ready(plan):
            self._summarise_stage()
            st.start(plan)
        s = len(st.slots)
        st.slots.append(slot)
        self._staged_row = True
        assert st.buf is not None
        n_pre = len(ok) + len(gl) + (len(params) if wpre is not None else 0)
        src = [e[4] for e in ok] + gl + (list(wpre) if wpre is not None else [])
        if src:
            torch._foreach_copy_(plan.views(st.buf, s, 0, n_pre), src)
        self._pre_seqs = [e[8] for e in ok]
        self._n_pre = n_pre
        self._plan = plan

    def stage_post(self, slot: int, wpost: Sequence[Tensor] | None, check: bool) -> bool:
        """Write the weights after the update into the open step's row and close it. With
        ``check`` (CPU, or ``on_nonfinite="raise"``), a row holding non-finite values is
        summarised at once so the step's events can be found; returns True when the step's
        statistics are complete in the buffer without further work."""
        st = self.stage
        assert st is not None and st.buf is not None
        plan = self._plan
        s = len(st.slots) - 1
        if wpost and plan.width > 0:
            n = len(plan.shapes)
            torch._foreach_copy_(plan.views(st.buf, s, self._n_pre, n), list(wpost))
        # counts, and the order in which rows were first touched (for events): applied to
        # the bookkeeping arrays when the stage is summarised
        book = self._bookkeeping(plan, bool(wpost))
        if book is not None:
            self._books.append((slot, self._pre_seqs, self._seq_counter, book))
            self._seq_counter += book[3]
        self._staged_row = False
        immediate, self._immediate = self._immediate, False
        if check:
            finite = math.isfinite(float(plan.row(st.buf, s).sum()))
            if not finite:
                st.exact = True
                self._summarise_stage()
                return False
        if not st.on_cpu:
            st.exact = True
        if len(st.slots) >= st.capacity:
            self._summarise_stage()
        return not immediate

    def _check_versions(self, opened: list[tuple[Any, ...]]
                        ) -> tuple[list[tuple[Any, ...]], tuple[Any, ...]]:
        """Learn which hook sites need a copy: a tensor changed in place after its hook (an
        in-place activation after the module) is copied in the hook from then on; held by
        reference, its value of this step is lost and dropped."""
        ok: list[tuple[Any, ...]] = []
        for e in opened:
            changed = e[5]._version != e[6]
            if changed:
                self._copy_keys.add(e[7])
                if e[4] is e[5]:
                    continue
            self._seen_keys.add(e[7])
            ok.append(e)
        return ok, tuple(e[:4] for e in ok)

    def _apply_books(self) -> None:
        """Counts, touched rows and first-touch order of the staged steps, a run of steps of
        one plan at a time."""
        books, self._books = self._books, []
        i = 0
        while i < len(books):
            j = i
            book = books[i][3]
            while j < len(books) and books[j][3] is book:
                j += 1
            run = books[i:j]
            i = j
            counts, uniq, first, _ = book
            slots = np.array([b[0] for b in run], dtype=np.int64)
            self.counts[slots] += counts
            base = np.array([b[2] for b in run], dtype=np.int64)[:, None]
            seqs = base + 1 + first[None, :]
            n_act = len(run[0][1])
            hooked = first < n_act
            if hooked.any():
                pre = np.array([b[1] for b in run], dtype=np.int64).reshape(len(run), n_act)
                seqs[:, hooked] = pre[:, first[hooked]]
            grid = np.ix_(slots, uniq)
            touched = self.touched[grid]
            self.seq[grid] = np.where(touched, np.minimum(self.seq[grid], seqs), seqs)
            self.touched[grid] = True

    def _bookkeeping(self, plan: Any, post: bool) -> Any:
        """Per-step row bookkeeping of a plan, cached on it: ``(counts[R], unique rows, their
        first position in the step's order, number of positions)``; the step's order is the
        hooks', then gradients, weights, update and drift rows."""
        key = ("book", post)
        book = plan.cache.get(key)
        if book is None:
            st = self.stage
            assert st is not None
            stats_entries = plan.entries
            rows = [e.row for e in stats_entries if e.role == STATS and e.param < 0]
            numels = [float(e.numel) for e in stats_entries if e.role == STATS and e.param < 0]
            ps = st.params
            if post and ps is not None:
                for kind_rows in (self._weight_rows, ps.update_rows, ps.drift_rows):
                    for r, n in zip(kind_rows, ps.numels):
                        if r >= 0:
                            rows.append(r)
                            numels.append(float(n))
            if not rows:
                plan.cache[key] = False
                return None
            arr = np.asarray(rows, dtype=np.int64)
            counts = np.zeros(len(self.rows))
            np.add.at(counts, arr, np.asarray(numels))
            uniq, first = np.unique(arr, return_index=True)
            book = (counts, uniq, first.astype(np.int64), len(rows))
            plan.cache[key] = book
        return book if book is not False else None

    def _entries(self, ok: list[tuple[Any, ...]], gmask: tuple[bool, ...],
                 pre: bool) -> list[Entry]:
        st = self.stage
        assert st is not None
        out = [Entry(e[0], e[1], e[2], e[3]) for e in ok]
        params = self._stage_params
        for p, r, m in zip(params, self._grad_rows, gmask):
            if m:
                out.append(Entry(r, tuple(p.shape)))
        if pre:
            out += [Entry(-1, tuple(p.shape), role=WPRE, param=j) for j, p in enumerate(params)]
        out += [Entry(r, tuple(p.shape), role=STATS, param=j)
                for j, (p, r) in enumerate(zip(params, self._weight_rows))]
        return out

    def _summarise_stage(self) -> None:
        st = self.stage
        if st is None or not st.slots or self._staged_row:
            return
        self._apply_books()
        slots, rows_t, mat, dead = st.summarise()
        r = len(self.rows)
        slots_t = torch.tensor(slots, dtype=torch.long, device=mat.device)
        if mat.shape[1]:
            flat_idx = (slots_t[:, None] * r + rows_t[None, :]).reshape(-1)
            E.merge_rows_(self.buf.view(-1, S.N_STATS), flat_idx, mat.reshape(-1, S.N_STATS))
        if dead:
            by_row: dict[int, list[Tensor]] = {}
            for row, mask in dead:
                by_row.setdefault(row, []).append(mask)
            slots_np = np.asarray(slots, dtype=np.int64)
            for row, masks in by_row.items():
                same = all(m.shape == masks[0].shape for m in masks)
                groups = [masks] if same else [[m] for m in masks]
                for grp in groups:
                    m = grp[0]
                    for other in grp[1:]:
                        m = m & other  # micro-batches of one step: dead on every one
                    count = m.sum(-1).to(E.STAT_DTYPE)
                    dev = self.device
                    self.buf[slots_t.to(dev), row, S.DEAD] += count.to(dev)
                    self.units[slots_np, row] += m.shape[-1]

    def settle(self) -> None:
        """Finish every queued computation so that :attr:`buf` is complete (before a flush)."""
        self.process_pending()
        self._summarise_stage()
        self._settle_losses()

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
        self.buf[slot, row, S.DEAD] += mask.sum().to(self.device, non_blocking=True)
        self.units[slot, row] += mask.numel()

    def end(self, slot: int, *, skipped: bool, scale: Tensor | None) -> None:
        """Finish a recorded step: turn unit masks into dead counts, store the AMP scale."""
        keys = [k for k in self._unit_masks if k[0] == slot]
        if len(keys) == 1:
            self._close_units(slot, keys[0][1], self._unit_masks.pop(keys[0]))
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

    def discard_open(self, slot: int) -> None:
        """Drop an unfinished step (detached between forward and optimizer step)."""
        if self._open_slot == slot:
            self._open.clear()
            self._open_keys.clear()
            self._open_slot = None
            self._open_numel = self._param_width
        if self._staged_row and self.stage is not None and self.stage.slots[-1:] == [slot]:
            self.stage.slots.pop()
        self._staged_row = False
        self._books = [b for b in self._books if b[0] != slot]
        self._pending = [p for p in self._pending if p[0] != slot]
        self._vectors = [v for v in self._vectors if v[0] != slot]
        self._mats = [m for m in self._mats if m[0] != slot]
        if slot == len(self.steps) - 1:
            self.steps.pop()
            self.skipped.pop()
            self.checked.pop()
        for key in [k for k in self._unit_masks if k[0] == slot]:
            del self._unit_masks[key]
        for key in [k for k in self.hist if k[0] == slot]:
            del self.hist[key]

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

    def add_loss(self, step: int, loss: Tensor) -> None:
        i = self._loss_index.get(step)
        if i is None:
            i = len(self.loss_steps)
            if i >= self.loss_sum.numel():  # more steps than planned between flushes
                self._settle_losses()
                self.loss_sum = torch.cat([self.loss_sum, torch.zeros_like(self.loss_sum)])
                self.loss_count = np.concatenate([self.loss_count, np.zeros_like(self.loss_count)])
                self._loss_started = np.concatenate(
                    [self._loss_started, np.zeros_like(self._loss_started)])
            self._loss_index[step] = i
            self.loss_steps.append(step)
            self.loss_count[i] = 0
            self._loss_started[i] = False
        # summed into loss_sum (float64) by settle(), all steps at once
        self._losses.append((i, loss.detach()))
        self.loss_count[i] += 1
        if len(self._losses) >= 4096:
            self._settle_losses()

    def _settle_losses(self) -> None:
        if not self._losses:
            return
        losses, self._losses = self._losses, []
        dev = self.loss_sum.device
        idx = torch.tensor([i for i, _ in losses], dtype=torch.long, device=dev)
        vals = torch.cat([_to(v.reshape(1), dev) for _, v in losses]).to(torch.float64)
        fresh = torch.tensor(sorted({i for i, _ in losses if not self._loss_started[i]}),
                             dtype=torch.long, device=dev)
        if fresh.numel():
            self.loss_sum.index_fill_(0, fresh, 0.0)
        self.loss_sum.index_add_(0, idx, vals)
        for i, _ in losses:
            self._loss_started[i] = True

    # ------------------------------------------------------------------ non-finite events

    def slot_nonfinite(self, slot: int) -> np.ndarray:
        """Host copy of one slot's non-finite counts. This is a host sync (one per step); the
        Probe calls it only on CPU, where it costs nothing, or with ``on_nonfinite="raise"``."""
        self.checked[slot] = True
        return self.buf[slot, :, S.NONFINITE].cpu().numpy()

    def event_for(self, slot: int, nonfinite: np.ndarray) -> dict[str, Any] | None:
        hit = np.flatnonzero((nonfinite > 0) & self.touched[slot])
        if hit.size == 0:
            return None
        first = min(hit, key=lambda r: (PASS_ORDER[PASS_OF_KIND[self.rows[r].kind]],
                                        int(self.seq[slot, r])))
        info = self.rows[int(first)]
        return {
            "type": "nonfinite",
            "step": int(self.steps[slot]),
            "layer": info.layer,
            "layer_id": info.layer_id,
            "pass": PASS_OF_KIND[info.kind],
            "kind": info.kind,
            "nonfinite": int(nonfinite[first]),
            "n_layers": int(hit.size),
            "amp_skipped": bool(self.skipped[slot]),
        }

    # ------------------------------------------------------------------ flush

    def flush(self) -> list[dict[str, Any]]:
        """Copy the finished slots to the host (one transfer), write the parts, reset.

        The synchronous form of :meth:`take` followed by :meth:`write`. Returns the non-finite
        events found in slots not checked before (already written).
        """
        data = self.take()
        if data is None:
            return []
        self.write(data)
        return data.events

    def take(self) -> HostFlush | None:
        """The training-thread half of a flush: finish queued work, copy the used slices of the
        buffer to the host in one transfer, find the non-finite events of slots not checked yet
        (written to ``events.jsonl`` at once) and reset the ring. ``None`` if nothing was
        recorded since the last flush.

        The result owns copies of everything :meth:`write` reads, so the recorder can go on
        recording while another thread writes it.
        """
        self.settle()
        n = len(self.steps)
        n_loss = len(self.loss_steps)
        if n == 0 and n_loss == 0:
            return None
        hist_items = sorted(self.hist.items())
        pieces = [self.buf[:n].reshape(-1), self.scale[:n], self.loss_sum[:n_loss]]
        for _, (edges, counts, nonfinite) in hist_items:
            pieces += [edges, counts, nonfinite.reshape(1)]
        # the one device->host transfer of this flush; torch.cat allocates, so the host array
        # never aliases the ring buffer (also on CPU, where .cpu() is a no-op)
        host = torch.cat(pieces).cpu().numpy()
        r = len(self.rows)
        off = n * r * S.N_STATS
        stats = host[:off].reshape(n, r, S.N_STATS)
        scale = host[off : off + n]
        off += n
        losses = host[off : off + n_loss]
        off += n_loss
        touched = self.touched[:n].copy()
        skipped = np.asarray(self.skipped, dtype=bool)
        bad = ((stats[:, :, S.NONFINITE] > 0) & touched).any(1)
        events: list[dict[str, Any]] = []
        for slot in np.flatnonzero(bad & ~np.asarray(self.checked, dtype=bool)):
            ev = self.event_for(int(slot), stats[slot, :, S.NONFINITE])
            if ev is not None:
                events.append(ev)
        self.writer.append_events(events)
        data = HostFlush(
            index=self.writer.next_flush(),
            steps=np.asarray(self.steps, dtype=np.int64),
            skipped=skipped,
            counts=self.counts[:n].copy(),
            units=self.units[:n].copy(),
            touched=touched,
            stats=stats,
            scale=scale,
            loss_steps=np.asarray(self.loss_steps, dtype=np.int64),
            losses=losses,
            loss_count=self.loss_count[:n_loss].copy(),
            hist_keys=[key for key, _ in hist_items],
            hist=host[off:].reshape(len(hist_items), 2 * self.hist_bins + 2),
            events=events,
            nonfinite=bool((bad & ~skipped).any()),
        )
        self.steps.clear()
        self.skipped.clear()
        self.checked.clear()
        self.loss_steps.clear()
        self._loss_index.clear()
        self.hist.clear()
        return data

    def write(self, data: HostFlush) -> None:
        """The host half of a flush: build the frames of ``data`` and write its parts (losses,
        histograms, then scalars, which commits the flush). Reads only ``data`` and the
        recorder's fixed row table, so it may run on another thread than :meth:`take`."""
        self.frames.write(data, self.writer)


def _to(x: Tensor, device: torch.device) -> Tensor:
    return x if x.device == device else x.to(device, non_blocking=True)


__all__ = ["HostFlush", "Recorder", "RowInfo", "Summariser"]  # HostFlush: gradprobe.store.frames
