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
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from gradprobe import activations
from gradprobe.errors import ConfigError, NonFiniteError, UnsupportedModelError
from gradprobe.layers import DENSE
from gradprobe.theory import meanfield as mf

Verdict = Literal["vanishing", "exploding", "fine"]

_WEIGHT_TYPES = DENSE  # theory covers the dense weight layers of the one table
_SHAPE_ONLY: tuple[type[nn.Module], ...] = (nn.Flatten, nn.Unflatten, nn.Identity)


@dataclass(frozen=True)
class LayerCheck:
    """One leaf module: what was measured, and what theory predicts where it applies."""

    name: str
    kind: str
    theory: bool
    note: str
    activation: str | None = None
    fan_in: int | None = None
    fan_out: float | None = None
    sigma_w2: float | None = None
    sigma_b2: float | None = None
    q_measured: float = math.nan
    q_predicted: float | None = None
    grad_ms: float = math.nan
    next_layer: str | None = None
    ratio_measured: float | None = None
    ratio_predicted: float | None = None


@dataclass(frozen=True)
class Fix:
    """The initialisation that makes the stack critical (``χ₁ = 1``).

    ``sigma_w2`` is ``None`` where the activation has no critical point; ``recommended_init``
    is the activation table's initialiser either way.
    """

    activation: str
    sigma_b2: float
    sigma_w2: float | None
    recommended_init: str

    def __str__(self) -> str:
        if self.sigma_w2 is None:
            return (
                f"{self.activation} has no critical sigma_w2 at sigma_b2={self.sigma_b2:.3g}; "
                f"use {self.recommended_init} or a normalising layer"
            )
        return (
            f"init weights N(0, {self.sigma_w2:.4g}/fan_in) (std = sqrt({self.sigma_w2:.4g}/fan_in))"
            f" with bias variance {self.sigma_b2:.3g} for {self.activation} "
            f"(table default: {self.recommended_init})"
        )


@dataclass(frozen=True)
class PreflightReport:
    """Result of :func:`preflight`. ``layers`` lists every leaf module that ran, in order."""

    layers: tuple[LayerCheck, ...]
    verdict: Verdict
    measured_log_gain: float
    predicted_log_gain: float | None
    predicted_verdict: Verdict | None
    depth: int
    meanfield: mf.MeanField | None
    fix: Fix | None
    threshold: float = mf.DEPTH_FACTOR
    notes: tuple[str, ...] = field(default_factory=tuple)
    verdict_basis: Literal["theory", "measurement"] = "measurement"

    @property
    def phase(self) -> str | None:
        """``"ordered"`` (vanishing), ``"chaotic"`` (exploding) or ``"critical"`` from theory."""
        return None if self.meanfield is None else self.meanfield.phase

    @property
    def max_depth(self) -> float | None:
        """Depth beyond which training is predicted to fail (``6 ξ``, Schoenholz et al. 2017)."""
        return None if self.meanfield is None else self.meanfield.max_depth

    def table(self) -> pd.DataFrame:
        """One row per leaf module (all fields of :class:`LayerCheck`)."""
        return pd.DataFrame([vars(layer) for layer in self.layers])

    def __str__(self) -> str:
        lines = [f"preflight: {self.verdict.upper()} (from {self.verdict_basis})"]
        lines.append(
            f"  measured gradient-variance gain first/last weight layer: "
            f"e^{self.measured_log_gain:+.2f} over {self.depth} weight layers "
            f"(|ln| > {self.threshold:g} fails)"
        )
        if self.predicted_log_gain is not None:
            lines.append(
                f"  theory predicts e^{self.predicted_log_gain:+.2f} along its chain "
                f"({self.predicted_verdict})"
            )
        m = self.meanfield
        if m is not None:
            lines.append(
                f"  mean field ({m.activation}, sigma_w2={m.sigma_w2:.4g}, sigma_b2={m.sigma_b2:.3g}):"
                f" q*={m.q_star:.4g}, chi1={m.chi1:.4f} -> {m.phase}; "
                f"xi_grad={m.xi_grad:.3g}, xi_c={m.xi_c:.3g}, trainable depth ~{m.max_depth:.3g}"
            )
        if self.fix is not None:
            label = "critical init" if self.verdict == "fine" else "fix"
            lines.append(f"  {label}: {self.fix}")
        for note in self.notes:
            lines.append(f"  note: {note}")
        header = f"  {'layer':<16} {'kind':<10} {'act':<10} {'sigma_w2':>9} {'q meas':>10} "
        header += f"{'q pred':>10} {'grad ms':>10} {'ratio':>8} {'pred':>8}  theory"
        lines.append(header)
        for r in self.layers:
            if r.kind not in {t.__name__ for t in _WEIGHT_TYPES} and r.theory:
                continue  # activations covered by their weight layer
            lines.append(
                f"  {r.name[:16]:<16} {r.kind[:10]:<10} {(r.activation or '-')[:10]:<10} "
                f"{_fmt(r.sigma_w2):>9} {_fmt(r.q_measured):>10} {_fmt(r.q_predicted):>10} "
                f"{_fmt(r.grad_ms):>10} {_fmt(r.ratio_measured):>8} {_fmt(r.ratio_predicted):>8}  "
                + ("yes" if r.theory else f"no theory ({r.note})")
            )
        return "\n".join(lines)


