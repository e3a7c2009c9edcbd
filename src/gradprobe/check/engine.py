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
:func:`torch.func.vmap` over :func:`torch.func.functional_call` (chunked to bound memory),
decided per tensor: vmap must run and agree with the loop on three perturbed rows of that tensor
(an operator without a batching rule such as ``rrelu``, in-place buffer updates, data-dependent
Python control flow, or a batching rule that is wrong for these shapes, send that tensor to the
loop, and :attr:`GradCheckReport.fallback_reason` says which and why).

Verdicts. How one tensor's differences become ``"ok"``, ``"kink"``, ``"suspicious"`` or ``"bug"``
(the roundoff floor, the kink test, the rows of the report) is :mod:`gradprobe.check.judge`;
this module runs the check: the precision check, then per tensor measure, judge, refine, judge.

The step. Where ``ε`` does not give a clean verdict, the worst coordinates are re-differenced
with a step chosen per coordinate from ``ε·10^k`` (:mod:`gradprobe.check.differences`), so the
noise floor the report states is as low as the function allows; the steps used are reported.

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

import time
import warnings as _warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from typing_extensions import Unpack

from gradprobe.check.differences import measure, refine
from gradprobe.check.evaluator import _Evaluator
from gradprobe.check.function import _FunctionEvaluator
from gradprobe.check.judge import (
    _empty_row,
    _judge,
    _precision_check,
    _rel,
    _roundoff_warning,
    _row,
    _step_note,
)
from gradprobe.check.model import _ModelEvaluator
from gradprobe.check.options import (
    CheckKwargs,
    CheckOptions,
    ParamsLike,
    RandomLayers,
    with_option_signature,
)
from gradprobe.check.report import CoordinateCheck, GradCheckReport, TensorCheck
from gradprobe.errors import ConfigError


def _run(
    ev: _Evaluator,
    opts: CheckOptions,
    *,
    notes: list[str],
    warnings: list[str],
    started: float,
) -> GradCheckReport:
    n_warnings = len(warnings)
    resolvable = _precision_check(ev, opts.eps, opts.dtype, opts.bug_tol, warnings)
    resolved = 0  # tensors the step ladder resolved although eps could not
    rows: list[TensorCheck] = []
    all_num: list[Tensor] = []
    all_ana: list[Tensor] = []
    empty: list[str] = []
    for t, name in enumerate(ev.names):
        if ev.base[t].numel() == 0:
            empty.append(f"{name} {tuple(ev.shapes[t])}")
            rows.append(_empty_row(ev, t))
            continue
        d = measure(ev, t, opts)
        j = _judge(d, opts, resolvable)
        # The step ladder, where ε does not read a clean ok. In float64 also where the precision
        # check failed at ε: a tensor whose floor the ladder brings below 0.1·bug_tol is then
        # resolved (in lower precisions the warning's advice, float64, stands).
        ladder = resolvable or opts.dtype == torch.float64
        if ladder and (j.verdict != "ok" or j.floor > opts.ok_tol):
            n_refined = refine(ev, t, opts, d, lower_floor=j.floor > opts.ok_tol)
            if n_refined:
                j = _judge(d, opts, resolvable)
                if not resolvable and j.floor <= 0.1 * opts.bug_tol:
                    j = _judge(d, opts, True)
                    resolved += 1
                notes.append(_step_note(name, d, n_refined, opts.eps))
        rows.append(_row(ev, t, d, j, opts.n_worst))
        if resolvable and j.floor > 0.1 * opts.bug_tol:
            warnings.append(_roundoff_warning(name, d, j.floor))
        all_num.append(d.num)
        all_ana.append(d.ana)
    if not resolvable and resolved == len(ev.names) - len(empty):
        # Every tensor was resolved with a larger step: the warning about eps no longer holds.
        del warnings[n_warnings:n_warnings + 1]
        notes.append(f"eps={opts.eps:g} could not resolve the gradient (roundoff); the steps the "
                     f"ladder chose did, for every tensor")
    if empty:
        notes.append(
            f"empty tensors checked trivially (no coordinate to perturb): {', '.join(empty)}"
        )
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
    if ev.vmap_notes:
        notes.extend(ev.vmap_notes)
    num_all = torch.cat(all_num) if all_num else torch.zeros(0, dtype=torch.float64)
    ana_all = torch.cat(all_ana) if all_ana else torch.zeros(0, dtype=torch.float64)
    return GradCheckReport(
        rows=tuple(rows),
        rel_error=_rel(num_all, ana_all),
        mode=opts.mode,
        eps=float(opts.eps),
        dtype=str(opts.dtype).replace("torch.", ""),
        ok_tol=opts.ok_tol,
        bug_tol=opts.bug_tol,
        n_evaluations=ev.n_evaluations,
        seconds=time.perf_counter() - started,
        vectorized=ev.vectorized,
        fallback_reason=ev.fallback_reason,
        notes=tuple(notes),
        warnings=tuple(warnings),
    )


# ------------------------------------------------------------------------------------ public API


FULL_WARN = 200_000
"""Parameters above which ``mode="full"`` warns (34 k parameters took 0.28 s; the cost grows
with parameters x model size)."""


def _dtype_hint(inputs: Any, dtype: torch.dtype) -> str:
    """Why a forward fails on the check's copy: integer features meet ``dtype`` weights."""
    seq = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
    ints = [str(x.dtype) for x in seq if isinstance(x, torch.Tensor) and
            not (x.is_floating_point() or x.is_complex())]
    if ints:
        return (f"inputs of dtype {', '.join(ints)} reach layers whose weights the check holds "
                f"in {dtype}; pass features as floating-point tensors (x.float()); integer "
                "inputs are passed through unchanged, which only suits indices such as token ids")
    return f"the check runs the model in {dtype}: make the forward accept that dtype"


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
        try:
            ev = _ModelEvaluator(
                model, loss_fn, inputs, targets, dtype=opts.dtype,
                regularization=regularization, random_layers=random_layers, seed=opts.seed,
                vectorize=opts.vectorize, notes=notes, warnings=warnings,
            )
        except RuntimeError as e:
            if "dtype" not in str(e):
                raise
            raise ConfigError(f"the model's forward failed on the inputs: {e}",
                              hint=_dtype_hint(inputs, opts.dtype)) from e
        n = sum(int(b.numel()) for b in ev.base)
        if opts.mode == "full" and n > FULL_WARN:
            message = (f"mode='full' differences all {n:,} parameters: about {2 * n:,} "
                       "evaluations of the model and loss (a few hundred per second on a CPU "
                       "for a small model); mode='directional' (n_directions=...) or "
                       "mode='sample' (k=...) check the same backward pass in seconds")
            _warnings.warn(message, UserWarning, stacklevel=3)
            warnings.append(message)
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
