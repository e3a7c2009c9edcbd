"""The always-on tier: what the Probe records at every optimizer step, cheaply.

Per step, on the device, with no host synchronisation in any hook:

* per tracked layer, the sum of each output it produced (one reduction per hooked output,
  ``x.sum()``, kept on the device): the sum is non-finite exactly when an element is NaN or
  ±Inf, or when the finite elements overflow the accumulator (``|Σ x| > 3.4e38`` in float32,
  itself an explosion; float16/bfloat16 outputs are summed in float32). Not on a full step
  whose statistics are checked on the host at its end (CPU, or ``on_nonfinite="raise"``) for
  the outputs it records: their count of non-finite elements is exact, the step's event and
  trigger come from it, and the flush sets those outputs' flags from it
  (:class:`gradprobe.store.frames.Frames`);
* per tracked parameter, the norm of its gradient: one ``torch._foreach_norm`` per device and
  dtype group, as ``torch.nn.utils.clip_grad_norm_`` does (float16/bfloat16 gradients in
  float32); on a CPU, where the C kernels build (:mod:`gradprobe.stats.native`), one C call
  per group writes the norms straight into the row; a parameter without a gradient counts 0.
  A layer's norm is ``sqrt(Σ_p ‖g_p‖²)`` over its parameters (:class:`gradprobe.store.frames.AlwaysFlush`);
* the sum of the step's observed losses and the AMP loss scale.

These land in one row of a ring buffer (``capacity`` steps × ``L + P + 2`` float32 values) that
goes to the host with the full tier's buffer at each flush. The row is also read on the host
as soon as it is cheap to do so (:meth:`AlwaysOn.end`): on the CPU at once (no device to wait
for); on a CUDA device through a pinned copy and an event polled at the next steps
(:meth:`AlwaysOn.ready`), never waited for, unless ``on_nonfinite="raise"`` asks for it.
The host reads find non-finite values (:func:`gradprobe.capture.events.always_event`) and
gradient-norm spikes (:meth:`AlwaysOn.spike`), on which the schedule
(:mod:`gradprobe.capture.schedule`) makes the next steps full.
"""

from __future__ import annotations

import ctypes
import math
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gradprobe.capture.events import always_event
from gradprobe.capture.select import Layer
from gradprobe.stats.native import NATIVE, NativeKernels
from gradprobe.store.frames import AlwaysFlush

SPIKE = 10.0
"""A gradient-norm spike: the total gradient norm (over every tracked parameter) above ``SPIKE``
times its running geometric mean (an exponential moving average of ``log ‖g‖``, weight
:data:`SMOOTH`). The total, not each parameter's: on a deep network some one of hundreds of
small parameters jumps tenfold almost every step (a 300-layer ReLU MLP: 52 triggers in 426
steps per parameter), while a spike that matters moves the whole gradient."""
SMOOTH = 0.1
HISTORY = 5
"""Steps of history before a spike can be called (the first steps' norms move fast)."""
_LOG_SPIKE = float(np.log(SPIKE))
SHORT_ROW = 256
"""Rows up to this many values are checked on the host as Python floats: on a short row a
numpy call costs more than its arithmetic (34 µs against 9 per step measured for a 30-value
row in the step's context), and the check runs every step."""
HALF = (torch.float16, torch.bfloat16)
"""Dtypes reduced in float32 (a float16 sum overflows at 65504)."""


