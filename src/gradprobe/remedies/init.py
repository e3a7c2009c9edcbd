"""Weight initialisation as a remedy: :func:`init_` re-initialises a model in place.

Every scheme draws a layer's weight ``W`` (``fan_out x fan_in``) from a zero-mean distribution
whose standard deviation is chosen so that the variance of the signal is kept from layer to
layer (forward: activations; backward: gradients):

==================  ==========================================  ===============================
scheme              distribution                                source
==================  ==========================================  ===============================
``zeros``           ``W = 0`` (every unit identical: symmetry)  --
``normal``          ``N(0, std²)``                              --
``uniform``         ``U(-√3·std, √3·std)`` (std is the std)     --
``xavier_uniform``  ``U(-a, a)``, ``a = gain·√(6/(fi+fo))``     Glorot & Bengio 2010
``xavier_normal``   ``N(0, gain²·2/(fi+fo))``                   Glorot & Bengio 2010
``he_uniform``      ``U(-a, a)``, ``a = gain·√(3/fi)``          He et al. 2015
``he_normal``       ``N(0, gain²/fi)``                          He et al. 2015
``lecun_uniform``   ``U(-a, a)``, ``a = gain·√(3/fi)``, gain 1  LeCun et al. 1998
``lecun_normal``    ``N(0, gain²/fi)``, gain 1                  LeCun 1998; SELU: Klambauer 2017
``orthogonal``      ``gain · Q`` (Q semi-orthogonal, from QR)   Saxe et al. 2014
``identity``        ``gain · I`` (square / recurrent weights)   IRNN: Le et al. 2015
==================  ==========================================  ===============================

``fi``/``fo`` are fan-in/fan-out: for ``Linear`` the in/out features; for ``ConvNd`` the
input channels per group times the kernel volume (``in_ch/groups · k₁·…·k_d``) and out channels
times the kernel volume; for recurrent layers each gate's block (``hidden x input`` or
``hidden x hidden``) is initialised as its own matrix.

Gain
    The He derivation (``Var[W] = gain²/fi``) keeps the forward pre-activation variance when
    ``gain² · E[φ(h)²] = Var[h]``: ``gain = √2`` for ReLU (half the units are zero), 5/3 for tanh
    (PyTorch's choice). Gains come from :data:`gradprobe.activations.ACTIVATIONS`.
    ``lecun_*`` use gain 1 unless ``gain=`` is given (LeCun's ``1/√fi``, the self-normalising
    init of SELU); ``zeros``, ``normal`` and ``uniform`` ignore activations.

Which activation belongs to a layer (``activation="auto"``)
    The model is traced with :mod:`torch.fx` (activation modules and weight layers are leaves).
    In the graph's execution order, a weight layer's activation is the first activation --
    a module from the table, or a functional call like ``torch.relu``/``F.gelu``/``x.tanh()`` --
    that runs after it and before the next weight layer; normalisation, dropout and reshapes in
    between are skipped. If tracing fails (data-dependent control flow), registration order
    (``model.named_modules()``) stands in for execution order, which is the same for
    ``nn.Sequential`` and for modules defined in the order they are called. Schemes that do not
    use the gain (zeros, normal, uniform, lecun_*, identity, or an explicit ``gain=``) skip the
    trace and report activations in registration order. A layer with no activation after it (typically the output layer) gets the *model-wide*
    activation: the single activation kind the model uses (identity if it uses none and the
    scheme does not depend on the gain). If the model uses several kinds, or none could be found
    for a gain-dependent scheme, :class:`~gradprobe.errors.ConfigError` asks for ``activation=``.
    Recurrent layers use their own nonlinearities: ``nn.RNN``'s ``tanh``/``relu``; LSTM gates
    ``i, f, o`` sigmoid and the cell candidate ``g`` tanh; GRU ``r, z`` sigmoid and ``n`` tanh.

Example
    >>> import torch
    >>> import gradprobe as gp
    >>> net = torch.nn.Sequential(torch.nn.Linear(512, 256), torch.nn.ReLU(), torch.nn.Linear(256, 1))
    >>> record = gp.remedies.init_(net, "he_normal", generator=torch.Generator().manual_seed(0))
    >>> [(e.layer, e.activation, round(e.gain, 3), round(e.std, 4)) for e in record]
    [('0', 'relu', 1.414, 0.0625), ('2', 'relu', 1.414, 0.0884)]
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, get_args

import torch
from torch import Tensor, nn

from gradprobe import activations
from gradprobe import layers as layers_table
from gradprobe.errors import ConfigError, UnsupportedModelError

if TYPE_CHECKING:
    import pandas as pd

Scheme = Literal[
    "zeros", "normal", "uniform", "xavier_uniform", "xavier_normal", "he_uniform", "he_normal",
    "lecun_uniform", "lecun_normal", "orthogonal", "identity",
]
SCHEMES: tuple[str, ...] = get_args(Scheme)

_GAIN_SCHEMES = {"xavier_uniform", "xavier_normal", "he_uniform", "he_normal", "orthogonal"}
_STD_SCHEMES = {"normal", "uniform"}
_CONV = layers_table.CONV
_RECURRENT = layers_table.RECURRENT
_WEIGHT_LAYERS = layers_table.WEIGHT_LAYERS

IRNN_INPUT_STD = 0.001
"""Le et al. 2015 draw an IRNN's input-to-hidden weights from N(0, 0.001²)."""

