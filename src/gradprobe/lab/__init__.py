"""The lab: classic experiments on vanishing and exploding gradients, with figures and tables.

>>> import gradprobe as gp
>>> result = gp.lab.run("linear-chain", depth=5)   # doctest: +SKIP
>>> result.table                                    # doctest: +SKIP

``run`` computes; figures are drawn only when ``out`` is given (or by ``write``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gradprobe.lab.base import (
    EXPERIMENTS,
    Claim,
    Experiment,
    LabResult,
    Progress,
    get,
    make_config,
    no_progress,
    write,
)

# The function, not the module: imported here once, so the package attribute stays bound to it
# (a first `import gradprobe.lab.sweep` after this would not rebind it), as gp.diagnose does.
from gradprobe.lab.sweep import SweepResult, sweep


def list_experiments() -> list[Experiment]:
    """Every registered experiment, in registration order."""
    from gradprobe.lab import experiments  # noqa: F401

    return list(EXPERIMENTS.values())


def run(
    name: str, *, out: str | Path | None = None, progress: Progress | None = None, **options: Any
) -> LabResult:
    """Run experiment ``name`` with its default config updated by ``options``.

    With ``out``, figures (PNG, SVG), tables (CSV, Markdown), ``summary.json`` and any run
    directories are written there.
    """
    exp = get(name)
    config = make_config(name, **options)
    result = exp.run(config, progress=progress or no_progress, out=None if out is None else Path(out))
    if out is not None:
        write(result, Path(out))
    return result


__all__ = [
    "EXPERIMENTS",
    "Claim",
    "Experiment",
    "LabResult",
    "SweepResult",
    "get",
    "list_experiments",
    "make_config",
    "run",
    "sweep",
    "write",
]
