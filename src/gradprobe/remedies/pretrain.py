"""Greedy layer-wise autoencoder pretraining: :func:`pretrain_`.

Why
    Before rectifiers, normalisation and careful initialisation, deep sigmoid networks trained from
    random weights stalled: the gradient reaching the first layers vanished. Hinton & Salakhutdinov
    2006 ("Reducing the dimensionality of data with neural networks", with RBMs) and Bengio et al.
    2007 ("Greedy layer-wise training of deep networks", with autoencoders) trained one hidden
    layer at a time, unsupervised, to reconstruct its own input, so that every layer starts from
    weights that preserve information about the data; supervised fine-tuning then starts from there.
    Erhan et al. 2010 ("Why does unsupervised pre-training help deep learning?") measured the effect.

What is done
    The hidden Linear layers of an MLP (every Linear but the last, in execution order: traced with
    torch.fx, else registration order) are trained one after the other. Layer ``k`` with weight
    ``W``, bias ``b`` and the activation ``φ`` that follows it (from the activation table; identity
    if none) is the encoder ``h = φ(W x + b)``; a temporary untied linear decoder ``x̂ = D h + c``
    (Xavier-uniform) reconstructs its input ``x``, the minimiser of the mean squared error
    ``mean((x̂ - x)²)``, trained with Adam(``lr``) for ``epochs`` passes in mini-batches of
    ``batch_size``. ``x`` is what reaches layer ``k`` when the model (in eval mode) runs on the
    data, through the layers already pretrained. Normalisers and dropout between layers act as in
    eval mode while the inputs are collected and are not part of the encoder. The decoder is then
    discarded; the model keeps its mode, the pretrained parameters' gradients are cleared and, if
    ``optimizer`` is given, their optimizer state (momentum, Adam moments) is dropped, so the user's
    loop fine-tunes from the pretrained weights.

    The record holds each layer's reconstruction error before and after, and for scale the error of
    the best constant reconstruction (the mean per-feature variance of the layer's input).

Example
    >>> import torch
    >>> from torch import nn
    >>> from gradprobe.remedies import pretrain_
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Linear(8, 6), nn.Sigmoid(), nn.Linear(6, 4), nn.Sigmoid(), nn.Linear(4, 1))
    >>> rec = pretrain_(net, torch.randn(256, 8), epochs=20, generator=torch.Generator().manual_seed(0))
    >>> [e.layer for e in rec], all(e.loss_after < e.loss_before for e in rec)
    (['0', '2'], True)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gradprobe import activations
from gradprobe.errors import ConfigError, UnsupportedModelError
from gradprobe.layers import following_activation as _following_activation
from gradprobe.layers import registration_order as _registration_order
from gradprobe.layers import trace_order as _trace_order
from gradprobe.remedies import _surgery as S


@dataclass(frozen=True)
class LayerPretrain:
    """One hidden layer's autoencoder: reconstruction MSE before and after, and the variance."""

    layer: str
    in_features: int
    out_features: int
    activation: str
    loss_before: float
    loss_after: float
    baseline: float


@dataclass(frozen=True)
class PretrainRecord:
    """What :func:`pretrain_` did, one :class:`LayerPretrain` per hidden layer in order."""

    layers: tuple[LayerPretrain, ...]
    epochs: int
    lr: float
    batch_size: int
    samples: int
    decoder: str = "untied linear, MSE"
    optimizer_state_cleared: int = 0

    def __iter__(self) -> Iterator[LayerPretrain]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __str__(self) -> str:
        lines = [f"pretrain_: {len(self.layers)} hidden layers, {self.epochs} epochs each, "
                 f"lr {self.lr:g}, batch {self.batch_size}, {self.samples} samples ({self.decoder})",
                 f"  {'layer':<16}{'shape':>12}  {'activation':<11}{'MSE before':>12}{'after':>12}"
                 f"{'variance':>12}"]
        for e in self.layers:
            shape = f"{e.in_features}->{e.out_features}"
            lines.append(f"  {e.layer:<16}{shape:>12}  {e.activation:<11}{e.loss_before:>12.4g}"
                         f"{e.loss_after:>12.4g}{e.baseline:>12.4g}")
        if self.optimizer_state_cleared:
            lines.append(f"  optimizer state cleared for {self.optimizer_state_cleared} tensors")
        return "\n".join(lines)


