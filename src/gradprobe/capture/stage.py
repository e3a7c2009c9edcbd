"""Staging of the small tensors of recorded steps: one buffer row per step, summarised together.

A recorded step of a small model produces dozens of tensors of a few hundred elements
(activations, activation gradients, parameter gradients, weights). Summarising each on its own
costs a handful of kernels, and on such sizes the per-kernel overhead, not the arithmetic, is
the whole cost. The stage instead copies every small tensor of a step into one row of a
``[capacity, width]`` buffer (one ``_foreach_copy_`` into views laid out once per *layout*, the
sequence of shapes a step produces), and summarises up to ``capacity`` rows of one layout with a
fixed number of kernels: row reductions over runs of equally shaped tensors, the update and
drift differences over the weight regions of the rows. A layout change (a new batch size, a
layer that did not run) summarises what is staged and starts a new layout.

Row layout (column order of one step)::

    [ stats entries sorted by shape | W_before of the small parameters | (sumsq scratch) ]

where the stats entries are activations, activation gradients, parameter gradients and the
weights after the step (in parameter order, sorted by size within the weights). Values are
summarised in the tensors' own precision with float64 results, like
:func:`gradprobe.stats.batched.batched_stats`; results equal the per-tensor statistics to float
tolerance (tested against :func:`gradprobe.stats.reference.reference_stats`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gradprobe.stats import eager as E
from gradprobe.stats import schema as S
from gradprobe.stats.native import NATIVE, NativeKernels

Rule = Callable[[Tensor], Tensor]

STATS, WPRE = 0, 1

MAX_ELEMS = 1 << 23
"""Elements the stage buffer holds at most (32 MiB of float32). A step's small tensors are
staged while their row fits (the rest are summarised at the step as before); rows of
``width`` elements are staged for ``min(MAX_ELEMS // width, steps between flushes)`` steps
before they are summarised, so a small model's buffer is far below the bound."""


@dataclass(frozen=True)
class Entry:
    """One tensor of a step's layout."""

    row: int  # statistics row (-1: W_before, kept only for the update ratio)
    shape: tuple[int, ...]
    sat: Rule | None = None
    ina: Rule | None = None
    role: int = STATS
    param: int = -1  # index into the stage's small parameters (weights after / before the step)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class _Run:
    """Consecutive stats entries of one shape: a ``[S, m, n]`` view of the buffer."""

    start: int
    m: int
    shape: tuple[int, ...]
    entries: list[int]  # indices into Plan.stats (layout order within the run)
    sat: list[tuple[Rule, list[int]]] = field(default_factory=list)  # rule -> positions in run
    ina: list[tuple[Rule, list[int]]] = field(default_factory=list)

    @property
    def n(self) -> int:
        return math.prod(self.shape)


class Plan:
    """Where each entry of one layout lives in a buffer row, and how the rows are summarised."""

    def __init__(self, entries: Sequence[Entry], params: ParamSet | None) -> None:
        self.params = params
        self.entries = list(entries)
        stats = [e for e in entries if e.role == STATS]
        # weights after the step last, in the parameter set's order (one contiguous region for
        # the update and drift differences); everything else by shape, so that runs are long
        rank = {j: k for k, j in enumerate(params.order)} if params is not None else {}

        def sort_key(i: int) -> tuple[Any, ...]:
            e = stats[i]
            if e.param >= 0:
                return (1, rank[e.param])
            # entries with the same rules next to each other: their block is a slice of the run
            return (0, e.numel, e.shape, _name(e.ina), _name(e.sat))

        order = sorted(range(len(stats)), key=sort_key)
        self.stats = [stats[i] for i in order]
        # the caller copies its tensors in `entries` order: where each one goes
        offset_of: dict[int, int] = {}
        runs: list[_Run] = []
        off = 0
        for j, i in enumerate(order):
            e = self.stats[j]
            offset_of[i] = off
            if runs and runs[-1].shape == e.shape:
                runs[-1].m += 1
                runs[-1].entries.append(j)
            else:
                runs.append(_Run(off, 1, e.shape, [j]))
            off += e.numel
        for run in runs:
            sat: dict[Any, list[int]] = {}
            ina: dict[Any, list[int]] = {}
            for pos, j in enumerate(run.entries):
                if self.stats[j].sat is not None:
                    sat.setdefault(self.stats[j].sat, []).append(pos)
                if self.stats[j].ina is not None:
                    ina.setdefault(self.stats[j].ina, []).append(pos)
            run.sat = list(sat.items())
            run.ina = list(ina.items())
        self.runs = runs
        self.stats_width = off
        pre = [e for e in entries if e.role == WPRE]
        self.has_pre = bool(pre)
        # W_before in the parameter set's size order, right after the stats entries
        pre_off: dict[int, int] = {}
        if pre:
            assert params is not None
            for j in params.order:
                pre_off[j] = off
                off += params.numels[j]
        self.width = off
        self.offsets: list[int] = []
        k = 0
        for e in entries:
            if e.role == STATS:
                self.offsets.append(offset_of[k])
                k += 1
            else:
                self.offsets.append(pre_off[e.param])
        self.shapes = [e.shape for e in entries]
        self.rows = np.array([e.row for e in self.stats], dtype=np.int64)
        self.numels = np.array([e.numel for e in self.stats], dtype=np.float64)
        self.cache: dict[Any, Any] = {}  # row indices, column blocks, bookkeeping of this plan
        # where the weights after the step are among the stats entries (for the ratios)
        if params is not None:
            post = {e.param: j for j, e in enumerate(self.stats) if e.param >= 0}
            if len(post) == len(params.numels):
                self.post_of_param = [post[j] for j in range(len(params.numels))]
            else:
                self.post_of_param = []
        else:
            self.post_of_param = []
        self._views: dict[tuple[int, int], list[Tensor]] = {}
        self._views_of: Tensor | None = None  # the buffer the cached views are of
        self._stat_offsets = np.concatenate(
            [[0], np.cumsum([e.numel for e in self.stats])]).astype(np.int64)

    def offset_of_stats(self, j: int) -> int:
        """Column where stats entry ``j`` (in sorted order) starts."""
        return int(self._stat_offsets[j])

    def views(self, buf: Tensor, s: int, lo: int, hi: int) -> list[Tensor]:
        """Views of row ``s`` of ``buf`` shaped like entries ``lo:hi`` (cached per buffer row)."""
        if buf is not self._views_of:
            self._views.clear()
            self._views_of = buf
        key = (s, lo)
        out = self._views.get(key)
        if out is None:
            row = buf[s]
            out = [row.narrow(0, self.offsets[i], math.prod(self.shapes[i])).view(self.shapes[i])
                   for i in range(lo, hi)]
            self._views[key] = out
        return out

    def row(self, buf: Tensor, s: int) -> Tensor:
        """Row ``s`` of ``buf``, ``width`` elements (cached like :meth:`views`)."""
        if buf is not self._views_of:
            self._views.clear()
            self._views_of = buf
        key = (s, -1)
        out = self._views.get(key)
        if out is None:
            out = [buf[s, : self.width]]
            self._views[key] = out
        return out[0]


@dataclass
class ParamSet:
    """The small parameters of one device and dtype whose weights the stage follows."""

    numels: list[int]
    update_rows: list[int]  # per parameter (-1: kind off)
    drift_rows: list[int]
    init: Tensor | None  # W0 of the parameters, flat, in `order`
    init_sumsq: Tensor | None  # Σ W0² per parameter (float64)
    order: list[int] = field(default_factory=list)  # parameters sorted by size (W_before layout)
    spread_rows: list[int] = field(default_factory=list)  # per parameter, -1: no spread row
    units: list[int] = field(default_factory=list)  # rows of each parameter (spread)

    def __post_init__(self) -> None:
        if not self.order:
            self.order = sorted(range(len(self.numels)), key=lambda j: self.numels[j])
        if not self.spread_rows:
            self.spread_rows = [-1] * len(self.numels)
        if not self.units:
            self.units = [1] * len(self.numels)


class Stage:
    """A ``[capacity, width]`` buffer of staged step rows of one layout (see the module doc)."""

    def __init__(self, device: torch.device, dtype: torch.dtype, params: ParamSet | None,
                 max_steps: int) -> None:
        self.device = device
        self.on_cpu = E.on_host(device)
        self.max_steps = max_steps
        self.dtype = dtype
        self.params = params
        self.plan: Plan | None = None
        self.buf: Tensor | None = None
        self.capacity = 0
        self.slots: list[int] = []
        self.exact = False  # a staged row held non-finite values: count them exactly
        self._plans: dict[Any, Plan] = {}
        self.native: NativeKernels = NATIVE  # the C kernels summarise runs where they serve

    def plan_for(self, key: Any, entries: Callable[[], Sequence[Entry]]) -> Plan:
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= 64:
                self._plans.clear()
            plan = Plan(entries(), self.params)
            self._plans[key] = plan
        return plan

    def ready(self, plan: Plan) -> bool:
        """True when a row of ``plan`` can be staged now (same layout, room left)."""
        return plan is self.plan and len(self.slots) < self.capacity

    def start(self, plan: Plan) -> None:
        """Begin staging rows of ``plan`` (the caller has summarised the previous ones)."""
        assert not self.slots
        self.plan = plan
        width = max(plan.width, 1)
        self.capacity = max(1, min(MAX_ELEMS // width, self.max_steps))
        if self.buf is None or self.buf.shape[1] < width or self.buf.shape[0] < self.capacity:
            rows = self.capacity
            self.buf = torch.empty(rows, width, dtype=self.dtype, device=self.device)
        else:
            self.capacity = min(self.capacity, self.buf.shape[0])

    # ------------------------------------------------------------------ summaries

    def summarise(self) -> tuple[list[int], Tensor, Tensor, list[tuple[int, Tensor]]]:
        """Statistics of the staged rows: ``(slots, rows_t, mat[S, k, N_STATS], dead)`` where
        ``dead`` lists ``(row, inactive mask [S, units])`` per entry with a dead-unit rule
        (AND-ed per row and counted by the caller); empties the stage."""
        plan = self.plan
        assert plan is not None and self.buf is not None
        slots, self.slots = self.slots, []
        exact, self.exact = self.exact, False
        n_steps = len(slots)
        x = self.buf[:n_steps, : plan.width]
        mats: list[Tensor] = []
        rows: list[Tensor] = []
        dead: list[tuple[int, Tensor]] = []
        ratio = self._ratios(plan, x)
        if ratio is not None:
            mats.append(ratio[1])
            rows.append(ratio[0])
        if plan.runs:
            # every entry's row of statistics, written run by run into one matrix
            mat = torch.zeros(n_steps, len(plan.stats), S.N_STATS, dtype=E.STAT_DTYPE,
                              device=x.device)
            k = 0
            for run in plan.runs:
                self._run_stats(plan, run, x, exact, dead, mat[:, k : k + run.m])
                k += run.m
            mat[..., S.NEG_MIN].neg_()
            keep = plan.rows >= 0  # weights after the step kept only for the ratios
            if not keep.all():
                mat = mat[:, _rows_tensor(plan, "keep", np.flatnonzero(keep), x.device)]
            if mat.shape[1]:
                mats.append(mat)
                rows.append(_rows_tensor(plan, "stats", plan.rows[keep], x.device))
        if not mats:
            empty = torch.empty(n_steps, 0, S.N_STATS, dtype=E.STAT_DTYPE, device=x.device)
            return slots, torch.empty(0, dtype=torch.long, device=x.device), empty, dead
        return slots, torch.cat(rows), torch.cat(mats, 1), dead

    def _run_stats(self, plan: Plan, run: _Run, x: Tensor, exact: bool,
                   dead: list[tuple[int, Tensor]], out: Tensor) -> None:
        """Statistics of one run into ``out`` (``[S, m, N_STATS]``, zeros; the ``NEG_MIN``
        column receives the minimum, negated by the caller for all runs at once)."""
        n_steps = x.shape[0]
        v = x[:, run.start : run.start + run.m * run.n].view(n_steps, run.m, run.n)
        for rule, pos in run.sat:
            counts = rule(_pick(v, pos)).sum(-1)
            if len(pos) == run.m:
                out[..., S.SATURATED] = counts
            else:
                out[:, pos, S.SATURATED] = counts.to(E.STAT_DTYPE)
        for rule, pos in run.ina:
            sub = _pick(v, pos).reshape(n_steps, len(pos), *run.shape)
            units = _inactive(sub, rule)  # [S, len(pos), units]
            for i, p in enumerate(pos):
                row = plan.stats[run.entries[p]].row
                dead.append((row, units[:, i]))
        rows = self.native.blocks(v)
        if rows is not None:  # one C pass per row, exact counts (gradprobe.stats.native)
            out[..., : S.SATURATED] = rows[..., : S.SATURATED]
            out[..., S.NEG_MIN] = rows[..., S.NEG_MIN].neg_()  # the minimum: see above
            out[..., S.MAX] = rows[..., S.MAX]
            return
        out[..., S.NEG_MIN : S.MAX + 1] = torch.stack([v.amin(-1), v.amax(-1)], -1)
        s = v.sum(-1)
        ss = torch.linalg.vector_norm(v, 2, dim=-1).square_()
        if exact:
            nnz = torch.count_nonzero(v, dim=-1).to(v.dtype)
            out[..., S.NONFINITE] = (~torch.isfinite(v)).sum(-1)
        a = v.abs_()  # the staged rows are consumed: |x| in place
        l1 = a.sum(-1)
        if not exact:
            nnz = a.sign_().sum(-1)
        out[..., S.SUM : S.NONZERO + 1] = torch.stack([s, ss, l1, nnz], -1)

    def _ratios(self, plan: Plan, x: Tensor) -> tuple[Tensor, Tensor] | None:
        """Update and drift rows ``(rows_t, mat[S, k, N_STATS])`` from the weight regions."""
        ps = plan.params
        if ps is None or not plan.post_of_param:
            return None
        want_u = any(r >= 0 for r in ps.update_rows)
        want_d = any(r >= 0 for r in ps.drift_rows) and ps.init is not None
        want_s = any(r >= 0 for r in ps.spread_rows)
        if not (want_u or want_d or want_s):
            return None
        n_steps = x.shape[0]
        # W after the step: one contiguous [S, P] region, in the parameter set's size order
        order = ps.order
        lens = [ps.numels[p] for p in order]
        lo = plan.offset_of_stats(plan.post_of_param[order[0]])
        post = x[:, lo : lo + sum(lens)]
        wsq = _segment_sumsq(post, lens)  # [S, len(order)]
        mats: list[Tensor] = []
        rows: list[int] = []
        if want_s:  # before the W_before region is consumed: post is read only
            sp_mat, sp_rows = _spread(ps, post, wsq)
            mats.append(sp_mat)
            rows += sp_rows
        pre = x[:, plan.stats_width : plan.stats_width + post.shape[1]] if plan.has_pre else None
        if want_u:
            if pre is not None:
                dsq = _segment_sumsq(pre.sub_(post), lens)  # the W_before region is consumed
            else:  # a step the optimizer skipped: the weights did not move
                dsq = torch.zeros_like(wsq)
            mats.append(E.ratio_rows(dsq, wsq))
            rows += [ps.update_rows[p] for p in order]
        if want_d:
            assert ps.init is not None and ps.init_sumsq is not None
            diff = torch.sub(post, ps.init, out=pre) if pre is not None else post - ps.init
            dsq = _segment_sumsq(diff, lens)
            ref = ps.init_sumsq[order].expand(n_steps, -1)
            mats.append(E.ratio_rows(dsq, ref))
            rows += [ps.drift_rows[p] for p in order]
        keep = [i for i, r in enumerate(rows) if r >= 0]
        mat = torch.cat(mats, 1)
        if len(keep) != len(rows):
            mat = mat[:, keep]
            rows = [rows[i] for i in keep]
        return _rows_tensor(plan, ("ratio", want_u, want_d, want_s), np.array(rows), x.device), mat


def _spread(ps: ParamSet, post: Tensor, wsq: Tensor) -> tuple[Tensor, list[int]]:
    """Rows of kind ``spread`` (:mod:`gradprobe.stats.spread`) of the staged steps' weights after
    the update: per dense weight ``Σ_i ‖w_i − w̄‖² = Σ‖w_i‖² − ‖Σ_i w_i‖²/u`` and ``Σ‖w_i‖²``,
    all staged steps of one weight in one reduction (``post`` ``[S, Σ lens]`` in ``ps.order``,
    ``wsq`` its per-parameter ``Σ W²``)."""
    n_steps = post.shape[0]
    cols: list[Tensor] = []
    refs: list[Tensor] = []
    units: list[int] = []
    rows: list[int] = []
    off = 0
    for k, p in enumerate(ps.order):
        n = ps.numels[p]
        if ps.spread_rows[p] >= 0:
            u = ps.units[p]
            colsum = post[:, off : off + n].reshape(n_steps, u, n // u).sum(1)
            cols.append(torch.linalg.vector_norm(colsum, 2, dim=-1).to(E.STAT_DTYPE).square())
            refs.append(wsq[:, k])
            units.append(u)
            rows.append(ps.spread_rows[p])
        off += n
    csq = torch.stack(cols, 1)
    ref = torch.stack(refs, 1)
    u_t = torch.tensor(units, dtype=E.STAT_DTYPE, device=post.device)
    spread = (ref - csq / u_t).clamp_min_(0.0)
    return E.ratio_rows(spread, ref), rows


def _name(rule: Rule | None) -> str:
    return "" if rule is None else f"{getattr(rule, '__module__', '')}.{rule.__qualname__}"


def _pick(v: Tensor, pos: list[int]) -> Tensor:
    """``v[:, pos]`` as a view when ``pos`` is a contiguous range (the plan sorts entries with
    the same rules next to each other), a copy otherwise."""
    if pos == list(range(pos[0], pos[0] + len(pos))):
        return v[:, pos[0] : pos[0] + len(pos)]
    return v[:, pos]


def _segment_sumsq(d: Tensor, lens: list[int]) -> Tensor:
    """``Σ d²`` of consecutive column segments of ``d`` (``[S, Σ lens]``) as ``[S, len(lens)]``
    float64, segments of equal length reduced together."""
    out: list[Tensor] = []
    off = 0
    i = 0
    while i < len(lens):
        j = i
        while j < len(lens) and lens[j] == lens[i]:
            j += 1
        n = lens[i]
        blk = d[:, off : off + (j - i) * n].reshape(d.shape[0], j - i, n)
        out.append(torch.linalg.vector_norm(blk, 2, dim=-1).to(E.STAT_DTYPE).square())
        off += (j - i) * n
        i = j
    return torch.cat(out, 1)


def _inactive(sub: Tensor, rule: Rule) -> Tensor:
    """``[S, m, units]`` inactive masks of ``sub`` (``[S, m, *shape]``): a unit is the channel of
    4-d and larger outputs, the last dimension otherwise (:func:`gradprobe.stats.schema.unit_dims`)."""
    dims = tuple(d + 2 for d in S.unit_dims(sub.ndim - 2))
    red = sub.amax(dim=dims) if dims else sub
    return rule(red.reshape(sub.shape[0], sub.shape[1], -1))


def _rows_tensor(plan: Plan, key: Any, rows: np.ndarray, device: torch.device) -> Tensor:
    t = plan.cache.get(key)
    if t is None:
        t = torch.as_tensor(rows, dtype=torch.long, device=device)
        plan.cache[key] = t
    return t


__all__ = ["Entry", "ParamSet", "Plan", "Stage"]
