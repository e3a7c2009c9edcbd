"""The slow, obvious definition of the statistics, for tests and documentation.

A Python loop in float64 over every element: the fast kernels (:mod:`.eager`, :mod:`.batched`,
:mod:`.compiled`, the Probe's stage) are tested against it.

Example
    >>> import torch
    >>> from gradprobe.stats.schema import derive_row
    >>> d = derive_row(reference_stats([torch.tensor([0.0, 3.0, -4.0])]))
    >>> d["norm"], d["zero_frac"], d["abs_max"]
    (5.0, 0.3333333333333333, 4.0)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from torch import Tensor

from gradprobe.stats.schema import RAW_COLUMNS


def reference_stats(
    tensors: Sequence[Tensor],
    saturated: Callable[[Tensor], Tensor] | None = None,
    inactive: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, float]:
    """The slow, obvious definition (a Python loop in float64), for tests and documentation.

    ``tensors`` are merged as one population (micro-batches of one activation, or the
    parameter tensors of one layer). ``inactive`` masks of the micro-batches are AND-ed per unit.
    """
    out: dict[str, float] = dict.fromkeys(RAW_COLUMNS, 0.0)
    out["min"], out["max"] = math.inf, -math.inf
    unit_mask: np.ndarray | None = None
    for t in tensors:
        a = t.detach().double().cpu()
        v = a.flatten().tolist()
        out["count"] += len(v)
        out["sum"] += math.fsum(v)
        out["sumsq"] += math.fsum(e * e for e in v)
        out["abs_sum"] += math.fsum(abs(e) for e in v)
        out["nonzero"] += sum(1 for e in v if e != 0)
        out["nonfinite"] += sum(1 for e in v if not math.isfinite(e))
        if v:
            out["min"] = min(out["min"], min(v))
            out["max"] = max(out["max"], max(v))
        if saturated is not None:
            out["saturated"] += float(saturated(a).sum())
        if inactive is not None:
            m = inactive(a).numpy()
            m = m.reshape(1) if m.ndim == 0 else m
            if m.ndim >= 4:
                m = np.moveaxis(m, 1, -1)
            per_unit = np.asarray(m.reshape(-1, m.shape[-1]).all(axis=0) if m.ndim >= 2 else m)
            unit_mask = per_unit if unit_mask is None else np.logical_and(unit_mask, per_unit)
    if unit_mask is not None:
        out["dead"] = float(unit_mask.sum())
        out["units"] = float(unit_mask.size)
    if saturated is None:
        out["saturated"] = math.nan
    if inactive is None:
        out["dead"] = math.nan
    return out


__all__ = ["reference_stats"]
