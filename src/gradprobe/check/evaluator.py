"""What the gradient check evaluates: the evaluator interface, the objective wrapper and
the kink bookkeeping shared by the model and function evaluators."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from gradprobe.check.options import (
    _as_scalar,
    _unit_roundoff,
)
from gradprobe.errors import ConfigError, UnsupportedModelError

# ----------------------------------------------------------------------------------- evaluators


class _Evaluator:
    """The function under test, seen as J(θ_t + δ) for one tensor t at a time."""

    names: list[str]
    shapes: list[tuple[int, ...]]
    base: list[Tensor]  # flat, in the check dtype
    grads: list[Tensor]  # flat analytic gradients, same dtype
    j0: float
    act_numel: int = 0
    n_evaluations: int = 0
    want_vmap: bool = False
    force_vmap: bool = False
    subject: str = "f"
    """What the check evaluates, for messages: "the model" or "f"."""
    has_hooks: bool = False
    fast_used: tuple[str, ...] = ()
    fast_lean: tuple[str, ...] = ()
    vmap_notes: tuple[str, ...] = ()
    """What the report should say about tensors that were not vectorised, or only partly."""

    def eval_rows(self, t: int, values: Tensor) -> tuple[Tensor, Tensor | None]:
        """J with tensor t set to values[r] (flat) for every row r, and per row the number of
        activation inputs whose kink region differs from the one at θ (or None without hooks)."""
        if self.vmap_ready(t, values):
            try:
                return self._batched(t, values)
            except Exception as e:  # e.g. control flow on the values of some rows only
                if self.force_vmap:
                    raise
                self._vmap_ok[t] = False
                self._vmap_why[t] = f"torch.func.vmap cannot run {self.subject} ({_first_line(e)})"
        return self._looped(t, values)

    def _batched(self, t: int, values: Tensor) -> tuple[Tensor, Tensor | None]:
        """:meth:`eval_rows` with ``torch.func.vmap``."""
        raise NotImplementedError

    def _looped(self, t: int, values: Tensor) -> tuple[Tensor, Tensor | None]:
        """:meth:`eval_rows` one row at a time (the reference)."""
        raise NotImplementedError

    # -- the choice between vmap and the loop, per tensor ----------------------------------------
    @property
    def _vmap_ok(self) -> dict[int, bool]:
        return self.__dict__.setdefault("_vmap_ok_", {})

    @property
    def _vmap_why(self) -> dict[int, str]:
        return self.__dict__.setdefault("_vmap_why_", {})

    def vmap_ready(self, t: int, values: Tensor) -> bool:
        """Whether tensor t is evaluated with vmap: decided at its first call, by evaluating
        three of its rows (the first, the middle, the last: θ + εe_i, θ − εe_i and θ for the
        first coordinate) both vectorised and in the loop. vmap must run and agree to
        ``1e3·u·|J|``: some batching rules are wrong for some argument shapes (vmapping the 0-d
        value of ``index_fill`` gives every row the last one), which the unperturbed point
        alone cannot show. Tensors where it does not run or agree use the loop, and
        :attr:`fallback_reason` says why."""
        if t in self._vmap_ok:
            return self._vmap_ok[t]
        self._vmap_ok[t] = False
        if not self.want_vmap:
            return False
        r = values.shape[0]
        probe = values[sorted({0, r // 2, r - 1})]
        try:
            fast, _ = self._batched(t, probe)
        except ConfigError:  # a bad function (not a scalar, say) is the user's to fix
            raise
        except Exception as e:  # any failure to batch means: use the loop
            if self.force_vmap:
                raise UnsupportedModelError(
                    f"vectorize=True but torch.func.vmap cannot run {self.subject} "
                    f"({_first_line(e)})",
                    hint="use vectorize='auto' to fall back to a loop",
                ) from e
            self._vmap_why[t] = f"torch.func.vmap cannot run {self.subject} ({_first_line(e)})"
            return False
        slow, _ = self._looped(t, probe)
        scale = max(float(slow.abs().max()), abs(self.j0), 1e-300)
        tol = 1e3 * _unit_roundoff(self.base[t].dtype) * scale
        gap = float((fast - slow).abs().max())
        if not gap <= tol:
            self._vmap_why[t] = (
                f"the vmapped evaluation of {self.subject} differs from the loop by {gap:.2e} "
                f"(J = {float(fast[0])!r} against {float(slow[0])!r} in the first row; a "
                f"batching rule that is wrong for these shapes, or a random layer that draws "
                f"differently under vmap?)"
            )
            return False
        self._vmap_ok[t] = True
        return True

    @property
    def vectorized(self) -> bool:
        """Whether any tensor was evaluated with vmap."""
        return any(self._vmap_ok.values())

    @property
    def fallback_reason(self) -> str | None:
        """Why tensors were evaluated in a loop: one reason if it is the same for all of them,
        else one per tensor, named; None if every tensor was vectorised."""
        why = self._vmap_why
        if not why:
            return None
        reasons = set(why.values())
        if len(reasons) == 1 and not self.vectorized:
            return reasons.pop()
        return "; ".join(f"{self.names[t]}: {r}" for t, r in sorted(why.items()))

    def eval_coords(
        self, t: int, cols: Tensor, eps: float, center: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """J at θ_t + ε e_i (rows 0..c-1) and θ_t − ε e_i (rows c..2c-1) for i in ``cols``: the
        textbook perturbation, every other coordinate bit-identical to θ; with ``center`` a last
        row J(θ), evaluated the same way."""
        return self.eval_rows(t, self._coord_values(t, cols, eps, center))

    def _coord_values(self, t: int, cols: Tensor, eps: float, center: bool = False) -> Tensor:
        base = self.base[t]
        c = cols.numel()
        values = base.repeat(2 * c + int(center), 1)
        ar = torch.arange(c, device=base.device)
        values[ar, cols] = base[cols] + eps
        values[ar + c, cols] = base[cols] - eps
        return values


class _KinkState:
    def __init__(self) -> None:
        self.mode: Literal["off", "record", "compare"] = "off"
        self.base: list[Tensor] = []
        self.counts: list[Tensor] = []
        self.i = 0

    def start(self, mode: Literal["off", "record", "compare"]) -> None:
        self.mode = mode
        self.counts = []
        self.i = 0
        if mode == "record":
            self.base = []

    def total(self, like: Tensor) -> Tensor:
        if not self.counts:
            return torch.zeros((), dtype=torch.int64, device=like.device)
        return torch.stack([c.to(torch.int64) for c in self.counts]).sum()


def _region(x: Tensor, points: Sequence[float]) -> Tensor:
    r = torch.zeros_like(x, dtype=torch.int8)
    for p in points:
        r = r + (x > p).to(torch.int8)
    return r


class _Objective(nn.Module):
    """J(θ) = loss_fn(model(inputs), targets) + regularization(model), as one module so that
    :func:`torch.func.functional_call` swaps the parameters for the regulariser too."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[..., Any],
        regularization: Callable[[nn.Module], Any] | None,
    ) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        self.regularization = regularization

    def forward(self, inputs: Any, targets: Any) -> Tensor:
        if isinstance(inputs, Mapping):
            out = self.model(**inputs)
        elif isinstance(inputs, (tuple, list)):
            out = self.model(*inputs)
        else:
            out = self.model(inputs)
        loss = self.loss_fn(out) if targets is None else self.loss_fn(out, targets)
        j = _as_scalar(loss, "loss_fn")
        if self.regularization is not None:
            j = j + _as_scalar(self.regularization(self.model), "regularization")
        return j


def _convert(obj: Any, dtype: torch.dtype) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().to(dtype) if obj.is_floating_point() else obj.detach()
    if isinstance(obj, Mapping):
        return {key: _convert(v, dtype) for key, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_convert(v, dtype) for v in obj)
    if isinstance(obj, list):
        return [_convert(v, dtype) for v in obj]
    return obj


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"