def _fmt(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.4g}"


@dataclass
class _Rec:
    name: str
    module: nn.Module
    in_obj: Tensor | None
    out_obj: Tensor | None  # what downstream modules receive (a clone)
    target: Tensor | None  # the module's own output: the gradient is taken with respect to it
    in_ms: Tensor | None
    out_ms: Tensor | None


def _ms(t: Tensor) -> Tensor:
    return t.detach().double().pow(2).mean()


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


def _transparent(module: nn.Module) -> bool:
    if isinstance(module, _SHAPE_ONLY):
        return True
    return isinstance(module, nn.Dropout) and (not module.training or module.p == 0.0)


def _check_inputs(model: Any, inputs: Any) -> tuple[Tensor, ...]:
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


def _loss(
    out: Any, loss_fn: Callable[..., Tensor] | None, targets: Any, seed: int
) -> Tensor:
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


def _measure(
    model: nn.Module, args: tuple[Tensor, ...], loss_fn: Callable[..., Tensor] | None,
    targets: Any, seed: int,
) -> tuple[list[_Rec], list[float], list[float], list[float], Any]:
    recs: list[_Rec] = []
    seen: Counter[str] = Counter()
    handles = []

    def make_hook(name: str) -> Callable[..., Any]:
        def hook(module: nn.Module, inp: tuple[Any, ...], output: Any) -> Any:
            seen[name] += 1
            label = name if seen[name] == 1 else f"{name}#{seen[name]}"
            x = inp[0] if inp and isinstance(inp[0], Tensor) else None
            if isinstance(output, Tensor) and output.is_floating_point():
                # Downstream gets a clone, so an in-place successor (ReLU(inplace=True)) cannot
                # overwrite the tensor we differentiate with respect to.
                clone = output.clone()
                recs.append(
                    _Rec(label, module, x, clone, output, None if x is None else _ms(x), _ms(output))
                )
                return clone
            recs.append(_Rec(label, module, x, None, None, None if x is None else _ms(x), None))
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
            loss = _loss(out, loss_fn, targets, seed)
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
    q = [math.nan if r.out_ms is None else float(r.out_ms) for r in recs]
    gms = []
    sizes = [math.nan if r.target is None else r.target.numel() / r.target.shape[0] for r in recs]
    for r in recs:
        g = by_target.get(id(r.target)) if r.target is not None else None
        # Host syncs here are deliberate: one per layer, once, after the pass.
        value = math.nan if g is None else float(_ms(g))
        gms.append(math.inf if value != value and g is not None else value)
    q = [math.inf if v != v and r.out_ms is not None else v for r, v in zip(recs, q)]
    return recs, q, gms, sizes, out