class _Captured(Exception):  # a control-flow signal that stops the forward, not an error
    def __init__(self, x: Tensor) -> None:
        self.x = x


def _check(epochs: int, lr: float, batch_size: int) -> None:
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"epochs must be an integer >= 1, got {epochs!r}", hint="e.g. epochs=5")
    if isinstance(lr, bool) or not isinstance(lr, int | float) or not math.isfinite(lr) or lr <= 0:
        raise ConfigError(f"lr must be a finite number > 0, got {lr!r}", hint="e.g. lr=1e-3 (Adam)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")


def _batches(data: object) -> list[Tensor]:
    """The input batches: a tensor (one batch), or an iterable of tensors or (x, ...) tuples."""
    if isinstance(data, Tensor):
        items: Iterable[object] = [data]
    elif isinstance(data, Iterable) and not isinstance(data, str | bytes | dict):
        items = data
    else:
        raise ConfigError(f"data must be a tensor of inputs or an iterable of (x, ...) batches, "
                          f"got {type(data).__name__}", hint="e.g. pretrain_(model, x_train) or "
                          "pretrain_(model, loader) with a DataLoader of (x, y)")
    out: list[Tensor] = []
    for item in items:
        x = item[0] if isinstance(item, tuple | list) and item else item
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise ConfigError(f"each batch's input must be a floating-point tensor, got "
                              f"{type(x).__name__ if not isinstance(x, Tensor) else x.dtype}",
                              hint="pass real-valued inputs (an MLP's features)")
        if x.dim() < 1 or x.shape[0] == 0:
            raise ConfigError(f"empty batch of shape {tuple(x.shape)} in data")
        out.append(x.detach())
    if not out:
        raise ConfigError("data holds no batch", hint="pass at least one batch of inputs")
    return out


def _hidden_layers(model: nn.Module) -> list[tuple[str, nn.Linear, str]]:
    for name, mod in model.named_modules():
        own = list(mod.parameters(recurse=False))
        if own and not isinstance(mod, (nn.Linear, *S.NORMS)) and S.activation_of(mod) is None:
            raise UnsupportedModelError(
                f"pretrain_ trains the hidden Linear layers of an MLP; {name or 'the model'!r} is "
                f"a {type(mod).__name__} with its own parameters",
                hint="pretrain an MLP (Linear layers, norms, activations, dropout), or pretrain "
                "the MLP part of the model on its own inputs",
            )
    order = _trace_order(model) or _registration_order(model)
    following = _following_activation(order)
    mods = dict(model.named_modules())
    linears = [n for n in following if isinstance(mods.get(n), nn.Linear)]
    if len(linears) < 2:
        raise UnsupportedModelError(
            f"{type(model).__name__} has {len(linears)} Linear layer(s): no hidden layer to pretrain",
            hint="layer-wise pretraining needs at least one hidden layer before the output layer",
        )
    out = []
    for n in linears[:-1]:
        lin = mods[n]
        assert isinstance(lin, nn.Linear)
        out.append((n, lin, following[n] or "identity"))
    return out


