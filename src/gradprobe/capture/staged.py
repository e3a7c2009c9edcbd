"""The recorder's side of the stage: which small tensors of a step go to it, and their books.

A step's small activations and activation gradients (:meth:`StagedSteps.add`, from the hooks),
then the staged parameters' gradients and weights before the update (:meth:`StagedSteps.pre`)
and after it (:meth:`StagedSteps.post`) are copied into one row of the
:class:`~gradprobe.capture.stage.Stage`; many rows are summarised at once
(:meth:`StagedSteps.summarise`) and merged into the :class:`~gradprobe.capture.recorder.Recorder`'s
buffer with the counts and first-touch order the events need (the books). Hook sites whose
tensors are changed in place after the hook are found here and copied from then on.

Whether a tensor goes to the stage at all is decided by :meth:`Recorder.observe` and the
Probe's parameter statistics (:mod:`gradprobe.capture.params`); this module only keeps the
stage's rows.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from gradprobe.capture import stage as _stage
from gradprobe.capture.stage import STATS, WPRE, Entry, ParamSet, Rule, Stage
from gradprobe.stats import batched as B
from gradprobe.stats import eager as E
from gradprobe.stats import schema as S


class Books(Protocol):
    """What the stage reads and writes of the :class:`~gradprobe.capture.recorder.Recorder`
    (a protocol, so that the recorder owns this module and not the other way round)."""

    buf: Tensor
    capacity: int
    counts: np.ndarray
    device: torch.device
    immediate: bool
    rows: list[Any]
    seq: np.ndarray
    seq_counter: int
    touched: np.ndarray
    units: np.ndarray
    kept_units: list[tuple[int, int, Tensor]] | None

    def defer(self, slot: int, row: int, x: Tensor, saturated: Rule | None = None,
              inactive: Rule | None = None) -> None: ...


class StagedSteps:
    """The open step's staged entries and the books of the staged steps of ``rec``."""

    def __init__(self, rec: Books) -> None:
        self.rec = rec
        self.stage: Stage | None = None
        # the open step's hooked tensors, one entry each in parallel lists (a hook appends
        # to each: no tuple to build and unpack per tensor): its layout key (row, shape,
        # rules), the tensor to copy (the hooked one, or its clone), the hooked tensor, its
        # version at the hook, the hook site, its first-touch sequence number
        self._open_keys: list[tuple[Any, ...]] = []
        self._open_ts: list[Tensor] = []
        self._open_xs: list[Tensor] = []
        self._open_vers: list[int] = []
        self._open_sites: list[Any] = []
        self._open_seqs: list[int] = []
        self._cloned = False  # an open entry is a clone (its site is checked at pre)
        self._open_slot: int | None = None
        self._staged_row = False  # the open step has a row in the stage
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
        # the open row's staged gradients, every parameter's, from pre to post: (plan, row,
        # first entry); None otherwise
        self._grads_at: tuple[Any, int, int] | None = None


    def setup(self, device: torch.device, dtype: torch.dtype, params: list[Tensor],
                    grad_rows: list[int], weight_rows: list[int], param_set: ParamSet) -> None:
        """Stage the small tensors of ``device`` and ``dtype``: activations, activation
        gradients, and the gradients and weights of ``params`` (rows ``-1``: kind not
        recorded). ``param_set`` carries the update/drift rows and W0."""
        self.stage = Stage(device, dtype, param_set if params else None, self.rec.capacity)
        self._stage_params = params
        self._grad_rows = grad_rows
        self._weight_rows = weight_rows
        # the parameters' share of a row: gradients, weights before and after the step
        self._open_numel = 3 * sum(p.numel() for p in params)
        self._param_width = self._open_numel

    @property
    def params(self) -> list[Tensor]:
        """The parameters whose gradients and weights the stage holds (:meth:`setup`)."""
        return self._stage_params

    def add(self, slot: int, row: int, x: Tensor, saturated: Rule | None,
                  inactive: Rule | None, key: Any) -> bool:
        """Stage a small activation (or activation gradient) of the open step. ``key`` names
        the hook site: the first time a site is seen its tensor is copied, and if the tensor
        was changed in place before the step ended (an in-place activation after it), the site
        is copied from then on; otherwise later steps keep a reference until the step's row
        is written. Returns False, staging nothing, when ``x`` does not go to the stage: another
        device or dtype than the stage's, more than :data:`gradprobe.stats.eager.SMALL` elements, not
        strided, or no room left in the step's row (:data:`gradprobe.capture.stage.MAX_ELEMS`)."""
        st = self.stage
        if st is None:
            return False
        n = x.numel()  # runs for every hooked tensor: each check once, the cheap ones first
        if (n > B.SMALL or x.dtype is not st.dtype or x.layout is not torch.strided
                or x.device != st.device):
            return False
        if self._open_slot != slot:
            self._clear_open(slot)
        if self._open_numel + n > _stage.MAX_ELEMS:
            return False
        self._open_numel += n
        rec = self.rec
        rec.seq_counter += 1
        if key in self._copy_keys or key not in self._seen_keys:
            self._open_ts.append(x.clone())
            self._cloned = True
        else:
            self._open_ts.append(x)
        self._open_keys.append((row, x.shape, saturated, inactive))
        self._open_xs.append(x)
        self._open_vers.append(x._version)
        self._open_sites.append(key)
        self._open_seqs.append(rec.seq_counter)
        return True

    def _clear_open(self, slot: int | None) -> None:
        """Forget the open entries; ``slot`` is the open step from now on."""
        self._open_keys = []
        self._open_ts = []
        self._open_xs = []
        self._open_vers = []
        self._open_sites = []
        self._open_seqs = []
        self._cloned = False
        self._open_slot = slot
        self._open_numel = self._param_width

    def pre(self, slot: int, grads: Sequence[Tensor | None] | None,
                  wpre: Sequence[Tensor] | None) -> None:
        """Write the open step's activations, the parameters' gradients and the weights before
        the update (``None``: not recorded, or the optimizer skipped the step) into its row."""
        st = self.stage
        assert st is not None
        if self._staged_row:  # a step whose optimizer step never finished: drop its row
            st.slots.pop()
            self._staged_row = False
        if self._open_slot != slot:
            self._clear_open(slot)
        if self._cloned or [x._version for x in self._open_xs] != self._open_vers:
            self._check_versions()
        keys = tuple(self._open_keys)
        ts, seqs = self._open_ts, self._open_seqs
        self._clear_open(None)
        params = self._stage_params
        gmask: tuple[bool, ...] = ()
        gl: list[Tensor] = []
        if grads is not None:
            dt, strided = st.dtype, torch.strided
            gl = [g for g in grads if g is not None and g.layout is strided and g.dtype is dt]
            gmask = (True,) * len(gl) if len(gl) == len(grads) else tuple(
                g is not None and g.layout is strided and g.dtype is dt for g in grads)
            if len(gl) != len(grads):  # sparse or other-dtype gradients: summarised at the step
                for g, m, r in zip(grads, gmask, self._grad_rows):
                    if g is not None and not m:
                        v = g.coalesce().values() if g.is_sparse else g
                        self.rec.defer(slot, r, v.detach().clone())
        key = (keys, gmask, wpre is not None)
        plan = st.plan_for(key, lambda: self._entries(keys, gmask, wpre is not None))
        if not st.ready(plan):
            self.summarise()
            st.start(plan)
        s = len(st.slots)
        st.slots.append(slot)
        self._staged_row = True
        assert st.buf is not None
        n_pre = len(ts) + len(gl) + (len(params) if wpre is not None else 0)
        src = ts + gl + (list(wpre) if wpre is not None else [])
        if src:
            torch._foreach_copy_(plan.views(st.buf, s, 0, n_pre), src)
        self._pre_seqs = seqs
        self._n_pre = n_pre
        self._plan = plan
        self._grads_at = (plan, s, len(ts)) if params and len(gl) == len(params) else None

    def grad_norms_into(self, out: Tensor, order: tuple[int, ...]) -> bool:
        """Between :meth:`pre` and :meth:`post` of a row that staged every parameter's
        gradient: ``out[j]`` = the norm of the gradient of staged parameter ``order[j]``, in
        one C call over the row (pointers made once per row of the buffer: no Python per
        gradient). False, writing nothing, where that does not serve."""
        st = self.stage
        at = self._grads_at
        if at is None or st is None or st.buf is None or len(order) != len(self._stage_params):
            return False
        plan, s, first = at
        base = st.buf.data_ptr()
        key = ("grad_norms", s, order)
        cached = plan.cache.get(key)
        if cached is None or cached[0] != base:  # a new buffer: the pointers made anew
            views = plan.views(st.buf, s, first, first + len(order))
            cached = (base, (ctypes.c_int64 * len(order))(*[views[j].data_ptr() for j in order]),
                      (ctypes.c_int64 * len(order))(*[views[j].numel() for j in order]))
            plan.cache[key] = cached
        return st.native.norms_at(st.dtype, cached[1], cached[2], out)

    def post(self, slot: int, wpost: Sequence[Tensor] | None, check: bool) -> bool:
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
            self._books.append((slot, self._pre_seqs, self.rec.seq_counter, book))
            self.rec.seq_counter += book[3]
        self._staged_row = False
        self._grads_at = None  # the row may be summarised (consumed) from here on
        immediate, self.rec.immediate = self.rec.immediate, False
        if check:
            finite = math.isfinite(float(plan.row(st.buf, s).sum()))
            if not finite:
                st.exact = True
                self.summarise()
                return False
        if not st.on_cpu:
            st.exact = True
        if len(st.slots) >= st.capacity:
            self.summarise()
        return not immediate

    def _check_versions(self) -> None:
        """Learn which hook sites need a copy: a tensor changed in place after its hook (an
        in-place activation after the module) is copied in the hook from then on; held by
        reference, its value of this step is lost and its entry dropped."""
        keep = []
        for i, (t, x, ver, site) in enumerate(zip(self._open_ts, self._open_xs,
                                                  self._open_vers, self._open_sites)):
            if x._version != ver:
                self._copy_keys.add(site)
                if t is x:
                    continue
            self._seen_keys.add(site)
            keep.append(i)
        if len(keep) != len(self._open_ts):
            for name in ("_open_keys", "_open_ts", "_open_xs", "_open_vers", "_open_sites",
                         "_open_seqs"):
                old = getattr(self, name)
                setattr(self, name, [old[i] for i in keep])

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
            self.rec.counts[slots] += counts
            base = np.array([b[2] for b in run], dtype=np.int64)[:, None]
            seqs = base + 1 + first[None, :]
            n_act = len(run[0][1])
            hooked = first < n_act
            if hooked.any():
                pre = np.array([b[1] for b in run], dtype=np.int64).reshape(len(run), n_act)
                seqs[:, hooked] = pre[:, first[hooked]]
            grid = np.ix_(slots, uniq)
            touched = self.rec.touched[grid]
            self.rec.seq[grid] = np.where(touched, np.minimum(self.rec.seq[grid], seqs), seqs)
            self.rec.touched[grid] = True

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
                for kind_rows in (self._weight_rows, ps.spread_rows, ps.update_rows,
                                  ps.drift_rows):
                    for r, n in zip(kind_rows, ps.numels):
                        if r >= 0:
                            rows.append(r)
                            numels.append(float(n))
            if not rows:
                plan.cache[key] = False
                return None
            arr = np.asarray(rows, dtype=np.int64)
            counts = np.zeros(len(self.rec.rows))
            np.add.at(counts, arr, np.asarray(numels))
            uniq, first = np.unique(arr, return_index=True)
            book = (counts, uniq, first.astype(np.int64), len(rows))
            plan.cache[key] = book
        return book if book is not False else None

    def _entries(self, keys: tuple[tuple[Any, ...], ...], gmask: tuple[bool, ...],
                 pre: bool) -> list[Entry]:
        st = self.stage
        assert st is not None
        out = [Entry(row, tuple(shape), sat, ina) for row, shape, sat, ina in keys]
        params = self._stage_params
        for p, r, m in zip(params, self._grad_rows, gmask):
            if m:
                out.append(Entry(r, tuple(p.shape)))
        if pre:
            out += [Entry(-1, tuple(p.shape), role=WPRE, param=j) for j, p in enumerate(params)]
        out += [Entry(r, tuple(p.shape), role=STATS, param=j)
                for j, (p, r) in enumerate(zip(params, self._weight_rows))]
        return out

    def summarise(self) -> None:
        st = self.stage
        if st is None or not st.slots or self._staged_row:
            return
        self._apply_books()
        slots, rows_t, mat, dead = st.summarise()
        r = len(self.rec.rows)
        slots_t = torch.tensor(slots, dtype=torch.long, device=mat.device)
        if mat.shape[1]:
            flat_idx = (slots_t[:, None] * r + rows_t[None, :]).reshape(-1)
            E.merge_rows_(self.rec.buf.view(-1, S.N_STATS), flat_idx, mat.reshape(-1, S.N_STATS))
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
                    if self.rec.kept_units is not None:  # counted across ranks at the flush
                        self.rec.kept_units += [(s, row, m[i]) for i, s in enumerate(slots)]
                        continue
                    count = m.sum(-1).to(E.STAT_DTYPE)
                    dev = self.rec.device
                    self.rec.buf[slots_t.to(dev), row, S.DEAD] += count.to(dev)
                    self.rec.units[slots_np, row] += m.shape[-1]

    def holds(self, slot: int) -> bool:
        """Whether the open step ``slot`` has anything staged."""
        return self._staged_row or (self._open_slot == slot and bool(self._open_ts))

    @property
    def pre_done(self) -> bool:
        """The open step's row was written by :meth:`pre` (its optimizer step began)."""
        return self._staged_row

    def discard(self, slot: int) -> None:
        """Drop the staged part of an unfinished step."""
        if self._open_slot == slot:
            self._clear_open(None)
        if self._staged_row and self.stage is not None and self.stage.slots[-1:] == [slot]:
            self.stage.slots.pop()
        self._staged_row = False
        self._grads_at = None
        self._books = [b for b in self._books if b[0] != slot]


__all__ = ["StagedSteps"]
