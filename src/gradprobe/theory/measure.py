"""Preflight's measured pass: one forward and one backward at initialisation, every leaf module.

For every leaf module that runs, :func:`measure` records the output's mean square ``q̂ = E[h²]``
and the back-propagated gradient's mean square ``ĝ = E[(∂L/∂h)²]`` (float64, over batch and
units). Forward hooks return a *clone* of each output: downstream modules receive the clone, so
an in-place successor (``ReLU(inplace=True)``) cannot overwrite the tensor differentiated, and
tensor identity (a module's input *is* an earlier module's returned clone) gives the data flow
(:mod:`gradprobe.theory.dataflow`).

Note
    Without ``loss_fn`` the backward pass starts from a fixed standard-normal cotangent at the
    output (``L = Σ g ⊙ f(x)``), the isotropic choice of mean-field theory. The model is left
    exactly as it was: hooks are removed, buffers (BatchNorm running statistics) are restored,
    the global RNG state is restored, and no ``.grad`` is written (gradients are taken with
    :func:`torch.autograd.grad` with respect to the recorded activations only).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gradprobe import activations
from gradprobe.errors import ConfigError, UnsupportedModelError


@dataclass
class Record:
    """One call of a leaf module: its objects (for the data flow) and its mean squares."""

    name: str
    module: nn.Module
    in_obj: Tensor | None
    out_obj: Tensor | None  # what downstream modules receive (a clone)
    target: Tensor | None  # the module's own output: the gradient is taken with respect to it
    in_ms: Tensor | None
    out_ms: Tensor | None
    saturated: Tensor | None = None  # activations: fraction of outputs the table calls saturated
    common: Tensor | None = None  # activations: common-mode fraction (see :func:`common_mode`)


@dataclass
class Measurement:
    """The pass: records in call order, and per record the output mean square ``q``, the
    gradient mean square ``g`` (``nan`` where none, ``inf`` where non-finite) and the output's
    size per example; ``out`` is the model's output."""

    records: list[Record]
    q: list[float]
    g: list[float]
    sizes: list[float]
    out: Any
    saturated: list[float]
    common: list[float]


def mean_square(t: Tensor) -> Tensor:
    """``E[t²]`` in float64, detached (no host sync)."""
    return t.detach().double().pow(2).mean()


def common_mode(a: Tensor) -> Tensor:
    """Fraction of an activation's second moment that is the same for every example:
    ``Σ_j (E_b a_bj)² / Σ_j E_b a_bj²`` over units ``j`` and the batch ``b``.

    0 for outputs centred per unit, 1 when every example gives the same output. It is the
    measured mean shift (sigmoid's ``E[σ] = ½``: LeCun et al. 1998, "Efficient BackProp", §4.3)
    and, in deep layers, the uncentred correlation between examples that mean-field theory's
    correlation map drives towards its fixed point ``c*``.
    """
    flat = a.detach().double().reshape(a.shape[0], -1)
    return flat.mean(0).pow(2).sum() / flat.pow(2).mean(0).sum().clamp_min(1e-300)


def check_inputs(model: Any, inputs: Any) -> tuple[Tensor, ...]:
    """The positional inputs as a tuple of tensors, or one clear error."""
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(
            f"model must be a torch.nn.Module, got {type(model).__name__}",
            hint="pass the network itself, e.g. preflight(net, x)",
        )
    args = (inputs,) if isinstance(inputs, Tensor) else inputs
    if not isinstance(args, (tuple, list)) or not args or not all(
        isinstance(a, Tensor) for a in args
    ):
        raise ConfigError(
            f"inputs must be a tensor or a tuple of tensors, got {type(inputs).__name__}",
            hint="pass a batch, e.g. torch.randn(128, 784)",
        )
    if not any(a.is_floating_point() for a in args):
        raise ConfigError(
            "inputs has no floating-point tensor", hint="pass float inputs, e.g. x.float()"
        )
    if args[0].ndim == 0 or args[0].shape[0] < 2:
        raise ConfigError(
            f"inputs needs a batch of at least 2 examples, got shape {tuple(args[0].shape)}",
            hint="variances are averages over examples and units: use e.g. 128 examples",
        )
    return tuple(args)


