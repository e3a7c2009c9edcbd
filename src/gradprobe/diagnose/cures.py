"""The remedies findings name, built in one place so every rule spells them the same way.

Each is a :class:`Remedy` whose ``name`` is a function of :mod:`gradprobe.remedies` and whose
``kwargs`` are its keyword arguments: the doctor applies it as
``getattr(gp.remedies, r.name)(target, **r.kwargs)`` (the target, model or optimizer, comes from
``gradprobe.remedies.TARGETS``). ``standardize_inputs_`` has no kwargs: the doctor supplies the
sample inputs ``x``.
"""

from __future__ import annotations

from gradprobe.diagnose.finding import Remedy


def init(scheme: str, why: str) -> Remedy:
    return Remedy("init_", {"scheme": scheme}, f'gp.remedies.init_(model, "{scheme}")', why)


def swap(to: str, why: str) -> Remedy:
    return Remedy("swap_activations_", {"to": to},
                  f'gp.remedies.swap_activations_(model, "{to}", optimizer=opt)', why)


def norm(kind: str, why: str) -> Remedy:
    return Remedy("add_norm_", {"kind": kind},
                  f'gp.remedies.add_norm_(model, "{kind}", optimizer=opt)', why)


def residual(why: str) -> Remedy:
    return Remedy("residual_", {}, "gp.remedies.residual_(model, optimizer=opt)", why)


def clip(max_norm: float, why: str) -> Remedy:
    return Remedy("clip_gradients_", {"max_norm": max_norm},
                  f"gp.remedies.clip_gradients_(opt, max_norm={max_norm})", why)


def lr(factor: float, why: str) -> Remedy:
    return Remedy("set_lr_", {"factor": factor}, f"gp.remedies.set_lr_(opt, factor={factor})", why)


def standardize(why: str) -> Remedy:
    return Remedy("standardize_inputs_", {}, "gp.remedies.standardize_inputs_(model, x_sample)",
                  why)


def init_for(activations: set[str], why: str) -> Remedy:
    """The variance-preserving initialiser of the model's activations: He for rectifiers
    (He et al. 2015), Glorot for sigmoid, tanh and linear chains (Glorot & Bengio 2010)."""
    rect = {"relu", "relu6", "leaky_relu", "prelu", "rrelu", "elu", "gelu", "silu", "softplus"}
    scheme = "he_normal" if activations & rect else "xavier_uniform"
    return init(scheme, why)


__all__ = ["clip", "init", "init_for", "lr", "norm", "residual", "standardize", "swap"]
