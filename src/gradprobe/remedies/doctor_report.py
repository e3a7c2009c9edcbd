"""What the doctor hands back: one entry per run (baseline and each remedy) and their ranking.

No torch here: the records are read by the terminal, JSON export and the HTML report alike.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gradprobe.diagnose.finding import Diagnosis, Finding, Remedy
from gradprobe.errors import ConfigError

LOSS_MARGIN = 1e-3
"""A loss counts as lower than the baseline's when it is below ``(1 - LOSS_MARGIN)`` times it."""


def _pathologies(findings: tuple[Finding, ...]) -> tuple[str, ...]:
    """The rules of the warning/error findings, in order, each once (info does not count)."""
    return tuple(dict.fromkeys(f.rule for f in findings if f.severity != "info"))


@dataclass(frozen=True)
class DoctorEntry:
    """One run of the doctor: the baseline (``remedy`` None) or one remedy tried.

    ``findings_before``/``loss_before`` are the baseline's; ``findings``/``final_loss`` this
    run's. ``depth_profile`` is ``(layer, median act_grad RMS)`` in forward order. ``error`` is
    ``"stage: Type: message"`` when applying the remedy or training with it raised.
    """

    label: str
    remedy: Remedy | None
    record: Any
    findings_before: tuple[Finding, ...]
    findings: tuple[Finding, ...]
    loss_before: float | None
    final_loss: float | None
    depth_profile: tuple[tuple[str, float], ...]
    run_dir: Path | None
    error: str | None
    seconds: float

    @property
    def pathologies(self) -> tuple[str, ...]:
        return _pathologies(self.findings)

    @property
    def gone(self) -> tuple[str, ...]:
        """Baseline pathologies (rules) this run no longer shows."""
        after = set(self.pathologies)
        return tuple(r for r in _pathologies(self.findings_before) if r not in after)

    @property
    def new(self) -> tuple[str, ...]:
        """Pathologies this run shows that the baseline did not."""
        before = set(_pathologies(self.findings_before))
        return tuple(r for r in self.pathologies if r not in before)

    @property
    def depth_ratio(self) -> float | None:
        """First layer's act_grad RMS over the last layer's (≪ 1: vanishing towards the input)."""
        if len(self.depth_profile) < 2 or self.depth_profile[-1][1] == 0:
            return None
        return self.depth_profile[0][1] / self.depth_profile[-1][1]

    @property
    def loss_change(self) -> float | None:
        """Relative change of the final loss against the baseline's (-0.5: halved)."""
        a, b = self.loss_before, self.final_loss
        if a is None or b is None or not math.isfinite(a) or a == 0:
            return None
        return (b - a) / abs(a)

    @property
    def improved(self) -> bool:
        """No error, and fewer pathologies than the baseline, or as many and a lower loss."""
        if self.error is not None or self.remedy is None:
            return False
        score = len(self.gone) - len(self.new)
        if score != 0:
            return score > 0
        a, b = self.loss_before, self.final_loss
        if b is None or not math.isfinite(b):
            return False
        return a is None or not math.isfinite(a) or b < a - LOSS_MARGIN * abs(a)

    def rank_key(self) -> tuple[bool, int, float]:
        loss = self.final_loss if self.final_loss is not None and math.isfinite(self.final_loss) \
            else math.inf
        return (self.error is not None, len(self.new) - len(self.gone), loss)

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "remedy": None if self.remedy is None else {**asdict(self.remedy),
                                                        "kwargs": dict(self.remedy.kwargs)},
            "record": None if self.record is None else str(self.record),
            "findings": [f.to_dict() for f in self.findings],
            "pathologies_before": list(_pathologies(self.findings_before)),
            "pathologies": list(self.pathologies),
            "gone": list(self.gone),
            "new": list(self.new),
            "loss_before": self.loss_before,
            "final_loss": self.final_loss,
            "depth_profile": [list(p) for p in self.depth_profile],
            "depth_ratio": self.depth_ratio,
            "run_dir": None if self.run_dir is None else str(self.run_dir),
            "error": self.error,
            "seconds": self.seconds,
            "improved": self.improved,
        }


def rank(entries: list[DoctorEntry]) -> tuple[DoctorEntry, ...]:
    """Pathologies cleared (net of new ones) first, then final loss; failed runs last."""
    return tuple(sorted(entries, key=DoctorEntry.rank_key))


def _num(x: float | None, fmt: str = ".4g") -> str:
    return "-" if x is None else format(x, fmt)


