"""Swap saturating activations for rectifiers: :func:`swap_activations_`.

Why
    A sigmoid's derivative is at most 1/4 (``σ' = σ(1-σ)``) and tanh's falls to 0 in its tails,
    so the gradient reaching layer ``l`` of a deep sigmoid network carries a product of factors
    ``≤ 1/4`` -- it vanishes geometrically with depth (Hochreiter 1991; Glorot & Bengio 2010).
    Rectifiers have derivative 1 on their active side (Glorot, Bordes & Bengio 2011, ReLU; Maas
    et al. 2013, Leaky ReLU; He et al. 2015, PReLU; Xu et al. 2015, RReLU; Clevert et al. 2016,
    ELU). SELU (Klambauer et al. 2017) additionally keeps activations at zero mean and unit
    variance through depth, *provided* the weights are LeCun-normal (``N(0, 1/fan_in)``) and
    dropout is AlphaDropout (which keeps that fixed point); with ``to="selu"`` both are done here.

Which activations are swapped
    By default the *saturating* ones: every entry of :data:`gradprobe.activations.ACTIVATIONS`
    with a saturation rule (sigmoid, tanh, hardtanh, relu6). ``from_=`` names others explicitly
    (``from_="gelu"``): a non-saturating activation is never swapped silently, and asking for it
    through ``where=`` alone is a :class:`~gradprobe.errors.ConfigError` that says so.

Modules and functional calls
    Activation *modules* (``nn.Sigmoid()``, also third-party classes named after a table entry,
    like transformers' ``GELUActivation``) are replaced in their parent. *Functional* calls in a
    custom ``forward`` (``torch.sigmoid(x)``, ``F.tanh(x)``, ``x.sigmoid()``) are rewritten with
    :mod:`torch.fx`: each custom module's own forward is traced with every child kept as one call
    (so an untraceable child never blocks its parent), the call is replaced by a new activation
    module, and the module is replaced in its parent by the resulting ``GraphModule`` (its
    submodules, parameters and their names are the same objects; methods other than ``forward``
    are not carried over). If the rewritten module is the model itself it cannot be replaced in
    place: **use ``record.model``** (the same object unless the root was rewritten). A module whose
    forward does not trace is listed in ``record.not_swapped`` with each call found in its source
    and the tracing error. ``x.sigmoid_()`` (in place) becomes an out-of-place call.

Example
    >>> import torch
    >>> from torch import nn
    >>> from gradprobe.remedies import swap_activations_
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    >>> rec = swap_activations_(net, "relu")
    >>> [(s.name, s.old, s.new) for s in rec.swapped]
    [('1', 'sigmoid', 'relu'), ('3', 'tanh', 'relu')]
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
from torch import nn

from gradprobe import activations
from gradprobe.errors import ConfigError, UnsupportedModelError
from gradprobe.layers import following_activation as _following_activation
from gradprobe.layers import registration_order as _registration_order
from gradprobe.layers import trace_order as _trace_order
from gradprobe.remedies import _surgery as S
from gradprobe.remedies.init import init_

To = Literal["relu", "leaky_relu", "prelu", "rrelu", "elu", "selu"]
TO: tuple[str, ...] = get_args(To)
SATURATING: tuple[str, ...] = tuple(
    n for n, s in activations.ACTIVATIONS.items() if s.saturated is not None
)
"""The activations swapped by default: those the table gives a saturation rule."""


@dataclass(frozen=True)
class Swapped:
    """One activation replaced: ``how`` is ``"module"`` or ``"fx"`` (a functional call rewritten)."""

    name: str
    old: str
    new: str
    how: Literal["module", "fx"]


@dataclass(frozen=True)
class NotSwapped:
    """A functional call left alone because its module's forward does not trace."""

    module: str
    call: str
    reason: str


