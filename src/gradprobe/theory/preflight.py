r"""Preflight: will this network's gradients vanish or explode? Theory against one measured pass.

``preflight(model, inputs)`` runs one forward and one backward pass at initialisation and, for
every leaf module that runs, measures the output's mean square ``q̂ = E[h²]`` and the
back-propagated gradient's mean square ``ĝ = E[(∂L/∂h)²]``. Each weight layer (Linear, Conv1d/2d/3d)
whose output feeds exactly one activation from :data:`gradprobe.activations.ACTIVATIONS` (or is
the model's output: identity) is mapped to mean-field theory (:mod:`gradprobe.theory.meanfield`)
with ``σ_w² = fan_in · E[W²]`` and ``σ_b² = E[b²]`` read from the layer:

- predicted ``q^l``: ``σ_w² E_z[φ(√q^{l-1} z)²] + σ_b²`` along an unbroken chain, or
  ``σ_w² q̂_in + σ_b²`` from the measured input where the chain starts or is broken;
- predicted gradient ratio to the next weight layer ``k`` (which must consume this layer's
  activation directly): ``E[(δ^l)²]/E[(δ^k)²] = fan_out_k · E[W_k²] · E_z[φ'(√q^l z)²]``, i.e.
  ``σ_{w,k}² (n_k / n_l) E[φ'²]`` (for Conv, ``fan_out = C_out/groups · ∏kernel / ∏stride``;
  zero padding makes this an approximation at the borders).

Layers without theory (normalisation, pooling, attention, residual joins, …) are measured and
listed with ``theory=False`` and the reason; none is skipped.

Verdict (scale-free)
    ``G = ln(‖δ_first‖² / ‖δ_last‖²)`` over the first and last weight layers (sums of squares, so
    that a narrow output layer does not count as vanishing: per layer this is
    ``σ_w² E[φ'²] = χ₁`` whatever the widths) is the measured log gain of gradient variance
    through the network. Schoenholz et al. (2017) found that networks train
    only up to about ``6 ξ`` layers, ``ξ = 1/|ln χ₁|`` being the depth over which gradient variance
    changes by a factor ``e``: that is ``|G| ≲ 6``, a factor ``e⁶ ≈ 400`` in variance (≈ 20 in
    gradient norm). ``G < −6`` is "vanishing", ``G > 6`` "exploding", otherwise "fine".
    Where theory covers every step between weight layers, the verdict uses theory's ``G`` (the
    product of the predicted ratios, with the drawn weights' ``σ_w²``): it does not carry one
    batch's finite-width noise (about ``√(2/n)`` per layer, 25 % at width 32). Elsewhere it uses
    the measured ``G``; both are reported and ``verdict_basis`` says which decided.

Note
    Without ``loss_fn`` the backward pass starts from a fixed standard-normal cotangent at the
    output (``L = Σ g ⊙ f(x)``), the isotropic choice of mean-field theory. The model is left
    exactly as it was: hooks are removed, buffers (BatchNorm running statistics) are restored,
    the global RNG state is restored, and no ``.grad`` is written (gradients are taken with
    :func:`torch.autograd.grad` with respect to the recorded activations only). Its training or
    evaluation mode is used as it is.

Example
    >>> import torch
    >>> from gradprobe.lab.zoo import mlp
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> net = mlp([64] + [64] * 20 + [10], "tanh")
    >>> for m in net:
    ...     if isinstance(m, torch.nn.Linear):
    ...         _ = torch.nn.init.normal_(m.weight, std=(0.5 / 64) ** 0.5)
    ...         _ = torch.nn.init.zeros_(m.bias)
    >>> preflight(net, torch.randn(256, 64)).verdict
    'vanishing'
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from gradprobe import activations
from gradprobe.errors import ConfigError, NonFiniteError, UnsupportedModelError
from gradprobe.theory import curvature
from gradprobe.theory import meanfield as mf
from gradprobe.theory.dataflow import WEIGHT_TYPES, Dataflow, Links, link, transparent
from gradprobe.theory.measure import Measurement, check_inputs, measure
from gradprobe.theory.preflight_report import Fix, LayerCheck, PreflightReport, Verdict


def preflight(
    model: nn.Module,
    inputs: Tensor | Sequence[Tensor],
    loss_fn: Callable[..., Tensor] | None = None,
    targets: Any = None,
    *,
    seed: int = 0,
    threshold: float = mf.DEPTH_FACTOR,
    lr: float | None = None,
    momentum: float = 0.0,
    optimizer: torch.optim.Optimizer | None = None,
) -> PreflightReport:
    """Predict vanishing or exploding gradients at initialisation and check against one pass.

    Args:
        model: any ``nn.Module``; left exactly as it was.
        inputs: a batch (tensor, or tuple of positional tensors) of at least 2 examples.
        loss_fn: ``loss_fn(output, targets)`` (or ``loss_fn(output)`` when ``targets`` is None);
            default: a fixed standard-normal cotangent at the output.
        seed: seed of that cotangent.
        threshold: ``|ln|`` of the gradient-variance gain beyond which training is predicted to
            fail (default 6, Schoenholz et al. 2017).
        lr, momentum: the SGD step and heavy-ball momentum that will train the model (needs
            ``loss_fn``). The loss's sharpness ``λ_max`` (top Gauss–Newton eigenvalue on
            ``inputs``) is measured and ``lr > 2(1+β)/λ_max`` adds a reason not to train
            (:mod:`gradprobe.theory.curvature`); above half of that limit it is borderline.
        optimizer: instead of ``lr``/``momentum``: a ``torch.optim.SGD`` to read them from
            (its first parameter group). Other optimisers are noted and not checked.

    Returns:
        :class:`PreflightReport` with ``.verdict``, ``.table()``, ``.phase``, ``.max_depth``,
        ``.fix``.
    """
    args = check_inputs(model, inputs)
    step = _step_settings(lr, momentum, optimizer, loss_fn)
    if not (threshold > 0 and math.isfinite(threshold)):
        raise ConfigError(f"threshold must be a positive number, got {threshold}", hint="use 6.0")
    m = measure(model, args, loss_fn, targets, seed)
    _require_finite(m)
    links = link(Dataflow(m))
    layers = _weight_layers(m)
    if not layers:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no weight layer (Linear, Conv, RNN, LSTM, GRU) that ran "
            "in the forward pass: there is no gradient gain to predict",
            hint="pass the model whose layers you want judged",
        )
    q_pred = _predict_q(m, links, layers)
    rows, steps = _rows(m, links, layers, q_pred)
    notes: list[str] = []
    weight_idx = [i for i in sorted(layers) if not math.isnan(m.g[i])]
    gain = _measured_gain(m, weight_idx, notes)
    pred_gain = (
        float(np.sum(np.log(steps.ratios)) + np.sum(np.log(steps.widths))) if steps.ratios else None
    )
    pred_verdict = None if pred_gain is None else _verdict(pred_gain, threshold)
    basis: Literal["theory", "measurement"]
    if steps.ratios and len(steps.ratios) == len(weight_idx) - 1 and pred_verdict is not None:
        verdict, basis = pred_verdict, "theory"
    else:
        verdict, basis = _verdict(gain, threshold), "measurement"
        if steps.ratios:
            notes.append(
                f"theory covers {len(steps.ratios)} of {len(weight_idx) - 1} layer-to-layer steps"
            )
    meanfield, fix = _typical_layer(links, layers, q_pred, verdict, notes)
    decisive = pred_gain if basis == "theory" and pred_gain is not None else gain
    hidden = [a for i, (_, a) in links.act_of.items() if a is not None and i in links.next_of]
    train = _trainability(m, hidden, decisive, max(len(weight_idx) - 1, 0), meanfield, threshold)
    notes += train.notes
    reasons, degree = list(train.reasons), abs(decisive) / threshold
    borderline = []
    if degree_borderline(degree) and all(r.startswith("gradient") for r in reasons):
        borderline.append(
            f"degree {degree:.2f} is within a factor {DEGREE_BORDERLINE:g} of the trainable "
            f"depth 6 xi_grad: the boundary is not sharp"
        )
    lam = limit = math.nan
    if isinstance(step, str):
        notes.append(step)
    elif step is not None:
        assert loss_fn is not None
        lam = curvature.sharpness(model, args, loss_fn, targets, seed=seed)
        limit = curvature.step_limit(lam, step[1])
        status, ratio = curvature.step_status(lam, step[0], step[1])
        text = (f"lr {step[0]:g} is {ratio:.2f}x the stability limit 2(1+beta)/lambda_max = "
                f"{limit:.3g} (lambda_max = {lam:.3g}, Gauss-Newton, momentum {step[1]:g})")
        if status == "unstable":
            reasons.append("step size: " + text)
        elif status == "borderline" and not reasons:
            borderline.append(text + "; curvature grows during training (progressive sharpening)")
    return PreflightReport(
        tuple(rows), verdict, gain, pred_gain, pred_verdict, len(weight_idx), meanfield, fix,
        threshold, tuple(notes), basis, not reasons, tuple(reasons), degree,
        train.saturation, train.mean_shift, train.depth_over_xi_c, lam, limit, tuple(borderline),
    )


DEGREE_BORDERLINE = 1.5
"""A degree within this factor of 1 (``[1/1.5, 1.5]``) is reported as borderline."""


def degree_borderline(degree: float) -> bool:
    """Whether the gradient degree ``|G| / threshold`` is within ``DEGREE_BORDERLINE`` of 1."""
    return 1.0 / DEGREE_BORDERLINE <= degree <= DEGREE_BORDERLINE


def _step_settings(
    lr: float | None, momentum: float, optimizer: torch.optim.Optimizer | None,
    loss_fn: Callable[..., Tensor] | None,
) -> tuple[float, float] | str | None:
    """``(lr, momentum)`` to check, a note saying why not, or None when no step was given."""
    if optimizer is not None:
        if lr is not None:
            raise ConfigError("pass lr or optimizer, not both", hint="drop lr=...")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}",
                hint="pass the optimizer that will train the model, or lr=...",
            )
        if type(optimizer) is not torch.optim.SGD:
            return (f"step size not checked: the stability limit 2(1+beta)/lambda_max is for "
                    f"SGD, not {type(optimizer).__name__}")
        group = optimizer.param_groups[0]
        if group.get("nesterov") or group.get("dampening"):
            return "step size not checked: the limit is for plain heavy-ball momentum"
        lr, momentum = float(group["lr"]), float(group["momentum"])
    if lr is None:
        return None
    if loss_fn is None:
        raise ConfigError(
            "checking the step size needs the loss: pass loss_fn (and targets)",
            hint="e.g. preflight(net, x, F.cross_entropy, y, lr=0.01)",
        )
    curvature.step_status(1.0, lr, momentum)  # validates lr and momentum
    return lr, momentum


def _require_finite(m: Measurement) -> None:
    bad = [r.name for r, g in zip(m.records, m.g) if math.isinf(g)]
    bad += [r.name for r, q in zip(m.records, m.q) if math.isinf(q)]
    if bad:
        raise NonFiniteError(
            f"non-finite activation or gradient at initialisation in {bad[0]}",
            hint="the weights are far too large: lower their scale (try the activation's "
            "recommended initialiser)",
        )


@dataclass(frozen=True)
class _Layer:
    """A weight layer as theory sees it: ``σ_w² = fan_in · E[W²]``, ``σ_b² = E[b²]``."""

    fan_in: int
    fan_out: float  # per input element
    w2: float
    b2: float

    @property
    def sigma_w2(self) -> float:
        return self.fan_in * self.w2


def _fan(module: nn.Module) -> tuple[int, float]:
    """``(fan_in, fan_out)`` of a weight layer, fan_out counted per input element."""
    w = module.weight
    assert isinstance(w, Tensor)
    if isinstance(module, nn.Linear):
        return int(w.shape[1]), float(w.shape[0])
    assert isinstance(module, nn.modules.conv._ConvNd)
    kernel = math.prod(module.kernel_size)
    stride = math.prod(module.stride)
    return int(w.shape[1] * kernel), float(w.shape[0] / module.groups * kernel / stride)


def _weight_moments(module: nn.Module) -> tuple[float, float]:
    with torch.no_grad():
        weight = module.weight
        assert isinstance(weight, Tensor)
        w2 = float(weight.detach().double().pow(2).mean())
        bias = getattr(module, "bias", None)
        b2 = 0.0 if bias is None else float(bias.detach().double().pow(2).mean())
    return w2, b2


def _weight_layers(m: Measurement) -> dict[int, _Layer]:
    """Record index -> the weight layer's fans and weight moments, for every weight-layer call."""
    return {i: _Layer(*_fan(r.module), *_weight_moments(r.module))
            for i, r in enumerate(m.records) if isinstance(r.module, WEIGHT_TYPES)}


