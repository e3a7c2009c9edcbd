"""Centred differences of one parameter tensor: the coordinates (or directions) checked, the
chunked evaluation at the step ε, and the step ladder that re-differences the coordinates where ε
is not the right step.

The step. A centred difference ``D(h) = (J(θ+h e_i) − J(θ−h e_i)) / 2h`` carries a truncation
error ``h² J'''/6`` and a rounding error ``≈ η/h``, ``η`` the absolute error of one evaluation
of ``J``. The model ``η ≈ 10·u·|J|`` holds for most functions, but not where ``J`` is computed
with cancellation (``ndtr`` in its lower tail evaluates ``1 + erf(x/√2)``: its ``η`` is about
``u``, not ``u·|J|``), and ``J'''`` is unknown. So where the verdict at ε is not a clean "ok",
each such coordinate is re-differenced on the ladder ``h_k = ε·10^k``, ``k = 1 … 4``, and its
error at each step is estimated from its neighbours on the ladder:

.. math::

    \\hat e_k = \\min(|D_k - D_{k-1}|, |D_k - D_{k+1}|),

since where rounding dominates ``|D_k − D_{k+1}| ≈ |e_k|`` (the error at ``h_{k+1}`` is ten
times smaller) and where truncation dominates ``|D_k − D_{k−1}| ≈ |e_k|`` (a hundred times
smaller at ``h_{k−1}``) -- the step-sequence estimate of Stepleman & Winarsky (1979) and of
numdifftools. The step with the smallest ``ê_k`` is taken (steps whose perturbed ``J`` is not
finite or crosses a kink the hooks see are skipped), and ``2·ê_k`` (at least the rounding model
at that step) becomes that coordinate's noise, so the floor the report states is as low as the
function allows. A coordinate keeps its value at ε unless the ladder lowers its error bound.
Kinks need a guard: one crossed at distance ``δ < ε`` makes ``D(h) = ḡ + c·δ/h``, which looks
like rounding on the ladder but moves ``D`` away from the one-sided gradient autograd gives. So
a coordinate whose one-sided slopes at ε disagree as at a kink goes past the first rung only if
that rung moved it towards the analytic value, and takes a larger step only if that brings it
closer: a kink costs two evaluations and stays a kink.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from gradprobe.check.evaluator import _Evaluator
from gradprobe.check.options import (
    _MAX_CHUNK,
    _NOISE_SAFETY,
    CheckOptions,
    _unit_roundoff,
)
from gradprobe.errors import NonFiniteError

_LADDER = (10.0, 100.0, 1e3, 1e4)
"""Steps ``h_k / ε`` of the ladder (ε itself is ``h_0``)."""
_MAX_REFINE = 256
"""Most coordinates (or directions) of one tensor re-differenced on the ladder: the worst."""


@dataclass
class Differences:
    """The centred differences of one tensor, per checked coordinate (or direction).

    ``num`` the centred differences, ``ana`` the analytic values, ``fwd``/``bwd`` the one-sided
    differences at ε, ``jscale`` the largest ``|J|`` met, ``noise`` the error bound of ``num``,
    ``step`` the step each value of ``num`` was taken with, ``refined`` which were re-differenced
    on the ladder, ``hook_crossed`` which crossed a kink the activation hooks saw."""

    idx: Tensor | None
    num: Tensor
    ana: Tensor
    fwd: Tensor
    bwd: Tensor
    jscale: Tensor
    noise: Tensor
    step: Tensor
    refined: Tensor
    hook_crossed: Tensor
    chunk: int


def _chunk_size(ev: _Evaluator, t: int, m: int, opts: CheckOptions) -> int:
    """Coordinates per vectorised call: within max_memory_mb, and at most _MAX_CHUNK (past a
    few hundred the per-call overhead is amortised and bigger batches only spill caches), split
    evenly so that no call is a small remainder."""
    if opts.chunk_size is not None:
        return opts.chunk_size
    itemsize = torch.empty(0, dtype=opts.dtype).element_size()
    per_row = 2 * (ev.base[t].numel() + ev.act_numel) * itemsize * 3
    chunk = int(max(1, min(_MAX_CHUNK, opts.max_memory_mb * 2**20 // max(per_row, 1))))
    return -(-m // -(-m // chunk))


def _directions(ev: _Evaluator, t: int, opts: CheckOptions, m: int, chunk: int) -> Iterator[Tensor]:
    """The random unit directions of tensor t, chunk by chunk; the same ones on every call."""
    base = ev.base[t]
    gen = _generator(opts, t)
    for a in range(0, m, chunk):
        dirs = torch.randn(min(chunk, m - a), base.numel(), generator=gen, dtype=torch.float64)
        dirs = dirs / torch.linalg.vector_norm(dirs, dim=1, keepdim=True)
        yield dirs.to(device=base.device, dtype=base.dtype)


def _generator(opts: CheckOptions, t: int) -> torch.Generator:
    return torch.Generator().manual_seed(opts.seed * 1_000_003 + t)


def measure(ev: _Evaluator, t: int, opts: CheckOptions) -> Differences:
    """Centred and one-sided differences of tensor t at the step ε (the textbook check)."""
    eps, name, shape = opts.eps, ev.names[t], ev.shapes[t]
    base, grad = ev.base[t], ev.grads[t]
    n = base.numel()
    idx: Tensor | None
    if opts.mode == "full":
        m, idx = n, torch.arange(n)
    elif opts.mode == "sample":
        m = min(opts.k, n)
        idx = torch.randperm(n, generator=_generator(opts, t))[:m].sort().values
    else:
        m, idx = opts.n_directions, None
    chunk = _chunk_size(ev, t, m, opts)
    num, ana, fwd, bwd, jscale = (torch.empty(m, dtype=torch.float64) for _ in range(5))
    hook_crossed = torch.zeros(m, dtype=torch.bool)
    directions = _directions(ev, t, opts, m, chunk) if idx is None else None
    j0 = 0.0
    for a in range(0, m, chunk):
        b = min(m, a + chunk)
        c = b - a
        # The first call also evaluates J(θ) (last row) through the same path as the
        # perturbed values, for the one-sided differences.
        center = a == 0
        if directions is None:
            assert idx is not None
            cols = idx[a:b].to(base.device)
            analytic = grad[cols].to(torch.float64).cpu()
            js, ks = ev.eval_coords(t, cols, eps, center=center)
        else:
            dirs = next(directions)
            analytic = (dirs @ grad).to(torch.float64).cpu()
            batch = [base + eps * dirs, base - eps * dirs] + ([base[None]] if center else [])
            js, ks = ev.eval_rows(t, torch.cat(batch))
            del dirs
        if center:
            j0 = float(js[2 * c])
        jp, jm = js[:c], js[c : 2 * c]
        finite = torch.isfinite(jp) & torch.isfinite(jm)
        if not bool(finite.all()):
            bad = int((~finite).nonzero()[0, 0]) + a
            where = (
                f"direction {bad}" if idx is None
                else str([int(i) for i in np.unravel_index(int(idx[bad]), shape)])
            )
            raise NonFiniteError(
                f"the loss is not finite at {name} {where} moved by ±{eps:g}",
                hint="use a smaller eps, or inputs away from a singularity (log 0, 1/0)",
            )
        num[a:b] = (jp - jm) / (2.0 * eps)
        ana[a:b] = analytic
        fwd[a:b] = (jp - j0) / eps
        bwd[a:b] = (j0 - jm) / eps
        jscale[a:b] = torch.maximum(jp.abs(), jm.abs()).clamp_min(abs(j0))
        if ks is not None:
            hook_crossed[a:b] = (ks[:c] > 0) | (ks[c : 2 * c] > 0)
    # Roundoff of one centred difference: two evaluations, each ≈ _NOISE_SAFETY·u·|J|.
    noise = _NOISE_SAFETY * _unit_roundoff(opts.dtype) * jscale / eps
    return Differences(
        idx=idx, num=num, ana=ana, fwd=fwd, bwd=bwd, jscale=jscale, noise=noise,
        step=torch.full((m,), float(eps), dtype=torch.float64),
        refined=torch.zeros(m, dtype=torch.bool), hook_crossed=hook_crossed, chunk=chunk,
    )


def _ladder_values(
    ev: _Evaluator, t: int, opts: CheckOptions, d: Differences, rows: Tensor, h: float
) -> Tensor:
    """D(h) for the checked coordinates (directions) ``rows``; NaN where J is not finite or a
    kink the hooks see is crossed."""
    base = ev.base[t]
    if d.idx is not None:
        js, ks = ev.eval_coords(t, d.idx[rows].to(base.device), h)
    else:
        dirs = torch.cat(list(_directions(ev, t, opts, d.num.numel(), d.chunk)))[rows.to(base.device)]
        js, ks = ev.eval_rows(t, torch.cat([base + h * dirs, base - h * dirs]))
    c = rows.numel()
    value = (js[:c] - js[c:]) / (2.0 * h)
    if ks is not None:
        value[(ks[:c] > 0) | (ks[c:] > 0)] = torch.nan
    return value


def refine(
    ev: _Evaluator, t: int, opts: CheckOptions, d: Differences, *, lower_floor: bool
) -> int:
    """Re-difference the worst coordinates of tensor t on the step ladder (module docstring):
    those whose error exceeds their noise, and with ``lower_floor`` (the tensor's floor is above
    ``ok_tol``) also those whose noise hides it; returns how many took a step other than ε."""
    err = (d.num - d.ana).abs()
    badness = torch.maximum(err, d.noise) if lower_floor else torch.where(err > d.noise, err, -1.0)
    badness[d.hook_crossed] = -1.0  # a kink the hooks saw: ε is the step that sees least of it
    order = torch.argsort(badness, descending=True)
    rows = order[: min(_MAX_REFINE, int((badness > 0).sum()))]
    if rows.numel() == 0:
        return 0
    steps = [opts.eps] + [opts.eps * f for f in _LADDER]
    # Coordinates whose one-sided slopes at ε disagree as at a kink: on the ladder a kink looks
    # like rounding (D(h) = ḡ + c·δ/h), so they go past the first rung only if it moved them
    # towards the analytic value, and take a larger step only if it brought them closer (a kink
    # costs two evaluations, and stays a kink).
    split = (d.fwd - d.bwd).abs()
    kinky = ((split > 2.0 * d.noise) & (err > d.noise) & (err >= 0.3 * split))[rows]
    first = _ladder_values(ev, t, opts, d, rows, steps[1])
    promising = ~kinky | ((first - d.ana[rows]).abs() < 0.5 * err[rows])
    rows, first, kinky = rows[promising], first[promising], kinky[promising]
    if rows.numel() == 0:
        return 0
    ladder = torch.stack(
        [d.num[rows], first] + [_ladder_values(ev, t, opts, d, rows, h) for h in steps[2:]]
    )  # (K, rows)
    jump = (ladder[1:] - ladder[:-1]).abs()  # (K-1, rows); NaN where a value is missing
    inf = torch.full_like(ladder[:1], torch.inf)
    below = torch.cat([inf, jump]).nan_to_num(nan=torch.inf)
    above = torch.cat([jump, inf]).nan_to_num(nan=torch.inf)
    estimate = torch.minimum(below, above)
    u = _unit_roundoff(opts.dtype)
    h = torch.tensor(steps, dtype=torch.float64)[:, None]
    model = _NOISE_SAFETY * u * d.jscale[rows][None, :] / h
    bound = torch.maximum(2.0 * estimate, model)
    bound[1:][~torch.isfinite(ladder[1:])] = torch.inf
    best = torch.argmin(bound, dim=0)
    pick = best[None, :]
    value = ladder.gather(0, pick)[0]
    new_bound = bound.gather(0, pick)[0]
    ana = d.ana[rows]
    old_bound = torch.maximum(d.noise[rows], err[rows])
    gap = (value - ana).abs()
    better = (best > 0) & (new_bound < old_bound) & (~kinky | (gap < err[rows]))
    chosen = rows[better]
    d.num[chosen] = value[better]
    d.noise[chosen] = new_bound[better]
    d.step[chosen] = h[:, 0][best[better]]
    d.refined[chosen] = True
    return int(better.sum())
