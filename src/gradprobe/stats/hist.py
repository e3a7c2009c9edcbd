"""Device-side histograms of tensors, without host synchronisation.

Nothing here calls ``.item()``, ``.cpu()`` or branches on a tensor's values.

Example
    >>> import torch
    >>> edges, counts, nonfinite = histogram(torch.tensor([0.0, 1.0, 1.0, float("nan")]), 2)
    >>> counts.tolist(), float(nonfinite)
    ([1.0, 2.0], 1.0)
"""

from __future__ import annotations

import torch
from torch import Tensor


def histogram(x: Tensor, bins: int, edges: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(edges[B+1], counts[B], nonfinite)`` of ``x`` on its device, without host sync.

    Bins are linear between the finite minimum and maximum (``torch.histc`` would need them as
    Python floats, i.e. a sync); given ``edges`` (an earlier micro-batch of the same step), values
    are binned into those, clamped into the end bins. Non-finite values are counted apart.
    """
    xf = x.detach().reshape(-1).float()
    finite = torch.isfinite(xf)
    nonfinite = (~finite).sum().to(torch.float64)
    if edges is None:
        lo = torch.where(finite, xf, torch.inf).amin()
        hi = torch.where(finite, xf, -torch.inf).amax()
        # all values non-finite: a dummy [0, 1] range (counts are all zero then)
        lo = torch.where(torch.isfinite(lo), lo, 0.0)
        hi = torch.where(torch.isfinite(hi), hi, 1.0)
        hi = torch.where(hi > lo, hi, lo + 1.0)
        steps = torch.linspace(0.0, 1.0, bins + 1, device=xf.device, dtype=torch.float64)
        edges = lo.double() + (hi.double() - lo.double()) * steps
    lo_e, hi_e = edges[0].float(), edges[-1].float()
    idx = ((xf - lo_e) / (hi_e - lo_e) * bins).floor().clamp_(0, bins - 1)
    idx = torch.where(finite, idx, 0.0).long()
    counts = torch.zeros(bins, dtype=torch.float64, device=xf.device)
    counts.index_add_(0, idx, finite.to(torch.float64))
    return edges, counts, nonfinite


__all__ = ["histogram"]
