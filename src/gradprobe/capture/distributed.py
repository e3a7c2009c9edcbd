"""torch.distributed awareness of the Probe: statistics of the whole global batch, rank 0 writes.

Under DistributedDataParallel (DDP) every rank attaches the Probe (the same training script
runs unchanged on every rank) and records into its own device buffer; only rank 0 writes the run
directory. At each flush the ranks exchange their raw sufficient statistics once (on the host,
where the flush copies them anyway), and rank 0 merges them (:func:`merge_flushes`):

* ``grad``, ``weight``, ``update``, ``drift``, ``spread``: the parameters and their gradients
  are the same on every rank after DDP's all-reduce, so rank 0's rows are kept as they are
  (gradient statistics are those of the all-reduced gradients);
* ``input``, ``act``: sums and counts add, extrema take the maximum
  (:func:`gradprobe.stats.schema.merge`), so mean, std, RMS and the fractions are those of the
  global batch;
* ``act_grad``: merged the same way after dividing each rank's gradients by the world size
  ``W`` (``sum``, ``abs_sum``, extrema by ``W``, ``sumsq`` by ``W²``): DDP averages the ranks'
  gradients, so it optimises ``L = (1/W) Σ_r L_r`` and ``∂L/∂a = (1/W) ∂L_r/∂a`` for an
  activation ``a`` of rank ``r``. With a mean-reduced loss and equal local batches this is the
  activation gradient of one process on the global batch;
* dead units: a unit is dead when it is inactive on every example of the global batch, so each
  rank keeps the per-unit masks of the flush's steps (instead of counting them) and rank 0 ANDs
  them across ranks before counting (summing per-rank dead counts would count a unit dead on
  one rank's half and alive on the other's);
* the loss: sums and counts add, so a step's loss is the mean of the ranks' losses (the loss of
  the global batch for a mean-reduced loss and equal local batches).

Memory: besides its buffer, each rank holds the unit masks of the flush's steps until the flush,
``flush_every × Σ units`` booleans over the records with a dead-unit rule; the exchange copies
them to float64 on the host.

Histograms, per-time-step gradients of recurrent layers and the ``events.jsonl`` entries are
rank 0's (the histogram edges differ between ranks; the merged ``nonfinite`` counts are in the
scalars).

The exchange is two small collectives per flush, never one per hook or per step: an
``all_reduce(MAX)`` of the payload length (one integer), then a ``gather`` of the padded
payloads to rank 0, on a gloo process group of its own (created when the Probe attaches, so it
works whatever the training backend is, NCCL included, and has its own timeout).

What happens when a rank fails or falls out of step (no deadlock):

* Every exchange is bounded by :data:`TIMEOUT` seconds (the gloo group's timeout). A rank that
  raised and left the training loop (its ``with probe:`` exits and its final flush starts an
  exchange that no peer answers), or that stops flushing, makes its peers' exchange fail after
  at most :data:`TIMEOUT`; it does not hang them. (DDP itself then waits in its own gradient
  all-reduce: that is DDP's timeout, not the Probe's.)
* The ranks send the steps they recorded; if they differ (a rank skipped a flush or a step),
  rank 0 does not mix them.
* After a failed or mismatched exchange, rank 0 writes its own statistics for that flush (dead
  units counted from its own masks), appends an event ``{"type": "distributed", ...}`` to
  ``events.jsonl`` saying so, warns once, and records local statistics for the rest of the run
  without further exchanges (so a late peer cannot pair with a different flush). The other
  ranks drop their statistics, as they always do after an exchange.

Create the Probe on every rank (attaching creates the gloo group: a collective of all ranks).

Example
    >>> rank()   # not distributed
    0
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import numpy as np

from gradprobe.errors import UnsupportedModelError
from gradprobe.stats import schema as S
from gradprobe.store.frames import HostFlush

TIMEOUT = 300.0
"""Seconds a rank waits at a flush's exchange for its peers before recording locally."""
MERGED_KINDS = ("input", "act", "act_grad")
"""Kinds whose statistics differ between ranks and are merged; the others are rank 0's."""

Mask = tuple[int, int, Any]
"""``(slot, row, boolean mask of the units)`` of one step and record (a torch tensor)."""


