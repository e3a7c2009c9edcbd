"""The verdict on one tensor's differences, and the report row that states it.

:func:`_judge` turns the centred differences of one parameter tensor
(:class:`~gradprobe.check.differences.Differences`) into a verdict, with what led to it:

* the relative error ``r = ‖g̃ − g‖ / (‖g̃‖ + ‖g‖)`` (``0/0 := 0``, :func:`_rel`) and the
  roundoff floor ``‖noise‖ / (‖g̃‖ + ‖g‖)`` below which an error cannot be told from noise;
* ``ok ≤ max(ok_tol, floor) < suspicious ≤ max(bug_tol, 10·floor) < bug`` (:func:`_verdict`);
* kinks: a coordinate where ``±ε`` crossed a kink (found by the activation hooks, or by one-sided
  slopes that disagree by far more than roundoff while the centred error is about half that
  disagreement) is *explained* when its error is within ``_KINK_SHARE`` of the disagreement; a
  tensor whose only errors are explained reads ``"kink"``.

:func:`_precision_check` says, before any tensor is judged, whether the dtype and ``ε`` can
resolve the gradient at all (roundoff ``u·|J|/ε`` against the gradient's typical coordinate),
and words the warning when they cannot. :func:`_row` and :func:`_empty_row` are the
:class:`~gradprobe.check.report.TensorCheck` rows of the report; :func:`_roundoff_warning` and
:func:`_step_note` the sentences it adds. The engine (:mod:`gradprobe.check.engine`) measures,
asks for the verdict, refines with the step ladder and asks again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from gradprobe.check.differences import Differences
from gradprobe.check.evaluator import _Evaluator
from gradprobe.check.options import (
    _KINK_SHARE,
    _NOISE_SAFETY,
    CheckOptions,
    Verdict,
    _unit_roundoff,
)
from gradprobe.check.report import CoordinateCheck, TensorCheck


def _rel(a: Tensor, b: Tensor) -> float:
    num = float(torch.linalg.vector_norm(a - b))
    den = float(torch.linalg.vector_norm(a)) + float(torch.linalg.vector_norm(b))
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def _verdict(rel: float, floor: float, ok_tol: float, bug_tol: float, resolvable: bool) -> Verdict:
    """ok ≤ max(ok_tol, roundoff floor) < suspicious ≤ max(bug_tol, 10·floor) < bug.

    When the dtype and ε cannot resolve the gradient at all (``resolvable`` false) an error
    above ``ok_tol`` that roundoff could explain reads "suspicious", never "ok"."""
    if rel <= ok_tol or (resolvable and rel <= floor):
        return "ok"
    if rel > max(bug_tol, 10.0 * floor):
        return "bug"
    return "suspicious"


@dataclass(frozen=True)
class _Judgement:
    """The verdict on one tensor's differences, with what led to it."""

    verdict: Verdict
    rel: float
    floor: float
    rel_smooth: float
    err: Tensor
    crossed: Tensor
    explained: Tensor


def _judge(d: Differences, opts: CheckOptions, resolvable: bool) -> _Judgement:
    ok_tol, bug_tol = opts.ok_tol, opts.bug_tol
    num, ana, noise = d.num, d.ana, d.noise
    err = (num - ana).abs()
    split = (d.fwd - d.bwd).abs()
    # A kink crossed on one side: the one-sided slopes disagree by far more than roundoff
    # and the centred error is about half that disagreement (curvature, by contrast, makes
    # split = ε·J'' with a centred error of O(ε²)). A coordinate the step ladder resolved is
    # not a kink.
    onesided = (split > 2.0 * noise) & (err > noise) & (err >= 0.3 * split) & ~d.refined
    crossed = d.hook_crossed | onesided
    explained = crossed & (err <= _KINK_SHARE * split + noise)
    den = float(torch.linalg.vector_norm(num)) + float(torch.linalg.vector_norm(ana))
    floor = float(torch.linalg.vector_norm(noise)) / den if den > 0 else 0.0
    rel = _rel(num, ana)
    verdict = _verdict(rel, floor, ok_tol, bug_tol, resolvable)
    keep = ~explained
    rel_smooth = _rel(num[keep], ana[keep])
    if verdict != "ok" and bool(explained.any()):
        den_s = float(torch.linalg.vector_norm(num[keep])) + float(
            torch.linalg.vector_norm(ana[keep])
        )
        floor_s = float(torch.linalg.vector_norm(noise[keep])) / den_s if den_s > 0 else 0.0
        smooth = _verdict(rel_smooth, floor_s, ok_tol, bug_tol, resolvable)
        verdict = "kink" if smooth == "ok" else smooth
    return _Judgement(verdict, rel, floor, rel_smooth, err, crossed, explained)


