"""Hook helpers of the Probe: finding the tensor a module produced.

Nothing here synchronises the host with the device: no ``.item()``, no ``.cpu()``, no Python
branch on a tensor's values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

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


__all__ = ["first_float_tensor"]