def _predict_q(m: Measurement, links: Links, layers: dict[int, _Layer]) -> dict[int, float]:
    """Predicted pre-activation second moment: the variance map along each unbroken chain,
    ``σ_w² q̂_in + σ_b²`` from the measured input where a chain starts."""
    q_pred: dict[int, float] = {}
    prev_of = {k: i for i, k in links.next_of.items()}
    for i in sorted(layers):
        layer = layers[i]
        p = prev_of.get(i)
        if p is not None and p in q_pred:
            q_pred[i] = mf.q_map(links.act_of[p][0], q_pred[p], layer.sigma_w2, layer.b2)
        else:
            in_ms = m.records[i].in_ms
            if in_ms is not None:
                q_pred[i] = layer.sigma_w2 * float(in_ms) + layer.b2
    return q_pred


@dataclass
class _Steps:
    """Predicted per-element gradient ratios of the measured layer-to-layer steps, and the width
    ratios ``n_l / n_k`` that turn them into sum-of-squares ratios."""

    ratios: list[float]
    widths: list[float]


def _rows(
    m: Measurement, links: Links, layers: dict[int, _Layer], q_pred: dict[int, float]
) -> tuple[list[LayerCheck], _Steps]:
    """One :class:`LayerCheck` per recorded call, with theory's ratio where it applies."""
    recs, steps = m.records, _Steps([], [])
    covered = {a: recs[i].name for i, (_, a) in links.act_of.items() if a is not None}
    rows: list[LayerCheck] = []
    for i, r in enumerate(recs):
        kind = type(r.module).__name__
        if i in layers:
            layer = layers[i]
            spec_a = links.act_of.get(i)
            k = links.next_of.get(i)
            rp = rm = None
            if k is not None and spec_a is not None and i in q_pred:
                nxt = layers[k]
                rp = nxt.fan_out * nxt.w2 * mf.derivative_second_moment(spec_a[0], q_pred[i])
                if m.g[k] > 0 and not math.isnan(m.g[i]):
                    rm = m.g[i] / m.g[k]
                if rm is not None and rm > 0:
                    steps.ratios.append(rp)
                    steps.widths.append(m.sizes[i] / m.sizes[k])
            rows.append(LayerCheck(
                r.name, kind, spec_a is not None, links.notes_of.get(i, ""),
                None if spec_a is None else spec_a[0].name, layer.fan_in, layer.fan_out,
                layer.sigma_w2, layer.b2, m.q[i],
                q_pred.get(i) if spec_a is not None else None, m.g[i],
                None if k is None else recs[k].name, rm, rp,
            ))
        elif i in covered:
            spec = activations.spec_for_module(r.module)
            rows.append(LayerCheck(
                r.name, kind, True, f"activation of {covered[i]}",
                None if spec is None else spec.name, q_measured=m.q[i], grad_ms=m.g[i],
            ))
        else:
            note = "shape only" if transparent(r.module) else "no theory for this module"
            if activations.spec_for_module(r.module) is not None:
                note = "activation not preceded by a supported weight layer"
            rows.append(LayerCheck(r.name, kind, False, note, q_measured=m.q[i], grad_ms=m.g[i]))
    return rows, steps


