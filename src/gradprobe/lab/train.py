"""A small, deterministic training loop shared by the lab's experiments.

It is the loop a user would write (shuffle, mini-batches, ``loss.backward()``,
``optimizer.step()``), with the gradprobe :class:`~gradprobe.Probe` optionally attached exactly as
a user attaches it, so a lab run directory is an ordinary run directory.

Determinism: model initialisation runs under :func:`seeded` (a forked RNG, so the caller's global
RNG is untouched) and the shuffling uses its own ``torch.Generator`` seeded from ``seed``. The same
seed gives bit-identical numbers on rerun on the same machine and build.

>>> import torch
>>> from gradprobe.lab import train, zoo
>>> with train.seeded(0):
...     model = zoo.mlp([2, 8, 1], "tanh")
>>> x = torch.randn(64, 2); y = (x[:, :1] > 0).float()
>>> result = train.fit(model, x, y, optimizer="adam", lr=0.05, epochs=30, batch_size=16)
>>> result.accuracy_after > 0.9
True
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypedDict

import torch
from torch import Tensor, nn

from gradprobe.errors import ConfigError

if TYPE_CHECKING:  # typing.Unpack is Python 3.11+; annotations are not evaluated at run time
    from typing_extensions import Unpack

OptimizerName = Literal["sgd", "momentum", "adam", "rmsprop", "adagrad"]
LossName = Literal["bce", "cross_entropy", "mse"]

OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    # name: (class, defaults). Learning rates and RMSprop's decay follow Keras' defaults
    # (lr 1e-3, rho 0.9, eps 1e-7), which the classic vanishing-gradient tutorials used; PyTorch's
    # own RMSprop defaults (lr 1e-2, alpha 0.99) train the circles networks noticeably differently.
    "sgd": (torch.optim.SGD, {"lr": 0.01}),
    "momentum": (torch.optim.SGD, {"lr": 0.01, "momentum": 0.9}),
    "adam": (torch.optim.Adam, {"lr": 1e-3, "eps": 1e-7}),
    "rmsprop": (torch.optim.RMSprop, {"lr": 1e-3, "alpha": 0.9, "eps": 1e-7}),
    "adagrad": (torch.optim.Adagrad, {"lr": 1e-2}),
}
"""Optimizers by name, with the defaults the lab uses (override any of them in ``make_optimizer``)."""


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with ``torch.manual_seed(seed)`` on a forked CPU RNG, restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def threads(n: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)`` (restored afterwards; ``None``: unchanged).

    The lab's networks have a few dozen parameters: splitting such ops over threads costs more
    than the work, and on a busy machine idle-waiting worker threads slow every step down
    (measured here under load: a 5-unit MLP's backward pass took 30 ms with 2 threads).
    """
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def make_optimizer(
    name: str, params: Any, *, lr: float | None = None, **options: Any
) -> torch.optim.Optimizer:
    """An optimizer from :data:`OPTIMIZERS` by name; ``lr`` and ``options`` override its defaults.

    >>> opt = make_optimizer("rmsprop", nn.Linear(2, 1).parameters())
    >>> opt.defaults["alpha"], opt.defaults["lr"]
    (0.9, 0.001)
    """
    key = name.lower()
    if key not in OPTIMIZERS:
        raise ConfigError(
            f"unknown optimizer {name!r}", hint="choose one of: " + ", ".join(OPTIMIZERS)
        )
    cls, defaults = OPTIMIZERS[key]
    kwargs = {**defaults, **options}
    if lr is not None:
        if not (lr > 0 and math.isfinite(lr)):
            raise ConfigError(f"learning rate lr={lr!r} must be a positive number", hint="e.g. lr=1e-3")
        kwargs["lr"] = lr
    return cls(params, **kwargs)


def loss_function(name: str) -> Callable[..., Tensor]:
    """The loss called ``name`` (:data:`LossName`), as ``f(output, target) -> Tensor``."""
    if name == "bce":  # the model outputs logits; sigmoid + binary cross-entropy, stably fused
        return nn.functional.binary_cross_entropy_with_logits
    if name == "cross_entropy":
        return nn.functional.cross_entropy
    if name == "mse":
        return nn.functional.mse_loss
    raise ConfigError(f"unknown loss {name!r}", hint="choose one of: bce, cross_entropy, mse")


