"""The records a gradient check returns: per coordinate, per tensor, and the report."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

from gradprobe.check.options import (
    Verdict,
)


@dataclass(frozen=True)
class CoordinateCheck:
    """One checked coordinate (``index``) or random direction (``direction``)."""

    index: tuple[int, ...] | None
    direction: int | None
    numeric: float
    analytic: float
    abs_error: float
    kink: bool
    step: float | None = None
    """The step of the centred difference that gave ``numeric``."""

    def where(self) -> str:
        return f"direction {self.direction}" if self.index is None else str(list(self.index))


@dataclass(frozen=True)
class TensorCheck:
    """The check of one parameter tensor.

    ``rel_error`` is ``‖g̃ − g‖ / (‖g̃‖ + ‖g‖)`` over the checked coordinates (or directional
    derivatives); ``noise_floor`` the relative error roundoff alone can produce for this tensor;
    ``rel_error_smooth`` the same relative error without the coordinates whose discrepancy a
    crossed kink explains; ``kinks_crossed`` how many checked coordinates crossed a kink;
    ``steps`` the steps used (see :mod:`gradprobe.check.differences`).
    """

    name: str
    shape: tuple[int, ...]
    n_checked: int
    rel_error: float
    abs_error: float
    numeric_norm: float
    analytic_norm: float
    noise_floor: float
    rel_error_smooth: float
    kinks_crossed: int
    verdict: Verdict
    worst: tuple[CoordinateCheck, ...]
    steps: tuple[float, ...] = ()
    """The steps of the centred differences used in this tensor: ``(eps,)`` unless some
    coordinates were re-differenced with a step chosen for them (the report's notes say why)."""


@dataclass(frozen=True)
class GradCheckReport:
    """What :func:`gradcheck` / :func:`gradcheck_fn` found, one row per parameter tensor.

    ``ok`` is true when every tensor reads ``"ok"`` or ``"kink"``; ``failed`` names the tensors
    that read ``"bug"``; ``suspicious`` those in between. ``table()`` gives a DataFrame.
    ``vectorized`` is true when any tensor was evaluated with ``torch.func.vmap``;
    ``fallback_reason`` says why the others (named, when some were vectorised) used the loop.
    """

    rows: tuple[TensorCheck, ...]
    rel_error: float
    mode: str
    eps: float
    dtype: str
    ok_tol: float
    bug_tol: float
    n_evaluations: int
    seconds: float
    vectorized: bool
    fallback_reason: str | None = None
    notes: tuple[str, ...] = ()
    warnings: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return all(r.verdict in ("ok", "kink") for r in self.rows)

    @property
    def failed(self) -> list[str]:
        return [r.name for r in self.rows if r.verdict == "bug"]

    @property
    def suspicious(self) -> list[str]:
        return [r.name for r in self.rows if r.verdict == "suspicious"]

    @property
    def verdict(self) -> Verdict:
        for v in ("bug", "suspicious", "kink"):
            if any(r.verdict == v for r in self.rows):
                return v  # type: ignore[return-value]
        return "ok"

    def __getitem__(self, name: str) -> TensorCheck:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no checked tensor named {name!r}; checked: {[r.name for r in self.rows]}")

    def table(self) -> pd.DataFrame:
        """One row per tensor: name, shape, n_checked, errors, floor, kinks, verdict, worst."""
        import pandas as pd

        return pd.DataFrame(
            [
                {
                    "name": r.name,
                    "shape": r.shape,
                    "n_checked": r.n_checked,
                    "rel_error": r.rel_error,
                    "abs_error": r.abs_error,
                    "numeric_norm": r.numeric_norm,
                    "analytic_norm": r.analytic_norm,
                    "noise_floor": r.noise_floor,
                    "rel_error_smooth": r.rel_error_smooth,
                    "kinks_crossed": r.kinks_crossed,
                    "verdict": r.verdict,
                    "steps": ", ".join(f"{h:g}" for h in r.steps),
                    "worst": "; ".join(
                        f"{c.where()}: numeric {c.numeric:.6g} analytic {c.analytic:.6g}"
                        for c in r.worst[:3]
                    ),
                }
                for r in self.rows
            ]
        )

    def __str__(self) -> str:
        how = "vectorised" if self.vectorized else "loop"
        if self.vectorized and self.fallback_reason:
            how = "partly vectorised"
        lines = [
            f"gradcheck: {self.verdict.upper()}  (mode={self.mode}, eps={self.eps:g}, "
            f"{self.dtype}, {self.n_evaluations} evaluations in {self.seconds:.2f} s, {how})",
            f"overall relative error {self.rel_error:.3e}  (ok <= {self.ok_tol:g}, "
            f"bug > {self.bug_tol:g})",
        ]
        width = max([len(r.name) for r in self.rows] + [6])
        lines.append(
            f"  {'tensor':<{width}}  {'shape':<14} {'checked':>7}  {'rel_error':>9}  "
            f"{'floor':>8}  {'kinks':>5}  verdict"
        )
        for r in self.rows:
            lines.append(
                f"  {r.name:<{width}}  {str(tuple(r.shape)):<14} {r.n_checked:>7}  "
                f"{r.rel_error:>9.2e}  {r.noise_floor:>8.1e}  {r.kinks_crossed:>5}  {r.verdict}"
            )
        for r in self.rows:
            if r.verdict in ("bug", "suspicious"):
                worst = ", ".join(
                    f"{c.where()} numeric {c.numeric:.6g} vs analytic {c.analytic:.6g}"
                    for c in r.worst[:3]
                )
                lines.append(f"{r.verdict} in {r.name}: {worst}")
        if self.fallback_reason:
            lines.append(f"not vectorised: {self.fallback_reason}")
        lines += [f"note: {n}" for n in self.notes]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


# ------------------------------------------------------------------------------ argument checks