@dataclass(frozen=True)
class SwapRecord(S.ChangeRecord):
    """What :func:`swap_activations_` changed. ``model`` is the model to use from now on."""

    to: str
    sources: tuple[str, ...]
    swapped: tuple[Swapped, ...]
    not_swapped: tuple[NotSwapped, ...] = ()
    rewritten: tuple[str, ...] = ()
    """Modules replaced by a GraphModule (``""`` is the root: use ``model``)."""
    reinitialised: tuple[str, ...] = ()
    """Layers re-initialised LeCun-normal (``to="selu"``)."""
    dropouts: tuple[str, ...] = ()
    """Dropout modules replaced by AlphaDropout / FeatureAlphaDropout (``to="selu"``)."""
    added_to_optimizer: int = 0
    model: nn.Module | None = field(default=None, repr=False, compare=False)

    def __str__(self) -> str:
        notes = [f"NOT swapped in {n.module or '<model>'}: {n.call} ({n.reason})"
                 for n in self.not_swapped]
        if self.reinitialised:
            notes.append("LeCun-normal re-initialised: " + ", ".join(self.reinitialised))
        if self.dropouts:
            notes.append("Dropout -> AlphaDropout: " + ", ".join(self.dropouts))
        return self._text(f"swap_activations_ -> {self.to}: {len(self.swapped)} swapped",
                          (f"{s.name or '<model>'}: {s.old} -> {s.new} ({s.how})"
                           for s in self.swapped), notes)


def _factory(to: str) -> nn.Module:
    factories: dict[str, Callable[[], nn.Module]] = {
        "relu": nn.ReLU, "leaky_relu": lambda: nn.LeakyReLU(0.01), "prelu": nn.PReLU,
        "rrelu": lambda: nn.RReLU(activations.RRELU_LOWER, activations.RRELU_UPPER),
        "elu": nn.ELU, "selu": nn.SELU,
    }
    return factories[to]()


def _check(to: str, from_: str | Sequence[str] | None) -> tuple[str, ...]:
    if to not in TO:
        raise ConfigError(f"to={to!r} is not an activation swap_activations_ can put in",
                          hint="choose one of: " + ", ".join(TO))
    if from_ is None:
        return SATURATING
    names = (from_,) if isinstance(from_, str) else tuple(from_)
    if not names or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"from_= must be an activation name or a list of them, got {from_!r}",
                          hint="e.g. from_='gelu' or from_=['sigmoid', 'tanh']")
    out = tuple(activations.get(n).name for n in names)  # unknown name -> ConfigError
    if to in out:
        raise ConfigError(f"from_={from_!r} includes the target to={to!r}: nothing to swap",
                          hint="leave the target out of from_=")
    if "identity" in out:
        raise ConfigError("from_='identity' would turn linear layers nonlinear",
                          hint="name real activations in from_=")
    return out


def swap_activations_(
    model: nn.Module,
    to: To,
    *,
    where: str | Sequence[str] | None = None,
    from_: str | Sequence[str] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> SwapRecord:
    """Replace the saturating activations of ``model`` (modules and traceable functional calls).

    Args:
        model: any ``nn.Module``.
        to: ``"relu"``, ``"leaky_relu"`` (slope 0.01), ``"prelu"`` (one learned slope per
            module, init 0.25), ``"rrelu"`` (slopes U(1/8, 1/3)), ``"elu"`` or ``"selu"``.
        where: ``fnmatch`` patterns on module names; only activations whose module name (for a
            functional call: the name of the module whose forward makes it) matches are swapped.
        from_: activation names to swap instead of the saturating ones (e.g. ``"gelu"``).
        optimizer: PReLU's new slopes are added to it (``add_param_group``, hyper-parameters of
            the first group).

    Returns:
        :class:`SwapRecord`; ``record.model`` is the model to use (the same object unless the
        model's own forward was rewritten through fx).

    Raises:
        ConfigError: unknown ``to``/``from_``, a ``where`` pattern matching no module, or nothing
            to swap (the message lists the activations the model has and the fix).
        UnsupportedModelError: ``model`` is not an ``nn.Module``.
    """
    sources = _check(to, from_)
    patterns = S.check_patterns(where)
    S.check_optimizer(optimizer)
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"swap_activations_ needs an nn.Module, got {type(model).__name__}")

    root = model
    swapped: list[Swapped] = []
    new_modules: list[nn.Module] = []
    others: dict[str, str] = {}
    named = list(model.named_modules())
    if patterns is not None:
        for p in patterns:
            if not any(S.match(n, (p,)) for n, _ in named):
                raise ConfigError(f"where={p!r} matches no module of {type(model).__name__}",
                                  hint="module names are: " + ", ".join(n for n, _ in named if n)[:400])
    for name, mod in named:
        act = S.activation_of(mod)
        if act is None or not S.match(name, patterns):
            continue
        if act not in sources:
            if act != to:
                others[name] = act
            continue
        new = _factory(to)
        new.train(mod.training)
        if name:
            S.set_submodule(model, name, new)
        else:
            root = new
        new_modules.append(new)
        swapped.append(Swapped(name, act, to, "module"))

    # functional calls in custom forwards
    not_swapped: list[NotSwapped] = []
    rewritten: list[str] = []
    for name, mod in list(root.named_modules()):
        if S.is_builtin(mod) or S.activation_of(mod) is not None:
            continue
        graph, reason = S.trace_own(mod)
        if graph is None:
            if S.match(name, patterns):
                not_swapped += [NotSwapped(name, call, reason) for call in _calls_in_source(mod, sources)]
            continue
        hits = [n for n in graph.nodes if S.function_activation(n) in sources
                and (S.match(name, patterns) or S.match(S.join(name, n.name), patterns))]
        if not hits:
            continue
        gm = S.graph_module(mod, graph)
        for node in list(gm.graph.nodes):
            old = S.function_activation(node)
            if node.name not in {h.name for h in hits} or old is None:
                continue
            attr = S.free_name(gm, f"{to}_{node.name}")
            new = _factory(to)
            gm.add_submodule(attr, new)
            new_modules.append(new)
            with gm.graph.inserting_after(node):
                repl = gm.graph.call_module(attr, (node.args[0],))
            node.replace_all_uses_with(repl)
            gm.graph.erase_node(node)
            swapped.append(Swapped(S.join(name, attr), old, to, "fx"))
        gm.recompile()
        if name:
            S.set_submodule(root, name, gm)
        else:
            root = gm
        rewritten.append(name)

    if not swapped and not not_swapped:
        _nothing_to_swap(model, sources, others, to, from_ is not None)

    reinit: tuple[str, ...] = ()
    dropouts: list[str] = []
    if to == "selu" and swapped:
        reinit = _selu_layers(root, patterns)
        if reinit:
            init_(root, "lecun_normal", layers=list(reinit))
        for name, mod in list(root.named_modules()):
            if type(mod) in (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d) and S.match(name, patterns):
                alpha = nn.AlphaDropout if type(mod) is nn.Dropout else nn.FeatureAlphaDropout
                new_drop = alpha(p=mod.p)
                new_drop.train(mod.training)
                S.set_submodule(root, name, new_drop)
                dropouts.append(name)
    added = S.add_to_optimizer(optimizer, (p for m in new_modules for p in m.parameters()))
    return SwapRecord(to, sources, tuple(swapped), tuple(not_swapped), tuple(rewritten),
                      reinit, tuple(dropouts), added, root)


