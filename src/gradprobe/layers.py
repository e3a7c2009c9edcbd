"""The one table of layer kinds, and the one finder of the activation after each layer.

* :data:`WEIGHT_LAYERS` -- the layers whose weights initialisers, theory and checks reason about:
  ``Linear``, ``Conv1d/2d/3d`` (:data:`DENSE`: one weight matrix applied to the input) and the
  recurrent ``RNN``, ``LSTM``, ``GRU`` (:data:`RECURRENT`);
* :data:`NORMALISERS` -- batch, layer, group and instance normalisation;
* activations come from :mod:`gradprobe.activations` (saturation and dead-unit rules, gains).

:func:`activation_after` names, for each weight layer, the activation that consumes its output
(the first activation before the next weight layer, in the traced execution order, or in
registration order where tracing fails). Initialisers read it to choose the gain.

Example
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
    >>> activation_after(net)
    ({'0': 'tanh', '2': None}, 'traced')
    >>> is_weight_layer(net[0]), is_weight_layer(net[1])
    (True, False)
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from gradprobe import activations

CONV: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
DENSE: tuple[type[nn.Module], ...] = (nn.Linear, *CONV)
"""Layers computing ``W x + b`` with one weight tensor: fan-in is ``weight[0].numel()``."""
RECURRENT: tuple[type[nn.Module], ...] = (nn.RNN, nn.LSTM, nn.GRU)
WEIGHT_LAYERS: tuple[type[nn.Module], ...] = (*DENSE, *RECURRENT)
NORMALISERS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
)


def is_weight_layer(m: nn.Module) -> bool:
    return isinstance(m, WEIGHT_LAYERS)


def is_dense(m: nn.Module) -> bool:
    return isinstance(m, DENSE)


def is_normaliser(m: nn.Module) -> bool:
    return isinstance(m, NORMALISERS)


def function_table() -> dict[object, str]:
    """Functional forms of the table's activations, keyed by callable (for fx call_function)."""
    import torch.nn.functional as F

    table: dict[object, str] = {}
    for name, spec in activations.ACTIVATIONS.items():
        for fn in (spec.fn, getattr(torch, name, None), getattr(F, name, None),
                   getattr(torch, name + "_", None), getattr(F, name + "_", None)):
            if fn is not None and callable(fn) and name != "identity":
                table.setdefault(fn, name)
    return table


def trace_order(model: nn.Module) -> list[tuple[str, str]] | None:
    """Execution order as ``[("layer", name) | ("act", activation name)]``, or None if untraceable."""
    import torch.fx

    class _Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            if isinstance(m, WEIGHT_LAYERS) or activations.spec_for_module(m) is not None:
                return True
            return super().is_leaf_module(m, qualname)

    try:
        graph = _Tracer().trace(model)
    except Exception:  # any tracing failure means: fall back to registration order
        return None
    modules = dict(model.named_modules())
    functions = function_table()
    method_names = {n for n in activations.ACTIVATIONS if n != "identity"}
    order: list[tuple[str, str]] = []
    for node in graph.nodes:
        if node.op == "call_module":
            mod = modules.get(str(node.target))
            if isinstance(mod, WEIGHT_LAYERS):
                order.append(("layer", str(node.target)))
            elif mod is not None and (spec := activations.spec_for_module(mod)) is not None:
                order.append(("act", spec.name))
        elif node.op == "call_function" and node.target in functions:
            order.append(("act", functions[node.target]))
        elif node.op == "call_method" and str(node.target).rstrip("_") in method_names:
            order.append(("act", str(node.target).rstrip("_")))
    return order


def registration_order(model: nn.Module) -> list[tuple[str, str]]:
    order: list[tuple[str, str]] = []
    for name, mod in model.named_modules():
        if isinstance(mod, WEIGHT_LAYERS):
            order.append(("layer", name))
        elif (spec := activations.spec_for_module(mod)) is not None:
            order.append(("act", spec.name))
    return order


def following_activation(order: list[tuple[str, str]]) -> dict[str, str | None]:
    """Each weight layer's next activation before the next weight layer (first call wins)."""
    result: dict[str, str | None] = {}
    for i, (kind, name) in enumerate(order):
        if kind != "layer" or name in result:
            continue
        result[name] = None
        for kind2, name2 in order[i + 1:]:
            if kind2 == "layer":
                break
            result[name] = name2
            break
    return result


Order = Literal["traced", "registration"]


def activation_after(model: nn.Module, *, trace: bool = True
                     ) -> tuple[dict[str, str | None], Order]:
    """For each weight layer of ``model`` (by qualified name) the activation that consumes its
    output, or ``None``; and how the order was found (``"traced"`` with torch.fx, else
    ``"registration"``). ``trace=False`` skips tracing (about 10 ms per 60 modules)."""
    order = trace_order(model) if trace else None
    how: Order = "traced"
    if order is None:
        order, how = registration_order(model), "registration"
    return following_activation(order), how


__all__ = [
    "CONV",
    "DENSE",
    "NORMALISERS",
    "RECURRENT",
    "WEIGHT_LAYERS",
    "activation_after",
    "following_activation",
    "is_dense",
    "is_normaliser",
    "is_weight_layer",
    "registration_order",
    "trace_order",
]
