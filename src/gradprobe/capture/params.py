"""Parameter statistics of a step: ``grad``, ``weight``, ``update`` and ``drift``.

The tracked parameters are grouped by device and dtype (:class:`ParamGroup`). At the optimizer
step (before it: gradients, and the weights before the update; after it: the weights, the
update ratio ``‖W_{t+1} − W_t‖ / ‖W_{t+1}‖`` and the drift ``‖W_t − W_0‖ / ‖W_0‖``) each group's
parameters are summarised in as few kernels as the :class:`~gradprobe.capture.recorder.Recorder`
allows: the small tensors of the first group go to its stage (summarised many steps at once),
other small tensors are deferred and summarised together, large ones one at a time so that the
weight statistics and both differences find ``W`` in cache. :class:`ParamStats` decides only
*which* tensors and rows; how a tensor is summarised is the recorder's choice.

With the weights after the update, kind ``spread`` records how different each dense layer's
units are (:mod:`gradprobe.stats.spread`: ``Σ_i ‖w_i − w̄‖²`` and ``Σ_i ‖w_i‖²`` of the weight
rows), a fixed number of kernels per device and dtype (:class:`SpreadGroup`).

Memory: one copy of the tracked parameters for ``update``/``drift`` (the weights before the
step) and one more for ``drift`` (W0), plus one scratch buffer as large as the largest tensor,
plus the spread's index tensors (8 bytes per element of the small dense weights).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from gradprobe.capture import stage as _stage
from gradprobe.capture.recorder import Recorder
from gradprobe.capture.select import Layer, spread_weight
from gradprobe.capture.stage import ParamSet
from gradprobe.stats import batched as B
from gradprobe.stats import eager as E
from gradprobe.stats import schema as S
from gradprobe.stats.spread import RowSpread, units_of

WeightsBefore = Literal["live", "prev", "none"]
"""Where the weights before the update are: ``"live"`` the parameters now (before the
optimizer step), ``"prev"`` the copy taken when the step began (no optimizer), ``"none"`` the
optimizer skipped the step."""


@dataclass
class ParamGroup:
    """Tracked parameters of one device and dtype, with their layers' rows per kind."""

    params: list[nn.Parameter]
    layer_ids: list[int]
    numels: list[int]
    rows: dict[str, list[int]] = field(default_factory=dict)
    rows_t: dict[str, Tensor] = field(default_factory=dict)
    prev: list[Tensor] = field(default_factory=list)  # scratch: W before the step, then W - W0
    init: list[Tensor] = field(default_factory=list)  # W0
    init_sumsq: Tensor | None = None
    scratch: Tensor | None = None  # flat, as large as the largest tensor: |x| without allocating
    small: list[int] = field(default_factory=list)  # tensors of at most stats.SMALL elements
    large: list[int] = field(default_factory=list)
    staged: list[int] = field(default_factory=list)  # small tensors of the recorder's stage
    own: list[int] = field(default_factory=list)  # small + large: summarised here
    own_params: list[Tensor] = field(default_factory=list)
    own_prev: list[Tensor] = field(default_factory=list)
    own_init_sumsq: Tensor | None = None  # Σ W0² of the `own` parameters


def make_groups(layers: list[Layer], kinds: tuple[str, ...],
                device: torch.device) -> list[ParamGroup]:
    """Group the layers' parameters by device and dtype; allocate the copies ``update`` and
    ``drift`` need (W before the step, W0)."""
    by_key: dict[tuple[object, object], ParamGroup] = {}
    for lay in layers:
        for p in lay.params:
            g = by_key.setdefault((p.device, p.dtype), ParamGroup([], [], []))
            g.params.append(p)
            g.layer_ids.append(lay.layer_id)
            g.numels.append(p.numel())
    groups = list(by_key.values())
    for g in groups:
        for kind in S.PARAM_KINDS:
            if kind in kinds:
                g.rows[kind] = [layers[i].rows[kind] for i in g.layer_ids]
                g.rows_t[kind] = torch.tensor(g.rows[kind], dtype=torch.long, device=device)
        g.small = [i for i, n in enumerate(g.numels) if n <= B.SMALL]
        g.large = [i for i, n in enumerate(g.numels) if n > B.SMALL]
        for kind in list(g.rows):
            g.rows_t[kind + "_large"] = g.rows_t[kind][g.large]
        with torch.no_grad():
            g.scratch = torch.empty(max(g.numels), dtype=g.params[0].dtype, device=device)
            if "update" in kinds or "drift" in kinds:
                g.prev = [torch.empty_like(p) for p in g.params]
            if "drift" in kinds:
                g.init = [p.detach().clone() for p in g.params]
                g.init_sumsq = B.sumsq_group(g.init)
    return groups


