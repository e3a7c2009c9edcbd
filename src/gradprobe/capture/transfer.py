"""The device-to-host half of a flush: one copy of the used buffers, then their host frames.

:meth:`Recorder.take <gradprobe.capture.recorder.Recorder.take>` concatenates every used slice
of the device buffers (statistics, loss scales, losses, histograms, time profiles and the
always-on tier's rows) and starts **one** copy to the host (:class:`DeviceCopy`):

* on a CUDA device, when the Probe asks for it, asynchronously: into a pinned host buffer with
  ``non_blocking=True``, followed by a CUDA event; the training thread goes on at once and the
  writer thread waits for that event (:meth:`DeviceCopy.numpy`) before it reads the values;
* otherwise synchronously (on the CPU the concatenation already is the host copy).

:class:`TakenFlush` holds the host-side books copied at the take (steps, counts, touched
records, ...) and builds the :class:`~gradprobe.store.frames.HostFlush` once the values are
there (:meth:`TakenFlush.resolve`): it finds the non-finite events of steps not checked yet and
appends them to ``events.jsonl``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gradprobe.capture.events import full_event
from gradprobe.stats import schema as S
from gradprobe.store.frames import AlwaysFlush, HostFlush
from gradprobe.store.writer import RunWriter


class DeviceCopy:
    """A copy of ``flat`` on the host, asynchronous where ``asynchronous`` and ``flat`` is on
    a CUDA device (pinned buffer, ``non_blocking``, an event recorded after it)."""

    def __init__(self, flat: Tensor, *, asynchronous: bool) -> None:
        self.ready: Any = None
        if asynchronous and flat.is_cuda:
            self.host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
            self.host.copy_(flat, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record()
        else:  # torch.cat allocated `flat`: on the CPU it never aliases the ring buffer
            self.host = flat.cpu()

    def numpy(self) -> np.ndarray:
        """The values; waits for the copy (only for it: an event, not a device sync)."""
        if self.ready is not None:
            self.ready.synchronize()
        return self.host.numpy()


@dataclass
class TakenFlush:
    """A flush taken from the recorder; its values may still be on their way to the host."""

    index: int
    copy: DeviceCopy
    rows: Sequence[Any]
    hist_bins: int
    steps: np.ndarray
    skipped: np.ndarray
    checked: np.ndarray
    counts: np.ndarray
    units: np.ndarray
    touched: np.ndarray
    seq: np.ndarray
    loss_steps: np.ndarray
    loss_count: np.ndarray
    hist_keys: list[tuple[int, int]]
    time_keys: list[tuple[int, int, str]]
    time_lens: list[int]
    always: tuple[int, Callable[[np.ndarray], AlwaysFlush]] | None
    """Number of values of the always-on rows (last in the copy) and how to read them."""
    extra: dict[str, Any]

    @property
    def what(self) -> str:
        steps = next((s for s in (self.steps, self.loss_steps) if len(s)), None)
        if steps is None and self.always is not None:
            return f"flush {self.index} (the always-on rows)"
        assert steps is not None
        return f"flush {self.index} (steps {int(steps[0])}-{int(steps[-1])})"

    def resolve(self, writer: RunWriter) -> HostFlush:
        """The :class:`HostFlush` (waits for the copy); appends the events it finds."""
        host = self.copy.numpy()
        n, r = len(self.steps), len(self.rows)
        off = n * r * S.N_STATS
        stats = host[:off].reshape(n, r, S.N_STATS)
        scale = host[off : off + n]
        off += n
        n_loss = len(self.loss_steps)
        losses = host[off : off + n_loss]
        off += n_loss
        width = 2 * self.hist_bins + 2
        n_hist = len(self.hist_keys) * width
        hist = host[off : off + n_hist].reshape(len(self.hist_keys), width)
        off += n_hist
        n_time = int(sum(self.time_lens))
        time_vals = host[off : off + n_time]
        off += n_time
        always = None
        if self.always is not None:
            always = self.always[1](host[off : off + self.always[0]])
        bad = ((stats[:, :, S.NONFINITE] > 0) & self.touched).any(1)
        events: list[dict[str, Any]] = []
        loss_bad = {int(st) for st, v in zip(self.loss_steps, losses) if not np.isfinite(v)}
        for slot in np.flatnonzero(bad & ~self.checked):
            step = int(self.steps[slot])
            ev = full_event(self.rows, step, stats[slot, :, S.NONFINITE],
                            self.touched[slot], self.seq[slot], bool(self.skipped[slot]),
                            self.extra, step in loss_bad)
            if ev is not None:
                events.append(ev)
        writer.append_events(events)
        return HostFlush(
            index=self.index, steps=self.steps, skipped=self.skipped, counts=self.counts,
            units=self.units, touched=self.touched, stats=stats, scale=scale,
            loss_steps=self.loss_steps, losses=losses, loss_count=self.loss_count,
            hist_keys=self.hist_keys, hist=hist, time_keys=self.time_keys,
            time_lens=self.time_lens, time=time_vals, events=events,
            nonfinite=bool((bad & ~self.skipped).any()), always=always,
        )


__all__ = ["DeviceCopy", "TakenFlush"]