def _measured_gain(m: Measurement, weight_idx: list[int], notes: list[str]) -> float:
    """``G = ln(‖δ_first‖² / ‖δ_last‖²)`` over the first and last weight layers (or, with fewer
    than two, the first and last measured modules)."""
    span = weight_idx if len(weight_idx) >= 2 else [
        i for i, g in enumerate(m.g) if not math.isnan(g)
    ]
    if len(span) < 2:
        notes.append("fewer than two measured layers: nothing to compare")
        return 0.0
    first = m.g[span[0]] * m.sizes[span[0]]
    last = m.g[span[-1]] * m.sizes[span[-1]]
    if last <= 0:
        raise ConfigError(
            "the loss has zero gradient at the model's last layer",
            hint="check loss_fn/targets: the loss must depend on the output",
        )
    return math.log(first / last) if first > 0 else -math.inf


def _typical_layer(
    links: Links, layers: dict[int, _Layer], q_pred: dict[int, float], verdict: Verdict,
    notes: list[str],
) -> tuple[mf.MeanField | None, Fix | None]:
    """Mean-field summary and critical fix of the typical hidden layer (the most common
    activation, the median ``σ_w²``, ``σ_b²`` and predicted ``q`` among its layers)."""
    hidden = [(links.act_of[i][0].name, layers[i].sigma_w2, layers[i].b2) for i in links.next_of]
    if not hidden:
        notes.append("no chain of weight layer -> activation -> weight layer: no mean-field phase")
        return None, None
    act_name = Counter(h[0] for h in hidden).most_common(1)[0][0]
    s_w2 = statistics.median(h[1] for h in hidden if h[0] == act_name)
    s_b2 = statistics.median(h[2] for h in hidden if h[0] == act_name)
    q0 = statistics.median(q_pred[i] for i in links.next_of if links.act_of[i][0].name == act_name)
    meanfield = mf.analyse(act_name, s_w2, s_b2, q0=max(q0, 1e-6))
    try:
        crit: float | None = mf.critical_sigma_w2(act_name, s_b2)
    except ConfigError:
        crit = None
    fix = Fix(act_name, s_b2, crit, activations.get(act_name).recommended_init)
    if meanfield.phase == "ordered" and verdict == "exploding" or (
        meanfield.phase == "chaotic" and verdict == "vanishing"
    ):
        notes.append("measured trend disagrees with the typical layer's phase")
    return meanfield, fix


