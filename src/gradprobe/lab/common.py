"""Helpers the lab's experiments share: building the MLPs they study and measuring the signals
through them.

Experiments import these from here, never from each other (``tests/test_layout.py``), so each
experiment module can be read, changed or removed on its own.

* :func:`sequential_mlp` and :func:`initialised_mlp`: ``fc1, act1, ..., fcL, actL[, out]``,
  built under a fixed seed and redrawn by :func:`gradprobe.remedies.init_`;
* :func:`propagate` and :class:`Signals`: one forward and backward pass keeping every hidden
  activation, its gradient and the preceding weight's gradient;
* :func:`saturated_fraction`, :func:`dead_fraction`: the activation table's saturation and
  dead-unit rules as fractions;
* :func:`classification_data` (``load_digits`` or ``make_moons`` with the head and loss to use),
  :func:`standardized_digits` (``load_digits``, pixels standardised) and :func:`running_mean`
  (the smoothing of loss curves, computed in ``run`` so that figures only draw);
* :func:`adam_curve`: Adam on cross-entropy over shuffled mini-batches, the loss at every step
  (for a number of epochs or of steps).

Example
    >>> import torch
    >>> from gradprobe.lab import common
    >>> model, _ = common.initialised_mlp([4, 8, 8], "tanh", "xavier_normal", seed=0)
    >>> sig = common.propagate(model, torch.randn(16, 4), generator=torch.Generator().manual_seed(0))
    >>> sig.names, [tuple(a.shape) for a in sig.acts]
    (['act1', 'act2'], [(16, 8), (16, 8)])
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn

from gradprobe import activations
from gradprobe.errors import ConfigError
from gradprobe.lab import data, train
from gradprobe.remedies.init import InitRecord, Scheme, init_


def sequential_mlp(
    sizes: list[int], activation: str, *, bias: bool = False, head: int | None = None
) -> nn.Sequential:
    """``fc1, act1, ..., fcL, actL`` (every Linear followed by the activation), plus an ``out``
    Linear of ``head`` units when given (a classifier's logits)."""
    spec = activations.get(activation)
    mods: OrderedDict[str, nn.Module] = OrderedDict()
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
        mods[f"fc{i}"] = nn.Linear(a, b, bias=bias)
        mods[f"act{i}"] = spec.factory()
    if head is not None:
        mods["out"] = nn.Linear(sizes[-1], head, bias=bias)
    return nn.Sequential(mods)


def initialised_mlp(
    sizes: list[int], activation: str, scheme: str, *, seed: int, bias: bool = False,
    head: int | None = None, options: Mapping[str, Any] | None = None,
) -> tuple[nn.Sequential, InitRecord]:
    """:func:`sequential_mlp` built under ``train.seeded(seed)``, then every weight redrawn by
    ``init_(model, scheme, generator=Generator().manual_seed(seed + 1), **options)``.

    The own generator makes the draw independent of the caller's global RNG and of the order
    the modules were built in. Returns the model and :func:`init_`'s record of the draw
    (``init_`` rejects an unknown ``scheme`` with a ConfigError).
    """
    with train.seeded(seed):
        model = sequential_mlp(sizes, activation, bias=bias, head=head)
    record = init_(model, cast(Scheme, scheme),
                   generator=torch.Generator().manual_seed(seed + 1), **dict(options or {}))
    return model, record


def classification_data(
    dataset: str, seed: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, int, train.LossName]:
    """``(x_train, y_train, x_test, y_test, outputs, loss)``: ``"digits"`` (``load_digits``
    split 70/30, 10 classes, cross-entropy) or ``"moons"`` (``make_moons``, 1000 points, noise
    0.1, split 50/50; one logit, binary cross-entropy), from ``seed``."""
    if dataset == "digits":
        xtr, ytr, xte, yte = data.digits(seed=seed)
        return xtr, ytr, xte, yte, 10, "cross_entropy"
    if dataset == "moons":
        xtr, ytr, xte, yte = data.moons(1000, noise=0.1, seed=seed)
        return xtr, ytr, xte, yte, 1, "bce"
    raise ConfigError(f"unknown dataset {dataset!r}", hint="use 'digits' or 'moons'")


def standardized_digits(seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``load_digits`` split 70/30 (:func:`gradprobe.lab.data.digits`), each pixel standardised
    with the training set's mean and std (constant pixels keep std 1)."""
    xtr, ytr, xte, yte = data.digits(seed=seed)
    mean, std = xtr.mean(0), xtr.std(0)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    return (xtr - mean) / std, ytr, (xte - mean) / std, yte


def running_mean(curve: np.ndarray, k: int) -> np.ndarray:
    """Running mean over the last ``k`` values (over the first ``i`` for ``i < k``), for loss
    curves drawn in figures; non-finite values stay non-finite, so they are not drawn."""
    if len(curve) < k:
        return curve
    out = np.convolve(curve, np.ones(k) / k, mode="full")[: len(curve)]
    out[: k - 1] = np.cumsum(curve[: k - 1]) / np.arange(1, k)
    return out


def adam_curve(
    model: nn.Module, x: Tensor, y: Tensor, *, batch: int, lr: float, seed: int,
    epochs: int | None = None, steps: int | None = None, min_batch: int = 1,
) -> np.ndarray:
    """Adam (``lr``) on the cross-entropy of ``model(x[idx])`` against ``y[idx]`` over shuffled
    mini-batches of ``batch``, a new permutation every epoch (:meth:`train.Loop.order`, so
    ``train.fit`` shuffles alike); the loss at every step, one host transfer at the end.

    Runs ``epochs`` epochs (every batch size sees the same examples, in ``epochs·n/batch`` steps)
    or, with ``steps``, exactly that many steps across as many epochs as it takes. Batches of
    fewer than ``min_batch`` examples are skipped (BatchNorm cannot train on one sample).
    """
    if (epochs is None) == (steps is None):
        raise ValueError("adam_curve: give epochs or steps, not both")
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses: list[Tensor] = []
    n = x.shape[0]
    model.train()
    epoch = 0
    while (len(losses) < steps) if steps is not None else (epoch < cast(int, epochs)):
        for idx in train.Loop.order(n, seed, epoch).split(batch):
            if len(losses) == steps:
                break
            if len(idx) < min_batch:
                continue
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        epoch += 1
    return torch.stack(losses).numpy().astype(float)


@dataclass
class Signals:
    """Per hidden layer (in depth order): the activation module's name and spec, its output
    ``acts[i]``, the gradient of the loss with respect to that output ``act_grads[i]``, and the
    gradient of the preceding Linear's weight ``weight_grads[i]``."""

    names: list[str]
    specs: list[activations.ActivationSpec]
    acts: list[Tensor] = field(default_factory=list)
    act_grads: list[Tensor] = field(default_factory=list)
    weight_grads: list[Tensor] = field(default_factory=list)
    output: Tensor | None = None


def propagate(
    model: nn.Sequential,
    x: Tensor,
    backward: Callable[[Tensor], Tensor] | None = None,
    *,
    generator: torch.Generator | None = None,
) -> Signals:
    """One forward and backward pass through a Sequential, keeping every activation and its
    gradient (``retain_grad`` on each activation output; the slow, obvious way).

    ``backward(output) -> loss``; when omitted, ``∂L/∂output ~ N(0, 1)`` elementwise
    (``loss = Σ output ⊙ g`` with a fixed Gaussian ``g``), the convention of signal-propagation
    studies. Gradients of the weights are taken and then cleared from the model.
    """
    h = x
    sig = Signals([], [])
    linears: list[nn.Linear] = []
    pending: nn.Linear | None = None
    for name, mod in model.named_children():
        h = mod(h)
        if isinstance(mod, nn.Linear):
            pending = mod
        spec = activations.spec_for_module(mod)
        if spec is not None and pending is not None:
            h.retain_grad()
            sig.names.append(name)
            sig.specs.append(spec)
            sig.acts.append(h)
            linears.append(pending)
            pending = None
    if backward is None:
        g = torch.randn(h.shape, generator=generator, dtype=h.dtype)
        loss = (h * g).sum()
    else:
        loss = backward(h)
    for p in model.parameters():
        p.grad = None
    loss.backward()
    for a, lin in zip(sig.acts, linears):
        assert a.grad is not None and lin.weight.grad is not None
        sig.act_grads.append(a.grad.detach())
        sig.weight_grads.append(lin.weight.grad.detach().clone())
    sig.acts = [a.detach() for a in sig.acts]
    sig.output = h.detach()
    for p in model.parameters():
        p.grad = None
    return sig


def saturated_fraction(spec: activations.ActivationSpec, a: Tensor) -> float:
    """Fraction of entries the activation table counts as saturated (NaN if no rule applies)."""
    return float(spec.saturated(a).double().mean()) if spec.saturated is not None else math.nan


def dead_fraction(spec: activations.ActivationSpec, a: Tensor) -> float:
    """Fraction of units inactive for *every* example of the batch (NaN if the activation
    cannot die): Lu et al. 2019's dead units."""
    if spec.inactive is None:
        return math.nan
    return float(spec.inactive(a).all(dim=0).double().mean())


__all__ = [
    "Signals",
    "adam_curve",
    "classification_data",
    "dead_fraction",
    "initialised_mlp",
    "propagate",
    "running_mean",
    "saturated_fraction",
    "sequential_mlp",
    "standardized_digits",
]
