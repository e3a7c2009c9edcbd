"""Display: figures (matplotlib), the HTML report, the comparison of runs.

Nothing here computes a statistic: it draws what the run, the lab or the diagnosis computed.
Importing this package does not import matplotlib; :mod:`gradprobe.report.style` does.

``gp.report(run, "report.html")`` is :func:`gradprobe.report.html.report`. This package is also
callable with the same arguments: importing a submodule (``import gradprobe.report.style``)
binds ``gradprobe.report`` to the package, and ``gp.report(...)`` must work in any import order.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any


class _CallableModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Path:
        from gradprobe.report.html import report

        return report(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule


def compare(*args: Any, **kwargs: Any) -> Path:
    """:func:`gradprobe.report.comparison.compare` (imported on first call)."""
    from gradprobe.report.comparison import compare as _compare

    return _compare(*args, **kwargs)
