"""Which module consumes which, as measured: the data flow of preflight's one pass.

A hook's input object *is* the clone an earlier hook returned (:mod:`gradprobe.theory.measure`),
so tensor identity gives each call's producer. Shape-only modules (Flatten, Unflatten, Identity,
Dropout in eval mode or with ``p = 0``) are looked through.

:func:`link` maps each weight layer (the dense layers of :mod:`gradprobe.layers`) to mean-field
theory: the activation that is the *only* consumer of its output (or ``identity`` where the
output is the model's), and the weight layer that is the only consumer of that activation's
output. This is a stricter question than :func:`gradprobe.layers.activation_after`, which names
the first activation after a layer in execution order (to choose an initialisation gain, with a
norm or a residual join in between): theory needs the activation to act on this layer's output
directly and alone (docs/design.md, "Two activation finders").
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from gradprobe import activations
from gradprobe.layers import DENSE
from gradprobe.theory.measure import Measurement

WEIGHT_TYPES = DENSE
"""Theory covers the dense weight layers of the one table."""
SHAPE_ONLY: tuple[type[nn.Module], ...] = (nn.Flatten, nn.Unflatten, nn.Identity)


def transparent(module: nn.Module) -> bool:
    """Whether the module only reshapes (or is an inactive dropout)."""
    if isinstance(module, SHAPE_ONLY):
        return True
    return isinstance(module, nn.Dropout) and (not module.training or module.p == 0.0)


class Dataflow:
    """Producers and consumers of the recorded calls, through shape-only modules."""

    def __init__(self, m: Measurement) -> None:
        self.records = m.records
        self._index_of_out = {id(r.out_obj): i for i, r in enumerate(m.records)
                              if r.out_obj is not None}
        self._model_out_id = id(m.out) if isinstance(m.out, Tensor) else None
        self.consumers: dict[int, list[int]] = {}
        for i, r in enumerate(m.records):
            if transparent(r.module):
                continue
            j = self.source(i)
            if j is not None:
                self.consumers.setdefault(j, []).append(i)

    def source(self, i: int) -> int | None:
        """Index of the record producing record ``i``'s input, through shape-only modules."""
        x = self.records[i].in_obj
        j = None if x is None else self._index_of_out.get(id(x))
        while j is not None and transparent(self.records[j].module):
            x = self.records[j].in_obj
            j = None if x is None else self._index_of_out.get(id(x))
        return j

    def reaches_output(self, i: int) -> bool:
        """Whether record ``i``'s output is (through shape-only modules) the model's output."""
        if self._model_out_id is None:
            return False
        if id(self.records[i].out_obj) == self._model_out_id:
            return True
        return any(
            transparent(r.module) and r.in_obj is self.records[i].out_obj
            and self.reaches_output(k)
            for k, r in enumerate(self.records)
        )


@dataclass
class Links:
    """For weight layer ``i``: ``act_of[i] = (activation, index of its call or None)``,
    ``next_of[i]`` the next weight layer, ``notes_of[i]`` why theory does not apply."""

    act_of: dict[int, tuple[activations.ActivationSpec, int | None]] = field(default_factory=dict)
    next_of: dict[int, int] = field(default_factory=dict)
    notes_of: dict[int, str] = field(default_factory=dict)


def link(flow: Dataflow) -> Links:
    """Which activation follows each weight layer, and which weight layer follows that."""
    recs, links = flow.records, Links()
    for i, r in enumerate(recs):
        if not isinstance(r.module, WEIGHT_TYPES):
            continue
        cons = flow.consumers.get(i, [])
        if not cons and flow.reaches_output(i):
            links.act_of[i] = (activations.get("identity"), None)
            continue
        if len(cons) != 1:
            links.notes_of[i] = (
                "output used by several modules (residual/branch)" if cons else
                "output not consumed by a module (functional op?)"
            )
            continue
        a = cons[0]
        spec = activations.spec_for_module(recs[a].module)
        if spec is None:
            links.notes_of[i] = f"followed by {type(recs[a].module).__name__}"
            continue
        links.act_of[i] = (spec, a)
        nxt = flow.consumers.get(a, [])
        if (len(nxt) == 1 and isinstance(recs[nxt[0]].module, WEIGHT_TYPES)
                and not flow.reaches_output(a)):
            links.next_of[i] = nxt[0]
    return links


__all__ = ["SHAPE_ONLY", "WEIGHT_TYPES", "Dataflow", "Links", "link", "transparent"]