def rank() -> int:
    """This process's rank in the default process group, or 0 when not distributed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return int(dist.get_rank())
    return 0


def world_size() -> int:
    """Number of processes in the default process group, or 1 when not distributed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return int(dist.get_world_size())
    return 1


def sharded(param: Any) -> bool:
    """Whether ``param`` is a sharded ``DTensor`` (FSDP2's ``fully_shard``, tensor parallelism)."""
    return hasattr(param, "to_local") and hasattr(param, "placements")


def check_sharded(layers: Sequence[Any], kinds: Sequence[str]) -> None:
    """Refuse parameter kinds on sharded (``DTensor``) parameters, with the fix.

    FSDP2 (``fully_shard``) keeps each parameter and gradient as a ``DTensor`` shard. Statistics
    of the full parameter follow from the shards' sufficient statistics (``Σ x²`` adds across
    shards, so ``‖W‖ = sqrt(Σ_shards Σ x²)``, never a combination of per-shard norms; extrema
    take the maximum; counts add): the merge :func:`merge_flushes` applies to activation rows.
    Reading the local shards (``p.to_local()``, ``p.grad.to_local()``) in the
    parameter statistics is not done yet, so the parameter kinds are refused for now;
    activation kinds work (forward and tensor hooks see ordinary tensors) and merge as under
    DDP."""
    want = [k for k in kinds if k not in MERGED_KINDS]
    if not want:
        return
    for lay in layers:
        for p in lay.params:
            if sharded(p):
                raise UnsupportedModelError(
                    f"layer {lay.name!r} has sharded (DTensor) parameters (FSDP's fully_shard): "
                    f"kinds {want} of sharded parameters are not recorded yet",
                    hint="pass kinds=('input', 'act', 'act_grad') under fully_shard, or probe "
                    "the model under DistributedDataParallel")


class NullWriter:
    """The writer of a non-zero rank: takes the calls rank 0's :class:`RunWriter` takes and
    writes nothing."""

    def next_flush(self) -> int:
        return 0

    def append_event(self, event: dict[str, Any]) -> None:
        pass

    def append_events(self, events: list[dict[str, Any]]) -> None:
        pass

    def write_meta(self, **updates: Any) -> None:
        pass

    def submit(self, job: Any, *, what: str) -> None:
        pass

    def raise_error(self) -> None:
        pass

    def held(self) -> bool:
        return False

    def wait(self) -> None:
        pass

    def close(self, *, status: str | None = None, **meta: Any) -> None:
        pass


@dataclass(frozen=True)
class Local:
    """One rank's flush as exchanged: the steps and the raw arrays merging needs."""

    steps: np.ndarray
    loss_steps: np.ndarray
    stats: np.ndarray      # [n, R, N_STATS]
    counts: np.ndarray     # [n, R]
    touched: np.ndarray    # [n, R] bool
    losses: np.ndarray
    loss_count: np.ndarray
    masks: list[tuple[int, int, np.ndarray]]  # (slot, row, bool[units])


def _empty(rows: int) -> Local:
    z = np.zeros(0, dtype=np.int64)
    return Local(z, z, np.zeros((0, rows, S.N_STATS)), np.zeros((0, rows)),
                 np.zeros((0, rows), dtype=bool), np.zeros(0), np.zeros(0), [])


def local_of(data: HostFlush | None, masks: list[Mask], rows: int) -> Local:
    if data is None:
        return _empty(rows)
    return Local(data.steps, data.loss_steps, data.stats, data.counts, data.touched,
                 data.losses, data.loss_count,
                 [(s, r, m.detach().reshape(-1).bool().cpu().numpy()) for s, r, m in masks])


def pack(loc: Local) -> np.ndarray:
    """One flat float64 payload: a header of lengths, then the arrays, then the masks."""
    n, r = loc.counts.shape if loc.counts.ndim == 2 else (0, 0)
    head = [n, r, len(loc.loss_steps), len(loc.masks)]
    index = np.asarray([[s, row, m.size] for s, row, m in loc.masks], dtype=np.float64)
    parts = [np.asarray(head, dtype=np.float64), loc.steps.astype(np.float64),
             loc.loss_steps.astype(np.float64), loc.stats.reshape(-1), loc.counts.reshape(-1),
             loc.touched.reshape(-1).astype(np.float64), loc.losses.astype(np.float64),
             loc.loss_count.astype(np.float64), index.reshape(-1)]
    parts += [m.astype(np.float64) for _, _, m in loc.masks]
    return np.concatenate(parts)


