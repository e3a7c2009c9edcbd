"""Skip connections: :func:`residual_` turns same-shape blocks ``f`` into ``x + f(x)``.

Why
    With ``y = x + f(x)`` the Jacobian of a block is ``I + ∂f/∂x``, so the gradient reaching an
    early layer is a sum over paths that includes the identity path: it cannot vanish
    geometrically with depth the way a product of ``∂f/∂x`` factors does (He et al. 2016, "Deep
    Residual Learning"; "Identity Mappings in Deep Residual Networks"; Veit et al. 2016 on
    residual networks as ensembles of shallow paths).

Which blocks
    A block is a Linear/ConvNd followed by optional normalisers, an activation (required) and
    optional dropout. It is wrapped when it keeps the shape of its input: a Linear with
    ``in_features == out_features``; a ConvNd with ``in_channels == out_channels``, stride 1 and
    "same" padding (``padding="same"``, or ``2·padding == dilation·(kernel - 1)`` in every
    dimension). Each eligible block of a run of consecutive ones becomes its own residual block
    ``x + f(x)``; the first and last layers of a network, which change the width, stay as they are.

    - ``nn.Sequential`` (nested too): the block's children are replaced by one :class:`Residual`
      whose ``body`` is ``nn.Sequential`` of them (their parameters are the same objects, renamed
      ``<i>.body.<j>.``).
    - Other modules: the module's own forward is traced with :mod:`torch.fx` (children as leaves)
      and an addition of the layer's input is put after the activation; the module is replaced in
      its parent by the GraphModule, and for the model itself ``record.model`` is the one to use.

Note
    This changes the function the model computes (``x + f(x)``, not ``f(x)``): train it again.

Example
    >>> import torch
    >>> from torch import nn
    >>> from gradprobe.remedies import residual_
    >>> net = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
    ...                     nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))
    >>> rec = residual_(net)
    >>> [(w.children, w.at) for w in rec.wrapped]
    [(('2', '3'), '2'), (('4', '5'), '3')]
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch
from torch import Tensor, nn

from gradprobe.errors import UnsupportedModelError
from gradprobe.remedies import _surgery as S
from gradprobe.remedies.norm import _is_sequential, _redirect


class Residual(nn.Module):
    """``x + body(x)``: the identity skip of He et al. 2016 around a same-shape ``body``."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


@dataclass(frozen=True)
class Wrapped:
    """One block made residual: ``children`` of ``container`` (names before the call).

    ``at`` is where it is now: the path of the :class:`Residual` module (Sequential), or of the
    addition node in the rewritten forward (fx). ``run`` numbers runs of consecutive blocks.
    """

    container: str
    children: tuple[str, ...]
    at: str
    layer: str
    how: str  # "sequential" or "fx"
    run: int


@dataclass(frozen=True)
class ResidualRecord(S.ListedChanges[Wrapped]):
    """What :func:`residual_` changed. ``model`` is the model to use from now on."""

    wrapped: tuple[Wrapped, ...]
    rewritten: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()
    added_to_optimizer: int = 0
    model: nn.Module | None = field(default=None, repr=False, compare=False)
    _entries: ClassVar[str] = "wrapped"

    def __str__(self) -> str:
        def span(w: Wrapped) -> str:
            return w.children[0] if len(w.children) == 1 else f"{w.children[0]}..{w.children[-1]}"

        return self._text(
            f"residual_: {len(self.wrapped)} blocks wrapped as x + f(x)",
            (f"run {w.run}: {w.container or '<model>'}[{span(w)}] (layer {w.layer}) -> {w.at} "
             f"({w.how})" for w in self.wrapped),
            (f"skipped {s}" for s in self.skipped))


def keeps_shape(layer: nn.Module) -> bool:
    """A Linear with in == out features, or a stride-1 'same'-padded ConvNd with in == out channels."""
    if isinstance(layer, nn.Linear):
        return layer.in_features == layer.out_features
    if isinstance(layer, S.WEIGHT_LAYERS):
        conv = layer
        assert isinstance(conv, nn.Conv1d | nn.Conv2d | nn.Conv3d)
        if conv.in_channels != conv.out_channels or any(s != 1 for s in conv.stride):
            return False
        if conv.padding == "same":
            return True
        if isinstance(conv.padding, str):  # "valid"
            return all(k == 1 for k in conv.kernel_size)
        return all(2 * p == d * (k - 1) for p, d, k in
                   zip(conv.padding, conv.dilation, conv.kernel_size))
    return False


def _describe(layer: nn.Module) -> str:
    if isinstance(layer, nn.Linear):
        return f"Linear {layer.in_features}->{layer.out_features}"
    return f"{type(layer).__name__}({layer.extra_repr()})"