def loss_of(
    out: Any, loss_fn: Callable[..., Tensor] | None, targets: Any, seed: int
) -> Tensor:
    """The scalar to differentiate: ``loss_fn``'s, or ``Σ g ⊙ out`` with a seeded normal ``g``."""
    if loss_fn is None:
        if not isinstance(out, Tensor) or not out.is_floating_point():
            raise ConfigError(
                f"the model returned {type(out).__name__}; without loss_fn preflight needs a "
                "floating-point output tensor",
                hint="pass loss_fn=lambda out: ... returning a scalar",
            )
        gen = torch.Generator(device="cpu").manual_seed(seed)
        g = torch.randn(out.shape, generator=gen, dtype=torch.float32).to(out)
        return (out * g).sum()
    if targets is not None:
        loss = loss_fn(out, targets)
    else:
        loss = loss_fn(out)
    if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.requires_grad:
        raise ConfigError(
            "loss_fn must return a scalar tensor that depends on the model's output",
            hint="e.g. loss_fn=torch.nn.functional.cross_entropy with targets=labels",
        )
    return loss.reshape(())


def measure(
    model: nn.Module, args: tuple[Tensor, ...], loss_fn: Callable[..., Tensor] | None,
    targets: Any, seed: int,
) -> Measurement:
    """One forward and one backward pass with a hook on every leaf module; model left as it was."""
    recs: list[Record] = []
    seen: Counter[str] = Counter()
    handles = []

    def make_hook(name: str) -> Callable[..., Any]:
        def hook(module: nn.Module, inp: tuple[Any, ...], output: Any) -> Any:
            seen[name] += 1
            label = name if seen[name] == 1 else f"{name}#{seen[name]}"
            x = inp[0] if inp and isinstance(inp[0], Tensor) else None
            x_ms = None if x is None else mean_square(x)
            if isinstance(output, Tensor) and output.is_floating_point():
                # Downstream gets a clone, so an in-place successor (ReLU(inplace=True)) cannot
                # overwrite the tensor we differentiate with respect to.
                clone = output.clone()
                rec = Record(label, module, x, clone, output, x_ms, mean_square(output))
                spec = activations.spec_for_module(module)
                if spec is not None and output.ndim >= 1 and output.shape[0] >= 2:
                    rec.common = common_mode(output)
                    if spec.saturated is not None:
                        rec.saturated = spec.saturated(output.detach()).double().mean()
                recs.append(rec)
                return clone
            recs.append(Record(label, module, x, None, None, x_ms, None))
            return None

        return hook

    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    devices = sorted(
        {t.device.index or 0 for t in [*model.parameters(), *args] if t.device.type == "cuda"}
    )
    try:
        for name, module in model.named_modules():
            if next(module.children(), None) is None and name:
                handles.append(module.register_forward_hook(make_hook(name)))
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            out = model(*args)
            loss = loss_of(out, loss_fn, targets, seed)
            targets_ = [
                r.target for r in recs if r.target is not None and r.target.requires_grad
            ]
            grads = torch.autograd.grad(loss, targets_, allow_unused=True) if targets_ else ()
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for n, b in model.named_buffers():
                if n in buffers:
                    b.copy_(buffers[n])
    by_target = {id(t): g for t, g in zip(targets_, grads)}
    sizes = [math.nan if r.target is None else r.target.numel() / r.target.shape[0] for r in recs]
    gms = []
    for r in recs:
        g = by_target.get(id(r.target)) if r.target is not None else None
        # Host syncs here are deliberate: one per layer, once, after the pass.
        value = math.nan if g is None else float(mean_square(g))
        gms.append(math.inf if value != value and g is not None else value)
    q = [math.nan if r.out_ms is None else float(r.out_ms) for r in recs]
    q = [math.inf if v != v and r.out_ms is not None else v for r, v in zip(recs, q)]
    def host(t: Tensor | None) -> float:
        return math.nan if t is None else float(t)

    return Measurement(recs, q, gms, sizes, out, [host(r.saturated) for r in recs],
                       [host(r.common) for r in recs])


__all__ = ["Measurement", "Record", "check_inputs", "common_mode", "loss_of", "mean_square", "measure"]
