"""Insert normalisation layers: :func:`add_norm_`.

Why
    Normalising each layer's pre-activations to zero mean and unit variance (then a learned scale
    ``γ`` and shift ``β``) keeps them in the activation's responsive range whatever the weights'
    scale, so gradients neither vanish in saturated units nor grow with depth:
    BatchNorm (Ioffe & Szegedy 2015) over the batch, LayerNorm (Ba et al. 2016) over a sample's
    features, GroupNorm (Wu & He 2018) over groups of channels, InstanceNorm (Ulyanov et al. 2016)
    over each channel's positions. ``y = γ·(x - μ)/√(σ² + ε) + β``.

Where
    After every Linear/ConvNd whose output feeds an activation (module or functional call), before
    the activation (default, as Ioffe & Szegedy) or after it (``position="after_activation"``).
    A layer already followed by a normaliser is left alone (listed in ``record.skipped``).

    - ``nn.Sequential`` (nested too): the norm is inserted into the Sequential (later indices shift).
      A Sequential with named children (``Sequential(OrderedDict(...))``) keeps its names; each
      norm is named after its layer: ``fc1`` -> ``fc1_norm``.
    - Other modules: the module's own forward is traced with :mod:`torch.fx` (children as leaves).
      Where the layer is called once and only the activation reads it, the layer is replaced in
      place by ``nn.Sequential(layer, norm)`` (after: the activation module by
      ``nn.Sequential(activation, norm)``); the module keeps its class, and the layer's parameters
      are the same objects under ``<layer>.0.``. Otherwise (a functional activation with
      ``after_activation``, a shared layer or activation, a layer output also read elsewhere) the
      module is rewritten as a ``GraphModule``; for the model itself use ``record.model``.
      A module whose forward does not trace and has weight-layer children is listed as skipped.

Which norm (``C`` = out features / channels of the layer)
    ===========  =======================================  ========================================
    kind         after Linear                             after ConvNd
    ===========  =======================================  ========================================
    batch        BatchNorm1d(C) -- 2-D outputs only       BatchNorm{N}d(C)
    layer        LayerNorm(C) (last dim)                  GroupNorm(1, C): LayerNorm over C×spatial
    group        GroupNorm(G, C) -- 2-D outputs only      GroupNorm(G, C)
    instance     -- (no positions: error)                 InstanceNorm{N}d(C, affine=True)
    ===========  =======================================  ========================================

    ``G`` is the largest divisor of ``C`` that is at most 32 and leaves at least 4 channels per
    group (Wu & He's default is 32 groups); 1 if there is none. BatchNorm/GroupNorm after a Linear
    normalise dim 1, which is the sequence axis of a ``(N, L, C)`` output: they raise a clear
    :class:`~gradprobe.errors.UnsupportedModelError` at the first such forward (use ``"layer"``).
    Every norm starts as the identity affine map (γ = 1, β = 0; BatchNorm running mean 0 and
    variance 1), so in eval mode a fresh BatchNorm changes outputs only by ``1/√(1 + ε)``.

Example
    >>> import torch
    >>> from torch import nn
    >>> from gradprobe.remedies import add_norm_
    >>> net = nn.Sequential(nn.Linear(4, 64), nn.ReLU(), nn.Linear(64, 1))
    >>> rec = add_norm_(net, "group")
    >>> [(e.layer, e.norm, e.groups) for e in rec.inserted]
    [('0', '1', 16)]
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import ClassVar, Literal, get_args

import torch
from torch import Tensor, nn

from gradprobe.errors import ConfigError, UnsupportedModelError
from gradprobe.remedies import _surgery as S

Kind = Literal["batch", "layer", "group", "instance"]
Position = Literal["before_activation", "after_activation"]
KINDS: tuple[str, ...] = get_args(Kind)
POSITIONS: tuple[str, ...] = get_args(Position)
MAX_GROUPS, MIN_GROUP_SIZE = 32, 4


@dataclass(frozen=True)
class Inserted:
    """One normaliser put in: after ``layer`` (before or after ``activation``), now at ``norm``."""

    layer: str
    activation: str
    norm: str
    module: str
    features: int
    groups: int | None
    how: Literal["sequential", "wrap", "fx"]


@dataclass(frozen=True)
class Skipped:
    layer: str
    reason: str


@dataclass(frozen=True)
class NormRecord(S.ListedChanges[Inserted]):
    """What :func:`add_norm_` changed. ``model`` is the model to use from now on."""

    kind: str
    position: str
    inserted: tuple[Inserted, ...]
    skipped: tuple[Skipped, ...] = ()
    rewritten: tuple[str, ...] = ()
    added_to_optimizer: int = 0
    model: nn.Module | None = field(default=None, repr=False, compare=False)
    _entries: ClassVar[str] = "inserted"

    def __str__(self) -> str:
        return self._text(
            f"add_norm_ {self.kind} ({self.position}): {len(self.inserted)} inserted",
            (f"after {e.layer} -> {e.activation}: {e.module} at {e.norm} ({e.how}"
             + (f", {e.groups} groups of {e.features // e.groups}" if e.groups else "") + ")"
             for e in self.inserted),
            (f"skipped {s.layer or '<model>'}: {s.reason}" for s in self.skipped))


def groups_for(channels: int) -> int:
    """Largest ``G <= 32`` dividing ``channels`` with ``channels / G >= 4``; 1 if none."""
    for g in range(min(MAX_GROUPS, channels // MIN_GROUP_SIZE), 0, -1):
        if channels % g == 0:
            return g
    return 1


class _FeatureCheck:
    """Refuses inputs that are not ``(N, C)``: after a Linear, dim 1 of a 3-D output is not C."""

    layer: str = "?"

    def _check(self, x: Tensor) -> None:
        if x.dim() != 2:
            kind = type(self).__mro__[2].__name__
            raise UnsupportedModelError(
                f"{kind} after Linear {self.layer!r} got a {x.dim()}-D output {tuple(x.shape)}: "
                f"it would normalise dim 1 (the sequence axis), not the {x.shape[-1]} features",
                hint="use add_norm_(model, 'layer'): LayerNorm normalises the last dimension",
            )


class LinearBatchNorm(_FeatureCheck, nn.BatchNorm1d):
    """BatchNorm1d for a Linear's ``(N, C)`` output (raises on ``(N, L, C)``)."""

    def forward(self, x: Tensor) -> Tensor:
        self._check(x)
        return super().forward(x)


