"""Which steps get the full tier, and what the Probe's own time costs.

Two schedules (:class:`Schedule`):

* ``"every"`` (``every=N`` given, or ``budget=None``): the full tier at steps ``0, N, 2N, ...``,
  nothing else; the always-on tier still runs every step.
* ``"budget"`` (the default, ``budget=0.05``): the Probe measures its own time and keeps it
  within ``budget`` times the training step's own time (the step without the Probe):

  - the first :data:`WARMUP` steps are full (initialisation problems show there);
  - after a step whose always-on row holds a non-finite value or a gradient-norm spike
    (:mod:`gradprobe.capture.always`), the next :data:`AFTER` steps are full, whatever they
    cost (over budget, a spike only if none was followed in full in the last
    :data:`SPIKE_GAP` steps);
  - otherwise a step is full when the budget allows it: ``spent + c_full − c_light ≤ MARGIN ·
    budget · bare``, where ``spent`` is the Probe's time so far, ``bare`` the steps' time without it and
    ``c_full``, ``c_light`` the running means of the Probe's time in a full and in an
    always-on step. Warm-up and triggered steps are paid back from the same account, so over
    a run the Probe's time stays near ``budget · bare`` (the first step's one-off set-up,
    allocation of the buffers, is left out of the account);
  - at least one full step every :data:`MAX_GAP` steps.

The Probe's time (:class:`Clock`) is measured on the host with ``time.perf_counter`` around its
hooks, its step hooks and the flushes. On a CUDA device the step time comes from CUDA events
recorded at each step's end and read once they have completed (``Event.query``, never a
wait), and a full step's cost is at least its device time above the running mean of the
always-on steps'.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import torch

from gradprobe.capture.options import Options

WARMUP = 10
"""The first steps, all full."""
AFTER = 5
"""Full steps after a spike or a non-finite value."""
RANKS_EVERY = 10
"""Under ``torch.distributed`` a budgeted Probe's full steps: every ``RANKS_EVERY``-th."""
MAX_GAP = 1000
"""At least one full step every ``MAX_GAP`` steps, whatever the budget says."""
SMOOTH = 0.2
"""Weight of the newest step in the running means of the costs."""
MARGIN = 0.8
"""The account aims at ``MARGIN · budget``: the Probe's timers do not see the dispatch of its
hooks inside PyTorch (module and optimizer hook calls), about 1 % of an LSTM step's time at a
third of the steps full (``benchmarks/budget_overhead.py``, W4)."""
CAP = 3.0
"""A step counts at most ``CAP`` times the running mean step time (a pause between steps,
for evaluation or checkpoints, earns no budget for full steps)."""
SPIKE_GAP = 100
"""Over budget, a spike is followed in full only if none was in the last ``SPIKE_GAP`` steps."""
MAX_TRIGGERS = 100
"""Triggers listed in ``meta.json`` (the count goes on)."""


