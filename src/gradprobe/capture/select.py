"""Which layers a Probe tracks: name patterns, module types, and the parameters each owns.

By default a Probe tracks every module that owns parameters directly plus every activation
module known to :mod:`gradprobe.activations`; ``layer_types`` replaces that default and
``layers`` (glob patterns on qualified module names, each of which must match) narrows it.
Each parameter, deduplicated by identity so that tied weights count once (as BackPACK and
Opacus do), belongs to the tracked module with the longest qualified-name prefix of its name.

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    >>> [(lay.name, len(lay.params)) for lay in select_layers(model, "1*", None, ("act",))]
    [('1', 0)]
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gradprobe.activations import ActivationSpec, spec_for_module
from gradprobe.errors import ConfigError, UnsupportedModelError
from gradprobe.layers import is_dense
from gradprobe.stats import schema as S


@dataclass
class Layer:
    """A tracked module, its parameters, and its rows of the recorder (one per kind)."""

    layer_id: int
    name: str
    module: nn.Module
    spec: ActivationSpec | None
    params: list[nn.Parameter] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)
    depth: int | None = None
    # read by the hooks on every call (set when the probe attaches)
    act_row: int | None = None
    act_grad_row: int | None = None
    input_row: int | None = None
    sat_rule: Any = None
    dead_rule: Any = None

    def record(self) -> dict[str, Any]:
        """The layer's entry of ``meta.json``."""
        return {
            "layer_id": self.layer_id,
            "name": self.name,
            "type": type(self.module).__name__,
            "depth": self.depth,
            "param_shapes": [list(p.shape) for p in self.params],
            "activation": self.spec.name if self.spec is not None else None,
        }


def display_name(name: str) -> str:
    """The qualified module name, ``"(model)"`` for the root."""
    return name if name else "(model)"


def check_kinds(kinds: Iterable[str]) -> tuple[str, ...]:
    """The recorded kinds in the canonical order of :data:`gradprobe.stats.schema.KINDS`."""
    if isinstance(kinds, str):
        kinds = (kinds,)
    out = tuple(kinds)
    bad = [k for k in out if k not in S.KINDS]
    if bad or not out:
        raise ConfigError(f"unknown kinds {bad}" if bad else "kinds is empty",
                          hint=f"choose from {list(S.KINDS)}")
    return tuple(k for k in S.KINDS if k in out)


def _candidates(named: list[tuple[str, nn.Module]], layer_types: Any
                ) -> list[tuple[str, nn.Module]]:
    """The modules selected by type: ``layer_types``, or the default (parameter owners and
    known activations)."""
    if layer_types is None:
        return [
            (n, m) for n, m in named
            if next(m.parameters(recurse=False), None) is not None
            or spec_for_module(m) is not None
        ]
    types = (layer_types,) if isinstance(layer_types, type) else tuple(layer_types)
    if not types or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in types):
        raise ConfigError(f"layer_types must be nn.Module subclasses, got {layer_types!r}")
    cands = [(n, m) for n, m in named if isinstance(m, types)]
    if not cands:
        raise ConfigError(
            f"layer_types {[t.__name__ for t in types]} match no module of the model",
            hint="types present: " + ", ".join(sorted({type(m).__name__ for _, m in named})),
        )
    return cands


def _matching(cands: list[tuple[str, nn.Module]], layers: Any) -> list[tuple[str, nn.Module]]:
    """The candidates whose qualified name matches one of the glob patterns ``layers``; each
    pattern must match at least one."""
    patterns = [layers] if isinstance(layers, str) else list(layers)
    if not patterns or not all(isinstance(p, str) for p in patterns):
        raise ConfigError(f"layers must be a glob pattern or a list of them, got {layers!r}")
    keep: list[tuple[str, nn.Module]] = []
    for pat in patterns:
        hits = [c for c in cands if fnmatch.fnmatchcase(c[0], pat)]
        if not hits:
            sample = ", ".join(display_name(n) for n, _ in cands[:8])
            raise ConfigError(
                f"layer pattern {pat!r} matches no tracked module",
                hint=f"patterns are globs on qualified names, e.g. {sample}",
            )
        keep += [h for h in hits if all(h[1] is not k[1] for k in keep)]
    return [c for c in cands if any(c[1] is k[1] for k in keep)]


def select_layers(root: nn.Module, layers: Any, layer_types: Any,
                  kinds: tuple[str, ...]) -> list[Layer]:
    """The tracked layers of ``root``, with their parameters and one (unassigned) row per kind
    (activation kinds for every layer, parameter kinds for layers owning parameters)."""
    cands = _candidates(list(root.named_modules()), layer_types)
    if layers is not None:
        cands = _matching(cands, layers)
    # named_parameters() yields each parameter once (by identity): tied weights count once
    by_name = {n: i for i, (n, _) in enumerate(cands)}
    result = [Layer(i, display_name(n), m, spec_for_module(m)) for i, (n, m) in enumerate(cands)]
    for pname, p in root.named_parameters():
        parts = pname.split(".")
        for k in range(len(parts) - 1, -1, -1):
            owner = ".".join(parts[:k])
            if owner in by_name:
                result[by_name[owner]].params.append(p)
                break
    for lay in result:
        lay.rows = {k: -1 for k in kinds if _has_kind(lay, k)}
    return result


def spread_weight(lay: Layer) -> nn.Parameter | None:
    """The weight whose rows (output units or channels) kind ``spread`` compares: the ``weight``
    of a dense layer (Linear, ConvNd) owned by this layer (a weight tied to an earlier layer
    is counted there), with at least one dimension."""
    w = getattr(lay.module, "weight", None)
    if not is_dense(lay.module) or not isinstance(w, nn.Parameter) or w.dim() < 1:
        return None
    return w if any(p is w for p in lay.params) else None


def _has_kind(lay: Layer, kind: str) -> bool:
    """Whether ``lay`` gets a row of ``kind``: activation kinds for every layer, parameter
    kinds for layers owning parameters, ``spread`` for dense layers owning their weight,
    ``input`` for dense layers (only the first of them to run records it)."""
    if kind in S.ACT_KINDS:
        return True
    if kind == "spread":
        return spread_weight(lay) is not None
    if kind == "input":
        return is_dense(lay.module)
    return bool(lay.params)


def check_optimizer(optimizer: Any, root: nn.Module) -> None:
    """Refuse an optimizer holding parameters that are not the model's."""
    if optimizer is None:
        return
    if isinstance(optimizer, torch.optim.LBFGS):
        raise closure_error(type(optimizer).__name__)
    own = {id(p) for p in root.parameters()}
    for gi, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            if id(p) not in own:
                raise ConfigError(
                    f"optimizer param_groups[{gi}] holds a parameter of shape "
                    f"{tuple(p.shape)} that is not a parameter of the model",
                    hint="build the optimizer from model.parameters() of the probed model",
                )


def closure_error(name: str) -> UnsupportedModelError:
    """The refusal of a closure optimizer (its forward passes run inside ``step``)."""
    return UnsupportedModelError(
        f"optimizer {name} steps with a closure (optimizer.step(closure)): its forward and "
        "backward passes run inside the optimizer step, between the Probe's step hooks, so "
        "they cannot be attributed to a step",
        hint="pass optimizer=None and call probe.step() after each optimizer.step(closure): "
        "every forward pass of the closure is then merged into that step as a micro-batch",
    )


__all__ = ["Layer", "closure_error", "check_kinds", "check_optimizer", "display_name", "select_layers",
           "spread_weight"]
