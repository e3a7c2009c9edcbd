"""The losses of every step between flushes: sums over micro-batches, kept on the device.

``observe_loss`` may be called on every step (not only recorded ones) and several times per
step (micro-batches); each call queues the detached loss, and :meth:`LossBuffer.settle` sums
the queue into a float64 buffer with one ``index_add_``: no host synchronisation per call.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


class LossBuffer:
    """Loss sums and counts of up to ``capacity`` steps (grown when more arrive)."""

    def __init__(self, capacity: int, device: torch.device) -> None:
        self.sum = torch.zeros(capacity, dtype=torch.float64, device=device)
        self.count = np.zeros(capacity, dtype=np.int64)
        self.steps: list[int] = []
        self._queue: list[tuple[int, Tensor]] = []  # (index into sum, detached loss)
        self._started = np.zeros(capacity, dtype=bool)
        self._index: dict[int, int] = {}

    def add(self, step: int, loss: Tensor) -> None:
        """Queue the (detached) loss of one micro-batch of ``step``; stays on its device."""
        i = self._index.get(step)
        if i is None:
            i = len(self.steps)
            if i >= self.sum.numel():  # more steps than planned between flushes
                self.settle()
                self.sum = torch.cat([self.sum, torch.zeros_like(self.sum)])
                self.count = np.concatenate([self.count, np.zeros_like(self.count)])
                self._started = np.concatenate(
                    [self._started, np.zeros_like(self._started)])
            self._index[step] = i
            self.steps.append(step)
            self.count[i] = 0
            self._started[i] = False
        # summed into sum (float64) by settle(), all steps at once
        self._queue.append((i, loss))  # detached by the caller
        self.count[i] += 1
        if len(self._queue) >= 4096:
            self.settle()

    def settle(self) -> None:
        """Sum the queued losses into :attr:`sum` (one index_add for all of them)."""
        if not self._queue:
            return
        losses, self._queue = self._queue, []
        dev = self.sum.device
        idx = torch.tensor([i for i, _ in losses], dtype=torch.long, device=dev)
        vals = torch.cat([to_device(v.reshape(1), dev) for _, v in losses]).to(torch.float64)
        fresh = torch.tensor(sorted({i for i, _ in losses if not self._started[i]}),
                             dtype=torch.long, device=dev)
        if fresh.numel():
            self.sum.index_fill_(0, fresh, 0.0)
        self.sum.index_add_(0, idx, vals)
        for i, _ in losses:
            self._started[i] = True

    def reset(self) -> None:
        """Forget the flushed steps (their sums are overwritten as new steps arrive)."""
        self.steps.clear()
        self._index.clear()


def to_device(x: Tensor, device: torch.device) -> Tensor:
    return x if x.device == device else x.to(device, non_blocking=True)


__all__ = ["LossBuffer", "to_device"]
