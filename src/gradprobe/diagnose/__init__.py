"""Diagnosis: from a run's frames to findings with evidence and ranked remedies.

One module per rule family, each a pure function ``rule(frames) -> list[Finding]``:
:mod:`~gradprobe.diagnose.depth` (vanishing and exploding across depth),
:mod:`~gradprobe.diagnose.growth` (exploding over steps), :mod:`~gradprobe.diagnose.nonfinite`,
:mod:`~gradprobe.diagnose.units` (dead ReLU, saturation, symmetry),
:mod:`~gradprobe.diagnose.loss`, :mod:`~gradprobe.diagnose.optimisation` (learning rate),
:mod:`~gradprobe.diagnose.slow` (a rate too small for a run that still descends) and
:mod:`~gradprobe.diagnose.inputs` (input scale, first from the recorded input:
:mod:`~gradprobe.diagnose.input_stats`), :mod:`~gradprobe.diagnose.symmetry` (units that stay
identical, from the unit spread) and :mod:`~gradprobe.diagnose.recurrent` (vanishing and
exploding through time); :mod:`~gradprobe.diagnose.api` runs them.
Thresholds and their derivations are in each module's docstring and in docs/diagnose.md.

This package's own import is light (the records only): the rules, pandas and the run reader are
imported when :func:`diagnose` is first called, so ``import gradprobe`` stays light.
"""

from __future__ import annotations

from typing import Any

from gradprobe.diagnose.finding import SEVERITIES, Diagnosis, Evidence, Finding, Remedy, Severity


def diagnose(run_or_path: Any) -> Diagnosis:
    """Diagnose a run (a :class:`gradprobe.Run` or its directory); see
    :func:`gradprobe.diagnose.api.diagnose`."""
    from gradprobe.diagnose import api

    return api.diagnose(run_or_path)


def append_findings(run_or_path: Any, diagnosis: Diagnosis) -> int:
    """Append ``diagnosis``'s findings to the run's ``events.jsonl``; see
    :func:`gradprobe.diagnose.api.append_findings`."""
    from gradprobe.diagnose import api

    return api.append_findings(run_or_path, diagnosis)


__all__ = ["SEVERITIES", "Diagnosis", "Evidence", "Finding", "Remedy", "Severity",
           "append_findings", "diagnose"]
