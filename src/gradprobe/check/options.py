"""The options of the gradient check: one frozen record (:class:`CheckOptions`), validated on
construction, and the constants of the check."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal, TypeVar

import numpy as np
import torch
from torch import Tensor, nn
from typing_extensions import TypedDict

from gradprobe.errors import ConfigError

Mode = Literal["full", "sample", "directional"]
RandomLayers = Literal["reseed", "eval"]
Verdict = Literal["ok", "suspicious", "bug", "kink"]
ParamsLike = Mapping[str, Any] | Sequence[Any]
"""Named parameters of ``gradcheck_fn``: a mapping of arrays or a sequence of them."""

_MODES = ("full", "sample", "directional")
_NOISE_SAFETY = 10.0
"""Roundoff of one loss evaluation is taken as ``_NOISE_SAFETY · u · |J|`` (``u`` the unit
roundoff): sums inside a forward pass lose a few more digits than one rounding."""
_KINK_SHARE = 0.6
"""A kink crossed on one side makes ``|g̃ − g| = |fwd − bwd| / 2``; allow 20 % slack."""
_MAX_CHUNK = 512
"""Most coordinates evaluated by one vectorised call when ``chunk_size`` is not given."""
_F = TypeVar("_F", bound=Callable[..., Any])
_RANDOM_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.modules.dropout._DropoutNd, nn.RReLU)


class CheckKwargs(TypedDict, total=False):
    """The keyword options shared by :func:`gradcheck` and :func:`gradcheck_fn` (for typing
    ``**options``); their defaults and meaning are those of :class:`CheckOptions`."""

    eps: float
    dtype: torch.dtype
    mode: Mode
    k: int
    n_directions: int
    seed: int
    ok_tol: float
    bug_tol: float
    vectorize: bool | Literal["auto"]
    chunk_size: int | None
    max_memory_mb: float
    n_worst: int


@dataclass(frozen=True)
class CheckOptions:
    """How a gradient check runs: the step, the precision, what is checked, the verdict bounds.

    One record for :func:`~gradprobe.check.gradcheck` and
    :func:`~gradprobe.check.gradcheck_fn`, validated on construction (a bad value raises
    :class:`~gradprobe.errors.ConfigError` with a hint).

    Attributes:
        eps: the step ε of the centred difference ``(J(θ+εe_i) − J(θ−εe_i)) / 2ε``.
        dtype: precision of the check; float32 with a small ε gives a warning, not a verdict.
        mode: ``"full"`` (every coordinate), ``"sample"`` (``k`` random coordinates per tensor),
            ``"directional"`` (``n_directions`` random unit directions per tensor).
        seed: seeds the sampled coordinates and directions (and, for models, torch's RNG before
            every evaluation).
        ok_tol, bug_tol: relative error ≤ ``ok_tol`` reads ``"ok"``, > ``bug_tol`` ``"bug"``.
        vectorize: ``"auto"`` batches with ``torch.func.vmap`` where it runs and agrees with the
            loop; ``True`` requires vmap; ``False`` loops.
        chunk_size, max_memory_mb: perturbations per vectorised call (default: sized so one
            call stays within ``max_memory_mb``).
        n_worst: how many worst coordinates (or directions) each row keeps.

    Example:
        >>> CheckOptions(mode="sample", k=8).k
        8
    """

    eps: float = 1e-7
    dtype: torch.dtype = torch.float64
    mode: Mode = "full"
    k: int = 32
    n_directions: int = 8
    seed: int = 0
    ok_tol: float = 1e-7
    bug_tol: float = 1e-3
    vectorize: bool | Literal["auto"] = "auto"
    chunk_size: int | None = None
    max_memory_mb: float = 256.0
    n_worst: int = 5

    def __post_init__(self) -> None:
        _validate(self)

    @classmethod
    def from_kwargs(cls, where: str, options: Mapping[str, Any]) -> CheckOptions:
        """The options passed to ``where`` as keywords; an unknown keyword is a TypeError that
        names the function and the keywords it takes."""
        unknown = sorted(set(options) - {f.name for f in fields(cls)})
        if unknown:
            raise TypeError(
                f"{where}() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; "
                f"options are: {', '.join(f.name for f in fields(cls))}"
            )
        return cls(**options)


def with_option_signature(fn: _F) -> _F:
    """Show the fields of :class:`CheckOptions` as keyword-only parameters of ``fn`` (whose
    ``**options`` receives them), so ``help()`` and :func:`inspect.signature` list them with
    their defaults."""
    sig = inspect.signature(fn)
    params = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
    params += [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                          annotation=f.type)
        for f in fields(CheckOptions)
    ]
    fn.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    return fn


def _validate(o: CheckOptions) -> None:
    eps, dtype, mode, k = o.eps, o.dtype, o.mode, o.k
    n_directions, ok_tol, bug_tol = o.n_directions, o.ok_tol, o.bug_tol
    chunk_size, vectorize = o.chunk_size, o.vectorize
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ConfigError(
            f"eps must be a positive finite step, got {eps!r}",
            hint="the usual choice is eps=1e-7 in float64",
        )
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(
            f"dtype must be a floating torch dtype, got {dtype!r}", hint="use torch.float64"
        )
    if mode not in _MODES:
        raise ConfigError(
            f"unknown mode {mode!r}", hint="choose one of: " + ", ".join(repr(m) for m in _MODES)
        )
    if not isinstance(k, int) or k < 1:
        raise ConfigError(f"k must be a positive integer, got {k!r}", hint="e.g. k=32")
    if not isinstance(n_directions, int) or n_directions < 1:
        raise ConfigError(
            f"n_directions must be a positive integer, got {n_directions!r}",
            hint="e.g. n_directions=8",
        )
    if not (0 < ok_tol < bug_tol):
        raise ConfigError(
            f"need 0 < ok_tol < bug_tol, got ok_tol={ok_tol!r}, bug_tol={bug_tol!r}",
            hint="the usual reading is ok_tol=1e-7, bug_tol=1e-3",
        )
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ConfigError(
            f"chunk_size must be a positive integer or None, got {chunk_size!r}",
            hint="leave it None to size chunks from max_memory_mb",
        )
    if vectorize not in ("auto", True, False):
        raise ConfigError(
            f"vectorize must be 'auto', True or False, got {vectorize!r}", hint="use 'auto'"
        )



def _unit_roundoff(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps) / 2.0


def _as_scalar(value: Any, what: str) -> Tensor:
    """A loss value as a 0-d tensor, or a ConfigError saying why it is not a scalar."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ConfigError(
                f"{what} must return a scalar, got a tensor of shape {tuple(value.shape)}",
                hint="reduce it, e.g. with .mean() or .sum()",
            )
        return value.reshape(())
    if isinstance(value, (float, int, np.floating, np.integer)) and not isinstance(value, bool):
        return torch.tensor(float(value), dtype=torch.float64)
    if isinstance(value, np.ndarray):
        if value.size != 1:
            raise ConfigError(
                f"{what} must return a scalar, got an array of shape {value.shape}",
                hint="reduce it, e.g. with .mean() or .sum()",
            )
        return torch.tensor(float(value.reshape(())), dtype=torch.float64)
    raise ConfigError(
        f"{what} must return a scalar number or tensor, got {type(value).__name__}",
        hint="return the loss as a 0-d tensor or a float",
    )