def residual_(model: nn.Module, *, optimizer: torch.optim.Optimizer | None = None) -> ResidualRecord:
    """Wrap every same-shape Linear/Conv (+ norm) + activation block of ``model`` as ``x + f(x)``.

    Args:
        model: any ``nn.Module`` (Sequential, nested Sequential, or a custom forward).
        optimizer: accepted for a uniform remedy signature; residual blocks add no parameters,
            and the existing ones are the same objects, so the optimizer keeps working unchanged.

    Returns:
        :class:`ResidualRecord` listing the wrapped spans; ``record.model`` is the model to use.

    Raises:
        UnsupportedModelError: no eligible block (the message lists what was found), or
            ``model`` is not an ``nn.Module``.
    """
    S.check_optimizer(optimizer)
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"residual_ needs an nn.Module, got {type(model).__name__}")
    root = model
    wrapped: list[tuple[Wrapped, nn.Module, str]] = []
    seen: list[str] = []
    skipped: list[str] = []
    rewritten: list[str] = []
    runs = [0]
    for name, mod in reversed(list(model.named_modules())):  # children first: names stay valid
        if _is_sequential(mod):
            _sequential(name, mod, wrapped, seen, runs)
        elif not S.is_builtin(mod) and S.activation_of(mod) is None:
            graph, reason = S.trace_own(mod)
            if graph is None:
                if any(isinstance(c, S.WEIGHT_LAYERS) for c in mod.children()):
                    skipped.append(f"{name or '<model>'}: forward does not trace ({reason})")
                continue
            new = _custom(name, mod, graph, wrapped, seen, runs)
            if new is not None:
                rewritten.append(name)
                if name:
                    S.set_submodule(root, name, new)
                else:
                    root = new
    if not wrapped:
        found = "; ".join(seen[:6]) or "no Linear/Conv followed by an activation"
        raise UnsupportedModelError(
            f"{type(model).__name__} has no block (Linear/Conv + optional norm + activation) that "
            f"keeps its input's shape, so none can become x + f(x) (found: {found})",
            hint="residual connections need in == out width (and stride 1, 'same' padding for "
            "convolutions); make the hidden layers square first",
        )
    final = {id(m): n for n, m in root.named_modules()}
    entries = [replace(w, at=S.join(final.get(id(obj), w.container), suffix))
               for w, obj, suffix in wrapped]
    entries.sort(key=lambda w: (w.run, w.children))
    return ResidualRecord(tuple(entries), tuple(reversed(rewritten)), tuple(reversed(skipped)), 0, root)


def _block_end(children: list[tuple[str, nn.Module]], i: int) -> int | None:
    """Index one past the block starting at weight layer ``i``, or None if no activation ends it."""
    j = i + 1
    while j < len(children) and isinstance(children[j][1], S.NORMS):
        j += 1
    if j >= len(children) or S.activation_of(children[j][1]) is None:
        return None
    j += 1
    while j < len(children) and isinstance(children[j][1], S.DROPOUTS):
        j += 1
    return j


def _sequential(prefix: str, seq: nn.Sequential, wrapped: list[tuple[Wrapped, nn.Module, str]],
                seen: list[str],
                runs: list[int]) -> None:
    children = list(seq.named_children())
    spans: list[tuple[int, int, int]] = []
    i, previous_end = 0, -1
    while i < len(children):
        layer = children[i][1]
        end = _block_end(children, i) if isinstance(layer, S.WEIGHT_LAYERS) else None
        if end is None:
            i += 1
            continue
        seen.append(f"{S.join(prefix, children[i][0])}: {_describe(layer)}")
        if keeps_shape(layer):
            if i != previous_end:
                runs[0] += 1
            spans.append((i, end, runs[0]))
            previous_end = end
        i = end
    if not spans:
        return
    new_children: list[nn.Module] = []
    k = 0
    for start, end, run in spans:
        new_children += [m for _, m in children[k:start]]
        names = tuple(n for n, _ in children[start:end])
        block = Residual(nn.Sequential(*[m for _, m in children[start:end]]))
        wrapped.append((Wrapped(prefix, names, "", S.join(prefix, children[start][0]),
                                "sequential", run), block, ""))
        new_children.append(block)
        k = end
    new_children += [m for _, m in children[k:]]
    for n, _ in children:
        delattr(seq, n)
    for idx, m in enumerate(new_children):
        seq.add_module(str(idx), m)


def _custom(name: str, mod: nn.Module, graph: torch.fx.Graph,
            wrapped: list[tuple[Wrapped, nn.Module, str]],
            seen: list[str], runs: list[int]) -> nn.Module | None:
    """Add ``+ x`` after each same-shape layer -> (norm) -> activation chain of ``mod``'s forward."""
    chains: list[tuple[torch.fx.Node, torch.fx.Node, list[str]]] = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(
            layer := mod.get_submodule(str(node.target)), S.WEIGHT_LAYERS
        ):
            continue
        cur, names = node, [str(node.target)]
        while len(cur.users) == 1:
            nxt = next(iter(cur.users))
            if nxt.op == "call_module" and isinstance(mod.get_submodule(str(nxt.target)), S.NORMS):
                cur = nxt
                names.append(str(nxt.target))
                continue
            break
        if len(cur.users) != 1:
            continue
        act = next(iter(cur.users))
        is_act = (S.activation_of(mod.get_submodule(str(act.target))) if act.op == "call_module"
                  else S.function_activation(act))
        if is_act is None:
            continue
        seen.append(f"{S.join(name, str(node.target))}: {_describe(layer)}")
        if keeps_shape(layer) and node.args and isinstance(node.args[0], torch.fx.Node):
            names.append(act.name if act.op != "call_module" else str(act.target))
            chains.append((node, act, names))
    if not chains:
        return None
    gm = S.graph_module(mod, graph)
    last_act: torch.fx.Node | None = None
    for node, act, names in chains:
        inp = node.args[0]
        if last_act is None or inp is not last_act:
            runs[0] += 1
        with gm.graph.inserting_after(act):
            add = gm.graph.call_function(operator.add, (inp, act))
        _redirect(act, add)
        last_act = add
        wrapped.append((Wrapped(name, tuple(names), "", S.join(name, str(node.target)), "fx",
                                runs[0]), gm, add.name))
    gm.recompile()
    return gm


__all__ = ["Residual", "ResidualRecord", "Wrapped", "keeps_shape", "residual_"]
