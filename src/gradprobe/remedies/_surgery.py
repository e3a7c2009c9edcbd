"""Module surgery shared by the model-changing remedies (swap, norm, residual, pretrain, standardise).

- which modules are weight layers, normalisers and activations (activations from the one table in
  :mod:`gradprobe.activations`, plus third-party classes named after a table entry, such as
  transformers' ``GELUActivation``);
- replacing a submodule in its parent, or the root (which cannot be replaced in place: the caller
  hands the new object back as the record's ``model``);
- tracing one module's *own* forward with :mod:`torch.fx`, every child a leaf, so that a child
  whose forward does not trace never stops its parent from being rewritten, and a rewrite keeps
  every other module (and its class) as it was;
- adding new parameters to the user's optimizer;
- :class:`ChangeRecord`, what the records of those remedies share (the modules rewritten with
  torch.fx, the tensors added to the optimizer) and the lines their ``str()`` prints for it;
  :class:`ListedChanges`, a record that iterates over its changes.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Iterator, Sequence
from typing import ClassVar, Generic, TypeVar

import torch
from torch import nn

from gradprobe import activations
from gradprobe.errors import ConfigError
from gradprobe.layers import CONV as _CONV
from gradprobe.layers import WEIGHT_LAYERS as _WEIGHT_LAYERS
from gradprobe.layers import function_table as _function_table

WEIGHT_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, *_CONV)
"""Feed-forward weight layers a remedy can put a normaliser after or wrap in a residual block."""
ALL_WEIGHT_LAYERS = _WEIGHT_LAYERS
NORMS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)
DROPOUTS: tuple[type[nn.Module], ...] = (nn.modules.dropout._DropoutNd,)


def activation_of(module: nn.Module) -> str | None:
    """The table name of an activation module, or None.

    Matched through the table (MRO), then by class name for parameter-free third-party
    activation modules: ``GELUActivation`` -> ``"gelu"``, ``SiLUActivation`` -> ``"silu"``.
    """
    spec = activations.spec_for_module(module)
    if spec is not None:
        return spec.name
    name = type(module).__name__.lower().removesuffix("activation")
    if name in activations.ACTIVATIONS and name != "identity" and not list(module.parameters()):
        return name
    return None


def function_activation(node: torch.fx.Node) -> str | None:
    """The table name of a functional activation call (``torch.tanh(x)``, ``F.relu``, ``x.sigmoid()``)."""
    if node.op == "call_function":
        return _FUNCTIONS.get(node.target)
    if node.op == "call_method":
        name = str(node.target).rstrip("_")
        if name in activations.ACTIVATIONS and name != "identity":
            return name
    return None


_FUNCTIONS = _function_table()


def is_builtin(module: nn.Module) -> bool:
    """A module class from torch itself (its forward holds no user code to rewrite)."""
    return type(module).__module__.startswith("torch.")


def join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule ``name`` (dotted, not the root) of ``root`` by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def free_name(module: nn.Module, base: str) -> str:
    """An attribute name on ``module`` not yet taken: ``base``, ``base_1``, ..."""
    base = base.replace(".", "_")
    name, i = base, 0
    while hasattr(module, name):
        i += 1
        name = f"{base}_{i}"
    return name


class _OwnTracer(torch.fx.Tracer):
    """Traces only the root's own forward: every submodule call stays one ``call_module`` node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def trace_own(module: nn.Module) -> tuple[torch.fx.Graph | None, str]:
    """The fx graph of ``module``'s own forward, or ``(None, reason)`` if it does not trace."""
    if isinstance(module, torch.fx.GraphModule):
        return module.graph, ""
    try:
        return _OwnTracer().trace(module), ""
    except Exception as exc:  # data-dependent control flow, unsupported ops, ...
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"


def graph_module(module: nn.Module, graph: torch.fx.Graph) -> torch.fx.GraphModule:
    """A GraphModule running ``graph`` on ``module``'s own submodules and parameters (shared objects)."""
    graph.lint()
    gm = torch.fx.GraphModule(module, graph, class_name=type(module).__name__)
    gm.train(module.training)
    return gm