def unpack(buf: np.ndarray) -> Local:
    n, r, nl, nm = (int(v) for v in buf[:4])
    off = 4

    def take(k: int) -> np.ndarray:
        nonlocal off
        out = buf[off: off + k]
        off += k
        return out

    steps = take(n).astype(np.int64)
    loss_steps = take(nl).astype(np.int64)
    stats = take(n * r * S.N_STATS).reshape(n, r, S.N_STATS).copy()
    counts = take(n * r).reshape(n, r).copy()
    touched = take(n * r).reshape(n, r) > 0
    losses = take(nl).copy()
    loss_count = take(nl).copy()
    index = take(3 * nm).reshape(nm, 3).astype(np.int64)
    masks = [(int(s), int(row), take(int(k)) > 0) for s, row, k in index]
    return Local(steps, loss_steps, stats, counts, touched, losses, loss_count, masks)


def _scale_act_grad(stats: np.ndarray, rows: np.ndarray, world: int) -> None:
    """Divide the ``act_grad`` rows' gradient statistics by ``world`` (see the module doc)."""
    for col, power in ((S.SUM, 1), (S.ABS_SUM, 1), (S.SUMSQ, 2), (S.NEG_MIN, 1), (S.MAX, 1)):
        stats[:, rows, col] /= float(world) ** power


