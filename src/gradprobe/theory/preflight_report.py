"""What :func:`gradprobe.theory.preflight.preflight` returns: per-layer rows, the fix, the report."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import pandas as pd

from gradprobe.theory import meanfield as mf
from gradprobe.theory.dataflow import WEIGHT_TYPES

Verdict = Literal["vanishing", "exploding", "fine"]


@dataclass(frozen=True)
class LayerCheck:
    """One leaf module: what was measured, and what theory predicts where it applies."""

    name: str
    kind: str
    theory: bool
    note: str
    activation: str | None = None
    fan_in: int | None = None
    fan_out: float | None = None
    sigma_w2: float | None = None
    sigma_b2: float | None = None
    q_measured: float = math.nan
    q_predicted: float | None = None
    grad_ms: float = math.nan
    next_layer: str | None = None
    ratio_measured: float | None = None
    ratio_predicted: float | None = None


@dataclass(frozen=True)
class Fix:
    """The initialisation that makes the stack critical (``χ₁ = 1``).

    ``sigma_w2`` is ``None`` where the activation has no critical point; ``recommended_init``
    is the activation table's initialiser either way.
    """

    activation: str
    sigma_b2: float
    sigma_w2: float | None
    recommended_init: str

    def __str__(self) -> str:
        if self.sigma_w2 is None:
            return (
                f"{self.activation} has no critical sigma_w2 at sigma_b2={self.sigma_b2:.3g}; "
                f"use {self.recommended_init} or a normalising layer"
            )
        return (
            f"init weights N(0, {self.sigma_w2:.4g}/fan_in) (std = sqrt({self.sigma_w2:.4g}/fan_in))"
            f" with bias variance {self.sigma_b2:.3g} for {self.activation} "
            f"(table default: {self.recommended_init})"
        )


@dataclass(frozen=True)
class PreflightReport:
    """Result of :func:`preflight`. ``layers`` lists every leaf module that ran, in order."""

    layers: tuple[LayerCheck, ...]
    verdict: Verdict
    measured_log_gain: float
    predicted_log_gain: float | None
    predicted_verdict: Verdict | None
    depth: int
    meanfield: mf.MeanField | None
    fix: Fix | None
    threshold: float = mf.DEPTH_FACTOR
    notes: tuple[str, ...] = field(default_factory=tuple)
    verdict_basis: Literal["theory", "measurement"] = "measurement"
    trainable: bool = True
    """Whether training is predicted to work: no reason in ``reasons``."""
    reasons: tuple[str, ...] = ()
    """Why training is predicted to fail: gradient gain, chaos, saturation."""
    degree: float = 0.0
    """``|G| / threshold``: the depth as a multiple of the trainable depth ``6 ξ_∇``."""
    saturation: float = math.nan
    """Mean fraction of saturated hidden activations at initialisation (activation table)."""
    mean_shift: float = math.nan
    """Mean common-mode fraction of the hidden activations (0: centred; 1: same for all inputs)."""
    depth_over_xi_c: float = math.nan
    """Layer-to-layer steps over the correlation depth scale ``ξ_c`` (chaos fails above 6)."""
    sharpness: float = math.nan
    """Top Gauss–Newton eigenvalue of the loss (measured only when a step size was given)."""
    step_limit: float = math.nan
    """Largest stable SGD step ``2(1+β)/sharpness`` (only when a step size was given)."""
    borderline_reasons: tuple[str, ...] = ()
    """Why the prediction is close to its boundary (degree near 1, step near its limit)."""

    @property
    def borderline(self) -> bool:
        """Whether ``trainable`` is a close call (see ``borderline_reasons``)."""
        return bool(self.borderline_reasons)

    @property
    def phase(self) -> str | None:
        """``"ordered"`` (vanishing), ``"chaotic"`` (exploding) or ``"critical"`` from theory."""
        return None if self.meanfield is None else self.meanfield.phase

    @property
    def max_depth(self) -> float | None:
        """Depth beyond which training is predicted to fail (``6 ξ``, Schoenholz et al. 2017)."""
        return None if self.meanfield is None else self.meanfield.max_depth

    def table(self) -> pd.DataFrame:
        """One row per leaf module (all fields of :class:`LayerCheck`)."""
        return pd.DataFrame([vars(layer) for layer in self.layers])

    def __str__(self) -> str:
        head = f"preflight: {self.verdict.upper()} (from {self.verdict_basis})"
        if self.verdict != "fine":
            head += f", degree {self.degree:.2g} (|G| / {self.threshold:g})"
        head += "; predicted to train" if self.trainable else "; predicted NOT to train"
        head += " (borderline)" if self.borderline else ""
        lines = [head]
        lines += [f"  does not train: {r}" for r in self.reasons]
        lines += [f"  borderline: {r}" for r in self.borderline_reasons]
        if not (math.isnan(self.saturation) and math.isnan(self.mean_shift)):
            lines.append(
                f"  hidden activations at init: {_pct(self.saturation)} saturated, "
                f"{_pct(self.mean_shift)} of their second moment common to all examples"
            )
        lines.append(
            f"  measured gradient-variance gain first/last weight layer: "
            f"e^{self.measured_log_gain:+.2f} over {self.depth} weight layers "
            f"(|ln| > {self.threshold:g} fails)"
        )
        if self.predicted_log_gain is not None:
            lines.append(
                f"  theory predicts e^{self.predicted_log_gain:+.2f} along its chain "
                f"({self.predicted_verdict})"
            )
        m = self.meanfield
        if m is not None:
            lines.append(
                f"  mean field ({m.activation}, sigma_w2={m.sigma_w2:.4g}, sigma_b2={m.sigma_b2:.3g}):"
                f" q*={m.q_star:.4g}, chi1={m.chi1:.4f} -> {m.phase}; "
                f"xi_grad={m.xi_grad:.3g}, xi_q={m.xi_q:.3g}, xi_c={m.xi_c:.3g}, "
                f"trainable depth ~{m.max_depth:.3g}"
            )
        if self.fix is not None:
            label = "critical init" if self.trainable else "fix"
            lines.append(f"  {label}: {self.fix}")
        for note in self.notes:
            lines.append(f"  note: {note}")
        header = f"  {'layer':<16} {'kind':<10} {'act':<10} {'sigma_w2':>9} {'q meas':>10} "
        header += f"{'q pred':>10} {'grad ms':>10} {'ratio':>8} {'pred':>8}  theory"
        lines.append(header)
        for r in self.layers:
            if r.kind not in {t.__name__ for t in WEIGHT_TYPES} and r.theory:
                continue  # activations covered by their weight layer
            lines.append(
                f"  {r.name[:16]:<16} {r.kind[:10]:<10} {(r.activation or '-')[:10]:<10} "
                f"{_fmt(r.sigma_w2):>9} {_fmt(r.q_measured):>10} {_fmt(r.q_predicted):>10} "
                f"{_fmt(r.grad_ms):>10} {_fmt(r.ratio_measured):>8} {_fmt(r.ratio_predicted):>8}  "
                + ("yes" if r.theory else f"no theory ({r.note})")
            )
        return "\n".join(lines)


def _pct(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:.0%}"


def _fmt(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.4g}"


__all__ = ["Fix", "LayerCheck", "PreflightReport", "Verdict"]
