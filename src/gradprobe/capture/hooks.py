"""Hook helpers of the Probe: finding the tensor a module produced, device-side histograms.

Nothing here synchronises the host with the device: no ``.item()``, no ``.cpu()``, no Python
branch on a tensor's values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor


def first_float_tensor(output: Any, _depth: int = 0) -> Tensor | None:
    """The module's primary output: the first floating-point tensor of ``output``.

    Tensors are searched in order through tuples/lists, mappings (``dict``, Hugging Face
    ``ModelOutput``) and dataclasses, e.g. ``output`` of ``nn.LSTM``'s ``(output, (h, c))``.
    """
    if isinstance(output, Tensor):
        return output if output.is_floating_point() and output.numel() > 0 else None
    if _depth > 4:
        return None
    if isinstance(output, Mapping):
        items: Any = output.values()
    elif isinstance(output, (tuple, list)):
        items = output
    elif dataclasses.is_dataclass(output) and not isinstance(output, type):
        items = (getattr(output, f.name) for f in dataclasses.fields(output))
    else:
        return None
    for item in items:
        found = first_float_tensor(item, _depth + 1)
        if found is not None:
            return found
    return None


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


__all__ = ["first_float_tensor", "histogram"]