def pretrain_(
    model: nn.Module,
    data: Tensor | Iterable[object],
    *,
    epochs: int = 5,
    lr: float = 1e-3,
    batch_size: int = 64,
    optimizer: torch.optim.Optimizer | None = None,
    generator: torch.Generator | None = None,
) -> PretrainRecord:
    """Pretrain the hidden Linear layers of an MLP, greedily, as autoencoders (module doc).

    Args:
        model: an MLP (Linear layers with activations, norms, dropout; any forward).
        data: a tensor of inputs, or an iterable of batches ``x`` or ``(x, ...)`` (a DataLoader);
            it is read once and kept in memory for the layer-by-layer passes.
        epochs: passes over the data per layer.
        lr: Adam's learning rate for the layer and its temporary decoder.
        batch_size: mini-batch size while pretraining a layer.
        optimizer: the fine-tuning optimizer; its state for the pretrained parameters is dropped.
        generator: a ``torch.Generator`` for the decoders' initialisation and the shuffling.

    Returns:
        :class:`PretrainRecord` with reconstruction errors before and after, per layer.

    Raises:
        ConfigError: bad ``epochs``/``lr``/``batch_size``/``data``, or inputs the model rejects.
        UnsupportedModelError: not an MLP, or no hidden layer.
    """
    _check(epochs, lr, batch_size)
    S.check_optimizer(optimizer)
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"pretrain_ needs an nn.Module, got {type(model).__name__}")
    batches = _batches(data)
    hidden = _hidden_layers(model)
    was_training = model.training
    entries: list[LayerPretrain] = []
    cleared = 0
    try:
        for name, layer, act in hidden:
            x = _inputs_of(model, layer, name, batches)
            if not layer.weight.requires_grad:
                continue  # a frozen layer stays as it is
            entries.append(_train_layer(name, layer, act, x, epochs, lr, batch_size, generator))
    finally:
        model.train(was_training)
    with torch.no_grad():
        for _, layer, _ in hidden:
            for p in layer.parameters():
                p.grad = None
                if optimizer is not None and p in optimizer.state:
                    del optimizer.state[p]
                    cleared += 1
    return PretrainRecord(tuple(entries), epochs, float(lr), batch_size,
                          sum(int(b.shape[0]) for b in batches), optimizer_state_cleared=cleared)


def _inputs_of(model: nn.Module, layer: nn.Linear, name: str, batches: list[Tensor]) -> Tensor:
    """Everything that reaches ``layer`` when the model (eval mode) runs on the batches."""

    def stop(_module: nn.Module, args: tuple[object, ...]) -> None:
        raise _Captured(args[0])  # type: ignore[arg-type]

    handle = layer.register_forward_pre_hook(stop)
    got: list[Tensor] = []
    model.eval()
    try:
        with torch.no_grad():
            for xb in batches:
                try:
                    model(xb)
                except _Captured as c:
                    got.append(c.x.detach())
                    continue
                except Exception as exc:
                    raise ConfigError(f"the model rejects a data batch of shape {tuple(xb.shape)}: "
                                      f"{type(exc).__name__}: {exc}",
                                      hint="pass the inputs the model is trained on") from exc
                raise UnsupportedModelError(f"layer {name!r} was not called by the model's forward",
                                            hint="pretrain_ needs every Linear to be used")
    finally:
        handle.remove()
    x = torch.cat(got)
    if x.dim() != 2:
        raise UnsupportedModelError(
            f"layer {name!r} receives {x.dim()}-D inputs {tuple(x.shape[1:])} per sample; pretrain_ "
            "handles MLPs whose hidden layers see one feature vector per sample",
            hint="flatten the inputs, or pretrain an MLP on its own",
        )
    if x.shape[1] != layer.in_features:
        raise ConfigError(
            f"layer {name!r} expects {layer.in_features} input features; the data brings it "
            f"{x.shape[1]} (per-sample shape {tuple(x.shape[1:])})",
            hint="pass the inputs the model is trained on",
        )
    return x


def _train_layer(name: str, layer: nn.Linear, act: str, x: Tensor, epochs: int, lr: float,
                 batch_size: int, generator: torch.Generator | None) -> LayerPretrain:
    fn = activations.get(act).fn
    decoder = nn.Linear(layer.out_features, layer.in_features, device=x.device, dtype=x.dtype)
    with torch.no_grad():
        nn.init.xavier_uniform_(decoder.weight, generator=generator)
        decoder.bias.zero_()
    params = [p for p in (*layer.parameters(), *decoder.parameters()) if p.requires_grad]
    adam = torch.optim.Adam(params, lr=lr)

    def full_loss() -> float:
        with torch.no_grad():
            return float(nn.functional.mse_loss(decoder(fn(layer(x))), x))  # one sync per layer

    before = full_loss()
    n = int(x.shape[0])
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(n, generator=generator, device="cpu").to(x.device)
            for start in range(0, n, batch_size):
                xb = x[order[start:start + batch_size]]
                loss = nn.functional.mse_loss(decoder(fn(layer(xb))), xb)
                adam.zero_grad(set_to_none=True)
                loss.backward()
                adam.step()
    baseline = float(x.var(dim=0, unbiased=False).mean())
    return LayerPretrain(name, layer.in_features, layer.out_features, act, before, full_loss(),
                         baseline)


__all__ = ["LayerPretrain", "PretrainRecord", "pretrain_"]