def preflight(
    model: nn.Module,
    inputs: Tensor | Sequence[Tensor],
    loss_fn: Callable[..., Tensor] | None = None,
    targets: Any = None,
    *,
    seed: int = 0,
    threshold: float = mf.DEPTH_FACTOR,
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

    Returns:
        :class:`PreflightReport` with ``.verdict``, ``.table()``, ``.phase``, ``.max_depth``,
        ``.fix``.
    """
    args = _check_inputs(model, inputs)
    if not (threshold > 0 and math.isfinite(threshold)):
        raise ConfigError(f"threshold must be a positive number, got {threshold}", hint="use 6.0")
    recs, q_meas, g_meas, sizes, out = _measure(model, args, loss_fn, targets, seed)
    bad = [r.name for r, g in zip(recs, g_meas) if math.isinf(g)]
    bad += [r.name for r, q in zip(recs, q_meas) if math.isinf(q)]
    if bad:
        raise NonFiniteError(
            f"non-finite activation or gradient at initialisation in {bad[0]}",
            hint="the weights are far too large: lower their scale (try the activation's "
            "recommended initialiser)",
        )
    index_of_out = {id(r.out_obj): i for i, r in enumerate(recs) if r.out_obj is not None}
    model_out_id = id(out) if isinstance(out, Tensor) else None

    def source(i: int) -> int | None:
        """Index of the record producing record ``i``'s input, through shape-only modules."""
        x = recs[i].in_obj
        j = None if x is None else index_of_out.get(id(x))
        while j is not None and _transparent(recs[j].module):
            x = recs[j].in_obj
            j = None if x is None else index_of_out.get(id(x))
        return j

    consumers: dict[int, list[int]] = {}
    for i, r in enumerate(recs):
        if _transparent(r.module):
            continue
        j = source(i)
        if j is not None:
            consumers.setdefault(j, []).append(i)

    def reaches_output(i: int) -> bool:
        """Whether record ``i``'s output is (through shape-only modules) the model's output."""
        if model_out_id is None:
            return False
        if id(recs[i].out_obj) == model_out_id:
            return True
        return any(
            _transparent(r.module) and r.in_obj is recs[i].out_obj and reaches_output(k)
            for k, r in enumerate(recs)
        )

    # Pass 1: which activation follows each weight layer, and which weight layer follows that.
    act_of: dict[int, tuple[activations.ActivationSpec, int | None]] = {}
    notes_of: dict[int, str] = {}
    next_of: dict[int, int] = {}
    for i, r in enumerate(recs):
        if not isinstance(r.module, _WEIGHT_TYPES):
            continue
        cons = consumers.get(i, [])
        if not cons and reaches_output(i):
            act_of[i] = (activations.get("identity"), None)
            continue
        if len(cons) != 1:
            notes_of[i] = (
                "output used by several modules (residual/branch)" if cons else
                "output not consumed by a module (functional op?)"
            )
            continue
        a = cons[0]
        spec = activations.spec_for_module(recs[a].module)
        if spec is None:
            notes_of[i] = f"followed by {type(recs[a].module).__name__}"
            continue
        act_of[i] = (spec, a)
        nxt = consumers.get(a, [])
        if len(nxt) == 1 and isinstance(recs[nxt[0]].module, _WEIGHT_TYPES) and not reaches_output(a):
            next_of[i] = nxt[0]

    # Pass 2: predicted q along chains, predicted and measured ratios.
    q_pred: dict[int, float] = {}
    rows: list[LayerCheck] = []
    prev_of = {k: i for i, k in next_of.items()}
    moments = {i: _weight_moments(r.module) for i, r in enumerate(recs)
               if isinstance(r.module, _WEIGHT_TYPES)}
    fans = {i: _fan(recs[i].module) for i in moments}
    for i in sorted(moments):
        fan_in, _ = fans[i]
        w2, b2 = moments[i]
        s_w2 = fan_in * w2
        p = prev_of.get(i)
        if p is not None and p in q_pred:
            q_pred[i] = mf.q_map(act_of[p][0], q_pred[p], s_w2, b2)
        else:
            in_ms = recs[i].in_ms
            if in_ms is not None:
                q_pred[i] = s_w2 * float(in_ms) + b2
    covered: dict[int, str] = {a: recs[i].name for i, (_, a) in act_of.items() if a is not None}
    ratios_pred: list[float] = []
    width_ratios: list[float] = []
    for i, r in enumerate(recs):
        kind = type(r.module).__name__
        if i in moments:
            fan_in, fan_out = fans[i]
            w2, b2 = moments[i]
            spec_a = act_of.get(i)
            k = next_of.get(i)
            rp = rm = None
            if k is not None and spec_a is not None and i in q_pred:
                fan_out_k = fans[k][1]
                rp = fan_out_k * moments[k][0] * mf.derivative_second_moment(spec_a[0], q_pred[i])
                if g_meas[k] > 0 and not math.isnan(g_meas[i]):
                    rm = g_meas[i] / g_meas[k]
                if rm is not None and rm > 0:
                    ratios_pred.append(rp)
                    width_ratios.append(sizes[i] / sizes[k])
            rows.append(LayerCheck(
                r.name, kind, spec_a is not None, notes_of.get(i, ""),
                None if spec_a is None else spec_a[0].name, fan_in, fan_out, fan_in * w2, b2,
                q_meas[i], q_pred.get(i) if spec_a is not None else None, g_meas[i],
                None if k is None else recs[k].name, rm, rp,
            ))
        elif i in covered:
            spec = activations.spec_for_module(r.module)
            rows.append(LayerCheck(
                r.name, kind, True, f"activation of {covered[i]}",
                None if spec is None else spec.name, q_measured=q_meas[i], grad_ms=g_meas[i],
            ))
        else:
            note = "shape only" if _transparent(r.module) else "no theory for this module"
            if activations.spec_for_module(r.module) is not None:
                note = "activation not preceded by a supported weight layer"
            rows.append(LayerCheck(r.name, kind, False, note, q_measured=q_meas[i],
                                   grad_ms=g_meas[i]))

    # Verdict from the measured gradient-variance gain between the first and last weight layers.
    notes: list[str] = []
    weight_idx = [i for i in sorted(moments) if not math.isnan(g_meas[i])]
    span = weight_idx if len(weight_idx) >= 2 else [
        i for i, g in enumerate(g_meas) if not math.isnan(g)
    ]
    if len(span) >= 2:
        first = g_meas[span[0]] * sizes[span[0]]
        last = g_meas[span[-1]] * sizes[span[-1]]
        if last <= 0:
            raise ConfigError(
                "the loss has zero gradient at the model's last layer",
                hint="check loss_fn/targets: the loss must depend on the output",
            )
        gain = math.log(first / last) if first > 0 else -math.inf
    else:
        gain = 0.0
        notes.append("fewer than two measured layers: nothing to compare")
    # Per-element ratios times width ratios n_l / n_k give the sum-of-squares gain.
    pred_gain = (
        float(np.sum(np.log(ratios_pred)) + np.sum(np.log(width_ratios))) if ratios_pred else None
    )
    pred_verdict = None if pred_gain is None else _verdict(pred_gain, threshold)
    full_cover = bool(ratios_pred) and len(ratios_pred) == len(weight_idx) - 1
    basis: Literal["theory", "measurement"]
    if full_cover and pred_verdict is not None:
        verdict, basis = pred_verdict, "theory"
    else:
        verdict, basis = _verdict(gain, threshold), "measurement"
        if ratios_pred:
            notes.append(
                f"theory covers {len(ratios_pred)} of {len(weight_idx) - 1} layer-to-layer steps"
            )

    # Typical hidden layer -> phase, depth scale, fix.
    hidden = [(act_of[i][0].name, fans[i][0] * moments[i][0], moments[i][1])
              for i in next_of]
    meanfield = fix = None
    if hidden:
        act_name = Counter(h[0] for h in hidden).most_common(1)[0][0]
        s_w2 = statistics.median(h[1] for h in hidden if h[0] == act_name)
        s_b2 = statistics.median(h[2] for h in hidden if h[0] == act_name)
        q0 = statistics.median(q_pred[i] for i in next_of if act_of[i][0].name == act_name)
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
    else:
        notes.append("no chain of weight layer -> activation -> weight layer: no mean-field phase")
    return PreflightReport(
        tuple(rows), verdict, gain, pred_gain, pred_verdict, len(weight_idx), meanfield, fix,
        threshold, tuple(notes), basis,
    )


def _verdict(gain: float, threshold: float) -> Verdict:
    if gain < -threshold:
        return "vanishing"
    if gain > threshold:
        return "exploding"
    return "fine"


__all__ = ["Fix", "LayerCheck", "PreflightReport", "Verdict", "preflight"]