@torch.no_grad()
def predict(model: nn.Module, x: Tensor) -> Tensor:
    """The model's outputs on ``x`` in evaluation mode (the mode is restored afterwards)."""
    was_training = model.training
    model.eval()
    try:
        return model(x)
    finally:
        model.train(was_training)


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Classification accuracy. One output column: a logit, class 1 when it is > 0 (probability
    > 0.5). Several columns: the arg-max class. ``y`` holds 0/1 floats or integer classes."""
    out = predict(model, x)
    if out.ndim == 2 and out.shape[1] == 1:
        pred = (out[:, 0] > 0).long()
        target = y.reshape(-1).long()
    else:
        pred = out.argmax(dim=1)
        target = y.reshape(-1).long()
    return float((pred == target).double().mean())  # host sync: once, after training


def loss_value(model: nn.Module, x: Tensor, y: Tensor, loss: LossName = "bce") -> float:
    """The mean loss of ``model`` on ``(x, y)`` in evaluation mode."""
    return float(loss_function(loss)(predict(model, x), y))


@dataclass
class FitResult:
    """What :func:`fit` measured. Losses are per-epoch means of the mini-batch training losses."""

    epoch_losses: list[float]
    accuracy_before: float
    accuracy_after: float
    loss_before: float
    loss_after: float
    steps: int
    steps_per_epoch: int
    test_accuracy_before: float | None = None
    test_accuracy_after: float | None = None
    run_dir: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class LoopOptions(TypedDict, total=False):
    """The keyword arguments :func:`fit` and :func:`fit_stacked` share (see :class:`Loop`)."""

    loss: LossName
    optimizer: str
    lr: float | None
    optimizer_options: Mapping[str, Any] | None
    batch_size: int
    epochs: int
    on_epoch: Callable[[int, int], None] | None
    num_threads: int | None


@dataclass(frozen=True)
class Loop:
    """The training loop's options, shared by :func:`fit` and :func:`fit_stacked`.

    ``loss`` (the model outputs logits for ``"bce"``), ``optimizer`` by name from
    :data:`OPTIMIZERS` with ``lr`` and ``optimizer_options`` overriding its defaults, mini-batches
    of ``batch_size``, ``epochs`` passes over the data; ``on_epoch(epoch, epochs)`` is called
    after each epoch (progress bars); training runs on ``num_threads`` intra-op threads (see
    :func:`threads`; ``None`` leaves torch's setting).

    Each epoch visits every example once in the order :meth:`order` draws from ``seed`` and the
    epoch (the last batch may be smaller, as in Keras' ``fit``).
    """

    loss: LossName = "bce"
    optimizer: str = "adam"
    lr: float | None = None
    optimizer_options: Mapping[str, Any] | None = None
    batch_size: int = 32
    epochs: int = 100
    on_epoch: Callable[[int, int], None] | None = None
    num_threads: int | None = 1

    def check(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size} must be at least 1",
                              hint="e.g. batch_size=32")
        if self.epochs < 0:
            raise ConfigError(f"epochs={self.epochs} must be 0 or more", hint="e.g. epochs=100")

    def loss_fn(self) -> Callable[..., Tensor]:
        return loss_function(self.loss)

    def make_optimizer(self, params: Any) -> torch.optim.Optimizer:
        return make_optimizer(self.optimizer, params, lr=self.lr,
                              **dict(self.optimizer_options or {}))

    def steps_per_epoch(self, n: int) -> int:
        return math.ceil(n / self.batch_size)

    @staticmethod
    def order(n: int, seed: int, epoch: int) -> Tensor:
        """The shuffled order of ``n`` examples in ``epoch`` for shuffling seed ``seed``."""
        return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))

    def epoch_done(self, epoch: int) -> None:
        if self.on_epoch is not None:
            self.on_epoch(epoch + 1, self.epochs)


def fit(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    seed: int = 0,
    x_test: Tensor | None = None,
    y_test: Tensor | None = None,
    run_dir: str | Path | None = None,
    probe_every: int | None = None,
    probe_options: Mapping[str, Any] | None = None,
    **options: Unpack[LoopOptions],
) -> FitResult:
    """Train ``model`` on ``(x, y)`` with shuffled mini-batches and return what was measured.

    ``options`` are the :class:`Loop`'s (``loss``, ``optimizer``, ``lr``, ``optimizer_options``,
    ``batch_size``, ``epochs``, ``on_epoch``, ``num_threads``); the shuffling order is drawn from
    ``seed``. With ``run_dir`` the loop runs inside ``gp.Probe(model, optimizer, run_dir=run_dir,
    every=probe_every)`` and hands it every loss; ``probe_every`` defaults to once per epoch;
    ``probe_options`` go to the Probe (e.g. ``kinds``, ``overwrite``).
    """
    loop = Loop(**options)
    with threads(loop.num_threads):
        return _fit(model, x, y, loop, seed=seed, x_test=x_test, y_test=y_test, run_dir=run_dir,
                    probe_every=probe_every, probe_options=probe_options)


def _fit(
    model: nn.Module, x: Tensor, y: Tensor, loop: Loop, *, seed: int, x_test: Tensor | None,
    y_test: Tensor | None, run_dir: str | Path | None, probe_every: int | None,
    probe_options: Mapping[str, Any] | None,
) -> FitResult:
    n = int(x.shape[0])
    if n == 0 or int(y.shape[0]) != n:
        raise ConfigError(
            f"fit needs as many targets as inputs and at least one example, got x {tuple(x.shape)}, "
            f"y {tuple(y.shape)}", hint="pass x of shape (n, features) and y of shape (n, ...)",
        )
    loop.check()
    loss_fn = loop.loss_fn()
    opt = loop.make_optimizer(model.parameters())
    steps_per_epoch = loop.steps_per_epoch(n)

    acc_before = accuracy(model, x, y)
    loss_before = loss_value(model, x, y, loop.loss)
    test_before = accuracy(model, x_test, y_test) if x_test is not None and y_test is not None else None

    history: list[Tensor] = []
    probe_ctx: contextlib.AbstractContextManager[Any]
    if run_dir is not None:
        import gradprobe as gp

        every = probe_every or steps_per_epoch
        probe_ctx = gp.Probe(model, opt, run_dir=str(run_dir), every=every,
                             **dict(probe_options or {}))
    else:
        probe_ctx = contextlib.nullcontext()

    model.train()
    with probe_ctx as probe:
        for epoch in range(loop.epochs):
            order = loop.order(n, seed, epoch)
            xs, ys = x[order].split(loop.batch_size), y[order].split(loop.batch_size)
            epoch_losses = []
            for xb, yb in zip(xs, ys):
                batch_loss = loss_fn(model(xb), yb)
                if probe is not None:
                    probe.observe_loss(batch_loss)
                batch_loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                epoch_losses.append(batch_loss.detach())
            history.append(torch.stack(epoch_losses).mean())
            loop.epoch_done(epoch)

    losses = torch.stack(history).tolist() if history else []  # one host transfer, after training
    return FitResult(
        epoch_losses=[float(v) for v in losses],
        accuracy_before=acc_before,
        accuracy_after=accuracy(model, x, y),
        loss_before=loss_before,
        loss_after=loss_value(model, x, y, loop.loss),
        steps=loop.epochs * steps_per_epoch,
        steps_per_epoch=steps_per_epoch,
        test_accuracy_before=test_before,
        test_accuracy_after=(
            accuracy(model, x_test, y_test) if x_test is not None and y_test is not None else None
        ),
        run_dir=None if run_dir is None else Path(run_dir),
    )


class StackedMLP(nn.Module):
    """``S`` networks of identical architecture evaluated as one: every Linear becomes a batched
    matrix product over a leading model axis, activations apply elementwise.

    Training it with a loss that *sums* the ``S`` per-model mean losses gives every slot exactly
    the gradient it would get alone (the slots share no parameter), and Adam, RMSprop, SGD and
    Adagrad update elementwise, so a stacked run is ``S`` independent runs computed together,
    without the per-step Python overhead of ``S`` small models. Used by the lab to repeat an
    experiment over seeds; ``tests/test_lab_core.py`` checks it against separate training.

    The models must be ``nn.Sequential`` of ``nn.Linear`` and parameter-free elementwise modules.
    """

    def __init__(self, models: list[nn.Sequential]) -> None:
        super().__init__()
        if not models:
            raise ConfigError("StackedMLP needs at least one model", hint="pass a list of models")
        first = models[0]
        self.plan: list[tuple[str, nn.Module | None]] = []
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for i, module in enumerate(first):
            column = [m[i] for m in models]
            if any(type(c) is not type(module) for c in column):
                raise ConfigError(
                    f"models differ at position {i}: {[type(c).__name__ for c in column]}",
                    hint="stack models of identical architecture",
                )
            if isinstance(module, nn.Linear):
                lins = [c for c in column if isinstance(c, nn.Linear)]
                w = torch.stack([c.weight.detach().T for c in lins])  # (S, in, out)
                b = torch.stack([
                    c.bias.detach()[None, :] if c.bias is not None
                    else torch.zeros(1, c.out_features, dtype=w.dtype) for c in lins
                ])
                self.weights.append(nn.Parameter(w.clone()))
                self.biases.append(nn.Parameter(b.clone(), requires_grad=module.bias is not None))
                self.plan.append(("linear", None))
            elif next(module.parameters(), None) is None:
                self.plan.append(("elementwise", module))
            else:
                raise ConfigError(
                    f"cannot stack module {type(module).__name__} at position {i}",
                    hint="StackedMLP takes Linear layers and parameter-free activations",
                )

    def forward(self, x: Tensor) -> Tensor:
        """``x``: (S, batch, features) -> (S, batch, outputs)."""
        k = 0
        for kind, module in self.plan:
            if kind == "linear":
                x = torch.baddbmm(self.biases[k], x, self.weights[k])
                k += 1
            else:
                assert module is not None
                x = module(x)
        return x

    @torch.no_grad()
    def unstack_into(self, models: list[nn.Sequential]) -> None:
        """Copy slot ``s``'s parameters back into ``models[s]``."""
        for s, model in enumerate(models):
            linears = [m for m in model if isinstance(m, nn.Linear)]
            for k, lin in enumerate(linears):
                lin.weight.copy_(self.weights[k][s].T)
                if lin.bias is not None:
                    lin.bias.copy_(self.biases[k][s, 0])


def fit_stacked(
    models: list[nn.Sequential],
    data: list[tuple[Tensor, Tensor]],
    *,
    seeds: list[int],
    **options: Unpack[LoopOptions],
) -> list[FitResult]:
    """Train ``models[s]`` on ``data[s]`` with shuffling seed ``seeds[s]``, all at once.

    Numerically the same as ``fit(models[s], *data[s], seed=seeds[s], **options)`` for each
    ``s`` (up to floating-point rounding of the batched products); the trained parameters are
    copied back into ``models``. Every data set must have the same number of examples.
    ``options`` are the :class:`Loop`'s, as for :func:`fit`.
    """
    loop = Loop(**options)
    if not (len(models) == len(data) == len(seeds)) or not models:
        raise ConfigError(
            f"fit_stacked needs one data set and one seed per model, got {len(models)} models, "
            f"{len(data)} data sets, {len(seeds)} seeds", hint="pass lists of equal length",
        )
    sizes = {int(x.shape[0]) for x, _ in data}
    if len(sizes) != 1 or any(int(x.shape[0]) != int(y.shape[0]) for x, y in data):
        raise ConfigError(f"data sets differ in size {sorted(sizes)}",
                          hint="give every model the same number of examples")
    loop.check()
    with threads(loop.num_threads):
        return _fit_stacked(models, data, seeds, sizes.pop(), loop)


def _fit_stacked(
    models: list[nn.Sequential], data: list[tuple[Tensor, Tensor]], seeds: list[int], n: int,
    loop: Loop,
) -> list[FitResult]:
    loss_fn = loop.loss_fn()
    before = [(accuracy(m, x, y), loss_value(m, x, y, loop.loss)) for m, (x, y) in zip(models, data)]
    stacked = StackedMLP(models)
    opt = loop.make_optimizer(stacked.parameters())
    xs = torch.stack([x for x, _ in data])
    ys = torch.stack([y for _, y in data])
    steps_per_epoch = loop.steps_per_epoch(n)
    history: list[Tensor] = []
    n_models = len(models)
    for epoch in range(loop.epochs):
        orders = torch.stack([loop.order(n, s, epoch) for s in seeds])
        bx = torch.gather(xs, 1, orders[..., None].expand(-1, -1, xs.shape[-1]))
        by = torch.gather(ys, 1, orders.view(*orders.shape, *([1] * (ys.ndim - 2))).expand_as(ys))
        epoch_losses = []
        for xb, yb in zip(bx.split(loop.batch_size, 1), by.split(loop.batch_size, 1)):
            out = stacked(xb)
            # each slot's mean loss over its own batch; their sum trains every slot alone
            per_model = loss_fn(out.flatten(0, 1), yb.flatten(0, 1), reduction="none")
            per_model = per_model.reshape(n_models, -1).mean(1)
            per_model.sum().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            epoch_losses.append(per_model.detach())
        history.append(torch.stack(epoch_losses).mean(0))
        loop.epoch_done(epoch)
    stacked.unstack_into(models)
    curves = torch.stack(history).T.tolist() if history else [[] for _ in models]
    return [
        FitResult(
            epoch_losses=[float(v) for v in curves[s]],
            accuracy_before=before[s][0], loss_before=before[s][1],
            accuracy_after=accuracy(models[s], *data[s]),
            loss_after=loss_value(models[s], *data[s], loop.loss),
            steps=loop.epochs * steps_per_epoch, steps_per_epoch=steps_per_epoch,
        )
        for s in range(len(models))
    ]


__all__ = [
    "OPTIMIZERS",
    "FitResult",
    "Loop",
    "LoopOptions",
    "StackedMLP",
    "LossName",
    "OptimizerName",
    "accuracy",
    "fit",
    "threads",
    "fit_stacked",
    "loss_function",
    "loss_value",
    "make_optimizer",
    "predict",
    "seeded",
]
