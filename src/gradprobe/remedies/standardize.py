"""Fixed input standardisation: :func:`standardize_inputs_`.

Why
    Inputs with large or very different scales make the first layer's pre-activations large (a
    sigmoid/tanh saturates at once) and make the loss surface badly conditioned: the gradient's
    size along each weight is proportional to its input's scale, so one learning rate is too large
    for some weights and too small for others (LeCun, Bottou, Orr & Müller 1998, "Efficient
    BackProp", §4.3: shift inputs to zero mean and scale them to unit variance).

What is done
    Per feature ``j`` (``dim`` of the input, default 1: the features of ``(N, F)``, the channels
    of ``(N, C, H, W)``), statistics are taken over every other dimension of the sample ``x`` and
    fixed: ``z = (x - c_j) / s_j`` in front of the model, with ``c``/``s`` registered *buffers*
    (saved in the state dict, moved by ``.to()``, never trained).

    ===============  ==========================================  ==================================
    method           centre ``c`` / scale ``s``                  when
    ===============  ==========================================  ==================================
    ``mean_std``     mean / standard deviation                   default
    ``median_iqr``   median / interquartile range ÷ 1.349        outliers: a few extreme values do
                     (1.349 = IQR of N(0, 1): s = std for        not move the median or the IQR,
                     Gaussian data)                              while they inflate mean and std
    ===============  ==========================================  ==================================

    ``clip=k`` also clamps ``z`` to ``[-k, k]`` (outliers at run time). A feature whose scale is 0
    (constant in ``x``) gets ``s = 1`` and is listed in the record.

Where
    ``nn.Sequential``: the :class:`Standardize` module is inserted at index 0. Any other model: it
    is registered as ``model.input_standardizer`` and applied to the first positional argument by a
    forward pre-hook, kept in the record. ``record.remove()`` undoes either.

Example
    >>> import torch
    >>> from torch import nn
    >>> from gradprobe.remedies import standardize_inputs_
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    >>> x = torch.randn(500, 3) * torch.tensor([1.0, 100.0, 0.01]) + 5
    >>> rec = standardize_inputs_(net, x)
    >>> z = net[0](x)
    >>> bool(z.mean(0).abs().max() < 1e-4), [round(v, 3) for v in z.std(0, unbiased=False).tolist()]
    (True, [1.0, 1.0, 1.0])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from gradprobe.errors import ConfigError, UnsupportedModelError

Method = Literal["mean_std", "median_iqr"]
METHODS: tuple[str, ...] = get_args(Method)
IQR_OF_NORMAL = 1.3489795003921634
"""The interquartile range of N(0, 1): 2·Φ⁻¹(3/4)."""
ATTRIBUTE = "input_standardizer"


class Standardize(nn.Module):
    """``(x - center) / scale`` per feature along ``dim``, optionally clamped to ``±clip``."""

    center: Tensor
    scale: Tensor

    def __init__(self, center: Tensor, scale: Tensor, dim: int, clip: float | None = None) -> None:
        super().__init__()
        self.register_buffer("center", center)
        self.register_buffer("scale", scale)
        self.dim = dim
        self.clip = clip

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() <= self.dim or x.shape[self.dim] != self.center.numel():
            raise ConfigError(
                f"standardisation was fitted on {self.center.numel()} features along dim "
                f"{self.dim}; got an input of shape {tuple(x.shape)}",
                hint="fit standardize_inputs_ on inputs shaped like the model's",
            )
        shape = [1] * x.dim()
        shape[self.dim] = -1
        z = (x - self.center.view(shape)) / self.scale.view(shape)
        return z if self.clip is None else z.clamp(-self.clip, self.clip)

    def extra_repr(self) -> str:
        return f"features={self.center.numel()}, dim={self.dim}, clip={self.clip}"


@dataclass(frozen=True)
class StandardizeRecord:
    """What :func:`standardize_inputs_` added; :meth:`remove` takes it out again."""

    method: str
    dim: int
    features: int
    center: tuple[float, ...]
    scale: tuple[float, ...]
    clip: float | None
    constant_features: tuple[int, ...]
    where: str  # "index 0 of the Sequential" or "forward pre-hook"
    module: Standardize = field(repr=False, compare=False)
    model: nn.Module = field(repr=False, compare=False)
    handle: RemovableHandle | None = field(default=None, repr=False, compare=False)

    def remove(self) -> None:
        """Remove the standardisation (idempotent)."""
        if self.handle is not None:
            self.handle.remove()
            if getattr(self.model, ATTRIBUTE, None) is self.module:
                delattr(self.model, ATTRIBUTE)
        elif getattr(self.model, ATTRIBUTE, None) is self.module:  # a named Sequential
            delattr(self.model, ATTRIBUTE)
        elif isinstance(self.model, nn.Sequential):
            for i, m in enumerate(self.model):
                if m is self.module:
                    del self.model[i]
                    break

    def __str__(self) -> str:
        def short(v: tuple[float, ...]) -> str:
            s = ", ".join(f"{a:.4g}" for a in v[:6])
            return f"[{s}{', ...' if len(v) > 6 else ''}]"

        lines = [f"standardize_inputs_ ({self.method}, dim {self.dim}, {self.features} features) "
                 f"at {self.where}", f"  center {short(self.center)}", f"  scale  {short(self.scale)}"]
        if self.clip is not None:
            lines.append(f"  clipped to ±{self.clip:g}")
        if self.constant_features:
            lines.append(f"  constant features (scale set to 1): {list(self.constant_features)}")
        return "\n".join(lines)


def _statistics(x: Tensor, dim: int, method: str) -> tuple[Tensor, Tensor]:
    flat = x.detach().movedim(dim, -1).reshape(-1, x.shape[dim]).double()
    if method == "mean_std":
        return flat.mean(0), flat.std(0, unbiased=False)
    q = torch.quantile(flat, torch.tensor([0.25, 0.5, 0.75], dtype=flat.dtype), dim=0)
    return q[1], (q[2] - q[0]) / IQR_OF_NORMAL


def standardize_inputs_(
    model: nn.Module,
    x: Tensor,
    *,
    method: Method = "mean_std",
    clip: float | None = None,
    dim: int = 1,
    eps: float = 1e-12,
) -> StandardizeRecord:
    """Put a fixed per-feature standardisation, fitted on sample inputs ``x``, in front of ``model``.

    Args:
        model: an ``nn.Module``; a Sequential gets the module at index 0, others a pre-hook.
        x: sample inputs (at least 2 samples, floating point, finite), shaped like the model's.
        method: ``"mean_std"`` or ``"median_iqr"`` (robust to outliers; module doc).
        clip: clamp the standardised values to ``[-clip, clip]`` (e.g. 5) if given.
        dim: the feature dimension of ``x`` (1 for ``(N, F)`` and ``(N, C, ...)``; -1 for
            channels-last ``(N, L, F)``).
        eps: scales at or below this are treated as 0 (constant feature: scale 1).

    Returns:
        :class:`StandardizeRecord` (statistics, where it went, ``remove()``).

    Raises:
        ConfigError: bad ``x`` (not a float tensor, integer token ids, < 2 samples, non-finite),
            ``method``, ``clip``, ``dim``; or the model already has one.
        UnsupportedModelError: ``model`` is not an ``nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"standardize_inputs_ needs an nn.Module, got {type(model).__name__}")
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}", hint="choose one of: " + ", ".join(METHODS))
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, int | float) or not clip > 0):
        raise ConfigError(f"clip must be a number > 0 or None, got {clip!r}", hint="e.g. clip=5.0")
    if not isinstance(x, Tensor):
        raise ConfigError(f"x must be a tensor of sample inputs, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ConfigError(
            f"x has dtype {x.dtype}: standardisation applies to real-valued inputs, not integer "
            "data such as token ids",
            hint="for token inputs normalise the embeddings instead (add_norm_ / LayerNorm)",
        )
    if x.dim() < 2 or x.shape[0] < 2:
        raise ConfigError(f"x must hold at least 2 samples along dim 0, shape {tuple(x.shape)}",
                          hint="pass a batch of inputs (N, features, ...) with N >= 2")
    if not -x.dim() < dim < x.dim() or dim % x.dim() == 0:
        raise ConfigError(f"dim={dim} is not a feature dimension of x with shape {tuple(x.shape)}",
                          hint="dim 0 is the batch; use dim=1 for (N, F) or dim=-1 for (N, L, F)")
    if not bool(torch.isfinite(x).all()):
        raise ConfigError("x contains NaN or Inf values", hint="drop or impute them first")
    if any(isinstance(m, Standardize) for m in model.modules()):
        raise ConfigError(f"{type(model).__name__} already has an input standardisation",
                          hint="call record.remove() on the earlier one first")
    dim = dim % x.dim()
    center, scale = _statistics(x, dim, method)
    constant = tuple(int(i) for i in torch.nonzero(scale <= eps).flatten())
    scale = torch.where(scale <= eps, torch.ones_like(scale), scale)
    module = Standardize(center.to(x.dtype).to(x.device), scale.to(x.dtype).to(x.device), dim,
                         None if clip is None else float(clip))
    handle: RemovableHandle | None = None
    if isinstance(model, nn.Sequential) and type(model).forward is nn.Sequential.forward:
        if all(k.isdigit() for k in model._modules):
            model.insert(0, module)
            where = "index 0 of the Sequential"
        else:  # named children (Sequential(OrderedDict(...))): keep their names, put ours first
            if ATTRIBUTE in model._modules:
                raise ConfigError(f"the Sequential already has a child named {ATTRIBUTE!r}",
                                  hint="remove the earlier standardisation with record.remove()")
            model._modules = {ATTRIBUTE: module, **model._modules}  # type: ignore[assignment]
            where = f"first child {ATTRIBUTE!r} of the Sequential"
    else:
        if hasattr(model, ATTRIBUTE):
            raise ConfigError(f"{type(model).__name__} already has an attribute {ATTRIBUTE!r}")
        model.add_module(ATTRIBUTE, module)

        def pre_hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if not args or not isinstance(args[0], Tensor):
                raise UnsupportedModelError(
                    f"the standardisation of {type(model).__name__} applies to the first "
                    "positional tensor argument of forward; this call has none",
                    hint="call the model with its input first: model(x, ...)",
                )
            return (module(args[0]), *args[1:]), kwargs

        handle = model.register_forward_pre_hook(pre_hook, with_kwargs=True)
        where = f"forward pre-hook ({ATTRIBUTE})"
    return StandardizeRecord(method, dim, int(center.numel()), tuple(center.tolist()),
                             tuple(scale.tolist()), module.clip, constant, where, module, model,
                             handle)


__all__ = ["IQR_OF_NORMAL", "METHODS", "Method", "Standardize", "StandardizeRecord",
           "standardize_inputs_"]