def _calls_in_source(mod: nn.Module, sources: tuple[str, ...]) -> list[str]:
    """Functional activation calls in a module's forward source (``torch.tanh(...)`` etc.)."""
    try:
        src = inspect.getsource(type(mod).forward)
    except (OSError, TypeError):  # no source (defined interactively): say the forward was not read
        return ["<forward source not available: any functional call in it>"]
    pattern = re.compile(r"(?<![\w.])((?:[A-Za-z_][\w]*\.)*(?:" + "|".join(sources) + r")_?)\s*\(")
    return [m.group(1) + "(...)" for m in pattern.finditer(src)
            if not m.group(1).startswith("self.") and not m.group(1)[:1].isupper()]


def _selu_layers(root: nn.Module, patterns: tuple[str, ...] | None) -> tuple[str, ...]:
    """Linear/Conv layers whose output feeds a SELU (execution order if the model traces)."""
    order = _trace_order(root) or _registration_order(root)
    following = _following_activation(order)
    mods = dict(root.named_modules())
    return tuple(n for n, act in following.items()
                 if act == "selu" and isinstance(mods.get(n), S.WEIGHT_LAYERS))


def _nothing_to_swap(model: nn.Module, sources: tuple[str, ...], others: dict[str, str],
                     to: str, explicit: bool) -> None:
    kinds = sorted(set(others.values()))
    where = f" (found: {', '.join(f'{n}={a}' for n, a in list(others.items())[:6])})" if others else ""
    if others and not explicit:
        raise ConfigError(
            f"{type(model).__name__} has no saturating activation ({', '.join(sources)}) to swap"
            f"{where}; {', '.join(kinds)} does not saturate",
            hint=f"to swap it anyway say so: swap_activations_(model, {to!r}, from_={kinds[0]!r})",
        )
    raise ConfigError(
        f"{type(model).__name__} has no {'/'.join(sources)} activation (module or traceable "
        f"functional call) to swap{where}",
        hint="check where=/from_=, or the model already uses non-saturating activations",
    )


__all__ = ["SATURATING", "TO", "NotSwapped", "SwapRecord", "Swapped", "To", "swap_activations_"]
