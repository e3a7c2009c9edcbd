"""Model builders for the lab. Every model is a plain ``nn.Module`` the Probe can watch.

Layers are named so that run tables read naturally: ``fc1, act1, fc2, act2, ..., out``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from gradprobe import activations
from gradprobe.errors import ConfigError


def mlp(
    sizes: Sequence[int],
    activation: str = "relu",
    *,
    bias: bool = True,
    out_activation: str | None = None,
    norm: str | None = None,
) -> nn.Sequential:
    """A fully connected network ``sizes[0] -> ... -> sizes[-1]``.

    Hidden layers are ``fc{i}`` (Linear), optionally ``norm{i}`` (``"batch"`` or ``"layer"``),
    then ``act{i}`` (from :mod:`gradprobe.activations`). The last Linear is ``out``, followed by
    ``out_act`` when ``out_activation`` is given (e.g. ``"sigmoid"`` for a binary output).

    >>> mlp([2, 5, 1], "tanh", out_activation="sigmoid")
    Sequential(
      (fc1): Linear(in_features=2, out_features=5, bias=True)
      (act1): Tanh()
      (out): Linear(in_features=5, out_features=1, bias=True)
      (out_act): Sigmoid()
    )
    """
    if len(sizes) < 2 or any(int(s) < 1 for s in sizes):
        raise ConfigError(
            f"mlp sizes must be at least two positive widths, got {list(sizes)}",
            hint="e.g. mlp([2, 5, 5, 1], 'relu')",
        )
    spec = activations.get(activation)
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-2], sizes[1:-1]), start=1):
        layers[f"fc{i}"] = nn.Linear(fan_in, fan_out, bias=bias)
        if norm == "batch":
            layers[f"norm{i}"] = nn.BatchNorm1d(fan_out)
        elif norm == "layer":
            layers[f"norm{i}"] = nn.LayerNorm(fan_out)
        elif norm is not None:
            raise ConfigError(f"unknown norm {norm!r}", hint="use 'batch', 'layer' or None")
        layers[f"act{i}"] = spec.factory()
    layers["out"] = nn.Linear(sizes[-2], sizes[-1], bias=bias)
    if out_activation is not None:
        layers["out_act"] = activations.get(out_activation).factory()
    return nn.Sequential(layers)


def linear_layers(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The model's Linear layers in registration order, with their qualified names."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def linear_chain(
    width: int,
    depth: int,
    init: str = "gaussian",
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> nn.Sequential:
    """``depth`` bias-free square Linear layers with no activation (Saxe et al. 2014).

    ``init="orthogonal"``: every weight orthogonal, so every singular value of the input-output
    Jacobian is exactly 1. ``init="gaussian"``: weights N(0, 1/width), the variance-preserving
    choice whose Jacobian spectrum nevertheless spreads with depth (Pennington et al. 2017).
    """
    if init not in ("gaussian", "orthogonal"):
        raise ConfigError(f"unknown linear-chain init {init!r}", hint="use 'gaussian' or 'orthogonal'")
    torch.manual_seed(seed)
    layers = []
    for _ in range(depth):
        lin = nn.Linear(width, width, bias=False)
        if init == "orthogonal":
            nn.init.orthogonal_(lin.weight)
        else:
            nn.init.normal_(lin.weight, std=width**-0.5)
        layers.append(lin)
    return nn.Sequential(*layers).to(dtype)