def _row(ev: _Evaluator, t: int, d: Differences, j: _Judgement, n_worst: int) -> TensorCheck:
    name, shape = ev.names[t], ev.shapes[t]
    idx, num, ana = d.idx, d.num, d.ana
    order = torch.argsort(j.err, descending=True)[:n_worst]
    worst = tuple(
        CoordinateCheck(
            index=None if idx is None
            else tuple(int(i) for i in np.unravel_index(int(idx[k]), shape)),
            direction=int(k) if idx is None else None,
            numeric=float(num[k]),
            analytic=float(ana[k]),
            abs_error=float(j.err[k]),
            kink=bool(j.explained[k]),
            step=float(d.step[k]),
        )
        for k in order.tolist()
    )
    return TensorCheck(
        name=name,
        shape=tuple(shape),
        n_checked=num.numel(),
        rel_error=j.rel,
        abs_error=float(torch.linalg.vector_norm(num - ana)),
        numeric_norm=float(torch.linalg.vector_norm(num)),
        analytic_norm=float(torch.linalg.vector_norm(ana)),
        noise_floor=j.floor,
        rel_error_smooth=j.rel_smooth,
        kinks_crossed=int(j.crossed.sum()),
        verdict=j.verdict,
        worst=worst,
        steps=tuple(sorted({float(h) for h in d.step.unique().tolist()})),
    )


def _empty_row(ev: _Evaluator, t: int) -> TensorCheck:
    """An empty tensor has no coordinate to get wrong: checked trivially."""
    return TensorCheck(
        name=ev.names[t], shape=tuple(ev.shapes[t]), n_checked=0, rel_error=0.0,
        abs_error=0.0, numeric_norm=0.0, analytic_norm=0.0, noise_floor=0.0,
        rel_error_smooth=0.0, kinks_crossed=0, verdict="ok", worst=(), steps=(),
    )


def _roundoff_warning(name: str, d: Differences, floor: float) -> str:
    num_norm = float(torch.linalg.vector_norm(d.num))
    ana_norm = float(torch.linalg.vector_norm(d.ana))
    noise_norm = float(torch.linalg.vector_norm(d.noise))
    if ana_norm <= noise_norm:
        return (
            f"{name}: the gradient is zero to within roundoff (analytic norm {ana_norm:.1e}, "
            f"numeric norm {num_norm:.1e}, roundoff ≈ {noise_norm:.1e}); its relative error is "
            f"not meaningful"
        )
    return (
        f"{name}: roundoff alone can give a relative error of {floor:.1e} here (|J| ≈ "
        f"{float(d.jscale.max()):.3g} against a gradient norm of {(num_norm + ana_norm) / 2:.3g}); "
        f"a small error in this tensor cannot be told from noise"
    )


def _step_note(name: str, d: Differences, n_refined: int, eps: float) -> str:
    used = sorted({float(h) for h in d.step[d.refined].tolist()})
    return (
        f"{name}: {n_refined} of {d.num.numel()} checked values re-differenced with a step "
        f"chosen per coordinate from eps·10^k, k ≤ 4 (steps used: "
        f"{', '.join(f'{h:g}' for h in used)}; eps={eps:g} gave more rounding or truncation "
        f"error there)"
    )


def _precision_check(
    ev: _Evaluator, eps: float, dtype: torch.dtype, bug_tol: float, warnings: list[str]
) -> bool:
    """Whether roundoff ``u·|J|/ε`` is small against the gradient's typical coordinate.

    If it is not, no error below the roundoff can be read as "ok" (a warning says why)."""
    u = _unit_roundoff(dtype)
    g = torch.cat([x.to(torch.float64).cpu() for x in ev.grads])
    rms = float(torch.linalg.vector_norm(g)) / math.sqrt(max(g.numel(), 1))
    roundoff = _NOISE_SAFETY * u * max(abs(ev.j0), 1e-300) / eps
    if rms > 0.0 and roundoff / rms <= 0.1 * bug_tol:
        return True
    best = float(torch.finfo(dtype).eps) ** (1.0 / 3.0)
    name = str(dtype).replace("torch.", "")
    if rms == 0.0:
        warnings.append(
            "the analytic gradient is exactly zero: the function is piecewise constant here "
            "(rounding, sign, comparisons, argmax), or does not depend on these parameters; "
            "the check can only confirm that the numeric gradient is zero too (a jump crossed "
            "by ±eps reads as an error); check at a point where the gradient is not zero"
        )
    elif dtype == torch.float64:
        warnings.append(
            f"the noise floor is above the verdict threshold: each difference carries roundoff "
            f"≈ 10·u·|J|/eps ≈ {roundoff:.1e} (|J| = {abs(ev.j0):.3g}) against a typical "
            f"gradient coordinate of {rms:.1e}, so an error below "
            f"{roundoff / rms:.0e} of the gradient cannot be seen; check a loss with a smaller "
            f"|J| (subtract its value at these parameters, or check the term of interest "
            f"alone), or use a larger step, eps ≈ {best:.0e} (≈ machine_eps^(1/3), the step "
            f"that balances roundoff against truncation error)"
        )
    else:
        warnings.append(
            f"{name} with eps={eps:g} cannot give a meaningful answer: each difference carries "
            f"roundoff ≈ machine_eps·|J|/eps ≈ {roundoff:.1e} (|J| = {abs(ev.j0):.3g}) against "
            f"a typical gradient coordinate of {rms:.1e}; use dtype=torch.float64 (the "
            f"default) or a larger step, eps ≈ {best:.0e} (≈ machine_eps^(1/3), the step that "
            f"balances roundoff against truncation error)"
        )
    return False