@dataclass(frozen=True)
class DoctorReport:
    """The doctor's result: the baseline, the remedies tried (ranked), those skipped and why."""

    baseline: DoctorEntry
    entries: tuple[DoctorEntry, ...]
    skipped: tuple[tuple[Remedy, str], ...]
    out: Path
    healthy: bool
    seconds: float

    @property
    def best(self) -> DoctorEntry | None:
        """The highest-ranked remedy that improved on the baseline, or None."""
        return next((e for e in self.entries if e.improved), None)

    @property
    def time_ratio(self) -> float:
        """The doctor's wall time in units of the baseline run (make + train + diagnose)."""
        return self.seconds / max(self.baseline.seconds, 1e-9)

    def __str__(self) -> str:
        b = self.baseline
        n = len(self.entries)
        lines = [f"doctor: {self.out}  (baseline + {n} remed{'y' if n == 1 else 'ies'}, "
                 f"{self.seconds:.1f} s = {self.time_ratio:.1f}x the baseline run)"]
        if self.healthy:
            lines.append(f"baseline: nothing to cure: no warning or error findings "
                         f"(final loss {_num(b.final_loss)}); no remedy tried.")
            return "\n".join(lines)
        lines.append(f"baseline: {len(b.pathologies)} patholog{'y' if len(b.pathologies) == 1 else 'ies'} "
                     f"[{', '.join(b.pathologies)}], final loss {_num(b.final_loss)}, "
                     f"depth ratio {_num(b.depth_ratio, '.2g')}")
        if self.entries:
            w = max(30, *(len(e.label) for e in self.entries))
            pw = max(17, *(len(", ".join(e.pathologies) or "none") for e in self.entries))
            lines.append(f"{'rank':>4}  {'remedy':<{w}}  {'pathologies after':<{pw}} "
                         f"{'gone':>4} {'new':>3}  {'final loss':<18} {'depth ratio':>11}")
            for i, e in enumerate(self.entries, 1):
                if e.error is not None:
                    lines.append(f"{'-':>4}  {e.label:<{w}}  failed: {e.error[:120]}")
                    continue
                change = e.loss_change
                loss = _num(e.final_loss) + ("" if change is None else f" ({change:+.0%})")
                after = ", ".join(e.pathologies) or "none"
                lines.append(f"{i:>4}  {e.label:<{w}}  {after:<{pw}} {len(e.gone):>4} "
                             f"{len(e.new):>3}  {loss:<18} {_num(e.depth_ratio, '.2g'):>11}")
        lines.extend(f"skipped: {r.name}{'(' + ', '.join(f'{k}={v!r}' for k, v in r.kwargs.items()) + ')'}: "
                     f"{why}" for r, why in self.skipped)
        best = self.best
        lines.append(f"best: {best.label}" if best is not None
                     else "best: none of the remedies tried improved on the baseline")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        best = self.best
        return {
            "out": str(self.out),
            "healthy": self.healthy,
            "message": "nothing to cure" if self.healthy else None,
            "baseline": self.baseline.to_dict(),
            "entries": [e.to_dict() for e in self.entries],
            "skipped": [{"remedy": r.name, "kwargs": dict(r.kwargs), "reason": why}
                        for r, why in self.skipped],
            "best": None if best is None else best.label,
            "seconds": self.seconds,
            "time_ratio": self.time_ratio,
        }

    def html(self, path: str | Path | None = None) -> Path:
        """Write the comparison report (baseline and every remedy run) to ``path``.

        The HTML report's comparison view (:func:`gradprobe.report.comparison.compare`) of the
        baseline and every remedy run; with no remedy run (a healthy baseline) the baseline's own
        report. Default path: ``out/report.html``.
        """
        from gradprobe.report.comparison import compare
        from gradprobe.report.html import report

        path = Path(path) if path is not None else self.out / "report.html"
        path.parent.mkdir(parents=True, exist_ok=True)
        done = [e for e in (self.baseline, *self.entries)
                if e.run_dir is not None and (e.run_dir / "meta.json").is_file()]
        diagnoses = [Diagnosis(list(e.findings), run=str(e.run_dir)) for e in done]
        if len(done) >= 2:
            return compare([e.run_dir for e in done], path, labels=[e.label for e in done],
                           diagnoses=diagnoses, title="gradprobe doctor: the baseline and each "
                           "remedy, re-trained with the same budget and seed",
                           summary=("The doctor's ranking (final loss: the value train() "
                                    "returned)", str(self)))
        if done:
            return report(done[0].run_dir, path, diagnosis=diagnoses[0],
                          title=f"{done[0].label}: nothing to cure" if self.healthy else None)
        raise ConfigError("the doctor recorded no run to report on",
                          hint="see the errors in the doctor's table (print(report))")


__all__ = ["LOSS_MARGIN", "DoctorEntry", "DoctorReport", "rank"]
