"""Numerical gradient checking that names the parameter tensor whose backward pass is wrong.

The check compares the analytic gradient ``g`` (autograd through the model's own backward,
including any custom ``torch.autograd.Function``, or the gradients a user computed by hand) with
centred differences

.. math::

    \\tilde g_i = \\frac{J(\\theta + \\varepsilon e_i) - J(\\theta - \\varepsilon e_i)}{2\\varepsilon},
    \\qquad
    r = \\frac{\\lVert \\tilde g - g \\rVert_2}{\\lVert \\tilde g \\rVert_2 + \\lVert g \\rVert_2}
    \\quad (0/0 := 0),

overall and per parameter tensor (Ng, *Improving Deep Neural Networks*, "Gradient checking";
CS231n notes, "Gradient checks"). The centred difference has truncation error
``ε² J''' / 6`` and a roundoff error of about ``u·|J| / ε`` per coordinate (``u`` the unit
roundoff of the dtype), so in float64 with ``ε = 1e-7`` a right gradient reads ``r ≈ 1e-7`` or
less and ``r > 1e-3`` almost surely means a bug. In float32 the same ``ε`` gives roundoff of the
order of the gradient itself: the report warns, with the reason, instead of blaming the code.

Three modes:

``"full"``
    every coordinate, two evaluations each;
``"sample"``
    ``k`` random coordinates per tensor;
``"directional"``
    ``n_directions`` random unit directions ``u`` per tensor, comparing
    ``(J(θ + εu) − J(θ − εu)) / 2ε`` with ``g·u``. A wrong gradient ``g + e`` shows the same
    relative error in expectation (``E[(e·u)²] = ‖e‖² / n``), so this scales to models with
    millions of parameters at ``2 · n_directions`` forward passes per tensor.

Kinks. ReLU-like activations, ``max`` and ``abs`` are not differentiable everywhere; when ``±ε``
moves a pre-activation across a kink the centred difference averages two slopes and disagrees
with the (one-sided) analytic gradient. Such coordinates are detected in two independent ways:
forward pre-hooks on the activation modules that :data:`gradprobe.activations.ACTIVATIONS` lists
with kinks compare the region pattern of their inputs at ``θ ± εe_i`` with the one at ``θ``; and
the one-sided differences ``(J(θ+εe_i) − J(θ))/ε`` and ``(J(θ) − J(θ−εe_i))/ε`` disagree. At a
kink crossed on one side the discrepancy is half the one-sided disagreement, so a coordinate whose
error is within that bound is *explained* and the tensor reads ``"kink"`` instead of a false
``"bug"``; a real bug on top of a kink still shows.

Speed. The perturbed forward passes of one tensor are evaluated together with
:func:`torch.func.vmap` over :func:`torch.func.functional_call` (chunked to bound memory). Where
vmap cannot run (an operator without a batching rule such as ``rrelu``, in-place buffer updates,
data-dependent Python control flow) the check falls back to a loop and says why in
:attr:`GradCheckReport.fallback_reason`.

Example
    >>> import torch, gradprobe as gp
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
    >>> report = gp.gradcheck(model, torch.nn.functional.mse_loss, x, y)
    >>> report.ok, report.failed
    (True, [])
"""


from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from typing_extensions import Unpack

from gradprobe.check.evaluator import (
    _Evaluator,
)
from gradprobe.check.function import _FunctionEvaluator
from gradprobe.check.model import _ModelEvaluator
from gradprobe.check.options import (
    _KINK_SHARE,
    _MAX_CHUNK,
    _NOISE_SAFETY,
    CheckKwargs,
    CheckOptions,
    ParamsLike,
    RandomLayers,
    Verdict,
    _unit_roundoff,
    with_option_signature,
)
from gradprobe.check.report import CoordinateCheck, GradCheckReport, TensorCheck
from gradprobe.errors import ConfigError, NonFiniteError


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