class LinearGroupNorm(_FeatureCheck, nn.GroupNorm):
    """GroupNorm for a Linear's ``(N, C)`` output (raises on ``(N, L, C)``)."""

    def forward(self, x: Tensor) -> Tensor:
        self._check(x)
        return super().forward(x)


def _make(kind: str, layer: nn.Module, name: str) -> tuple[nn.Module, int, int | None]:
    """The norm for ``layer``'s output, its width, and its group count (GroupNorm)."""
    w = layer.weight
    assert isinstance(w, Tensor)
    c = int(w.shape[0])
    nd = w.dim() - 2  # 0 for Linear, N for ConvN
    g: int | None = None
    norm: nn.Module
    if kind == "batch":
        norm = LinearBatchNorm(c) if nd == 0 else (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[nd - 1](c)
    elif kind == "layer":
        norm = nn.LayerNorm(c) if nd == 0 else nn.GroupNorm(1, c)
        g = None if nd == 0 else 1
    elif kind == "group":
        g = groups_for(c)
        norm = LinearGroupNorm(g, c) if nd == 0 else nn.GroupNorm(g, c)
    else:
        if nd == 0:
            raise ConfigError(
                f"instance norm does not apply after Linear {name!r}: it normalises each channel "
                "over its spatial positions, and a Linear's output has none",
                hint="use add_norm_(model, 'layer') for Linear layers",
            )
        norm = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)[nd - 1](c, affine=True)
    if isinstance(norm, _FeatureCheck):
        norm.layer = name
    norm.train(layer.training)
    return norm.to(device=w.device, dtype=w.dtype), c, g


def _describe(norm: nn.Module) -> str:
    """``BatchNorm1d(64)``, ``GroupNorm(16, 64)``, ``LayerNorm(64)``."""
    base = type(norm).__mro__[2] if isinstance(norm, _FeatureCheck) else type(norm)
    if isinstance(norm, nn.GroupNorm):
        return f"{base.__name__}({norm.num_groups}, {norm.num_channels})"
    width = norm.normalized_shape[0] if isinstance(norm, nn.LayerNorm) else norm.num_features
    return f"{base.__name__}({width})"


def _is_sequential(m: nn.Module) -> bool:
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


