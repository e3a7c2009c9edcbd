"""What a diagnosis says: findings, the evidence behind each, and the remedies that apply.

These are plain, frozen records with no torch import, so the report, the terminal view, the
doctor and JSON export all read the same objects.

>>> f = Finding(
...     rule="vanishing-gradients", severity="error", layers=("0", "2"), steps=(0, 99),
...     evidence=(Evidence("act_grad decay per layer", 0.31, 0.5, "<"),),
...     explanation="Each sigmoid layer multiplies the backward signal by at most 1/4.",
...     remedies=(Remedy("init_", {"scheme": "xavier_uniform"},
...                      'gp.remedies.init_(model, "xavier_uniform")', "keeps the variance"),),
... )
>>> Diagnosis([f]).rules
['vanishing-gradients']
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Severity = Literal["info", "warning", "error"]
SEVERITIES: tuple[Severity, ...] = ("info", "warning", "error")


@dataclass(frozen=True)
class Evidence:
    """One number that triggered a finding, and what it was compared to.

    ``relation`` reads ``value <relation> threshold`` (e.g. ``0.31 < 0.5``); ``note`` says what
    the threshold is (a ratio to the run's own history, a derived bound, ...).
    """

    name: str
    value: float
    threshold: float | None = None
    relation: Literal["<", ">", "<=", ">=", "=", "!="] | None = None
    note: str = ""

    def __str__(self) -> str:
        if self.threshold is None or self.relation is None:
            text = f"{self.name} = {self.value:.3g}"
        else:
            text = f"{self.name} = {self.value:.3g} {self.relation} {self.threshold:.3g}"
        return f"{text} ({self.note})" if self.note else text


@dataclass(frozen=True)
class Remedy:
    """A cure a finding names: the ``gradprobe.remedies`` function (or ``"setting"`` for a
    plain PyTorch setting), its keyword arguments, the code a user would type, and why."""

    name: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    code: str = ""
    why: str = ""

    def __str__(self) -> str:
        return f"{self.code or self.name}  ({self.why})" if self.why else (self.code or self.name)


@dataclass(frozen=True)
class Finding:
    """One diagnosed problem: which rule, how bad, where (layers, first and last step), the
    evidence, the mechanism (citing its source) and the remedies, best first."""

    rule: str
    severity: Severity
    layers: tuple[str, ...]
    steps: tuple[int, int] | None
    evidence: tuple[Evidence, ...]
    explanation: str
    remedies: tuple[Remedy, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["layers"] = list(self.layers)
        out["steps"] = None if self.steps is None else list(self.steps)
        out["remedies"] = [
            {**asdict(r), "kwargs": dict(r.kwargs)} for r in self.remedies
        ]
        return out


class Diagnosis:
    """The findings of one run, most severe first. Iterable; ``len(d) == 0`` means healthy."""

    def __init__(self, findings: list[Finding], *, run: str | None = None) -> None:
        order = {s: i for i, s in enumerate(reversed(SEVERITIES))}
        self.findings = sorted(findings, key=lambda f: order[f.severity])
        self.run = run

    def __iter__(self) -> Iterator[Finding]:
        return iter(self.findings)

    def __len__(self) -> int:
        return len(self.findings)

    @property
    def rules(self) -> list[str]:
        return [f.rule for f in self.findings]

    @property
    def healthy(self) -> bool:
        """No warning or error (info findings do not count)."""
        return not any(f.severity != "info" for f in self.findings)

    def to_dict(self) -> dict[str, Any]:
        return {"run": self.run, "findings": [f.to_dict() for f in self.findings]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=float)

    def __str__(self) -> str:
        head = f"Diagnosis of {self.run}" if self.run else "Diagnosis"
        if not self.findings:
            return f"{head}: no findings: gradients look healthy."
        lines = [f"{head}: {len(self.findings)} finding(s)"]
        for f in self.findings:
            where = ", ".join(f.layers[:6]) + (" ..." if len(f.layers) > 6 else "")
            steps = "" if f.steps is None else f" steps {f.steps[0]}-{f.steps[1]}"
            lines.append(f"[{f.severity}] {f.rule}: {where or 'whole model'}{steps}")
            lines.extend(f"    evidence: {e}" for e in f.evidence)
            lines.append(f"    why: {f.explanation}")
            lines.extend(f"    fix {i}: {r}" for i, r in enumerate(f.remedies, 1))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"Diagnosis({self.rules!r})"


__all__ = ["SEVERITIES", "Diagnosis", "Evidence", "Finding", "Remedy", "Severity"]
