"""Mergeable sufficient statistics of tensors, and the quantities derived from them.

A tensor ``x`` with ``n`` elements is summarised on its own device by a small vector of sums and
extrema that **merge exactly** across micro-batches, ranks and time windows (sums add, maxima take
the maximum); everything a user reads is derived from them when a run is read:

=================  ==============================================================================
stored (raw)       meaning
=================  ==============================================================================
``count``          ``n`` (kept on the host: it is known without looking at the values)
``sum``            ``Σ x_i``
``sumsq``          ``Σ x_i²``
``abs_sum``        ``Σ |x_i|``
``nonzero``        ``#{i : x_i ≠ 0}`` (NaN counts as non-zero)
``nonfinite``      ``#{i : x_i is NaN or ±Inf}``
``saturated``      ``#{i : saturated(x_i)}`` by the activation's rule in :mod:`gradprobe.activations`
``dead``           number of *units* inactive on every example (see below)
``units``          number of units (host side)
``ref_sumsq``      ``Σ w_i²`` of the reference weights, for the ratio kinds ``update``/``drift``
``min``, ``max``   extrema (``min`` is stored negated on the device so both merge by ``max``)
=================  ==============================================================================

Derived (``derive``), with ``n = count``:

* ``mean = sum / n``; ``std = sqrt(max(sumsq/n − mean², 0))`` (population standard deviation;
  computed in float64 from float32 sums, so its relative error grows like ``ε·mean²/var`` when
  the mean dominates);
* ``rms = sqrt(sumsq / n)``; ``abs_mean = abs_sum / n``; ``norm = sqrt(sumsq)`` (Frobenius /
  Euclidean norm over all parameter tensors of the layer);
* ``abs_max = max(|min|, |max|)``; ``zero_frac = (n − nonzero) / n``;
* ``saturated_frac = saturated / n`` (NaN where the module has no saturation rule);
* ``dead_frac = dead / units`` (NaN where the module has no dead-unit rule);
* for kinds ``update``, ``drift`` and ``spread`` the column ``norm`` holds the **ratio**
  ``sqrt(sumsq / ref_sumsq)``: ``‖W_{t+1} − W_t‖ / ‖W_{t+1}‖`` and ``‖W_t − W_0‖ / ‖W_0‖``
  (the update-to-weight ratio whose healthy value is about 1e-3, Karpathy 2019, "A recipe for
  training neural networks"; the drift from initialisation that stays near 0 in layers whose
  gradient vanishes, Glorot & Bengio 2010), and the **spread of the units**
  ``sqrt(Σ_i ‖w_i − w̄‖² / Σ_i ‖w_i‖²)`` of a dense layer's weight rows ``w_i`` (one row per
  output unit or channel, ``w̄`` their mean row): 0 when every unit has the same incoming
  weights (a constant initialisation), ``sqrt(1 − 1/units)`` in expectation for i.i.d.
  zero-mean rows. Their other moment columns are NaN.

Kind ``input`` holds the ordinary statistics of the input of the first dense layer to run
(the model's input where the model starts with a Linear or ConvNd layer).

Dead units (Lu et al. 2019, "Dying ReLU and Initialization"): a unit is the channel (dimension 1)
of an output with 4 or more dimensions (``N, C, H, W, …``) and the last dimension otherwise
(``N, F`` or ``N, T, F``); it is dead in a step when the activation's ``inactive`` rule holds for
every element of that unit in every micro-batch of the step.

When ``nonfinite > 0`` the moments include the non-finite values and are themselves non-finite;
``nonfinite`` says how many there were.

This module is the one definition of the row: its fields and their order (:data:`DEVICE_FIELDS`,
:func:`ordered`), how rows merge (:func:`merge`), the stored and derived columns and
:func:`derive`. It imports no torch: the run reader and the diagnosis use it alone; the torch-side
kernels (:mod:`.eager`, :mod:`.batched`, :mod:`.compiled`) lay their rows out with :func:`ordered`.

Example
    >>> d = derive_row({"count": 3, "sum": -1.0, "sumsq": 25.0, "abs_sum": 7.0, "nonzero": 2,
    ...                 "nonfinite": 0, "min": -4.0, "max": 3.0})
    >>> d["norm"], d["zero_frac"], d["abs_max"]
    (5.0, 0.3333333333333333, 4.0)
"""

from __future__ import annotations

import math
from typing import Any, TypeVar

import numpy as np
import pandas as pd

# Device-side layout: first the fields merged by addition, then the fields merged by maximum.
SUM, SUMSQ, ABS_SUM, NONZERO, NONFINITE, SATURATED, DEAD, REF_SUMSQ, NEG_MIN, MAX = range(10)
N_ADD = 8
N_STATS = 10
DEVICE_FIELDS = (
    "sum", "sumsq", "abs_sum", "nonzero", "nonfinite", "saturated", "dead", "ref_sumsq",
    "neg_min", "max",
)
RAW_COLUMNS = (
    "count", "sum", "sumsq", "abs_sum", "nonzero", "nonfinite", "saturated", "dead", "units",
    "ref_sumsq", "min", "max",
)
DERIVED_COLUMNS = (
    "count", "mean", "std", "rms", "abs_mean", "norm", "min", "max", "abs_max", "zero_frac",
    "nonfinite", "saturated_frac", "dead_frac",
)
KINDS = ("grad", "weight", "update", "drift", "spread", "input", "act", "act_grad")
PARAM_KINDS = ("grad", "weight", "update", "drift")
ACT_KINDS = ("act", "act_grad")
DENSE_KINDS = ("spread", "input")
"""Kinds recorded for dense weight layers only (Linear, ConvNd: :data:`gradprobe.layers.DENSE`)."""
RATIO_KINDS = ("update", "drift", "spread")
ADD_FIELDS = DEVICE_FIELDS[:N_ADD]
"""Fields merged by addition; the others (``neg_min``, ``max``) merge by maximum."""