def add_norm_(
    model: nn.Module,
    kind: Kind,
    *,
    position: Position = "before_activation",
    optimizer: torch.optim.Optimizer | None = None,
) -> NormRecord:
    """Insert a ``kind`` normaliser after every Linear/ConvNd that feeds an activation.

    Args:
        model: any ``nn.Module`` (Sequential, nested Sequential, or a custom forward).
        kind: ``"batch"``, ``"layer"``, ``"group"`` or ``"instance"`` (table in the module doc).
        position: ``"before_activation"`` (layer -> norm -> activation) or ``"after_activation"``.
        optimizer: the norms' γ and β are added to it (``add_param_group``, hyper-parameters of
            the first group).

    Returns:
        :class:`NormRecord`: one :class:`Inserted` per norm; ``record.model`` is the model to use.

    Raises:
        ConfigError: unknown ``kind``/``position``, or ``"instance"`` after a Linear.
        UnsupportedModelError: no Linear/Conv feeds an activation, or ``model`` is no module.
    """
    if kind not in KINDS:
        raise ConfigError(f"unknown norm kind {kind!r}", hint="choose one of: " + ", ".join(KINDS))
    if position not in POSITIONS:
        raise ConfigError(f"unknown position {position!r}", hint="choose one of: " + ", ".join(POSITIONS))
    S.check_optimizer(optimizer)
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"add_norm_ needs an nn.Module, got {type(model).__name__}")
    after = position == "after_activation"
    root = model
    inserted: list[tuple[Inserted, nn.Module]] = []
    skipped: list[Skipped] = []
    rewritten: list[str] = []
    norms: list[nn.Module] = []
    # children before parents: a parent's change (Sequential indices shift, GraphModule) then
    # never invalidates a name still to be used
    for name, mod in reversed(list(model.named_modules())):
        if _is_sequential(mod):
            _sequential(name, mod, kind, after, inserted, skipped, norms)
        elif not S.is_builtin(mod) and S.activation_of(mod) is None:
            new = _custom(name, mod, kind, after, inserted, skipped, norms)
            if new is not None:
                rewritten.append(name)
                if name:
                    S.set_submodule(root, name, new)
                else:
                    root = new
    if not inserted:
        why = "; ".join(f"{s.layer or '<model>'}: {s.reason}" for s in skipped[:4])
        raise UnsupportedModelError(
            f"{type(model).__name__} has no Linear/Conv layer whose output feeds an activation"
            + (f" ({why})" if why else ""),
            hint="add_norm_ puts a norm between a weight layer and its activation; insert it by "
            "hand where the model has none",
        )
    added = S.add_to_optimizer(optimizer, (p for n in norms for p in n.parameters()))
    final = {id(m): n for n, m in root.named_modules()}
    entries = tuple(replace(e, norm=final.get(id(m), e.norm)) for e, m in reversed(inserted))
    return NormRecord(kind, position, entries, tuple(reversed(skipped)), tuple(reversed(rewritten)), added, root)


def _sequential(prefix: str, seq: nn.Sequential, kind: str, after: bool,
                inserted: list[tuple[Inserted, nn.Module]], skipped: list[Skipped],
                norms: list[nn.Module]) -> None:
    # positions in ``_modules`` (what insert and the rebuild below index), a shared child
    # counted at each of its places
    children = [(k, m) for k, m in seq._modules.items() if m is not None]
    plan: list[tuple[int, nn.Module, str, str, int, int | None]] = []
    for i, (cname, child) in enumerate(children[:-1]):
        if not isinstance(child, S.WEIGHT_LAYERS):
            continue
        nxt = children[i + 1][1]
        lname = S.join(prefix, cname)
        if isinstance(nxt, S.NORMS):
            skipped.append(Skipped(lname, f"already followed by {type(nxt).__name__}"))
            continue
        act = S.activation_of(nxt)
        if act is None:
            continue
        if after and i + 2 < len(children) and isinstance(children[i + 2][1], S.NORMS):
            skipped.append(Skipped(lname, "its activation is already followed by a norm"))
            continue
        norm, c, g = _make(kind, child, lname)
        plan.append((i + 2 if after else i + 1, norm, lname, act, c, g))
    if len(children) == len(seq._modules) and all(k.isdigit() for k in seq._modules):
        for index, norm, *_ in reversed(plan):
            seq.insert(index, norm)
    elif plan:
        # named children (Sequential(OrderedDict(...))): nn.Sequential.insert renumbers by
        # index and fails on names; rebuild the children in order, keep every name, and name
        # each norm after its layer ("fc1" -> "fc1_norm", "fc1_norm_1" if taken)
        at = {index: norm for index, norm, *_ in plan}
        taken = set(seq._modules)
        rebuilt: dict[str, nn.Module] = {}
        for i, (cname, child) in enumerate(children):
            if i in at:
                rebuilt[_new_name(children[i - (2 if after else 1)][0], taken)] = at[i]
            rebuilt[cname] = child
        if len(children) in at:  # after the last child (its activation closes the Sequential)
            rebuilt[_new_name(children[-2][0], taken)] = at[len(children)]
        seq._modules = rebuilt  # type: ignore[assignment]
    for _, norm, lname, act, c, g in reversed(plan):  # reversed back at the end
        norms.append(norm)
        inserted.append((Inserted(lname, act, "", _describe(norm), c, g, "sequential"), norm))