SATURATED_MAJORITY = 0.5
"""More than half of the hidden units saturated at initialisation: not trainable."""


@dataclass
class _Trainability:
    trainable: bool
    reasons: tuple[str, ...]
    notes: list[str]
    saturation: float
    mean_shift: float
    depth_over_xi_c: float


def _trainability(
    m: Measurement, hidden: list[int], gain: float, steps: int, meanfield: mf.MeanField | None,
    threshold: float,
) -> _Trainability:
    """Whether training is predicted to work, and every reason it is not.

    Three criteria, each from theory, none fitted to a benchmark:

    1. *Gradient*: ``|G| > threshold`` (6): the gradient variance changes by more than ``e⁶``
       between the first and the last weight layer, i.e. the depth exceeds ``6 ξ_∇``. The degree
       ``|G| / 6`` says by how much (Schoenholz et al. 2017).
    2. *Chaos*: in the chaotic phase, more than ``6 ξ_c`` layer-to-layer steps. Two different
       inputs' correlation converges to ``c*`` over ``ξ_c`` layers whatever it started at, so the
       deep layers no longer tell the inputs apart, even where the gradient gain is moderate
       (Schoenholz et al. 2017, Fig. 5: trainable up to about ``6 ξ_c``).
    3. *Saturation*: more than half (``SATURATED_MAJORITY``) of the hidden activations' outputs
       saturated by the activation table's rule (derivative below 5 % of its maximum). Mean-field
       ``χ₁`` averages ``φ'²`` over units, so a few unsaturated units with large weights can keep
       it near 1 (sigmoid with N(0, 1) weights: ``χ₁ ≈ 1.1``) while each layer's Jacobian
       ``diag(φ') W`` has lost most of its rank: the gradient reaches the weights through a
       minority of units whose set changes from example to example.

    The measured mean shift (common-mode fraction of the hidden activations, averaged over
    layers) is reported and noted above ``1/2``; it does not decide on its own, since ReLU's
    outputs are not centred either (``1/π`` of their second moment at the first layer) and
    critical ReLU networks train.
    """
    sat = [m.saturated[a] for a in hidden if not math.isnan(m.saturated[a])]
    shift = [m.common[a] for a in hidden if not math.isnan(m.common[a])]
    saturation = float(np.mean(sat)) if sat else math.nan
    mean_shift = float(np.mean(shift)) if shift else math.nan
    reasons: list[str] = []
    notes: list[str] = []
    if abs(gain) > threshold:
        way = "vanishes" if gain < 0 else "explodes"
        reasons.append(
            f"gradient variance {way} by e^{gain:+.1f} over {steps} layers: "
            f"{abs(gain) / threshold:.2g}x the trainable depth 6 xi_grad"
        )
    ratio = math.nan
    if meanfield is not None and meanfield.xi_c > 0 and math.isfinite(meanfield.xi_c):
        ratio = steps / meanfield.xi_c
        if meanfield.phase == "chaotic" and ratio > mf.DEPTH_FACTOR:
            reasons.append(
                f"chaotic phase: {steps} layers = {ratio:.3g} xi_c (xi_c = {meanfield.xi_c:.3g}) "
                f"> {mf.DEPTH_FACTOR:g} xi_c: input correlations converge to c* = "
                f"{meanfield.c_star:.3g}, deep layers no longer tell inputs apart"
            )
    if saturation > SATURATED_MAJORITY:
        reasons.append(
            f"saturated: {saturation:.0%} of hidden activations saturated at initialisation "
            f"(> {SATURATED_MAJORITY:.0%})"
        )
    if mean_shift > 0.5:
        notes.append(
            f"hidden activations not centred: {mean_shift:.0%} of their second moment is common "
            "to all examples (mean shift / converged correlations)"
        )
    return _Trainability(not reasons, tuple(reasons), notes, saturation, mean_shift, ratio)


def _verdict(gain: float, threshold: float) -> Verdict:
    if gain < -threshold:
        return "vanishing"
    if gain > threshold:
        return "exploding"
    return "fine"


__all__ = ["DEGREE_BORDERLINE", "Fix", "LayerCheck", "PreflightReport", "Verdict", "degree_borderline", "preflight"]
