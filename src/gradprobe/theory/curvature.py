r"""The loss's curvature at initialisation, and the largest step (SGD, heavy ball) it allows.

Gradient descent with step ``η`` and heavy-ball momentum ``β`` on a quadratic with largest
curvature ``λ`` is stable only for ``η < 2(1 + β)/λ`` (Polyak 1964; for ``β = 0`` the classical
``η < 2/λ``). Near a minimum, and at initialisation for wide networks, the relevant curvature is
the largest eigenvalue of the Gauss–Newton matrix ``G = Jᵀ H_L J`` (``J`` the Jacobian of the
outputs with respect to the parameters, ``H_L`` the loss's Hessian with respect to the outputs):
for mean-squared error ``G`` is the neural tangent kernel's Gram matrix divided by the batch,
and Lee et al. (2019) and Xiao, Pennington & Schoenholz (2020) derive the maximal learning rate
``η_max = 2/λ_max(Θ)`` from it. ``G`` is positive semi-definite, so its top eigenvalue is found
by power iteration on products ``G v = Jᵀ(H_L(J v))`` without forming any matrix.

Why depth matters for ReLU at criticality: every layer contributes a term ``‖x^{l-1}‖² ‖δ^l‖²``
to the kernel and at criticality (He) none of them shrinks with depth, so ``λ_max`` grows with
depth and the stable step shrinks (Xiao et al. 2020: the NTK of a critical network grows with
depth; Hanin & Rolnick 2018: the fluctuations of deep ReLU nets grow with depth/width). Measured
on digits at width 128 (docs/theory.md): ``λ_max`` about 50, 100, 130, 150, 210 at 5, 10, 20, 30,
40 layers, and the largest SGD step that trains falls from above 0.03 to below 0.003. A step that suits a shallow net can thus be unstable for a
deep one initialised "correctly".

Note
    Training raises the curvature (Cohen et al. 2021, "progressive sharpening", until the
    sharpness reaches ``2(1+β)/η``, the "edge of stability"). A step within a factor of two of
    the bound at initialisation is therefore reported as borderline, not as safe.

Example
    >>> import torch
    >>> x = torch.randn(64, 5)
    >>> net = torch.nn.Linear(5, 1, bias=False)
    >>> lam = sharpness(net, x, lambda out: out.pow(2).mean())
    >>> exact = float(torch.linalg.eigvalsh(2 * x.T @ x / 64)[-1])
    >>> abs(lam - exact) / exact < 1e-2
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from gradprobe.errors import ConfigError
from gradprobe.theory.measure import check_inputs, loss_of

BORDERLINE_FACTOR = 2.0
"""A step above ``1/2`` of the stability bound at initialisation is borderline (sharpening)."""


def step_limit(sharpness: float, momentum: float = 0.0) -> float:
    """Largest stable step of heavy-ball gradient descent: ``2(1 + β)/λ`` (Polyak 1964).

    >>> step_limit(100.0, 0.9)
    0.038
    """
    if not 0.0 <= momentum < 1.0:
        raise ConfigError(f"momentum must be in [0, 1), got {momentum}", hint="e.g. momentum=0.9")
    if sharpness <= 0:
        return math.inf
    return 2.0 * (1.0 + momentum) / sharpness


StepStatus = Literal["stable", "borderline", "unstable"]


def step_status(sharpness: float, lr: float, momentum: float = 0.0) -> tuple[StepStatus, float]:
    """``(status, lr / limit)`` for a step ``lr`` against :func:`step_limit`: "unstable" above
    the limit, "borderline" above ``1 / BORDERLINE_FACTOR`` of it, otherwise "stable".

    >>> step_status(300.0, 0.01, 0.9)
    ('borderline', 0.7894736842105263)
    """
    if not (lr > 0 and math.isfinite(lr)):
        raise ConfigError(f"lr must be a positive number, got {lr}", hint="e.g. lr=0.01")
    ratio = lr / step_limit(sharpness, momentum)
    if ratio > 1.0:
        return "unstable", ratio
    return ("borderline" if ratio > 1.0 / BORDERLINE_FACTOR else "stable"), ratio


def sharpness(
    model: nn.Module,
    inputs: Tensor | Sequence[Tensor],
    loss_fn: Callable[..., Tensor],
    targets: Any = None,
    *,
    iters: int = 100,
    tol: float = 1e-4,
    seed: int = 0,
) -> float:
    """Top eigenvalue of the loss's Gauss–Newton matrix ``Jᵀ H_L J`` at the current parameters.

    Power iteration on ``G v`` (``J v`` by the double-vector-Jacobian trick, ``H_L`` by a
    Hessian-vector product with respect to the outputs, ``Jᵀ`` by a vector-Jacobian product),
    stopped when the estimate changes by less than ``tol`` (relative, after at least five
    products) or after ``iters`` products. The model's buffers and the global RNG state are left as they were; no ``.grad``
    is written.
    """
    args = check_inputs(model, inputs)
    if iters < 1:
        raise ConfigError(f"iters must be at least 1, got {iters}", hint="use e.g. 30")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameter", hint="unfreeze its weights")
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    try:
        with torch.random.fork_rng(devices=[]), torch.enable_grad():
            out = model(*args)
            if not isinstance(out, Tensor) or not out.is_floating_point():
                raise ConfigError(
                    f"the model returned {type(out).__name__}; sharpness needs one float tensor",
                    hint="wrap the model so that it returns its logits",
                )
            u = torch.zeros_like(out, requires_grad=True)
            jt_u = torch.autograd.grad(out, params, u, create_graph=True, allow_unused=True)
            pairs = [(p, g) for p, g in zip(params, jt_u) if g is not None]
            o = out.detach().requires_grad_(True)
            (dl,) = torch.autograd.grad(loss_of(o, loss_fn, targets, seed), o, create_graph=True)
            gen = torch.Generator(device="cpu").manual_seed(seed)
            v = [torch.randn(p.shape, generator=gen).to(p) for p, _ in pairs]
            lam = 0.0
            for k in range(iters):
                norm = torch.sqrt(sum((t * t).sum() for t in v))  # type: ignore[arg-type]
                v = [t / norm for t in v]
                (jv,) = torch.autograd.grad([g for _, g in pairs], u, v, retain_graph=True)
                (hjv,) = torch.autograd.grad(dl, o, jv, retain_graph=True)
                gv = torch.autograd.grad(out, [p for p, _ in pairs], hjv, retain_graph=True)
                new = float(sum((a * b).sum() for a, b in zip(gv, v)))  # one sync per product
                done = k >= 4 and abs(new - lam) <= tol * abs(new)
                lam, v = new, [t.detach() for t in gv]
                if done or lam <= 0:
                    break
    finally:
        with torch.no_grad():
            for n, b in model.named_buffers():
                if n in buffers:
                    b.copy_(buffers[n])
    return max(lam, 0.0) if math.isfinite(lam) else math.inf


__all__ = ["BORDERLINE_FACTOR", "StepStatus", "sharpness", "step_limit", "step_status"]
