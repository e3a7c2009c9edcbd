"""The Probe's scalar options, checked in one place: each bad value is one
:class:`~gradprobe.errors.ConfigError` naming the argument and how to fix it.

Example
    >>> check_options(every=None, budget=0.05, flush_every=100, flush_secs=30.0, hist_every=0,
    ...               hist_bins=64, on_nonfinite="record").schedule
    'budget'
    >>> check_options(every=None, budget=1.5, flush_every=100, flush_secs=30.0, hist_every=0,
    ...               hist_bins=64, on_nonfinite="record")
    Traceback (most recent call last):
    ...
    gradprobe.errors.ConfigError: budget must be a fraction of the step time between 0 and 1 (exclusive), got 1.5
    hint: e.g. budget=0.05 (5 % of the step time), or budget=None, every=1 to record everything every step
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from gradprobe.errors import ConfigError


@dataclass(frozen=True)
class Options:
    """The checked options (see :class:`gradprobe.Probe` for their meaning)."""

    every: int
    """The fixed schedule's period (1 where the schedule is the budget's)."""
    budget: float | None
    """Fraction of the step time, where the schedule is the budget's; else ``None``."""
    flush_every: int
    flush_secs: float
    hist_every: int
    hist_bins: int
    on_nonfinite: Literal["record", "raise"]

    @property
    def schedule(self) -> Literal["budget", "every"]:
        """``"budget"``: the Probe chooses the full tier's steps; ``"every"``: fixed."""
        return "every" if self.budget is None else "budget"


def _int(name: str, value: object, least: int, hint: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        what = "a positive integer" if least else "an integer >= 0"
        raise ConfigError(f"{name} must be {what}, got {value!r}", hint=hint)
    return value


def _real(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    v = float(value)
    return v if math.isfinite(v) else None


def check_options(*, every: object, budget: object, flush_every: object, flush_secs: object,
                  hist_every: object, hist_bins: object, on_nonfinite: object) -> Options:
    """:class:`Options` from the Probe's arguments, or the :class:`ConfigError` of the first
    bad one. ``every`` given forces the fixed schedule (``budget`` is then ignored);
    ``budget=None`` without ``every`` records every step."""
    if every is not None:
        every = _int("every", every, 1, "e.g. every=10 (a fixed schedule), or leave every out "
                     "and let budget= choose the full statistics' steps")
    b: float | None = None
    if budget is not None:  # checked even where every= makes it unused: a typo is an error
        b = _real(budget)
        if b is None or not 0.0 < b < 1.0:
            raise ConfigError(
                f"budget must be a fraction of the step time between 0 and 1 (exclusive), "
                f"got {budget!r}",
                hint="e.g. budget=0.05 (5 % of the step time), or budget=None, every=1 to "
                "record everything every step")
    secs = _real(flush_secs)
    if secs is None or secs <= 0:
        raise ConfigError(f"flush_secs must be a positive number of seconds, got {flush_secs!r}",
                          hint="e.g. flush_secs=30.0 (rows reach the disk at least every 30 s)")
    if on_nonfinite not in ("record", "raise"):
        raise ConfigError(f"on_nonfinite must be 'record' or 'raise', got {on_nonfinite!r}")
    return Options(
        every=every if isinstance(every, int) else 1,
        budget=b if every is None else None,
        flush_every=_int("flush_every", flush_every, 1, "e.g. flush_every=100"),
        flush_secs=secs,
        hist_every=_int("hist_every", hist_every, 0, "hist_every=0 (off) or e.g. 100"),
        hist_bins=_int("hist_bins", hist_bins, 1, "e.g. hist_bins=64"),
        on_nonfinite=on_nonfinite,  # type: ignore[arg-type]
    )


__all__ = ["Options", "check_options"]