@dataclass
class SpreadGroup:
    """The dense weights of one device and dtype whose row spread is recorded."""

    params: list[Tensor]
    rows: list[int]
    rows_t: Tensor
    numels: list[int]
    kernel: RowSpread


def make_spread_groups(layers: list[Layer], skip: set[int]) -> list[SpreadGroup]:
    """The dense weights with a ``spread`` row, but those in ``skip`` (ids of the staged
    parameters, whose spread the stage summarises), grouped by device and dtype."""
    by_key: dict[tuple[object, object], list[tuple[Tensor, int]]] = {}
    for lay in layers:
        row = lay.rows.get("spread")
        w = spread_weight(lay)
        if row is None or w is None or id(w) in skip:
            continue
        by_key.setdefault((w.device, w.dtype), []).append((w, row))
    out = []
    for items in by_key.values():
        ws = [w for w, _ in items]
        rows = [r for _, r in items]
        dev = ws[0].device
        out.append(SpreadGroup(ws, rows, torch.tensor(rows, dtype=torch.long, device=dev),
                               [w.numel() for w in ws], RowSpread(ws, dev)))
    return out


class ParamStats:
    """The parameter side of a Probe: its groups, and the statistics of a step's parameters
    written into ``recorder``."""

    def __init__(self, layers: list[Layer], kinds: tuple[str, ...], device: torch.device,
                 recorder: Recorder) -> None:
        self.kinds = kinds
        self.recorder = recorder
        self.groups = make_groups(layers, kinds, device)
        self._stage_group = self.groups[0]
        self.staged: list[Tensor] = []  # the parameters of the recorder's stage
        self._want_post = bool(set(kinds) & {"weight", "update", "drift", "spread"})
        self._stage(self.groups, layers)
        # the staged dense weights' spread is summarised with the stage; the others here
        staged = {id(p) for p in self.staged}
        self.spreads = make_spread_groups(layers, staged) if "spread" in kinds else []
        # Σ W² of the step's large weights, from their weight statistics, and where the C
        # kernels formed them in the same call, Σ_j (Σ_i W[i, j])² (both reused by spread)
        self._wsq: dict[int, Tensor] = {}
        self._csq: dict[int, Tensor] = {}
        self._cols = {id(p): p.numel() // units_of(p) for sg in self.spreads for p in sg.params
                      if p.numel() > B.SMALL}

    @property
    def staged_after(self) -> list[Tensor] | None:
        """The staged parameters whose values after the update the stage records."""
        return self.staged if self._want_post else None

    def _stage(self, groups: list[ParamGroup], layers: list[Layer]) -> None:
        """Hand the small parameters of the first group (and the small activations of its
        device and dtype) to the recorder's stage: one buffer row per step, summarised for
        many steps at once (:mod:`gradprobe.capture.stage`)."""
        rec = self.recorder
        g = groups[0]
        if 3 * sum(g.numels[i] for i in g.small) <= _stage.MAX_ELEMS // 2:
            g.staged, g.small = g.small, []  # else the stage keeps only activations
        for grp in groups:
            _index_own(grp, rec.device)
        params: list[Tensor] = [g.params[i] for i in g.staged]

        def rows(kind: str) -> list[int]:
            return [g.rows[kind][i] if kind in g.rows else -1 for i in g.staged]

        init = init_sumsq = None
        if "drift" in self.kinds and params:
            order = sorted(range(len(params)), key=lambda j: params[j].numel())
            init = torch.cat([g.init[g.staged[j]].reshape(-1) for j in order])
            assert g.init_sumsq is not None
            init_sumsq = g.init_sumsq[g.staged]
        spread_of = {id(spread_weight(lay)): lay.rows["spread"] for lay in layers
                     if "spread" in lay.rows and spread_weight(lay) is not None}
        pset = ParamSet([p.numel() for p in params], rows("update"), rows("drift"), init,
                        init_sumsq, spread_rows=[spread_of.get(id(p), -1) for p in params],
                        units=[int(p.shape[0]) if p.dim() else 1 for p in params])
        rec.staged.setup(g.params[0].device, g.params[0].dtype, params,
                        rows("grad"), rows("weight"), pset)
        self.staged = params

    # ------------------------------------------------------------------ around the update

    def snapshot(self) -> None:
        """Copy every tracked parameter as the weights before the update (no optimizer: the
        step's end is only known afterwards)."""
        with torch.no_grad():
            for g in self.groups:
                torch._foreach_copy_(g.prev, [p.detach() for p in g.params])

    def before_update(self) -> None:
        """Copy the parameters not staged, for ``update`` (the optimizer is about to step)."""
        if "update" in self.kinds:
            for g in self.groups:
                if g.own:
                    torch._foreach_copy_(g.own_prev, g.own_params)

    def stage_before(self, slot: int, wpre: WeightsBefore, hist: bool) -> None:
        """Stage the step's small gradients and the weights before the update."""
        g = self._stage_group
        params = self.staged
        grads = [p.grad for p in params] if "grad" in self.kinds else None
        before: list[Tensor] | None = None
        if "update" in self.kinds and params:
            if wpre == "live":
                before = params
            elif wpre == "prev":
                before = [g.prev[i] for i in g.staged]
        self.recorder.staged.pre(slot, grads, before)
        if grads is not None and hist:
            have = [(gr, g.rows["grad"][i]) for gr, i in zip(grads, g.staged) if gr is not None]
            self.hist(slot, [gr for gr, _ in have], [r for _, r in have])

    def release(self) -> None:
        """Free the parameter copies (the probe detached)."""
        for g in self.groups:
            g.prev.clear()
            g.init.clear()

    # ------------------------------------------------------------------ statistics

    def hist(self, slot: int, tensors: list[Tensor], rows: list[int]) -> None:
        """Histograms of ``tensors``, the tensors of one row pooled."""
        by_row: dict[int, list[Tensor]] = {}
        for t, r in zip(tensors, rows):
            by_row.setdefault(r, []).append(t.detach().reshape(-1))
        for r, ts in by_row.items():
            self.recorder.add_hist(slot, r, torch.cat(ts) if len(ts) > 1 else ts[0])

    def grads(self, slot: int, hist: bool) -> None:
        """Statistics of the gradients not staged (sparse gradients by their values)."""
        if "grad" not in self.kinds or not any(g.own for g in self.groups):
            return  # every gradient is staged (the small models: this runs every step)
        rec = self.recorder
        with torch.no_grad():
            for g in self.groups:
                small: list[Tensor] = []
                small_rows: list[int] = []
                large: list[Tensor] = []
                large_rows: list[int] = []
                for i in g.own:
                    gr = g.params[i].grad
                    if gr is None:
                        continue
                    if gr.is_sparse:
                        gr = gr.coalesce().values()
                    if gr.numel() <= B.SMALL:
                        small.append(gr)
                        small_rows.append(g.rows["grad"][i])
                    else:
                        large.append(gr)
                        large_rows.append(g.rows["grad"][i])
                if small:
                    # one copy of all small gradients (the optimizer step must not change
                    # them under us), summarised with the step's other small tensors
                    flat = torch._C._nn.flatten_dense_tensors(small)
                    for v, row in zip(flat.split([t.numel() for t in small]), small_rows):
                        rec.defer(slot, row, v)
                if large:
                    mat = rec.summary.group(large)
                    rows_t = (g.rows_t["grad_large"] if len(large) == len(g.large)
                              else torch.tensor(large_rows, dtype=torch.long, device=mat.device))
                    rec.add_many(slot, large_rows, rows_t, mat, [t.numel() for t in large])
                if hist:
                    self.hist(slot, small + large, small_rows + large_rows)

    def params(self, slot: int, skipped: bool, hist: bool) -> None:
        """Statistics of the weights after the update, the update and the drift of the
        parameters not staged."""
        want_w = "weight" in self.kinds
        for g in self.groups:
            if not g.own and not (want_w and hist):
                continue  # every parameter of the group is staged
            ws = [p.detach() for p in g.params]
            if want_w:
                rows = g.rows["weight"]
                for i in g.small:  # summarised with the step's other small tensors
                    self.recorder.defer(slot, rows[i], ws[i])
                if hist:
                    self.hist(slot, ws, rows)
            up_w, up_d, dr_d = self._large(g, ws, slot, skipped)
            if g.own:
                self._ratios(g, ws, slot, skipped, up_w, up_d, dr_d)
        self.spread(slot)

    def spread(self, slot: int) -> None:
        """The ``spread`` rows of the dense weights after the update (a fixed number of
        kernels per device and dtype; see :mod:`gradprobe.stats.spread`)."""
        for sg in self.spreads:
            known = [self._wsq.get(id(p)) for p in sg.params]
            colsq = [self._csq.get(id(p)) for p in sg.params]
            sp, ref = sg.kernel([p.detach() for p in sg.params], known, colsq)
            self.recorder.add_many(slot, sg.rows, sg.rows_t, E.ratio_rows(sp, ref), sg.numels)
        self._wsq.clear()
        self._csq.clear()

    def _large(self, g: ParamGroup, ws: list[Tensor], slot: int, skipped: bool
               ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Large tensors one at a time, so that the weight statistics, W_before − W and
        W − W0 find W in cache; differences go through the scratch buffer. Adds the weight
        rows; returns the per-tensor Σ W², Σ (W_before − W)² and Σ (W − W0)²."""
        rec = self.recorder
        want_w, want_u, want_d = ("weight" in self.kinds, "update" in self.kinds,
                                  "drift" in self.kinds)
        vecs: list[Tensor] = []
        up_w: list[Tensor] = []
        up_d: list[Tensor] = []
        dr_d: list[Tensor] = []
        exact = True  # every vector from the compiled kernel: counts already exact
        for i in g.large:
            w = ws[i]
            # one pass (C, else compiled) where available: statistics of W, Σ(W_before − W)²,
            # Σ(W − W0)², and the spread's column sums (C)
            pid = id(g.params[i])
            both = rec.summary.weight(w, g.prev[i] if want_u and not skipped else None,
                                      g.init[i] if want_d else None, self._cols.get(pid, 0))
            if both is not None:
                self._wsq[pid] = both[S.SUMSQ]
                if both.numel() > S.N_STATS + 2:
                    self._csq[pid] = both[S.N_STATS + 2]
                if want_w:
                    vecs.append(both[: S.N_STATS])
                if want_u:
                    up_w.append(both[S.SUMSQ])
                    if not skipped:
                        up_d.append(both[S.N_STATS])
                if want_d:
                    dr_d.append(both[S.N_STATS + 1])
                continue
            exact = False
            if want_w:
                vecs.append(rec.summary.large_weight(w))
            if want_u:
                up_w.append(vecs[-1][S.SUMSQ] if want_w else E.sumsq(w))
            if want_w or want_u:
                self._wsq[id(g.params[i])] = vecs[-1][S.SUMSQ] if want_w else up_w[-1]
                if not skipped:
                    up_d.append(E.diff_sumsq(g.prev[i], w, g.scratch))
            if want_d:
                dr_d.append(E.diff_sumsq(w, g.init[i], g.scratch))
        if vecs:
            wl = [ws[i] for i in g.large]
            wmat = torch.stack(vecs)
            if not exact:
                wmat = E.fix_nonfinite_(wl, wmat)
            rec.add_many(slot, [g.rows["weight"][i] for i in g.large],
                         g.rows_t["weight_large"], wmat, [g.numels[i] for i in g.large])
        return up_w, up_d, dr_d

    def _ratios(self, g: ParamGroup, ws: list[Tensor], slot: int, skipped: bool,
                up_w: list[Tensor], up_d: list[Tensor], dr_d: list[Tensor]) -> None:
        """The ``update`` and ``drift`` rows of the group's parameters not staged: the small
        tensors' sums of squares in one foreach pass, the large ones' from :meth:`_large`."""
        rec = self.recorder
        own = g.own
        if "update" in self.kinds:
            if skipped:
                wsq = rec.summary.sumsq_group([ws[i] for i in own])
                dsq = torch.zeros_like(wsq)
            else:
                wsq = torch.empty(len(own), dtype=E.STAT_DTYPE, device=ws[0].device)
                dsq = torch.empty_like(wsq)
                if g.small:  # W_before - W_after into g.prev
                    d = [g.prev[i] for i in g.small]
                    torch._foreach_sub_(d, [ws[i] for i in g.small])
                    both = rec.summary.sumsq_group([ws[i] for i in g.small] + d)
                    wsq[g.rows_t["small_pos"]] = both[: len(d)]
                    dsq[g.rows_t["small_pos"]] = both[len(d):]
                if g.large:
                    wsq[g.rows_t["large_pos"]] = torch.stack(up_w).to(E.STAT_DTYPE)
                    dsq[g.rows_t["large_pos"]] = torch.stack(up_d).to(E.STAT_DTYPE)
            rec.add_many(slot, [g.rows["update"][i] for i in own], g.rows_t["update_own"],
                         E.ratio_rows(dsq, wsq), [g.numels[i] for i in own])
        if "drift" in self.kinds:
            dsq = torch.empty(len(own), dtype=E.STAT_DTYPE, device=ws[0].device)
            if g.small:  # small tensors: W - W0 into g.prev with two foreach calls
                d = [g.prev[i] for i in g.small]
                torch._foreach_copy_(d, [ws[i] for i in g.small])
                torch._foreach_sub_(d, [g.init[i] for i in g.small])
                dsq[g.rows_t["small_pos"]] = rec.summary.sumsq_group(d)
            if g.large:
                dsq[g.rows_t["large_pos"]] = torch.stack(dr_d).to(E.STAT_DTYPE)
            assert g.own_init_sumsq is not None
            rec.add_many(slot, [g.rows["drift"][i] for i in own], g.rows_t["drift_own"],
                         E.ratio_rows(dsq, g.own_init_sumsq), [g.numels[i] for i in own])


def _index_own(grp: ParamGroup, row_device: torch.device) -> None:
    """The group's parameters not staged (``own``) and the index tensors that place their
    small and large members in its rows."""
    grp.own = sorted(grp.small + grp.large)
    grp.own_params = [grp.params[i] for i in grp.own]
    grp.own_prev = [grp.prev[i] for i in grp.own] if grp.prev else []
    dev = grp.params[0].device
    pos = {i: k for k, i in enumerate(grp.own)}
    grp.rows_t["own"] = torch.tensor(grp.own, dtype=torch.long, device=dev)
    if grp.init_sumsq is not None:
        grp.own_init_sumsq = grp.init_sumsq[grp.rows_t["own"]]
    grp.rows_t["small_pos"] = torch.tensor([pos[i] for i in grp.small], dtype=torch.long,
                                           device=dev)
    grp.rows_t["large_pos"] = torch.tensor([pos[i] for i in grp.large], dtype=torch.long,
                                           device=dev)
    for kind in ("update", "drift"):
        if kind in grp.rows:
            grp.rows_t[kind + "_own"] = torch.tensor(
                [grp.rows[kind][i] for i in grp.own], dtype=torch.long, device=row_device)


__all__ = ["ParamGroup", "ParamStats", "SpreadGroup", "WeightsBefore", "make_groups",
           "make_spread_groups"]