# The gate blocks of the stacked recurrent weights, in PyTorch's order, and each gate's activation.
_GATES: dict[type[nn.Module], tuple[tuple[str, str], ...]] = {
    nn.LSTM: (("i", "sigmoid"), ("f", "sigmoid"), ("g", "tanh"), ("o", "sigmoid")),
    nn.GRU: (("r", "sigmoid"), ("z", "sigmoid"), ("n", "tanh")),
}


@dataclass(frozen=True)
class LayerInit:
    """What :func:`init_` did to one weight matrix (one gate block for LSTM/GRU).

    ``std`` is the standard deviation of the entries' distribution (uniform: ``bound/√3``;
    orthogonal and identity: the root mean square of the entries, ``gain/√max(fo, fi)`` and
    ``gain/√n``). ``found_by`` says how the activation was chosen: ``"explicit"``, ``"traced"``
    (torch.fx execution order), ``"registration"`` (module order), ``"model-wide"`` (nothing
    follows the layer) or ``"cell"`` (a recurrent layer's own nonlinearity).
    """

    layer: str
    param: str
    module: str
    scheme: str
    activation: str | None
    gain: float
    std: float
    bound: float | None
    fan_in: int
    fan_out: int
    found_by: str
    gate: str | None = None


@dataclass(frozen=True)
class _Block:
    layer: str
    module: nn.Module
    param: str
    weight: Tensor
    fan_in: int
    fan_out: int
    activation: str | None
    gain: float
    how: str
    gate: str | None


@dataclass(frozen=True)
class InitRecord:
    """The per-layer record :func:`init_` returns; iterate it or turn it into a table."""

    scheme: str
    entries: tuple[LayerInit, ...]
    order: Literal["traced", "registration", "explicit"]
    bias: float | None
    skipped: tuple[str, ...] = field(default=())

    def __iter__(self) -> Iterator[LayerInit]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def layer(self, name: str) -> list[LayerInit]:
        """The entries of one layer (several for recurrent weights)."""
        found = [e for e in self.entries if e.layer == name]
        if not found:
            raise KeyError(f"no layer {name!r} in this record: {sorted({e.layer for e in self})}")
        return found

    def to_frame(self) -> pd.DataFrame:
        import pandas as pd

        return pd.DataFrame([e.__dict__ for e in self.entries])


# --------------------------------------------------------------------------------- fan and draws
def fans(module: nn.Module, weight: Tensor) -> tuple[int, int]:
    """``(fan_in, fan_out)`` of a Linear or ConvNd weight: ``in·k`` and ``out·k`` (k = kernel volume).

    For a grouped convolution the weight's second dimension is already ``in_ch/groups``.
    """
    receptive = math.prod(weight.shape[2:]) if weight.dim() > 2 else 1
    return int(weight.shape[1]) * receptive, int(weight.shape[0]) * receptive


def _std_and_bound(
    scheme: str, fan_in: int, fan_out: int, gain: float, std: float | None
) -> tuple[float, float | None]:
    """The distribution's std and, for uniform schemes, its bound ``a`` (``std = a/√3``)."""
    if scheme == "zeros":
        return 0.0, None
    if scheme in _STD_SCHEMES:
        assert std is not None
        return (std, None) if scheme == "normal" else (std, std * math.sqrt(3.0))
    if scheme.startswith("xavier"):
        s = gain * math.sqrt(2.0 / (fan_in + fan_out))
    elif scheme.startswith(("he", "lecun")):
        s = gain / math.sqrt(fan_in)
    elif scheme == "orthogonal":
        s = gain / math.sqrt(max(fan_in, fan_out))
    else:  # identity
        s = gain / math.sqrt(fan_in)
    return (s, s * math.sqrt(3.0)) if scheme.endswith("uniform") else (s, None)


