"""Optimizer remedies: gradient clipping, L1/L2 penalties and learning-rate changes.

Each takes the optimizer first and changes what its next ``step()`` does, so the user's training
loop stays as it is: clipping and penalties are optimizer *step pre-hooks*
(``Optimizer.register_step_pre_hook``); the returned record's ``.remove()`` takes them off again.

================  ===============================================  ==============================
remedy            what the step sees                               source
================  ===============================================  ==============================
clip_gradients_   ``g ← clamp(g, -v, v)`` then                     Pascanu, Mikolov & Bengio 2013
                  ``g ← g · min(1, c / (‖g‖₂ + 1e-6))``
regularize_       ``g ← g + l2·w + l1·sign(w)``                    Tikhonov; Tibshirani 1996
set_lr_           every group's ``lr ← lr_new`` or ``lr · factor``  --
================  ===============================================  ==============================

``‖g‖₂`` is the total norm over every gradient the optimizer holds, as if they were one vector
(exactly :func:`torch.nn.utils.clip_grad_norm_`: one ``torch._foreach_norm`` per device and
dtype, then the norm of the norms). The coefficient is clamped rather than tested
(``if norm > c`` would copy the norm to the host on every step), so the hook never synchronises.

Example
    >>> import torch, gradprobe as gp
    >>> net = torch.nn.Linear(4, 1)
    >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
    >>> clip = gp.remedies.clip_gradients_(opt, max_norm=1.0)
    >>> (100 * net(torch.randn(8, 4))).sum().backward()
    >>> opt.step()                      # the hook clipped the gradient first
    >>> round(float(torch.cat([p.grad.flatten() for p in net.parameters()]).norm()), 4)
    1.0
    >>> clip.remove()
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype, _has_foreach_support
from typing_extensions import Self

from gradprobe.errors import ConfigError

_EPS = 1e-6  # clip_grad_norm_'s guard against a zero norm


def _check_optimizer(optimizer: Any, remedy: str) -> None:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(
            f"{remedy} needs a torch.optim.Optimizer, got {type(optimizer).__name__}",
            hint=f"pass the optimizer, e.g. gp.remedies.{remedy}(optimizer, ...)",
        )


def _check_number(name: str, value: float | None, *, positive: bool) -> None:
    if value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= 0 if positive else value < 0):
        raise ConfigError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, "
                          f"got {value!r}")


def _params_with_grad(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """Every parameter of every group that has a dense gradient, each once (by identity)."""
    seen: set[int] = set()
    out: list[Tensor] = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def _grouped(tensors: list[Tensor]) -> list[tuple[torch.device, list[Tensor]]]:
    """``tensors`` grouped by device and dtype (the grouping ``clip_grad_norm_`` uses)."""
    groups = _group_tensors_by_device_and_dtype([tensors])  # type: ignore[list-item]
    return [(device, list(ts)) for (device, _), ([ts], _) in groups.items()]  # type: ignore[misc,arg-type]


def total_norm(grads: list[Tensor]) -> Tensor:
    """The 2-norm of ``grads`` viewed as one vector, as a 0-d tensor on the first one's device.

    One ``torch._foreach_norm`` per (device, dtype) group, then ``vector_norm`` of the stacked
    norms; no host synchronisation. Equals ``torch.nn.utils.get_total_norm(grads)``.
    """
    if not grads:
        return torch.tensor(0.0)
    first = grads[0].device
    norms: list[Tensor] = []
    for device, ts in _grouped(grads):
        if _has_foreach_support(ts, device):
            norms.extend(torch._foreach_norm(ts, 2.0))
        else:
            norms.extend(torch.linalg.vector_norm(t, 2.0) for t in ts)
    return torch.linalg.vector_norm(torch.stack([n.to(first) for n in norms]), 2.0)


def _mul_(grads: list[Tensor], factor: Tensor) -> None:
    for device, ts in _grouped(grads):
        f = factor.to(device)
        if _has_foreach_support(ts, device):
            torch._foreach_mul_(ts, f)
        else:
            for t in ts:
                t.mul_(f)


def _clamp_(grads: list[Tensor], bound: float) -> None:
    for device, ts in _grouped(grads):
        if _has_foreach_support(ts, device):
            torch._foreach_clamp_min_(ts, -bound)
            torch._foreach_clamp_max_(ts, bound)
        else:
            for t in ts:
                t.clamp_(min=-bound, max=bound)


def _loss_scale(optimizer: torch.optim.Optimizer, scaler: Any) -> Tensor | None:
    """The factor the gradients are still multiplied by when the step runs, or None.

    ``GradScaler.step`` normally unscales the gradients *before* ``optimizer.step()`` (and hence
    before every step pre-hook): then nothing is left to do. Two cases differ:

    * an optimizer that unscales inside its own kernel (``_step_supports_amp_scaling``, e.g.
      ``Adam(fused=True)``): ``GradScaler.step`` leaves the gradients scaled and sets
      ``optimizer.grad_scale``; the hook then works on ``g / grad_scale`` without unscaling;
    * ``optimizer.step()`` called directly with ``scaler`` given and the gradients not unscaled
      this step: the hook calls ``scaler.unscale_(optimizer)`` (which ``GradScaler.step`` would
      otherwise have done), and a later ``scaler.step`` does not unscale twice.
    """
    scale = getattr(optimizer, "grad_scale", None)
    if isinstance(scale, Tensor):
        return scale
    if scaler is not None and scaler.is_enabled():
        from torch.amp.grad_scaler import OptState

        if scaler._per_optimizer_states[id(optimizer)]["stage"] is OptState.READY:
            scaler.unscale_(optimizer)
    return None


class _Attached:
    """A record of a hook attached to an optimizer (a frozen dataclass declaring ``_handle``):
    ``remove()`` detaches it, and so does leaving a ``with`` block."""

    _handle: Any

    def remove(self) -> None:
        self._handle.remove()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


class _ClipHook:
    """The step pre-hook of :func:`clip_gradients_` (a class so a second attach is detected)."""

    def __init__(self, max_norm: float | None, max_value: float | None, scaler: Any) -> None:
        self.max_norm = max_norm
        self.max_value = max_value
        self.scaler = scaler

    @torch.no_grad()
    def __call__(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        params = _params_with_grad(optimizer)
        grads = [p.grad for p in params if p.grad is not None and not p.grad.is_sparse]
        if not grads:
            return
        scale = _loss_scale(optimizer, self.scaler)
        if self.max_value is not None:
            if scale is None:
                _clamp_(grads, self.max_value)
            else:  # scaled gradients: clamp g/s to ±v, i.e. g to ±v·s (divide, clamp, multiply)
                _mul_(grads, scale.reciprocal())
                _clamp_(grads, self.max_value)
                _mul_(grads, scale)
        if self.max_norm is not None:
            norm = total_norm(grads)
            if scale is not None:
                norm = norm / scale.to(norm.device)
            # clamp, not `if norm > max_norm`: a Python branch on a tensor would sync the host
            coef = torch.clamp(self.max_norm / (norm + _EPS), max=1.0)
            _mul_(grads, coef)


@dataclass(frozen=True)
class ClipRecord(_Attached):
    """What :func:`clip_gradients_` attached. ``remove()`` detaches it (also on ``with`` exit)."""

    max_norm: float | None
    max_value: float | None
    n_params: int
    scaler: bool
    _handle: Any = field(repr=False, compare=False)

    def __str__(self) -> str:
        parts = [f"value to ±{self.max_value:g}"] if self.max_value is not None else []
        if self.max_norm is not None:
            parts.append(f"total norm to {self.max_norm:g}")
        amp = " (unscaled gradients)" if self.scaler else ""
        return f"clip gradients: {' then '.join(parts)}{amp}, {self.n_params} parameter tensors"


def _attached(optimizer: torch.optim.Optimizer, kind: type) -> bool:
    hooks: dict[int, Callable[..., Any]] = getattr(optimizer, "_optimizer_step_pre_hooks", {})
    return any(isinstance(h, kind) for h in hooks.values())


def clip_gradients_(
    optimizer: torch.optim.Optimizer,
    *,
    max_norm: float | None = None,
    max_value: float | None = None,
    scaler: Any = None,
) -> ClipRecord:
    """Clip the gradients at every ``optimizer.step()``, by value and/or by total norm.

    By value every entry is clamped to ``[-max_value, max_value]``; by norm all gradients are
    multiplied by ``min(1, max_norm / (‖g‖₂ + 1e-6))``, ``‖g‖₂`` the norm of every gradient of
    the optimizer as one vector: the direction is kept, only the length is capped (Pascanu et al.
    2013, "On the difficulty of training recurrent neural networks"). With both, values are
    clamped first, so the norm bound holds at the step. Bit for bit the same as calling
    :func:`torch.nn.utils.clip_grad_value_` / :func:`~torch.nn.utils.clip_grad_norm_` on the
    optimizer's parameters before the step, batched with ``torch._foreach_*`` per device and dtype
    and without host synchronisation.

    Args:
        optimizer: the optimizer whose steps to clip (a step pre-hook; the loop is unchanged).
        max_norm: the largest total 2-norm of the gradients.
        max_value: the largest absolute value of a gradient entry.
        scaler: the AMP ``GradScaler`` if one is used. Clipping then applies to the *unscaled*
            gradients: under ``scaler.step(optimizer)`` they are already unscaled when the hook
            runs; an optimizer that unscales in its own fused kernel is handled through the
            ``grad_scale`` it is given; if ``optimizer.step()`` is called directly the hook calls
            ``scaler.unscale_(optimizer)`` first. Steps with inf/NaN gradients are skipped by
            the scaler before the hook runs.

    Returns:
        :class:`ClipRecord`; ``record.remove()`` detaches the hook.

    Raises:
        ConfigError: neither bound given, a bound that is not a finite number > 0, or clipping
            already attached to this optimizer.

    Note:
        A :class:`gradprobe.Probe` attached *after* this call records the clipped gradients (its
        hook runs later); attached before, the raw ones.
    """
    _check_optimizer(optimizer, "clip_gradients_")
    if max_norm is None and max_value is None:
        raise ConfigError("clip_gradients_ needs max_norm= or max_value= (or both)",
                          hint="e.g. clip_gradients_(optimizer, max_norm=1.0)")
    _check_number("max_norm", max_norm, positive=True)
    _check_number("max_value", max_value, positive=True)
    if scaler is not None and not all(hasattr(scaler, a) for a in ("unscale_", "is_enabled")):
        raise ConfigError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
    if _attached(optimizer, _ClipHook):
        raise ConfigError("gradient clipping is already attached to this optimizer",
                          hint="call .remove() on the first record before attaching another")
    hook = _ClipHook(None if max_norm is None else float(max_norm),
                     None if max_value is None else float(max_value), scaler)
    handle = optimizer.register_step_pre_hook(hook)
    n = len({id(p) for g in optimizer.param_groups for p in g["params"]})
    return ClipRecord(hook.max_norm, hook.max_value, n, scaler is not None, handle)


class _PenaltyHook:
    def __init__(self, l1: float, l2: float) -> None:
        self.l1 = l1
        self.l2 = l2

    @torch.no_grad()
    def __call__(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        params = [p for p in _params_with_grad(optimizer) if not p.grad.is_sparse]  # type: ignore[union-attr]
        if not params:
            return
        scale = getattr(optimizer, "grad_scale", None)  # fused AMP step: gradients still scaled
        for device, ps in _grouped(params):
            grads = [p.grad for p in ps]
            s = scale.to(device) if isinstance(scale, Tensor) else None
            if self.l2:
                # g += l2·w (times the loss scale if the gradients are still scaled)
                if s is None:
                    torch._foreach_add_(grads, ps, alpha=self.l2)  # type: ignore[arg-type]
                else:
                    torch._foreach_add_(grads, torch._foreach_mul(ps, s * self.l2))  # type: ignore[arg-type]
            if self.l1:
                signs = torch._foreach_sign(ps)
                if s is not None:
                    torch._foreach_mul_(signs, s)
                torch._foreach_add_(grads, signs, alpha=self.l1)  # type: ignore[arg-type]


@dataclass(frozen=True)
class PenaltyRecord(_Attached):
    """What :func:`regularize_` attached. ``remove()`` detaches it (also on ``with`` exit)."""

    l1: float
    l2: float
    n_params: int
    _handle: Any = field(repr=False, compare=False)

    def __str__(self) -> str:
        return (f"penalty gradient at each step: l1={self.l1:g} (sign(w)), l2={self.l2:g} (w), "
                f"{self.n_params} parameter tensors")


def regularize_(optimizer: torch.optim.Optimizer, *, l1: float = 0.0, l2: float = 0.0) -> PenaltyRecord:
    """Add the gradient of an L1/L2 penalty to every gradient at each ``optimizer.step()``.

    At the step every parameter ``w`` with a gradient gets ``g ← g + l2·w + l1·sign(w)``: the
    gradient of ``(l2/2)·‖w‖² + l1·‖w‖₁`` added to the loss, without touching the loss (a step
    pre-hook, ``torch._foreach_*`` per device and dtype). ``sign(0) = 0`` (the subgradient at 0).

    L2 here is *coupled* weight decay: the penalty's gradient joins the loss gradient before the
    optimizer sees it. For SGD this is the same as ``weight_decay=l2``. For adaptive optimizers
    (Adam, RMSprop) it is not decay at all in the intended sense: the penalty is divided by
    ``√v̂`` with the rest of the gradient, so weights with large gradient history are barely
    regularised. AdamW (Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization")
    instead shrinks the weights directly, ``w ← w − lr·λ·w``, outside the adaptive scaling; to
    get that, use ``torch.optim.AdamW(weight_decay=λ)`` rather than this remedy.

    Args:
        optimizer: the optimizer whose steps to regularise; every parameter with a gradient,
            biases and normalisation parameters included.
        l1: coefficient of ``‖w‖₁`` (pushes weights to exactly zero: sparsity).
        l2: coefficient of ``½‖w‖²``.

    Returns:
        :class:`PenaltyRecord`; ``record.remove()`` detaches the hook.

    Example:
        >>> import torch, gradprobe as gp
        >>> w = torch.nn.Parameter(torch.tensor([2.0, -1.0]))
        >>> opt = torch.optim.SGD([w], lr=0.1)
        >>> rec = gp.remedies.regularize_(opt, l2=0.5)
        >>> w.grad = torch.zeros(2); opt.step(); w.data
        tensor([ 1.9000, -0.9500])

    Note:
        Under ``GradScaler.step`` the gradients are already unscaled when the hook runs; for an
        optimizer that unscales inside its fused kernel the penalty is multiplied by its
        ``grad_scale``, so the same penalty applies either way.
    """
    _check_optimizer(optimizer, "regularize_")
    _check_number("l1", l1, positive=False)
    _check_number("l2", l2, positive=False)
    if not l1 and not l2:
        raise ConfigError("regularize_ needs l1 > 0 or l2 > 0", hint="e.g. regularize_(opt, l2=1e-4)")
    if _attached(optimizer, _PenaltyHook):
        raise ConfigError("a penalty is already attached to this optimizer",
                          hint="call .remove() on the first record before attaching another")
    handle = optimizer.register_step_pre_hook(_PenaltyHook(float(l1), float(l2)))
    n = len({id(p) for g in optimizer.param_groups for p in g["params"]})
    return PenaltyRecord(float(l1), float(l2), n, handle)


@dataclass(frozen=True)
class LrRecord:
    """Each parameter group's learning rate before and after :func:`set_lr_`."""

    old: tuple[float, ...]
    new: tuple[float, ...]
    scheduler: bool = False

    def __str__(self) -> str:
        pairs = ", ".join(f"{o:g} -> {n:g}" for o, n in zip(self.old, self.new))
        sched = " (and the scheduler's base_lrs)" if self.scheduler else ""
        return f"learning rate: {pairs}{sched}"


def set_lr_(
    optimizer: torch.optim.Optimizer,
    *,
    lr: float | None = None,
    factor: float | None = None,
    scheduler: Any = None,
) -> LrRecord:
    """Set every parameter group's learning rate to ``lr``, or multiply it by ``factor``.

    Args:
        optimizer: the optimizer to change in place.
        lr: the new learning rate of every group (exclusive with ``factor``).
        factor: multiply each group's rate (keeps the ratios between groups), e.g. 0.1 for a
            rate ten times too large.
        scheduler: a ``torch.optim.lr_scheduler`` driving this optimizer: its ``base_lrs`` (and
            ``initial_lr`` in the groups) change the same way, so the schedule does not restore
            the old rate.

    Returns:
        :class:`LrRecord` with the old and new rates, one per group.

    Example:
        >>> import torch, gradprobe as gp
        >>> opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=1.0)
        >>> print(gp.remedies.set_lr_(opt, factor=0.1))
        learning rate: 1 -> 0.1
    """
    _check_optimizer(optimizer, "set_lr_")
    if (lr is None) == (factor is None):
        raise ConfigError("set_lr_ needs exactly one of lr= and factor=",
                          hint="set_lr_(opt, lr=1e-3) or set_lr_(opt, factor=0.1)")
    _check_number("lr" if lr is not None else "factor", lr if lr is not None else factor,
                  positive=True)
    if scheduler is not None and getattr(scheduler, "optimizer", None) is not optimizer:
        raise ConfigError("scheduler does not drive this optimizer",
                          hint="pass the scheduler built on this optimizer")

    def new_rate(old: float) -> float:
        return float(lr) if lr is not None else old * float(factor)  # type: ignore[arg-type]

    old: list[float] = []
    new: list[float] = []
    for group in optimizer.param_groups:
        current = group["lr"]
        value = float(current)  # a tensor lr (capturable optimizers) is read once, not in a hook
        old.append(value)
        new.append(new_rate(value))
        if isinstance(current, Tensor):
            current.fill_(new[-1])
        else:
            group["lr"] = new[-1]
        if scheduler is not None and "initial_lr" in group:
            group["initial_lr"] = new_rate(float(group["initial_lr"]))
    if scheduler is not None:
        scheduler.base_lrs = [new_rate(float(b)) for b in scheduler.base_lrs]
    return LrRecord(tuple(old), tuple(new), scheduler is not None)


__all__ = [
    "ClipRecord", "LrRecord", "PenaltyRecord", "clip_gradients_", "regularize_", "set_lr_",
    "total_norm",
]