def dead_counts(per_rank: list[list[tuple[int, int, np.ndarray]]], n: int, r: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """``(dead [n, R], units [n, R])`` from every rank's masks: the k-th mask of a (step,
    record) is ANDed across the ranks that have one of the same length (a unit is dead when
    inactive on every example of every rank); masks without such a partner count alone."""
    dead = np.zeros((n, r))
    units = np.zeros((n, r))
    groups: dict[tuple[int, int], list[list[np.ndarray]]] = {}
    for masks in per_rank:
        seen: dict[tuple[int, int], int] = {}
        for s, row, m in masks:
            k = seen.get((s, row), 0)
            seen[(s, row)] = k + 1
            pops = groups.setdefault((s, row), [])
            while len(pops) <= k:
                pops.append([])
            pops[k].append(m)
    for (s, row), pops in groups.items():
        for pop in pops:
            if all(m.size == pop[0].size for m in pop):
                acc = np.logical_and.reduce(pop)
                dead[s, row] += acc.sum()
                units[s, row] += acc.size
            else:
                for m in pop:
                    dead[s, row] += m.sum()
                    units[s, row] += m.size
    return dead, units


def merge_flushes(data: HostFlush, locs: list[Local], kinds: list[str], dead_rows: np.ndarray
                  ) -> HostFlush:
    """Rank 0's flush with every rank's statistics merged (``locs[0]`` is rank 0's own).

    Raises ``ValueError`` when the ranks recorded different steps."""
    world = len(locs)
    for i, loc in enumerate(locs[1:], 1):
        if not (np.array_equal(loc.steps, data.steps)
                and np.array_equal(loc.loss_steps, data.loss_steps)):
            raise ValueError(f"rank {i} recorded steps {loc.steps.tolist()} where rank 0 "
                             f"recorded {data.steps.tolist()}")
    n, r = data.counts.shape
    merged_rows = np.asarray([k in MERGED_KINDS for k in kinds], dtype=bool)
    grad_rows = np.flatnonzero([k == "act_grad" for k in kinds])
    stats = data.stats.copy()
    counts = data.counts.copy()
    touched = data.touched.copy()
    if grad_rows.size:
        _scale_act_grad(stats, grad_rows, world)
    for loc in locs[1:]:
        other = loc.stats.copy()
        if grad_rows.size:
            _scale_act_grad(other, grad_rows, world)
        acc = stats[:, merged_rows]
        S.merge(acc, other[:, merged_rows])
        stats[:, merged_rows] = acc
        counts[:, merged_rows] += loc.counts[:, merged_rows]
        touched[:, merged_rows] |= loc.touched[:, merged_rows]
    dead, units = dead_counts([loc.masks for loc in locs], n, r)
    stats[:, dead_rows, S.DEAD] = dead[:, dead_rows]
    units_all = data.units.copy()
    units_all[:, dead_rows] = units[:, dead_rows]
    losses = data.losses + sum((loc.losses for loc in locs[1:]), np.zeros_like(data.losses))
    loss_count = data.loss_count + sum((loc.loss_count for loc in locs[1:]),
                                       np.zeros_like(data.loss_count))
    bad = ((stats[:, :, S.NONFINITE] > 0) & touched).any(1) if n else np.zeros(0, dtype=bool)
    return replace(data, stats=stats, counts=counts, touched=touched, units=units_all,
                   losses=losses, loss_count=loss_count,
                   nonfinite=bool((bad & ~data.skipped).any()))


def local_flush(data: HostFlush, masks: list[Mask], dead_rows: np.ndarray) -> HostFlush:
    """Rank 0's flush on its own (after a failed exchange): dead units from its own masks."""
    n, r = data.counts.shape
    dead, units = dead_counts([local_of(data, masks, r).masks], n, r)
    stats = data.stats.copy()
    stats[:, dead_rows, S.DEAD] = dead[:, dead_rows]
    units_all = data.units.copy()
    units_all[:, dead_rows] = units[:, dead_rows]
    return replace(data, stats=stats, units=units_all)


class Sync:
    """The flush exchange of one Probe across the ranks of the default process group."""

    def __init__(self, kinds: list[str], dead_rows: list[bool], *,
                 timeout: float | None = None) -> None:
        import torch.distributed as dist

        self.rank = rank()
        self.world = world_size()
        self.kinds = kinds
        self.dead_rows = np.asarray(dead_rows, dtype=bool)
        # A gloo group of its own: host tensors whatever the training backend, its own timeout.
        # Creating it is a collective of every rank (the Probe attaches on every rank).
        self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=TIMEOUT if timeout is None else timeout))
        self.active = True

    @classmethod
    def create(cls, kinds: list[str], dead_rows: list[bool]) -> Sync | None:
        """A Sync when torch.distributed runs more than one process, else ``None``."""
        if world_size() <= 1:
            return None
        return cls(kinds, dead_rows)

    def _exchange(self, payload: np.ndarray) -> list[np.ndarray] | None:
        import torch
        import torch.distributed as dist

        size = torch.tensor([payload.size], dtype=torch.int64)
        dist.all_reduce(size, op=dist.ReduceOp.MAX, group=self.group)
        n = int(size.item())
        mine = torch.zeros(n, dtype=torch.float64)
        mine[: payload.size] = torch.from_numpy(payload)
        out = [torch.empty(n, dtype=torch.float64) for _ in range(self.world)] if (
            self.rank == 0) else None
        dist.gather(mine, out, dst=0, group=self.group)
        return [t.numpy() for t in out] if out is not None else None

    def exchange(self, data: HostFlush | None, masks: list[Mask], writer: Any
                 ) -> HostFlush | None:
        """Exchange one flush; returns what rank 0 writes (``None`` on the other ranks)."""
        r = len(self.kinds)
        if not self.active:
            return local_flush(data, masks, self.dead_rows) if data is not None else None
        mine = local_of(data, masks, r)
        try:
            got = self._exchange(pack(mine))
            if got is None:
                return None
            locs = [mine] + [unpack(b) for b in got[1:]]
            if data is None:
                if any(loc.steps.size or loc.loss_steps.size for loc in locs[1:]):
                    raise ValueError("rank 0 recorded no step where other ranks did")
                return None
            return merge_flushes(data, locs, self.kinds, self.dead_rows)
        except (RuntimeError, ValueError) as err:  # a timeout, a closed peer, a mismatch
            self.active = False
            msg = (f"statistics of rank {self.rank} not merged across the {self.world} ranks "
                   f"from here on ({type(err).__name__}: {err})")
            warnings.warn("gradprobe: " + msg, RuntimeWarning, stacklevel=3)
            if self.rank != 0 or data is None:
                return None
            step = int(data.steps[0]) if data.steps.size else None
            writer.append_event({"type": "distributed", "step": step, "message": msg})
            return local_flush(data, masks, self.dead_rows)


__all__ = ["MERGED_KINDS", "check_sharded", "sharded", "TIMEOUT", "NullWriter", "Sync", "merge_flushes", "rank",
           "world_size"]
