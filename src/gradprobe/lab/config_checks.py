"""The checks an experiment's ``validate()`` makes of its numeric options, with one wording: the
experiment, the option and its value, what it needs, and a hint from the option's default
(``e.g. --depth 20``), so that ``gradprobe lab run`` answers every bad option alike.

* :func:`need_at_least`: integers and counts (``depth >= 2``; a tuple option: every element);
* :func:`need_positive`: positive finite numbers (learning rates, scales; tuples too);
* :func:`need_within`: an interval (``0 <= momentum < 1``).

Checks that need the experiment's knowledge (an unknown activation, a width that runs out before
the depth) stay in its ``validate()``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from gradprobe.errors import ConfigError


def _hint(config: Any, name: str) -> str:
    default = {f.name: f.default for f in dataclasses.fields(config)}.get(name)
    shown = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in default) \
        if isinstance(default, tuple) else default
    return f"e.g. --{name.replace('_', '-')} {shown}"


def _values(config: Any, name: str) -> tuple[Any, tuple[Any, ...]]:
    value = getattr(config, name)
    return value, value if isinstance(value, tuple) else (value,)


def need_at_least(experiment: str, config: Any, minimum: float, *names: str) -> None:
    """Every option of ``names`` is at least ``minimum`` (a tuple option: not empty, and every
    element), else one ConfigError naming the first that is not.

    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class C:
    ...     depth: int = 20
    >>> need_at_least("demo", C(depth=1), 2, "depth")
    Traceback (most recent call last):
    ...
    gradprobe.errors.ConfigError: demo: needs depth >= 2, got depth=1
    hint: e.g. --depth 20
    """
    for name in names:
        value, values = _values(config, name)
        if not values or min(values) < minimum:
            every = "every " if isinstance(value, tuple) else ""
            raise ConfigError(f"{experiment}: needs {every}{name} >= {minimum:g}, got {name}={value}",
                              hint=_hint(config, name))


def need_positive(experiment: str, config: Any, *names: str) -> None:
    """Every option of ``names`` is a positive finite number (a tuple option: not empty, and
    every element), else one ConfigError naming the first that is not."""
    for name in names:
        value, values = _values(config, name)
        if not values or not all(v > 0 and math.isfinite(v) for v in values):
            what = "positive numbers" if isinstance(value, tuple) else "a positive number"
            raise ConfigError(f"{experiment}: {name} must be {what}, got {name}={value}",
                              hint=_hint(config, name))


def need_within(experiment: str, config: Any, name: str, low: float, high: float, *,
                closed: tuple[bool, bool] = (True, False)) -> None:
    """``low <= option < high`` (``closed`` says which ends belong), else a ConfigError."""
    value = getattr(config, name)
    above = value >= low if closed[0] else value > low
    below = value <= high if closed[1] else value < high
    if not (above and below):
        interval = f"{'[' if closed[0] else '('}{low:g}, {high:g}{']' if closed[1] else ')'}"
        raise ConfigError(f"{experiment}: {name} must lie in {interval}, got {name}={value}",
                          hint=_hint(config, name))


__all__ = ["need_at_least", "need_positive", "need_within"]