class AlwaysOn:
    """The always-on rows of ``layers`` (activation sums where ``acts``, gradient norms where
    ``grads``) for up to ``capacity`` steps on ``device``."""

    def __init__(self, layers: Sequence[Layer], *, acts: bool, grads: bool,
                 device: torch.device, capacity: int, scaler: bool, sync: bool) -> None:
        self.layers = list(layers)
        self.acts = acts
        self.n_layers = len(self.layers)
        by_key: dict[tuple[Any, Any], list[tuple[Tensor, int]]] = {}
        for i, lay in enumerate(self.layers):
            for p in lay.params if grads else []:
                by_key.setdefault((p.device, p.dtype), []).append((p, i))
        order = [item for items in by_key.values() for item in items]
        self.params = [p for p, _ in order]
        self.param_layer = np.array([i for _, i in order], dtype=np.int64)
        self.has_grad = np.zeros(self.n_layers, dtype=bool)  # a layer with gradient norms
        self.has_grad[self.param_layer] = True
        # one (parameters, columns, norm dtype) per device and dtype, columns contiguous
        self.groups: list[tuple[list[Tensor], slice, torch.dtype | None]] = []
        col = self.n_layers
        for (_, dtype), items in by_key.items():
            self.groups.append(([p for p, _ in items], slice(col, col + len(items)),
                                torch.float32 if dtype in HALF else None))
            col += len(items)
        self.loss_col, self.scale_col = col, col + 1
        self.width = col + 2
        self.capacity = capacity
        self.device = device
        self.scaler = scaler
        self.sync = sync or device.type == "cpu"  # read each row on the host at once
        self.buf = torch.zeros(capacity, self.width, dtype=torch.float32, device=device)
        self.steps: list[int] = []
        self.full: list[bool] = []
        self.skipped: list[bool] = []
        self.has_loss: list[bool] = []
        # the open step's output sums and their layers, appended by the module hook
        # (gradprobe.capture.forward.ForwardHooks.output): one reduction per output
        self.sums: list[Tensor] = []
        self.sum_cols: list[int] = []
        self._index: dict[tuple[int, ...], Tensor] = {}
        self._views: dict[int, tuple[Any, ...]] = {}
        self._losses: list[Tensor] = []
        self._taken: list[Tensor] | None = None  # gradient norms read before the row's end
        self._in_row = False  # ... or written into the open row already (the C kernels)
        self.native: NativeKernels = NATIVE
        self._native_rows = device.type == "cpu"  # the row is host memory the kernels write
        self._staged: Any = None  # the stage the norms of a full step come from (link_stage)
        self._stage_order: tuple[int, ...] = ()
        # each group's parameter sizes, for the C kernels (a gradient has its parameter's size)
        self._sizes = [(ctypes.c_int64 * len(ps))(*[p.numel() for p in ps])
                       for ps, _, _ in self.groups]
        self._in_order = tuple(range(self.n_layers))
        self._zero = torch.zeros((), device=device)
        self._pending: deque[tuple[int, bool, bool, Tensor, Any]] = deque()
        self._prev: Sequence[float] | np.ndarray | None = None  # the previous step's norms
        self._total = 0.0  # running mean of log(total gradient norm)
        self._seen = 0

    # ------------------------------------------------------------------ during the step

    def _grad_norms(self) -> list[Tensor]:
        """Each tracked parameter's gradient norm (0-d tensors, on the device), in row order."""
        vals: list[Tensor] = []
        for params, _, dtype in self.groups:  # columns contiguous, in this order
            grads = [p.grad for p in params]
            try:  # the common case, one kernel; no Python loop over the gradients
                vals += torch._foreach_norm(grads, 2, dtype=dtype)  # type: ignore[arg-type]
            except (TypeError, NotImplementedError):  # a parameter without a gradient (a
                # TypeError for the None), or a sparse gradient (no sparse kernel)
                vals += self._mixed_norms(grads, dtype)
        return vals

    def _mixed_norms(self, grads: list[Tensor | None], dtype: torch.dtype | None
                     ) -> list[Tensor]:
        """The norms of a group holding missing or sparse gradients: the dense ones still in
        one ``_foreach_norm``, 0 for a missing one, a sparse one through its values."""
        dense = [g for g in grads if g is not None and not g.is_sparse]
        it = iter(torch._foreach_norm(dense, 2, dtype=dtype) if dense else [])  # type: ignore[arg-type]
        return [self._zero if g is None else
                torch.linalg.vector_norm(g.coalesce().values(), dtype=dtype) if g.is_sparse
                else next(it) for g in grads]

    def _norms_into(self, slot: int) -> bool:
        """On a CPU: every gradient norm straight into ``row``'s columns, one C call per group
        (:meth:`gradprobe.stats.native.NativeKernels.norms_into`: a ``_foreach_norm`` costs a
        kernel per tensor, 870-1,100 µs for the 602 gradients of a depth-300 MLP against 317);
        False where that does not serve (a missing, sparse or half-precision gradient)."""
        if not self._native_rows:
            return False
        outs = self._slot_views(slot)[5]
        for (params, _, dtype), sizes, out in zip(self.groups, self._sizes, outs):
            grads = [p.grad for p in params]
            if dtype is not None or any(g is None for g in grads):
                return False
            if not self.native.norms_into(grads, out, sizes):  # type: ignore[arg-type]
                return False
        return True

    def link_stage(self, staged: Any) -> None:
        """Take a full step's gradient norms from the stage's row (``staged``: the recorder's
        :class:`~gradprobe.capture.staged.StagedSteps`) where the stage holds every tracked
        parameter's gradient: one C call over memory whose pointers are made once, against a
        Python check and pointer per gradient every step (:meth:`take_staged_norms`)."""
        self._staged = None
        params = staged.params
        if len(self.groups) != 1 or not self._native_rows or not params:
            return
        group, _, dtype = self.groups[0]
        at = {id(p): i for i, p in enumerate(params)}
        if dtype is not None or len(group) != len(params) or any(id(p) not in at for p in group):
            return
        self._staged = staged
        self._stage_order = tuple(at[id(p)] for p in group)

    def take_staged_norms(self) -> None:
        """On a full step, before the full tier's end may consume the stage's row: the
        gradient norms from the row (the gradients as the optimizer step got them), where
        :meth:`link_stage` linked the stage and the row staged every gradient."""
        if self._staged is None or self._in_row or self._taken is not None:
            return
        out = self._slot_views(len(self.steps))[5][0]
        with torch.no_grad():
            self._in_row = self._staged.grad_norms_into(out, self._stage_order)

    def take_grad_norms(self) -> None:
        """Read the gradient norms now (before clipping changes them) for the step's row."""
        with torch.no_grad():
            self._in_row = self._norms_into(len(self.steps))
            self._taken = None if self._in_row else self._grad_norms()

    def _slot_views(self, slot: int) -> tuple[Any, ...]:
        """The row of ``slot`` and its spans (made once per slot): the row; from the first
        column to the loss; from the first gradient norm to the loss; the output sums; the
        loss; each group's gradient columns (a list)."""
        views = self._views.get(slot)
        if views is None:
            row = self.buf[slot]
            views = self._views[slot] = (row, row[: self.loss_col + 1],
                                         row[self.n_layers : self.loss_col + 1],
                                         row[: self.n_layers], row[self.loss_col],
                                         [row[cols] for _, cols, _ in self.groups])
        return views

    def loss(self, loss: Tensor) -> None:
        self._losses.append(loss)  # detached by the caller

    def end(self, step: int, *, full: bool, skipped: bool, scale: Tensor | None
            ) -> np.ndarray | None:
        """Write the step's row; returns it on the host when that costs no wait (CPU, or
        ``sync``), else starts its copy for :meth:`ready`."""
        slot = len(self.steps)
        views = self._slot_views(slot)
        row = views[0]
        with torch.no_grad():
            in_row, self._in_row = self._in_row, False
            taken, self._taken = self._taken, None
            if not in_row and taken is None:
                in_row = self._norms_into(slot)
            vals: list[Tensor] = []
            cols = tuple(self.sum_cols)
            if cols == self._in_order:  # each layer once, in order: straight into the row
                if in_row:
                    if self.sums:
                        torch.stack(self.sums, out=views[3])
                else:
                    vals += self.sums
            elif cols:  # a layer called twice (micro-batches, reuse), or out of order
                idx = self._index.get(cols)
                if idx is None:
                    if len(self._index) > 64:
                        self._index.clear()
                    idx = self._index[cols] = torch.tensor(cols, device=self.device)
                row.index_add_(0, idx, torch.stack(self.sums).to(row.dtype))
            span = views[1] if vals else views[2]
            if not in_row:
                vals += taken if taken is not None else self._grad_norms()
            losses = self._losses  # scalars of any shape: summed, or viewed, as 0-d
            if len(losses) == 1:
                one = losses[0]
                one = one if one.dim() == 0 else one.reshape(())
            else:
                one = torch.stack(losses).sum() if losses else self._zero
            self.has_loss.append(bool(losses))
            if in_row:  # the norms are in the row already: the loss alone
                views[4].copy_(one)
            else:  # one kernel writes the step's values (all 0-d) into its row
                vals.append(one)
                torch.stack(vals, out=span)
            if scale is not None:
                row[self.scale_col].copy_(scale.reshape(()))
            self.sums, self.sum_cols, self._losses = [], [], []
        self._taken = None
        self.steps.append(step)
        self.full.append(full)
        self.skipped.append(skipped)
        if self.sync:
            # a host read of one row: free on the CPU; on a device only with
            # on_nonfinite="raise", where the user asked for one sync per step
            return row.cpu().numpy() if row.is_cuda else row.numpy()
        host = torch.empty(self.width, dtype=row.dtype, pin_memory=True)
        host.copy_(row, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        self._pending.append((step, full, skipped, host, ready))
        return None

    def ready(self, wait: bool = False) -> list[tuple[int, bool, bool, np.ndarray]]:
        """The rows whose asynchronous copies have arrived (all of them with ``wait``):
        ``(step, full, skipped, values)``."""
        out = []
        while self._pending and (wait or self._pending[0][4].query()):
            step, full, skipped, host, ready = self._pending.popleft()
            ready.synchronize()
            out.append((step, full, skipped, host.numpy()))
        return out

    def loss_nonfinite(self) -> bool:
        """Whether a loss observed in the open step is non-finite (reads the losses on the
        host: only once a step is known to hold a non-finite value)."""
        return any(not bool(torch.isfinite(x).all()) for x in self._losses)

    def open(self) -> bool:
        """Whether the open step has outputs or a loss queued (a pass ran)."""
        return bool(self.sums or self._losses)

    def discard_open(self) -> None:
        """Forget the open step's queued reductions (it never reached its end)."""
        self.sums, self.sum_cols, self._losses = [], [], []
        self._taken = None
        self._in_row = False

    # ------------------------------------------------------------------ on the host

    def check(self, step: int, full: bool, skipped: bool, v: np.ndarray
              ) -> tuple[bool, dict[str, Any] | None, int | None]:
        """Whether a step's row holds a non-finite value; its event (``None`` on a full step
        unless only the loss was non-finite: the full tier reports the others in more
        detail); the index of the layer whose gradient norm spiked (:data:`SPIKE`), if any."""
        n, p = self.n_layers, len(self.params)
        head = v[: self.loss_col + 1]
        norms: Sequence[float] | np.ndarray
        if len(head) <= SHORT_ROW:  # as Python floats (float64)
            vals = head.tolist()
            # a float64 sum of float32 values is finite exactly when every value is (it
            # cannot overflow); likewise the sum of the norms' squares
            bad = not math.isfinite(sum(vals))
            norms = vals[n : n + p]
            sq = sum(x * x for x in norms)
        else:  # one pass over the row in float64: the same, in numpy
            v64 = head.astype(np.float64)
            bad = not math.isfinite(float(v64 @ v64))
            norms = v64[n : n + p]  # a view of a fresh array: kept by spike() as it is
            sq = float(norms @ norms)
        event = None
        if bad:
            act_bad = ~np.isfinite(v[:n])
            grad_bad = np.zeros(n, dtype=bool)
            grad_bad[self.param_layer[~np.isfinite(v[n : n + p])]] = True
            loss_bad = not np.isfinite(v[self.loss_col])
            if not full or not (act_bad.any() or grad_bad.any()):
                depth = [lay.depth if lay.depth is not None else 1 << 30 for lay in self.layers]
                event = always_event(step, [lay.name for lay in self.layers],
                                     [lay.layer_id for lay in self.layers], depth, act_bad,
                                     grad_bad, loss_bad, skipped, self.has_grad)
        spike = self.spike(norms, sq) if p else None
        return bad, event, None if spike is None else int(self.param_layer[spike])

    def spike(self, norms: Sequence[float] | np.ndarray, sq: float) -> int | None:
        """When the total gradient norm (``sq``: the sum of the ``norms``' squares) is above
        :data:`SPIKE` times its running geometric mean: the parameter whose norm grew the
        most since the previous step (named in the trigger); else ``None``. Updates the mean
        (a non-finite total is reported as such and kept out of it). Keeps ``norms`` (the
        caller's own) for the next step."""
        prev, self._prev = self._prev, norms
        if not math.isfinite(sq):
            return None
        total = 0.5 * math.log(sq + 1e-60)
        if prev is None or self._seen == 0:  # the first finite total
            self._total, self._seen = total, 1
            return None
        hit = None
        if self._seen >= HISTORY and total - self._total > _LOG_SPIKE:
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                jump = (np.log(np.asarray(norms, dtype=np.float64) + 1e-30)
                        - np.log(np.asarray(prev, dtype=np.float64) + 1e-30))
            hit = int(np.where(np.isfinite(jump), jump, -np.inf).argmax())
        self._total += SMOOTH * (total - self._total)
        self._seen += 1
        return hit

    # ------------------------------------------------------------------ flush

    def full_ring(self) -> bool:
        return len(self.steps) >= self.capacity

    def piece(self) -> tuple[Tensor | None, Callable[[np.ndarray], AlwaysFlush] | None]:
        """The used rows (flat, on the device) and how to read their host copy; resets."""
        m = len(self.steps)
        if m == 0:
            return None, None
        flat = self.buf[:m].reshape(-1).clone()
        steps = np.asarray(self.steps, dtype=np.int64)
        full = np.asarray(self.full, dtype=bool)
        skipped = np.asarray(self.skipped, dtype=bool)
        has_loss = np.asarray(self.has_loss, dtype=bool)
        ids = [lay.layer_id for lay in self.layers]

        def read(values: np.ndarray) -> AlwaysFlush:
            return AlwaysFlush(steps=steps, full=full, skipped=skipped, values=values,
                               layer_ids=ids, param_layer=self.param_layer,
                               has_loss=has_loss, has_scale=self.scaler)

        self.steps, self.full, self.skipped, self.has_loss = [], [], [], []
        self.buf[:m].zero_()
        return flat, read


__all__ = ["HALF", "HISTORY", "SHORT_ROW", "SMOOTH", "SPIKE", "AlwaysOn"]