def match(name: str, patterns: Sequence[str] | None) -> bool:
    return patterns is None or any(fnmatch.fnmatchcase(name, p) for p in patterns)


def check_patterns(where: str | Sequence[str] | None, arg: str = "where") -> tuple[str, ...] | None:
    if where is None:
        return None
    if isinstance(where, str):
        return (where,)
    if not isinstance(where, Sequence) or not all(isinstance(p, str) for p in where) or not where:
        raise ConfigError(
            f"{arg}= must be a module-name pattern or a non-empty list of them, got {where!r}",
            hint=f"e.g. {arg}='encoder.*' or {arg}=['0', '2'] (fnmatch patterns on named_modules())",
        )
    return tuple(where)


def check_optimizer(optimizer: object) -> None:
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(
            f"optimizer= must be a torch.optim.Optimizer, got {type(optimizer).__name__}",
            hint="pass the optimizer that trains the model, so the new parameters are trained too",
        )


def add_to_optimizer(
    optimizer: torch.optim.Optimizer | None, params: Iterable[nn.Parameter]
) -> int:
    """Add ``params`` (those not in it yet) to ``optimizer`` as one new parameter group.

    The group copies the first group's hyper-parameters (lr, momentum, weight decay, ...) except
    ``params``. Returns how many tensors were added.
    """
    if optimizer is None:
        return 0
    have = {id(p) for g in optimizer.param_groups for p in g["params"]}
    new = [p for p in {id(p): p for p in params}.values() if id(p) not in have and p.requires_grad]
    if new:
        group = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
        optimizer.add_param_group({"params": new, **group})
    return len(new)


def count(params: Iterable[nn.Parameter]) -> int:
    return sum(p.numel() for p in {id(p): p for p in params}.values())


class ChangeRecord:
    """Base of the records of the remedies that change a model's modules (``add_norm_``,
    ``residual_``, ``swap_activations_``), each a frozen dataclass declaring the two fields:

    ``rewritten``: the modules replaced by a GraphModule (``""`` is the root: use ``model``);
    ``added_to_optimizer``: the new parameter tensors added to the optimizer.
    """

    rewritten: tuple[str, ...]
    added_to_optimizer: int

    def _text(self, head: str, changes: Iterable[str], notes: Iterable[str] = ()) -> str:
        """``str()`` of a record: ``head``, one indented line per change, the torch.fx
        rewrites, the ``notes`` (what was skipped or done besides), the optimizer's new tensors."""
        lines = [head, *(f"  {c}" for c in changes)]
        lines += [f"  rewritten with torch.fx: {r or '<model> (use record.model)'}"
                  for r in self.rewritten]
        lines += [f"  {n}" for n in notes]
        if self.added_to_optimizer:
            lines.append(f"  {self.added_to_optimizer} new parameter tensors added to the optimizer")
        return "\n".join(lines)


E = TypeVar("E")


class ListedChanges(ChangeRecord, Generic[E]):
    """A :class:`ChangeRecord` that is the sequence of its changes: ``for e in record`` and
    ``len(record)`` run over the field named by ``_entries`` (``add_norm_``'s ``inserted``,
    ``residual_``'s ``wrapped``)."""

    _entries: ClassVar[str]

    def __iter__(self) -> Iterator[E]:
        return iter(getattr(self, self._entries))

    def __len__(self) -> int:
        return len(getattr(self, self._entries))


__all__ = [
    "ALL_WEIGHT_LAYERS", "DROPOUTS", "NORMS", "WEIGHT_LAYERS", "ChangeRecord", "ListedChanges", "activation_of",
    "add_to_optimizer", "check_optimizer", "check_patterns", "count", "free_name",
    "function_activation", "graph_module", "is_builtin", "join", "match", "set_submodule",
    "trace_own",
]