def _draw_(
    w: Tensor, scheme: str, std: float, bound: float | None, gain: float,
    generator: torch.Generator | None,
) -> None:
    """Fill ``w`` (2-D or conv weight) in place. Sampling matches torch.nn.init's calls."""
    if scheme == "zeros":
        w.zero_()
    elif bound is not None:
        w.uniform_(-bound, bound, generator=generator)
    elif scheme == "orthogonal":
        nn.init.orthogonal_(w, gain=gain, generator=generator)
    elif scheme == "identity":
        if w.dim() != 2 or w.shape[0] != w.shape[1]:
            raise AssertionError("identity needs a square matrix")  # checked before drawing
        w.copy_(torch.eye(w.shape[0], dtype=w.dtype, device=w.device)).mul_(gain)
    else:
        w.normal_(0.0, std, generator=generator)


# --------------------------------------------------------------------- activation per weight layer
# ------------------------------------------------------------------------------------------ init_
def _select(
    model: nn.Module, layers: Sequence[str] | None
) -> tuple[list[tuple[str, nn.Module]], list[str]]:
    """The weight layers to initialise and the names of weight-bearing modules left alone."""
    named = [(n, m) for n, m in model.named_modules()]
    supported: list[tuple[str, nn.Module]] = [
        (n, m) for n, m in named if isinstance(m, _WEIGHT_LAYERS)
    ]
    if layers is None:
        skipped = [
            n for n, m in named
            if not isinstance(m, _WEIGHT_LAYERS)
            and isinstance(getattr(m, "weight", None), nn.Parameter)
            and activations.spec_for_module(m) is None
        ]
        if not supported:
            raise UnsupportedModelError(
                f"{type(model).__name__} has no Linear, Conv1d/2d/3d, RNN, LSTM or GRU layer to "
                "initialise",
                hint="init_ handles those layer types; use torch.nn.init for others",
            )
        return supported, skipped
    if isinstance(layers, str):
        layers = [layers]
    chosen: list[tuple[str, nn.Module]] = []
    for pattern in layers:
        hits = [(n, m) for n, m in named if n and fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ConfigError(
                f"layers={pattern!r} matches no module of {type(model).__name__}",
                hint="module names are: " + ", ".join(n for n, _ in named if n)[:400],
            )
        for n, m in hits:
            if not isinstance(m, _WEIGHT_LAYERS):
                if len(hits) == 1:
                    raise UnsupportedModelError(
                        f"layer {n!r} is a {type(m).__name__}; init_ handles Linear, Conv1d/2d/3d, "
                        "RNN, LSTM and GRU",
                        hint="use torch.nn.init for other modules, or pick a supported layer",
                    )
                continue
            if all(n != c for c, _ in chosen):
                chosen.append((n, m))
    if not chosen:
        raise ConfigError(
            f"layers={list(layers)!r} selects no Linear, Conv or recurrent layer",
            hint="give the names of weight layers, e.g. layers=['fc1', 'out']",
        )
    return chosen, []


def _check_arguments(scheme: str, std: float | None, gain: float | None) -> None:
    if scheme not in SCHEMES:
        raise ConfigError(
            f"unknown initialisation scheme {scheme!r}",
            hint="choose one of: " + ", ".join(SCHEMES),
        )
    if scheme in _STD_SCHEMES:
        if std is None:
            raise ConfigError(
                f"scheme {scheme!r} needs std=",
                hint=f"e.g. init_(model, {scheme!r}, std=0.01); or a scaled scheme like 'he_normal'",
            )
    elif std is not None and scheme != "identity":
        raise ConfigError(
            f"std= applies only to 'normal', 'uniform' (and 'identity''s RNN input weights), "
            f"not to {scheme!r}",
            hint=f"{scheme!r} derives the std from fan-in/fan-out and gain; pass gain= to scale it",
        )
    if std is not None and (not math.isfinite(std) or std < 0):
        raise ConfigError(f"std must be a finite number >= 0, got {std!r}")
    if gain is not None and (not math.isfinite(gain) or gain <= 0):
        raise ConfigError(f"gain must be a finite number > 0, got {gain!r}")
    if scheme in {"zeros", "normal", "uniform"} and gain is not None:
        raise ConfigError(
            f"gain= does not apply to {scheme!r}",
            hint="give the standard deviation directly with std=",
        )


def init_(
    model: nn.Module,
    scheme: Scheme,
    *,
    activation: str = "auto",
    gain: float | None = None,
    std: float | None = None,
    bias: float | None = 0.0,
    generator: torch.Generator | None = None,
    layers: Sequence[str] | None = None,
) -> InitRecord:
    """Re-initialise the weights of ``model``'s Linear, ConvNd, RNN, LSTM and GRU layers in place.

    Args:
        model: any ``nn.Module``; parameters shared between layers are initialised once.
        scheme: one of :data:`SCHEMES` (see the module docstring for the formulas and sources).
        activation: ``"auto"`` finds each layer's following activation (module docstring), or an
            activation name from :mod:`gradprobe.activations` used for every Linear/Conv layer.
        gain: overrides the activation's gain for every layer (not for zeros/normal/uniform).
        std: the standard deviation for ``normal``/``uniform``; for ``identity`` the std of an
            ``nn.RNN``'s input weights (default ``IRNN_INPUT_STD`` = 0.001, Le et al. 2015).
        bias: value every bias is set to; ``None`` leaves biases untouched.
        generator: a ``torch.Generator`` for reproducible draws (same draws as ``torch.nn.init``).
        layers: module names or ``fnmatch`` patterns (``"fc*"``) to restrict the change to.

    Returns:
        :class:`InitRecord` with one :class:`LayerInit` per weight matrix (per gate for LSTM/GRU).

    Raises:
        ConfigError: unknown scheme, ``std`` missing for normal/uniform, a pattern matching no
            layer, a scheme that does not apply to a selected layer (``identity`` on a non-square
            Linear, a Conv or LSTM/GRU), or an activation that cannot be determined.
        UnsupportedModelError: a selected module is not a supported layer type.

    Example:
        >>> import torch
        >>> from gradprobe.remedies import init_
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
        >>> rec = init_(net, "xavier_normal")
        >>> [(e.layer, e.activation, round(e.gain, 4)) for e in rec]
        [('0', 'tanh', 1.6667), ('2', 'tanh', 1.6667)]
    """
    _check_arguments(scheme, std, gain)
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(
            f"init_ needs an nn.Module, got {type(model).__name__}",
            hint="pass the model itself, e.g. init_(model, 'he_normal')",
        )
    chosen, skipped = _select(model, layers)
    needs_gain = scheme in _GAIN_SCHEMES and gain is None

    # which activation follows each Linear/Conv
    found: dict[str, str | None] = {}
    order_kind: Literal["traced", "registration", "explicit"] = "explicit"
    model_wide: set[str] = set()
    if activation != "auto":
        fixed = activations.get(activation).name
    else:
        fixed = None
        # Tracing costs ~10 ms per 60 modules; when no gain is needed the activation is only
        # reported, and registration order is good enough for that.
        order = layers_table.trace_order(model) if needs_gain else None
        order_kind = "traced"
        if order is None:
            order, order_kind = layers_table.registration_order(model), "registration"
        found = layers_table.following_activation(order)
        model_wide = {name for kind, name in order if kind == "act"}
        if not model_wide:  # a module the trace never reached may still be registered
            model_wide = {name for kind, name in layers_table.registration_order(model)
                          if kind == "act"}

    plan: list[_Block] = []
    for name, mod in chosen:
        if isinstance(mod, _RECURRENT):
            plan.extend(_recurrent_plan(name, mod, scheme, gain, std))
            continue
        weight = mod.weight
        assert isinstance(weight, Tensor)
        fan_in, fan_out = fans(mod, weight)
        if scheme == "identity" and (isinstance(mod, _CONV) or fan_in != fan_out):
            raise ConfigError(
                f"scheme 'identity' does not apply to layer {name!r} ({type(mod).__name__}, weight "
                f"{tuple(weight.shape)}): it needs a square Linear or a recurrent weight",
                hint="restrict it with layers=[...] (e.g. the hidden-to-hidden layer), or use "
                "'orthogonal'; for convolutions torch.nn.init.dirac_",
            )
        act, how = _activation_for(name, fixed, found, model_wide, scheme, needs_gain, order_kind)
        g = gain if gain is not None else _scheme_gain(scheme, act)
        plan.append(_Block(name, mod, "weight", weight, fan_in, fan_out, act, g, how, None))

    entries: list[LayerInit] = []
    seen: set[int] = set()
    with torch.no_grad():
        for b in plan:
            name, mod, pname, w, fan_in, fan_out = b.layer, b.module, b.param, b.weight, b.fan_in, b.fan_out
            act, g, how, gate = b.activation, b.gain, b.how, b.gate
            if gate is None and id(w) in seen:
                continue
            seen.add(id(w))
            s, bound = _std_and_bound(scheme, fan_in, fan_out, g, std)
            if how == "irnn-input":
                s, bound = (std if std is not None else IRNN_INPUT_STD), None
                _draw_(w, "normal", s, None, 1.0, generator)
                entries.append(LayerInit(name, pname, type(mod).__name__, "normal", act, 1.0, s,
                                         None, fan_in, fan_out, "cell", gate))
                continue
            _draw_(w, scheme, s, bound, g, generator)
            entries.append(LayerInit(name, pname, type(mod).__name__, scheme, act, g, s, bound,
                                     fan_in, fan_out, how, gate))
        if bias is not None:
            for _, mod in chosen:
                for pname, p in mod.named_parameters(recurse=False):
                    if pname.startswith("bias") and id(p) not in seen:
                        seen.add(id(p))
                        p.fill_(bias)
    return InitRecord(scheme, tuple(entries), order_kind, bias, tuple(skipped))


def _scheme_gain(scheme: str, act: str | None) -> float:
    if scheme in _GAIN_SCHEMES:
        return activations.get(act).gain if act is not None else 1.0
    if scheme == "zeros" or scheme in _STD_SCHEMES:
        return 0.0 if scheme == "zeros" else 1.0
    return 1.0  # lecun_*, identity


def _activation_for(
    name: str, fixed: str | None, found: dict[str, str | None], model_wide: set[str],
    scheme: str, needs_gain: bool, order_kind: str,
) -> tuple[str | None, str]:
    if fixed is not None:
        return fixed, "explicit"
    act = found.get(name)
    if act is not None:
        return act, order_kind
    if len(model_wide) == 1:
        return next(iter(model_wide)), "model-wide"
    if not needs_gain:
        return None, "model-wide"
    if not model_wide:
        raise ConfigError(
            f"could not find the activation of layer {name!r}: the model has no activation module "
            f"or traceable activation call, and scheme {scheme!r} needs its gain",
            hint="pass activation='relu' (or 'identity' for a linear network), or gain=",
        )
    raise ConfigError(
        f"layer {name!r} has no activation after it and the model uses several "
        f"({', '.join(sorted(model_wide))}), so its gain is ambiguous",
        hint=f"pass activation=... for one gain everywhere, or init_ {name!r} separately with "
        f"layers=[{name!r}], activation='identity'",
    )


def _recurrent_plan(
    name: str, mod: nn.Module, scheme: str, gain: float | None, std: float | None
) -> list[_Block]:
    """One entry per gate block of every ``weight_ih_l*`` / ``weight_hh_l*``."""
    gates = _GATES.get(type(mod))
    if gates is None:  # nn.RNN (or a subclass of it): one block, its own nonlinearity
        for klass in type(mod).__mro__:
            if klass in _GATES:
                gates = _GATES[klass]
                break
    if gates is None:
        gates = (("", str(getattr(mod, "nonlinearity", "tanh"))),)
    elif scheme == "identity":
        raise ConfigError(
            f"scheme 'identity' does not apply to layer {name!r} ({type(mod).__name__}): IRNN "
            "identity initialisation is for nn.RNN's hidden-to-hidden weights",
            hint="use 'orthogonal' for LSTM/GRU, or layers=[...] to leave this layer out",
        )
    plan: list[_Block] = []
    for pname, p in mod.named_parameters(recurse=False):
        if not pname.startswith("weight_"):
            continue
        if pname.startswith("weight_hr"):  # LSTM projection: one block, no gate activation
            blocks: list[tuple[str | None, str, Tensor]] = [(None, "identity", p)]
        else:
            chunks = p.chunk(len(gates), dim=0)
            blocks = [(g if g else None, act, c) for (g, act), c in zip(gates, chunks)]
        for gate, act, block in blocks:
            fan_out, fan_in = int(block.shape[0]), int(block.shape[1])
            how = "cell"
            if scheme == "identity" and pname.startswith("weight_ih"):
                how = "irnn-input"
            g = gain if gain is not None else _scheme_gain(scheme, act)
            plan.append(_Block(name, mod, pname, block, fan_in, fan_out, act, g, how, gate))
    return plan


__all__ = ["IRNN_INPUT_STD", "SCHEMES", "InitRecord", "LayerInit", "Scheme", "fans", "init_"]
