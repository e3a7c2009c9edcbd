"""What the gradient check evaluates: the evaluator interface, the objective wrapper and
the kink bookkeeping shared by the model and function evaluators."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from gradprobe.check.options import (
    _as_scalar,
)

# ----------------------------------------------------------------------------------- evaluators


class _Evaluator:
    """The function under test, seen as J(θ_t + δ) for one tensor t at a time."""

    names: list[str]
    shapes: list[tuple[int, ...]]
    base: list[Tensor]  # flat, in the check dtype
    grads: list[Tensor]  # flat analytic gradients, same dtype
    j0: float
    act_numel: int = 0
    vectorized: bool = False
    fallback_reason: str | None = None
    n_evaluations: int = 0
    has_hooks: bool = False
    fast_used: tuple[str, ...] = ()
    fast_lean: tuple[str, ...] = ()
    vmap_notes: tuple[str, ...] = ()
    """What the report should say about tensors that were not vectorised, or only partly."""

    def eval_rows(self, t: int, values: Tensor) -> tuple[Tensor, Tensor | None]:
        """J with tensor t set to values[r] (flat) for every row r, and per row the number of
        activation inputs whose kink region differs from the one at θ (or None without hooks)."""
        raise NotImplementedError

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