def _run(
    ev: _Evaluator,
    opts: CheckOptions,
    *,
    notes: list[str],
    warnings: list[str],
    started: float,
) -> GradCheckReport:
    eps, dtype, mode, seed, n_worst = opts.eps, opts.dtype, opts.mode, opts.seed, opts.n_worst
    ok_tol, bug_tol, chunk_size = opts.ok_tol, opts.bug_tol, opts.chunk_size
    u = _unit_roundoff(dtype)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    resolvable = _precision_check(ev, eps, dtype, bug_tol, warnings)
    rows: list[TensorCheck] = []
    all_num: list[Tensor] = []
    all_ana: list[Tensor] = []
    for t, (name, shape, base, grad) in enumerate(zip(ev.names, ev.shapes, ev.base, ev.grads)):
        n = base.numel()
        gen = torch.Generator().manual_seed(seed * 1_000_003 + t)
        idx: Tensor | None
        if mode == "full":
            m, idx = n, torch.arange(n)
        elif mode == "sample":
            m = min(opts.k, n)
            idx = torch.randperm(n, generator=gen)[:m].sort().values
        else:
            m, idx = opts.n_directions, None
        per_row = 2 * (n + ev.act_numel) * itemsize * 3
        # Coordinates per vectorised call: within max_memory_mb, and at most _MAX_CHUNK (past a
        # few hundred the per-call overhead is amortised and bigger batches only spill caches),
        # split evenly so that no call is a small remainder.
        chunk = chunk_size or int(max(1, min(_MAX_CHUNK, opts.max_memory_mb * 2**20 // max(per_row, 1))))
        if chunk_size is None:
            chunk = -(-m // -(-m // chunk))
        num, ana, fwd, bwd, jscale = (torch.empty(m, dtype=torch.float64) for _ in range(5))
        hook_crossed = torch.zeros(m, dtype=torch.bool)
        j0 = 0.0
        for a in range(0, m, chunk):
            b = min(m, a + chunk)
            c = b - a
            # The first call also evaluates J(θ) (last row) through the same path as the
            # perturbed values, for the one-sided differences.
            center = a == 0
            if idx is not None:
                cols = idx[a:b].to(base.device)
                analytic = grad[cols].to(torch.float64).cpu()
                js, ks = ev.eval_coords(t, cols, eps, center=center)
            else:
                dirs = torch.randn(c, n, generator=gen, dtype=torch.float64)
                dirs = dirs / torch.linalg.vector_norm(dirs, dim=1, keepdim=True)
                dirs = dirs.to(device=base.device, dtype=base.dtype)
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
        noise = _NOISE_SAFETY * u * jscale / eps
        err = (num - ana).abs()
        split = (fwd - bwd).abs()
        # A kink crossed on one side: the one-sided slopes disagree by far more than roundoff
        # and the centred error is about half that disagreement (curvature, by contrast, makes
        # split = ε·J'' with a centred error of O(ε²)).
        onesided = (split > 2.0 * noise) & (err > noise) & (err >= 0.3 * split)
        crossed = hook_crossed | onesided
        explained = crossed & (err <= _KINK_SHARE * split + noise)
        den = float(torch.linalg.vector_norm(num)) + float(torch.linalg.vector_norm(ana))
        noise_norm = float(torch.linalg.vector_norm(noise))
        floor = noise_norm / den if den > 0 else 0.0
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
        order = torch.argsort(err, descending=True)[:n_worst]
        worst = tuple(
            CoordinateCheck(
                index=None if idx is None
                else tuple(int(i) for i in np.unravel_index(int(idx[j]), shape)),
                direction=int(j) if idx is None else None,
                numeric=float(num[j]),
                analytic=float(ana[j]),
                abs_error=float(err[j]),
                kink=bool(explained[j]),
            )
            for j in order.tolist()
        )
        rows.append(
            TensorCheck(
                name=name,
                shape=tuple(shape),
                n_checked=m,
                rel_error=rel,
                abs_error=float(torch.linalg.vector_norm(num - ana)),
                numeric_norm=float(torch.linalg.vector_norm(num)),
                analytic_norm=float(torch.linalg.vector_norm(ana)),
                noise_floor=floor,
                rel_error_smooth=rel_smooth,
                kinks_crossed=int(crossed.sum()),
                verdict=verdict,
                worst=worst,
            )
        )
        if resolvable and floor > 0.1 * bug_tol:
            if float(torch.linalg.vector_norm(ana)) <= noise_norm:
                warnings.append(
                    f"{name}: the gradient is zero to within roundoff (analytic norm "
                    f"{float(torch.linalg.vector_norm(ana)):.1e}, numeric norm "
                    f"{float(torch.linalg.vector_norm(num)):.1e}, roundoff ≈ {noise_norm:.1e}); "
                    f"its relative error is not meaningful"
                )
            else:
                warnings.append(
                    f"{name}: roundoff alone can give a relative error of {floor:.1e} here "
                    f"(|J| ≈ {float(jscale.max()):.3g} against a gradient norm of "
                    f"{den / 2:.3g}); a small error in this tensor cannot be told from noise"
                )
        all_num.append(num)
        all_ana.append(ana)
    if ev.fast_used:
        notes.append(
            f"coordinates of {', '.join(ev.fast_used)} (nn.Linear) perturbed as rank-1 updates of "
            f"the layer output, propagated column-wise through elementwise activations "
            f"(checked against full perturbed forward passes first)"
        )
    if ev.fast_lean:
        notes.append(
            f"for {', '.join(ev.fast_lean)}, layer outputs that differ from θ in one column and "
            f"are read only by such layers were left unmaterialised (NaN placeholders; checked "
            f"against full perturbed forward passes first)"
        )
    return GradCheckReport(
        rows=tuple(rows),
        rel_error=_rel(torch.cat(all_num), torch.cat(all_ana)),
        mode=mode,
        eps=float(eps),
        dtype=str(dtype).replace("torch.", ""),
        ok_tol=ok_tol,
        bug_tol=bug_tol,
        n_evaluations=ev.n_evaluations,
        seconds=time.perf_counter() - started,
        vectorized=ev.vectorized,
        fallback_reason=ev.fallback_reason,
        notes=tuple(notes),
        warnings=tuple(warnings),
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
    warnings.append(
        f"{str(dtype).replace('torch.', '')} with eps={eps:g} cannot give a meaningful answer: "
        f"each difference carries roundoff ≈ machine_eps·|J|/eps ≈ {roundoff:.1e} (|J| = "
        f"{abs(ev.j0):.3g}) against a typical gradient coordinate of {rms:.1e}; use "
        f"dtype=torch.float64 (the default) or a larger step, eps ≈ {best:.0e} "
        f"(≈ machine_eps^(1/3), the step that balances roundoff against truncation error)"
    )
    return False


# ------------------------------------------------------------------------------------ public API


@with_option_signature
def gradcheck(
    model: nn.Module,
    loss_fn: Callable[..., Any],
    inputs: Any,
    targets: Any = None,
    *,
    regularization: Callable[[nn.Module], Any] | None = None,
    random_layers: RandomLayers = "reseed",
    **options: Unpack[CheckKwargs],
) -> GradCheckReport:
    """Check the gradient of ``J = loss_fn(model(inputs), targets) + regularization(model)``.

    The model is deep-copied and cast to ``dtype`` (float64 by default); the user's model, its
    buffers and torch's RNG state are left exactly as they were. ``inputs`` is passed as
    ``model(*inputs)`` when it is a tuple or list, ``model(**inputs)`` when a dict, else
    ``model(inputs)``; ``targets=None`` calls ``loss_fn(output)``. Every parameter that requires
    grad is checked, tied parameters once.

    Args:
        eps, dtype, mode, k, n_directions, seed, ok_tol, bug_tol, vectorize, chunk_size,
            max_memory_mb, n_worst: the options of
            :class:`~gradprobe.check.options.CheckOptions`, as keywords.
        eps: the step ε of the centred difference ``(J(θ+εe_i) − J(θ−εe_i)) / 2ε``.
        dtype: precision of the check; float32 with a small ε gives a warning, not a verdict.
        mode: ``"full"`` (every coordinate), ``"sample"`` (``k`` random coordinates per tensor),
            ``"directional"`` (``n_directions`` random unit directions per tensor).
        seed: seeds the sampled coordinates and directions, and torch's RNG before every
            evaluation (so dropout/RReLU draw the same masks each time).
        ok_tol, bug_tol: relative error ≤ ``ok_tol`` reads ``"ok"``, > ``bug_tol`` ``"bug"``,
            in between ``"suspicious"``. Where roundoff (``u·|J|/ε``) alone can exceed ``ok_tol``
            the ok bound rises to that floor, and a bug must exceed ten times the floor.
        regularization: ``callable(model) -> scalar`` added to the loss (an L2 term, say); it
            sees the perturbed parameters.
        random_layers: ``"reseed"`` keeps Dropout/RReLU in training mode and reseeds torch's RNG
            identically before every evaluation; ``"eval"`` puts those layers in eval mode.
        vectorize: ``"auto"`` batches the perturbed forward passes with ``torch.func.vmap`` and
            falls back to a loop where vmap cannot run; ``True`` requires vmap; ``False`` loops.
        chunk_size, max_memory_mb: perturbations per vmapped call (default: sized so that one
            call stays within ``max_memory_mb``).
        n_worst: how many worst coordinates (or directions) each row keeps.

    Note:
        BatchNorm in training mode normalises with batch statistics, which depend on every
        example and parameter upstream; the check perturbs the whole batch's forward pass, so
        that dependence is part of ``J`` as it should be. Running statistics are not updated.

    Example:
        >>> import torch, gradprobe as gp
        >>> _ = torch.manual_seed(0)
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        >>> rep = gp.gradcheck(net, torch.nn.functional.mse_loss, torch.randn(16, 4),
        ...                    torch.randn(16, 1), mode="sample", k=8)
        >>> rep.ok
        True
    """
    started = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model must be a torch.nn.Module, got {type(model).__name__}",
            hint="for a plain function of tensors or arrays use gp.gradcheck_fn",
        )
    if not callable(loss_fn):
        raise ConfigError(
            f"loss_fn must be callable, got {type(loss_fn).__name__}",
            hint="e.g. torch.nn.functional.mse_loss",
        )
    if regularization is not None and not callable(regularization):
        raise ConfigError(
            f"regularization must be callable(model) -> scalar, got "
            f"{type(regularization).__name__}",
            hint="e.g. lambda m: 1e-3 * sum((p**2).sum() for p in m.parameters())",
        )
    if random_layers not in ("reseed", "eval"):
        raise ConfigError(
            f"unknown random_layers {random_layers!r}", hint="choose 'reseed' or 'eval'"
        )
    opts = CheckOptions.from_kwargs("gradcheck", options)
    notes: list[str] = []
    warnings: list[str] = []
    devices = sorted(
        {p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"}
    )
    with torch.random.fork_rng(devices=devices):
        ev = _ModelEvaluator(
            model, loss_fn, inputs, targets, dtype=opts.dtype, regularization=regularization,
            random_layers=random_layers, seed=opts.seed, vectorize=opts.vectorize, notes=notes,
            warnings=warnings,
        )
        try:
            return _run(ev, opts, notes=notes, warnings=warnings, started=started)
        finally:
            ev.close()


@with_option_signature
def gradcheck_fn(
    f: Callable[[Any], Any],
    params: ParamsLike,
    claimed_grads: ParamsLike,
    **options: Unpack[CheckKwargs],
) -> GradCheckReport:
    """Check ``claimed_grads`` against centred differences of a scalar function ``f(params)``.

    ``params`` is a dict (rows are named by its keys) or a list (``params[i]``) of torch tensors
    or NumPy arrays; ``f`` receives the same container with the same kinds of values (fresh
    copies in ``dtype`` at every call, so it may not rely on mutating them) and returns a scalar.
    ``claimed_grads`` has the same structure and shapes: typically the output of a hand-written
    backward pass. Functions of tensors are batched with ``torch.func.vmap`` when possible;
    NumPy functions run in a loop. Kinks are found from one-sided differences. Options as in
    :func:`gradcheck`.

    Example:
        >>> import numpy as np, gradprobe as gp
        >>> x = np.array([1.0, -2.0, 3.0])
        >>> f = lambda p: float(np.sum((p["w"] * x) ** 2))
        >>> w = np.array([0.5, 1.5, -1.0])
        >>> gp.gradcheck_fn(f, {"w": w}, {"w": 2 * w * x**2}).ok
        True
        >>> gp.gradcheck_fn(f, {"w": w}, {"w": w * x**2}).failed   # forgot the factor 2
        ['w']
    """
    started = time.perf_counter()
    opts = CheckOptions.from_kwargs("gradcheck_fn", options)
    ev = _FunctionEvaluator(
        f, params, claimed_grads, dtype=opts.dtype, vectorize=opts.vectorize
    )
    return _run(ev, opts, notes=[], warnings=[], started=started)


__all__ = ["CoordinateCheck", "GradCheckReport", "TensorCheck", "gradcheck", "gradcheck_fn"]