class Clock:
    """Step times: ``perf_counter`` between step ends on the CPU, CUDA events on a GPU
    (results arrive once their events completed, possibly steps later)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._last = time.perf_counter()
        self._events: deque[tuple[int, bool, float, Any]] = deque()

    def end(self, step: int, full: bool, probe_s: float) -> list[tuple[int, bool, float, float]]:
        """Mark the end of ``step``; returns the ``(step, full, probe_s, step_s)`` now known."""
        if not self.cuda:
            now = time.perf_counter()
            step_s, self._last = now - self._last, now
            return [(step, full, probe_s, step_s)]
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        self._events.append((step, full, probe_s, ev))
        out = []
        while len(self._events) >= 2 and self._events[1][3].query():
            first = self._events.popleft()
            s, f, p, ev1 = self._events[0]
            out.append((s, f, p, first[3].elapsed_time(ev1) / 1e3))
        return out


class Schedule:
    """The full tier's steps, from the checked :class:`~gradprobe.capture.options.Options`."""

    def __init__(self, options: Options) -> None:
        self.mode = options.schedule
        self.every = options.every
        self.budget = options.budget
        self.forced_until = 0  # steps below are full (warm-up, triggers)
        self.warmup = 0  # fixed schedule: steps below are full too (across ranks)
        self.ranks = False  # a budget replaced by the fixed schedule across ranks
        self.last_full = -1
        self.spent = 0.0  # the Probe's seconds
        self.bare = 0.0  # the steps' seconds without the Probe
        self.c_full: float | None = None
        self.c_light: float | None = None
        self.light_step: float | None = None  # running mean of an always-on step's time
        self.step_s: float | None = None  # running mean of a step's time
        self.n_full = 0
        self.n_steps = 0
        self.n_triggers = 0
        self._last_spike = -SPIKE_GAP  # the last spike followed by full steps
        self.triggers: list[dict[str, Any]] = []
        if self.mode == "budget":
            self.forced_until = WARMUP

    def across_ranks(self) -> None:
        """Under ``torch.distributed``: the budget's schedule follows each rank's own timing, and
        the ranks' full steps must be the same ones (their statistics are merged flush by
        flush), so a budgeted Probe takes a fixed schedule there: the first :data:`WARMUP` steps,
        then every :data:`RANKS_EVERY`-th step; no triggers. ``every=N`` stays as given."""
        if self.mode == "budget":
            self.mode, self.every, self.warmup = "every", RANKS_EVERY, WARMUP
            self.ranks = True

    def full(self, step: int) -> bool:
        """Whether ``step`` (about to begin) gets the full tier; call once per step."""
        if self.mode == "every":
            due = step % self.every == 0 or step < self.warmup
        elif step < self.forced_until or step - self.last_full >= MAX_GAP:
            due = True
        elif self.c_full is None:
            due = True
        else:
            assert self.budget is not None
            extra = self.c_full - (self.c_light or 0.0)
            due = self.spent + extra <= MARGIN * self.budget * self.bare
        if due:
            self.last_full = step
        return due

    def trigger(self, step: int, why: str, layer: str | None) -> None:
        """A spike or a non-finite value at ``step``: the next :data:`AFTER` steps are full
        (budget schedule only; a fixed schedule stays fixed). A non-finite value always; a
        spike when the account is within the budget or no spike was followed in full in the
        last :data:`SPIKE_GAP` steps (a network whose gradient spikes often would otherwise
        be recorded in full at every step; every spike stays in the always-on rows, at its
        step)."""
        self.n_triggers += 1
        forced = self.mode == "budget" and (
            why != "spike" or self.budget is None
            or self.spent <= MARGIN * self.budget * self.bare
            or step - self._last_spike >= SPIKE_GAP)
        if forced and why == "spike":
            self._last_spike = step
        if len(self.triggers) < MAX_TRIGGERS:
            self.triggers.append({"step": step, "why": why, "layer": layer, "full": forced})
        if forced:
            self.forced_until = max(self.forced_until, step + 1 + AFTER)

    def measured(self, step: int, full: bool, probe_s: float, step_s: float,
                 device_time: bool) -> None:
        """Account one finished step: the Probe's host time and the whole step's time."""
        self.n_steps += 1
        self.n_full += full
        if step == 0:
            return  # the one-off set-up (buffers allocated at the first step)
        if self.step_s is not None:  # a pause between steps (evaluation, another loop)
            step_s = min(step_s, CAP * self.step_s)  # earns no budget beyond CAP steps
        self.step_s = _mean(self.step_s, step_s)
        if device_time:  # a full step costs at least its time above an always-on step's
            if not full:
                self.light_step = _mean(self.light_step, step_s)
            elif self.light_step is not None:
                probe_s = max(probe_s, step_s - self.light_step)
        probe_s = min(probe_s, step_s)
        self.spent += probe_s
        self.bare += step_s - probe_s
        if full:
            self.c_full = _mean(self.c_full, probe_s)
        else:
            self.c_light = _mean(self.c_light, probe_s)

    def describe(self) -> dict[str, Any]:
        """The schedule as used, for ``meta.json``."""
        out: dict[str, Any] = {"mode": self.mode}
        if self.mode == "every":
            out["every"] = self.every
            if self.ranks:
                out.update(warmup=self.warmup, budget_replaced="torch.distributed: the ranks "
                           "need the same full steps")
        else:
            out.update(budget=self.budget, warmup=WARMUP, after=AFTER, max_gap=MAX_GAP)
        from gradprobe.capture.always import SPIKE

        out.update(
            spike_factor=SPIKE, steps=self.n_steps, full_steps=self.n_full,
            probe_fraction=(self.spent / self.bare) if self.bare > 0 else None,
            full_cost_s=self.c_full, always_cost_s=self.c_light,
            n_triggers=self.n_triggers, triggers=list(self.triggers),
        )
        return out


def _mean(old: float | None, new: float) -> float:
    return new if old is None else old + SMOOTH * (new - old)


__all__ = ["AFTER", "MARGIN", "MAX_GAP", "RANKS_EVERY", "SPIKE_GAP", "WARMUP", "Clock", "Schedule"]