T = TypeVar("T")


def ordered(zero: T, ninf: T, **given: T) -> list[T]:
    """The values of one statistics row in :data:`DEVICE_FIELDS` order: the ``given`` fields,
    ``zero`` for the other fields merged by addition and ``ninf`` (``-inf``, the identity of
    ``max``) for the other maxima. Every kernel builds its rows with this, so the layout is
    written once::

        >>> ordered(0, -9, sumsq=4, max=2)
        [0, 4, 0, 0, 0, 0, 0, 0, -9, 2]
    """
    unknown = set(given) - set(DEVICE_FIELDS)
    if unknown:
        raise KeyError(f"unknown statistics fields {sorted(unknown)}")
    return [given.get(f, zero if i < N_ADD else ninf) for i, f in enumerate(DEVICE_FIELDS)]


def merge(acc: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Merge host rows ``other`` into ``acc`` in place (both ``[..., N_STATS]``): sums add,
    maxima take the maximum. The torch twin is :func:`gradprobe.stats.eager.merge_`."""
    acc[..., :N_ADD] += other[..., :N_ADD]
    np.maximum(acc[..., N_ADD:], other[..., N_ADD:], out=acc[..., N_ADD:])
    return acc


def identity(rows: int) -> np.ndarray:
    """``[rows, N_STATS]`` identity of :func:`merge` on the host."""
    out = np.zeros((rows, N_STATS))
    out[:, N_ADD:] = -math.inf
    return out


def unit_dims(ndim: int) -> tuple[int, ...]:
    """Dimensions reduced to decide whether a unit is dead (all but the unit dimension)."""
    if ndim <= 1:
        return ()
    unit = 1 if ndim >= 4 else ndim - 1
    return tuple(d for d in range(ndim) if d != unit)


# ----------------------------------------------------------------------------------- derived


def derive(raw: pd.DataFrame) -> pd.DataFrame:
    """Derived columns (see the module docstring) from a frame of raw columns, vectorised."""
    n = raw["count"].to_numpy(dtype=float)
    s = raw["sum"].to_numpy(dtype=float)
    ss = raw["sumsq"].to_numpy(dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = s / n
        var = np.maximum(ss / n - mean * mean, 0.0)  # NaN stays NaN
        out = pd.DataFrame(index=raw.index)
        out["count"] = raw["count"].astype("int64")
        out["mean"] = mean
        out["std"] = np.sqrt(var)
        out["rms"] = np.sqrt(ss / n)
        out["abs_mean"] = raw["abs_sum"].to_numpy(dtype=float) / n
        norm = np.sqrt(ss)
        mn = raw["min"].to_numpy(dtype=float)
        mx = raw["max"].to_numpy(dtype=float)
        out["min"] = mn
        out["max"] = mx
        out["abs_max"] = np.fmax(np.abs(mn), np.abs(mx))
        out["zero_frac"] = (n - raw["nonzero"].to_numpy(dtype=float)) / n
        out["nonfinite"] = raw["nonfinite"].to_numpy(dtype=float)
        out["saturated_frac"] = raw["saturated"].to_numpy(dtype=float) / n
        units = raw["units"].to_numpy(dtype=float)
        out["dead_frac"] = np.where(units > 0, raw["dead"].to_numpy(dtype=float) / units, np.nan)
        if "kind" in raw:
            ratio = raw["kind"].isin(RATIO_KINDS).to_numpy()
            ref = raw["ref_sumsq"].to_numpy(dtype=float)
            norm = np.where(ratio, np.sqrt(ss / ref), norm)
            for col in ("mean", "std", "rms", "abs_mean", "min", "max", "abs_max", "zero_frac"):
                out.loc[ratio, col] = np.nan
        out["norm"] = norm
    return out[list(DERIVED_COLUMNS)]


def derive_row(raw: dict[str, Any]) -> dict[str, float]:
    """:func:`derive` for one record given as a dict of raw columns."""
    row = {c: raw.get(c, math.nan) for c in RAW_COLUMNS}
    frame = derive(pd.DataFrame([row]))
    return {k: float(v) for k, v in frame.iloc[0].items()}


__all__ = [
    "ACT_KINDS",
    "ADD_FIELDS",
    "DENSE_KINDS",
    "DERIVED_COLUMNS",
    "DEVICE_FIELDS",
    "KINDS",
    "N_ADD",
    "N_STATS",
    "PARAM_KINDS",
    "RATIO_KINDS",
    "RAW_COLUMNS",
    "derive",
    "derive_row",
    "identity",
    "merge",
    "ordered",
    "unit_dims",
]
