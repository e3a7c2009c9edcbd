"""``gradprobe preflight``: theory against measurement at initialisation, from the command line.

The model comes either from ``--mlp`` (built with :func:`gradprobe.lab.zoo.mlp`) or from
``--model module.path:factory`` (a function the user wrote, called with no arguments), with
``--input-shape`` giving the batch of standard-normal inputs.

Examples::

    gradprobe preflight --mlp "784,512x10,10" --activation tanh --init normal:0.02
    gradprobe preflight --mlp "100,100x20,10" --activation tanh --init sigma_w2:1.76 --sigma-b2 0.05
    gradprobe preflight --model mypkg.nets:make_cnn --input-shape 32,3,32,32
"""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

import typer

from gradprobe.errors import ConfigError, UnsupportedModelError

INIT_HELP = (
    "default (PyTorch's), xavier_normal, xavier_uniform, orthogonal (these three with the "
    "activation's gain), he_normal, he_uniform, lecun_normal, normal:STD, uniform:A, "
    "sigma_w2:V (std = sqrt(V/fan_in)), critical (sigma_w2 at chi1 = 1 for --activation and "
    "--sigma-b2)"
)


MAX_LAYERS = 2_000
MAX_PARAMS = 200_000_000
"""Bounds on what ``--mlp`` builds (one forward and backward at initialisation)."""


def parse_sizes(spec: str) -> list[int]:
    """``"784,512x10,10"`` -> ``[784] + [512] * 10 + [10]``."""
    sizes: list[int] = []
    try:
        for part in spec.split(","):
            part = part.strip()
            if "x" in part:
                width, times = part.split("x")
                sizes += [int(width)] * int(times)
            else:
                sizes.append(int(part))
    except ValueError:
        raise ConfigError(
            f"--mlp {spec!r} is not a list of widths",
            hint='write widths separated by commas, WIDTHxCOUNT for repeats: "784,512x10,10"',
        ) from None
    if len(sizes) < 2 or any(s < 1 for s in sizes):
        raise ConfigError(
            f"--mlp {spec!r} needs at least two positive widths", hint='e.g. "784,512x10,10"'
        )
    params = sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))
    if len(sizes) - 1 > MAX_LAYERS or params > MAX_PARAMS:
        raise ConfigError(
            f"--mlp {spec!r} builds {len(sizes) - 1:,} layers and {params:,} parameters, more "
            f"than preflight measures from the command line ({MAX_LAYERS:,} layers, "
            f"{MAX_PARAMS:,} parameters)",
            hint="mean-field predictions for deeper networks need no network: see "
            "gradprobe.theory; or call gp.preflight(model, x) in Python",
        )
    return sizes


def parse_shape(spec: str) -> tuple[int, ...]:
    """``"32,3,32,32"`` -> ``(32, 3, 32, 32)`` (the first entry is the batch size)."""
    try:
        shape = tuple(int(p) for p in spec.split(","))
    except ValueError:
        raise ConfigError(
            f"--input-shape {spec!r} is not a comma-separated list of integers",
            hint="e.g. --input-shape 32,3,32,32 (batch first)",
        ) from None
    if not shape or any(s < 1 for s in shape) or shape[0] < 2:
        raise ConfigError(
            f"--input-shape {spec!r} needs positive sizes and a batch of at least 2",
            hint="e.g. --input-shape 32,3,32,32 (batch first)",
        )
    return shape


def load_factory(spec: str):  # -> Callable[[], nn.Module]
    """Import ``module.path:function``."""
    if spec.count(":") != 1:
        raise ConfigError(
            f"--model {spec!r} must look like module.path:factory",
            hint="e.g. --model mypkg.nets:make_cnn (a function returning an nn.Module)",
        )
    module_name, attr = spec.split(":")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"--model: cannot import {module_name!r} ({exc})",
            hint="run from the directory that contains it or install it",
        ) from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(
            f"--model: {module_name!r} has no callable {attr!r}",
            hint="name a function that takes no arguments and returns an nn.Module",
        )
    return factory


