"""Display: figures (matplotlib), the HTML report, the comparison of runs.

Nothing here computes a statistic: it draws what the run, the lab or the diagnosis computed.
Importing this package does not import matplotlib; :mod:`gradprobe.report.style` does.

``gp.report(run, "report.html")`` is :func:`gradprobe.report.html.report`, re-exported here
and bound over the package name by ``gradprobe/__init__.py`` (as ``gp.diagnose`` is).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def report(run_or_path: Any, out: str | os.PathLike[str] = "report.html", *,
           diagnosis: Any = None, title: str | None = None) -> Path:
    """:func:`gradprobe.report.html.report` (imported on first call, with matplotlib)."""
    from gradprobe.report.html import report as _report

    return _report(run_or_path, out, diagnosis=diagnosis, title=title)


def compare(*args: Any, **kwargs: Any) -> Path:
    """:func:`gradprobe.report.comparison.compare` (imported on first call)."""
    from gradprobe.report.comparison import compare as _compare

    return _compare(*args, **kwargs)
