"""``diagnose(run)``: read a run's frames once, run every rule, merge what they find.

Example
    >>> import tempfile, torch, gradprobe as gp
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> with gp.Probe(model, opt, run_dir=tempfile.mkdtemp() + "/r") as probe:
    ...     for _ in range(5):
    ...         loss = model(torch.randn(32, 4)).pow(2).mean()
    ...         probe.observe_loss(loss)
    ...         loss.backward(); opt.step(); opt.zero_grad()
    >>> d = gp.diagnose(probe.run)
    >>> isinstance(d, gp.Diagnosis)
    True
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gradprobe.diagnose.depth import exploding_depth, vanishing
from gradprobe.diagnose.finding import SEVERITIES, Diagnosis, Finding
from gradprobe.diagnose.frames import Frames
from gradprobe.diagnose.growth import exploding_steps
from gradprobe.diagnose.inputs import input_scale
from gradprobe.diagnose.loss import loss_plateau
from gradprobe.diagnose.nonfinite import nonfinite
from gradprobe.diagnose.optimisation import learning_rate
from gradprobe.diagnose.recurrent import through_time
from gradprobe.diagnose.slow import slow_learning_rate
from gradprobe.diagnose.symmetry import symmetry
from gradprobe.diagnose.units import dead_relu, saturation

Rule = Callable[[Frames], list[Finding]]

RULES: tuple[Rule, ...] = (
    nonfinite, vanishing, exploding_depth, exploding_steps, through_time, dead_relu, saturation,
    symmetry, learning_rate, input_scale, slow_learning_rate, loss_plateau,
)
"""Every rule, in the order their findings are reported within a severity."""

FINDING_EVENT = "finding"
"""``type`` of the lines :func:`append_findings` writes to ``events.jsonl``."""


def _merge(findings: list[Finding]) -> list[Finding]:
    """One finding per rule: layers and evidence joined, steps spanned, worst severity, the
    first finding's explanation and remedies first (then any others, without repeats)."""
    out: dict[str, Finding] = {}
    for f in findings:
        g = out.get(f.rule)
        if g is None:
            out[f.rule] = f
            continue
        steps = [s for s in (g.steps, f.steps) if s is not None]
        names = {r.name + repr(sorted(r.kwargs.items())) for r in g.remedies}
        out[f.rule] = Finding(
            rule=f.rule,
            severity=max(g.severity, f.severity, key=SEVERITIES.index),
            layers=tuple(dict.fromkeys(g.layers + f.layers)),
            steps=(min(s[0] for s in steps), max(s[1] for s in steps)) if steps else None,
            evidence=g.evidence + f.evidence,
            explanation=g.explanation if g.explanation == f.explanation
            else g.explanation + " " + f.explanation,
            remedies=g.remedies + tuple(
                r for r in f.remedies if r.name + repr(sorted(r.kwargs.items())) not in names),
        )
    return list(out.values())


def diagnose_frames(frames: Frames, *, run: str | None = None,
                    rules: tuple[Rule, ...] = RULES) -> Diagnosis:
    """Run ``rules`` on ``frames`` (pure: no file is read or written)."""
    findings: list[Finding] = []
    for rule in rules:
        findings.extend(frames.findings(rule))
    return Diagnosis(_merge(findings), run=run)


def _open(run_or_path: Any) -> Any:
    if isinstance(run_or_path, (str, os.PathLike)):
        from gradprobe.store.run import Run

        return Run.open(Path(run_or_path))
    return run_or_path


def diagnose(run_or_path: Any) -> Diagnosis:
    """Diagnose a run (a :class:`gradprobe.Run` or its directory): every rule of
    :data:`RULES` on the run's frames, read once. ``RunDirError`` if it is not a run."""
    run = _open(run_or_path)
    return diagnose_frames(Frames.of(run), run=str(run.path))


def append_findings(run_or_path: Any, diagnosis: Diagnosis) -> int:
    """Append the findings to the run's ``events.jsonl`` (one line each, ``type: "finding"``,
    with the time they were made); :meth:`Run.events` keeps listing non-finite events only.
    Returns the number of lines written."""
    from gradprobe.store.writer import RunWriter

    run = _open(run_or_path)
    now = time.strftime("%Y-%m-%dT%H:%M:%S")
    lines = [{"type": FINDING_EVENT, "time": now, **f.to_dict()} for f in diagnosis]
    RunWriter(Path(run.path)).append_events(lines)
    return len(lines)


__all__ = ["FINDING_EVENT", "RULES", "append_findings", "diagnose", "diagnose_frames"]
