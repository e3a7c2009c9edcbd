"""The options of the gradient check: modes, tolerances, and their validation."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

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
_RANDOM_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.modules.dropout._DropoutNd, nn.RReLU)


def _check_options(
    eps: float,
    dtype: torch.dtype,
    mode: str,
    k: int,
    n_directions: int,
    ok_tol: float,
    bug_tol: float,
    chunk_size: int | None,
    vectorize: object,
) -> None:
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
