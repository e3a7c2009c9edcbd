"""The one exception family gradprobe raises.

Every error names what is wrong (argument, layer, step) and, where there is one, how to fix it in
``hint``. The CLI prints ``error: <message>`` and ``hint: <hint>`` on one line each; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations


class GradprobeError(Exception):
    """Base class of every error gradprobe raises on purpose."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\nhint: {self.hint}"


class ConfigError(GradprobeError, ValueError):
    """A bad argument: wrong type, value out of range, a pattern that matches nothing."""


class RunDirError(GradprobeError, OSError):
    """A run directory that cannot be written or read."""


class NonFiniteError(GradprobeError, FloatingPointError):
    """A NaN or Inf appeared (raised with ``on_nonfinite="raise"`` once the data is on disk)."""


class UnsupportedModelError(GradprobeError, TypeError):
    """A model or module gradprobe cannot instrument, with the reason and a workaround."""


class RunDataWarning(UserWarning):
    """Part of a run directory could not be read (a damaged or missing part, a garbled line of
    ``events.jsonl``) and was skipped; the message says which steps are missing."""


__all__ = [
    "ConfigError",
    "GradprobeError",
    "NonFiniteError",
    "RunDataWarning",
    "RunDirError",
    "UnsupportedModelError",
]