def init_(model, init: str, activation: str, sigma_b2: float | None):  # -> nn.Module
    """Initialise every Linear/Conv weight of ``model`` from an ``--init`` spec, in place.

    Biases: ``N(0, sigma_b2)`` when ``sigma_b2`` is given, else left as they are.
    """
    import torch
    from torch import nn

    from gradprobe import activations
    from gradprobe.layers import is_dense
    from gradprobe.theory import meanfield

    name, _, arg = init.partition(":")
    name = name.strip().lower()

    def number(what: str) -> float:
        try:
            value = float(arg)
        except ValueError:
            raise ConfigError(
                f"--init {init!r}: {what} must be a number", hint=f"e.g. --init {name}:0.02"
            ) from None
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"--init {init!r}: {what} must be >= 0", hint=INIT_HELP)
        return value

    gain = activations.get(activation).gain
    crit = None
    if name == "critical":
        crit = meanfield.critical_sigma_w2(activation, sigma_b2 or 0.0)
    value = number("the value") if name in {"normal", "uniform", "sigma_w2"} else None
    known = {"default", "xavier_normal", "xavier_uniform", "he_normal", "he_uniform",
             "lecun_normal", "orthogonal", "normal", "uniform", "sigma_w2", "critical"}
    if name not in known:
        raise ConfigError(f"unknown --init {init!r}", hint="choose one of: " + INIT_HELP)
    with torch.no_grad():
        for m in model.modules():
            if not is_dense(m):
                continue
            w = m.weight
            fan_in = w[0].numel()
            if name == "xavier_normal":
                nn.init.xavier_normal_(w, gain=gain)
            elif name == "xavier_uniform":
                nn.init.xavier_uniform_(w, gain=gain)
            elif name == "he_normal":
                nn.init.kaiming_normal_(w, nonlinearity="relu")
            elif name == "he_uniform":
                nn.init.kaiming_uniform_(w, nonlinearity="relu")
            elif name == "lecun_normal":
                nn.init.normal_(w, std=fan_in**-0.5)
            elif name == "orthogonal":
                nn.init.orthogonal_(w, gain=gain)
            elif name == "normal":
                assert value is not None
                nn.init.normal_(w, std=value)
            elif name == "uniform":
                assert value is not None
                nn.init.uniform_(w, -value, value)
            elif name in {"sigma_w2", "critical"}:
                s2 = crit if crit is not None else value
                assert s2 is not None
                nn.init.normal_(w, std=math.sqrt(s2 / fan_in))
            if sigma_b2 is not None and m.bias is not None:
                nn.init.normal_(m.bias, std=math.sqrt(sigma_b2))
    return model


def preflight_cmd(
    mlp: str = typer.Option(None, "--mlp", help='Widths, e.g. "784,512x10,10".'),
    activation: str = typer.Option("relu", "--activation", help="Hidden activation for --mlp."),
    model: str = typer.Option(None, "--model", help="module.path:factory returning an nn.Module."),
    input_shape: str = typer.Option(None, "--input-shape", help="Batch shape, e.g. 32,3,32,32."),
    init: str = typer.Option("default", "--init", help=INIT_HELP),
    sigma_b2: float = typer.Option(None, "--sigma-b2", help="Bias variance (N(0, v) biases)."),
    batch: int = typer.Option(256, "--batch", help="Batch size for --mlp inputs."),
    seed: int = typer.Option(0, "--seed", help="Seed for weights, inputs and cotangent."),
    csv: Path = typer.Option(None, "--csv", help="Also write the per-layer table here."),
) -> None:
    """Predict vanishing/exploding gradients at initialisation and check with one pass."""
    import torch

    from gradprobe.lab.zoo import mlp as build_mlp
    from gradprobe.theory.preflight import preflight

    if (mlp is None) == (model is None):
        raise ConfigError(
            "give exactly one of --mlp and --model",
            hint='e.g. --mlp "784,512x10,10" --activation tanh',
        )
    if sigma_b2 is not None and (not math.isfinite(sigma_b2) or sigma_b2 < 0):
        raise ConfigError(f"--sigma-b2 must be >= 0, got {sigma_b2}", hint="e.g. --sigma-b2 0.05")
    if batch < 2:
        raise ConfigError(f"--batch must be at least 2, got {batch}", hint="e.g. --batch 256")
    torch.manual_seed(seed)
    if mlp is not None:
        sizes = parse_sizes(mlp)
        net = build_mlp(sizes, activation)
        shape: tuple[int, ...] = (batch, sizes[0])
    else:
        factory = load_factory(model)
        if input_shape is None:
            raise ConfigError("--model needs --input-shape", hint="e.g. --input-shape 32,3,32,32")
        shape = parse_shape(input_shape)
        try:
            net = factory()
        except TypeError as exc:
            raise ConfigError(
                f"--model {model!r} could not be called without arguments: {exc}",
                hint="wrap it in a function that takes no arguments",
            ) from None
        if not isinstance(net, torch.nn.Module):
            raise UnsupportedModelError(
                f"--model {model!r} returned {type(net).__name__}, not an nn.Module",
                hint="the factory must return the network",
            )
    if init != "default":
        init_(net, init, activation, sigma_b2)
    elif sigma_b2 is not None:
        init_(net, "default", activation, sigma_b2)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1))
    try:
        report = preflight(net, x, seed=seed)
    except RuntimeError as exc:
        raise UnsupportedModelError(
            f"the model failed on inputs of shape {tuple(shape)}: {str(exc).splitlines()[0]}",
            hint="check --input-shape (batch first)",
        ) from None
    typer.echo(str(report))
    if csv is not None:
        report.table().to_csv(csv, index=False)
        typer.echo(f"table written to {csv}")


def register(app: typer.Typer) -> None:
    app.command("preflight")(preflight_cmd)