def _new_name(layer: str, taken: set[str]) -> str:
    """``<layer>_norm`` (``_1``, ``_2``, ... if taken), added to ``taken``."""
    name, i = f"{layer}_norm", 0
    while name in taken:
        i += 1
        name = f"{layer}_norm_{i}"
    taken.add(name)
    return name


def _custom(name: str, mod: nn.Module, kind: str, after: bool,
            inserted: list[tuple[Inserted, nn.Module]],
            skipped: list[Skipped], norms: list[nn.Module]) -> nn.Module | None:
    """Insert norms in a custom module's own forward; returns its GraphModule if one was needed."""
    graph, reason = S.trace_own(mod)
    if graph is None:
        if any(isinstance(c, S.WEIGHT_LAYERS) for c in mod.children()):
            skipped.append(Skipped(name, f"forward does not trace with torch.fx ({reason})"))
        return None
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    wraps: list[tuple[str, nn.Module, str, str, int, int | None]] = []
    edits: list[tuple[torch.fx.Node, torch.fx.Node, nn.Module, str, str, int, int | None]] = []
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        layer = mod.get_submodule(str(node.target))
        if not isinstance(layer, S.WEIGHT_LAYERS):
            continue
        lname = S.join(name, str(node.target))
        users = list(node.users)
        norm_users = [u for u in users if u.op == "call_module"
                      and isinstance(mod.get_submodule(str(u.target)), S.NORMS)]
        if norm_users:
            skipped.append(Skipped(lname, "already followed by a norm"))
            continue
        acts = [(u, _node_activation(mod, u)) for u in users]
        acts = [(u, a) for u, a in acts if a is not None]
        if len(acts) != 1:
            continue
        act_node, act_or_none = acts[0]
        act = str(act_or_none)
        norm, c, g = _make(kind, layer, lname)
        norms.append(norm)
        target = str(act_node.target) if after else str(node.target)
        simple = calls.get(target, 0) == 1 and (after and act_node.op == "call_module" or not after
                                         and len(users) == 1)
        if simple:
            wraps.append((target, norm, lname, act, c, g))
        else:
            edits.append((node, act_node, norm, lname, act, c, g))
    found: list[tuple[Inserted, nn.Module]] = []
    for target, norm, lname, act, c, g in wraps:
        S.set_submodule(mod, target, nn.Sequential(mod.get_submodule(target), norm))
        found.append((Inserted(lname, act, "", _describe(norm), c, g, "wrap"), norm))
    if not edits:
        inserted += reversed(found)
        return None
    gm = S.graph_module(mod, graph)
    for node, act_node, norm, lname, act, c, g in edits:
        attr = S.free_name(gm, f"{node.name}_norm")
        gm.add_submodule(attr, norm)
        if after:
            with gm.graph.inserting_after(act_node):
                new = gm.graph.call_module(attr, (act_node,))
            _redirect(act_node, new)
        else:
            with gm.graph.inserting_after(node):
                new = gm.graph.call_module(attr, (node,))
            act_node.replace_input_with(node, new)
        found.append((Inserted(lname, act, "", _describe(norm), c, g, "fx"), norm))
    inserted += reversed(found)
    gm.recompile()
    return gm


def _redirect(old: torch.fx.Node, new: torch.fx.Node) -> None:
    """Every user of ``old`` but ``new`` itself reads ``new`` instead."""
    for user in list(old.users):
        if user is not new:
            user.replace_input_with(old, new)


def _node_activation(mod: nn.Module, node: torch.fx.Node) -> str | None:
    if node.op == "call_module":
        return S.activation_of(mod.get_submodule(str(node.target)))
    return S.function_activation(node)


__all__ = ["KINDS", "POSITIONS", "Inserted", "Kind", "NormRecord", "Position", "Skipped",
           "add_norm_", "groups_for"]
