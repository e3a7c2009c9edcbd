"""Hook helpers of the Probe: finding the tensor a module produced.

Nothing here synchronises the host with the device: no ``.item()``, no ``.cpu()``, no Python
branch on a tensor's values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

MAX_NESTING = 32
"""How deep :func:`first_float_tensor` looks into nested outputs."""


def first_float_tensor(output: Any, _depth: int = 0) -> Tensor | None:
    """The module's primary output: the first floating-point or complex tensor of ``output``.

    Tensors are searched in order through tuples/lists, mappings (``dict``, Hugging Face
    ``ModelOutput``) and dataclasses, e.g. ``output`` of ``nn.LSTM``'s ``(output, (h, c))``,
    down to :data:`MAX_NESTING` levels. A complex tensor is returned as it is: the statistics
    read it through :func:`as_real`.
    """
    if isinstance(output, Tensor):
        ok = output.is_floating_point() or output.is_complex()
        return output if ok and output.numel() > 0 else None
    if _depth >= MAX_NESTING:
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


def as_real(t: Tensor) -> Tensor:
    """A complex tensor as its real and imaginary parts (``torch.view_as_real``: a view, no
    copy; its norm is the complex norm, its mean and spread those of the parts); a real
    tensor as it is."""
    return torch.view_as_real(t) if t.is_complex() else t


__all__ = ["MAX_NESTING", "as_real", "first_float_tensor"]
