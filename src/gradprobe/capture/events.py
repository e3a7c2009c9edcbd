"""Non-finite events: which layer and pass a NaN/Inf of a step is reported at.

One event per step, naming the first (layer, kind) record in execution order: the forward
pass (activations, in the order they were first touched), then the loss, then the backward
pass (activation gradients, then parameter gradients), then the weights. The full tier
(:class:`gradprobe.capture.recorder.Recorder`) knows every record of a full step; the always-on
tier (:mod:`gradprobe.capture.always`) knows, every step, which layers' outputs, gradients and
which loss were non-finite, and reports the first of them in the same order (its gradients
deepest layer first: a NaN born in the backward pass reaches every layer below it).

The always-on tier sees parameter gradients, not output gradients, so it infers the pass of a
NaN born in the backward pass: with every output finite, when the deepest layer ``L`` whose
gradient is non-finite has every layer with parameters below it non-finite too, the gradient
flowing into ``L``'s output was (its weights' gradient and the gradient it passes down both
come from it), and the event says ``act_grad`` with ``inferred: True``; when the layers below
stayed finite, the NaN was born in ``L``'s own parameter gradient: ``grad``. A NaN that enters
the output gradient of a layer without parameters (an activation) is reported at the nearest
layer with parameters below it, whose output gradient it also makes non-finite.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

PASS_OF_KIND = {"input": "forward", "act": "forward", "act_grad": "act_grad", "grad": "grad",
                "weight": "weight", "update": "weight", "drift": "weight", "spread": "weight"}
PASS_ORDER = {"forward": 0, "loss": 1, "act_grad": 2, "grad": 3, "weight": 4}


def full_event(rows: Sequence[Any], step: int, nonfinite: np.ndarray, touched: np.ndarray,
               seq: np.ndarray, skipped: bool, extra: dict[str, Any], loss_bad: bool = False
               ) -> dict[str, Any] | None:
    """The event of one full step from its records' non-finite counts (``rows``: the
    recorder's :class:`~gradprobe.capture.recorder.RowInfo` table; ``touched`` and ``seq``:
    the step's written records and their first-touch order); ``None`` if none is non-finite.
    ``loss_bad``: the step's loss was non-finite; the event is the loss's when no output was
    non-finite before it (the records do not hold the loss, and a NaN loss makes every
    gradient below it NaN)."""
    hit = np.flatnonzero((nonfinite > 0) & touched)
    if hit.size == 0:
        return None
    first = int(min(hit, key=lambda r: (PASS_ORDER[PASS_OF_KIND[rows[int(r)].kind]],
                                        int(seq[r]))))
    info = rows[first]
    if loss_bad and PASS_ORDER[PASS_OF_KIND[info.kind]] > PASS_ORDER["loss"]:
        return {
            "type": "nonfinite", "step": int(step), "layer": None, "layer_id": -1,
            "pass": "loss", "kind": "loss", "nonfinite": -1, "n_layers": int(hit.size),
            "amp_skipped": bool(skipped), **extra,
        }
    return {
        "type": "nonfinite",
        "step": int(step),
        "layer": info.layer,
        "layer_id": info.layer_id,
        "pass": PASS_OF_KIND[info.kind],
        "kind": info.kind,
        "nonfinite": int(nonfinite[first]),
        "n_layers": int(hit.size),
        "amp_skipped": bool(skipped),
        **extra,
    }


def always_event(step: int, names: Sequence[str], layer_ids: Sequence[int],
                 depth: Sequence[int], act_bad: np.ndarray, grad_bad: np.ndarray,
                 loss_bad: bool, skipped: bool, has_grad: np.ndarray | None = None
                 ) -> dict[str, Any] | None:
    """The event of one step from the always-on tier's flags (per layer: its output, its
    parameters' gradients; the loss). The layer is the first in the forward pass whose output
    was non-finite, else the loss, else the deepest layer whose gradient was; its pass is
    inferred as the module docstring says where ``has_grad`` (per layer: it has parameters
    with gradient norms) is given. ``nonfinite`` is ``-1``: the always-on tier flags, it does
    not count."""
    acts = np.flatnonzero(act_bad)
    grads = np.flatnonzero(grad_bad)
    n = int(acts.size + grads.size + int(loss_bad))
    if n == 0:
        return None
    inferred = False
    if acts.size:
        i: int | None = int(min(acts, key=lambda j: depth[int(j)]))
        pas, kind = "forward", "act"
    elif loss_bad:
        i, pas, kind = None, "loss", "loss"
    else:
        i = int(max(grads, key=lambda j: depth[int(j)]))
        pas, kind = "grad", "grad"
        if has_grad is not None:
            below = [j for j in np.flatnonzero(has_grad) if depth[int(j)] < depth[i]]
            if below and all(grad_bad[j] for j in below):
                pas, kind, inferred = "act_grad", "act_grad", True
    return {
        "type": "nonfinite",
        "step": int(step),
        "layer": names[i] if i is not None else None,
        "layer_id": layer_ids[i] if i is not None else -1,
        "pass": pas,
        "kind": kind,
        "nonfinite": -1,
        "n_layers": int(acts.size + grads.size),
        "amp_skipped": bool(skipped),
        "tier": "always",
        **({"inferred": True} if inferred else {}),
    }


__all__ = ["PASS_OF_KIND", "PASS_ORDER", "always_event", "full_event"]
