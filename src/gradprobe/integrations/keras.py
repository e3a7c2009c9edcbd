"""A Keras 3 ``Callback`` that runs a :class:`gradprobe.Probe` through ``model.fit`` on the PyTorch
backend (``KERAS_BACKEND=torch``, set before keras is first imported).

    >>> from gradprobe.integrations.keras import GradprobeCallback       # doctest: +SKIP
    >>> model.fit(x, y, epochs=3, callbacks=[GradprobeCallback("runs/keras")])  # doctest: +SKIP
    >>> run = gp.Run.open("runs/keras")                                    # doctest: +SKIP

How it maps onto the Probe. On the PyTorch backend every Keras layer is a ``torch.nn.Module``
and every variable a ``torch.nn.Parameter``, but a Sequential or Functional model does not
register its layers as submodules (``model.named_modules()`` reaches only parameter
dictionaries): the callback walks ``model.layers`` (into nested models) and hands the Probe a
container module whose children are those layers, named by their Keras names (``"dense_1"``;
a nested model's layers as ``"encoder/dense"``). Each layer's parameters are its variables
(``layer.weights``, Keras paths); a Dense kernel is stored ``(in, out)``, the transpose of
``nn.Linear.weight``: every recorded statistic of a parameter is a sum over its elements
(norms, moments, min/max, zero and non-finite counts), so it does not depend on the layout.

What is recorded, per layer with float variables:

* ``grad``: ``variable.value.grad`` at ``on_train_batch_end``. Keras's PyTorch trainer runs the
  forward pass, ``zero_grad()``, ``loss.backward()``, then ``optimizer.apply(gradients)``; the
  gradients stay set until the next batch, so they are the step's gradients as backward left
  them: **before** the optimizer's ``clipnorm``/``clipvalue``/``global_clipnorm`` (which clip a
  copy inside ``apply``);
* ``weight``, ``update``, ``drift``: the variables after ``optimizer.apply``;
* ``act``, ``act_grad``: each layer's output and the gradient of the loss with respect to it
  (forward hooks fire: Keras calls a layer through ``torch.nn.Module.__call__``). A Dense layer's
  activation is applied inside it, so its ``act`` is the activated output, with the fractions
  of saturated and dead units where the activation is one the Probe knows (``relu``,
  ``relu6``, ``sigmoid``, ``tanh``; also ``elu``, ``selu``, ``gelu``, ``silu``, ``softplus``,
  which have no such rule), given as ``activation=`` or by an ``Activation``/``ReLU`` layer,
  and where the output has at most 3 dimensions (units last, as the Probe counts them) or is a
  ``channels_first`` convolution's (a channels-last image output gets no rule);
* the loss: that of each batch, as backpropagated (with regularisation losses), recovered on
  the device from Keras's loss tracker (``Δtotal / Δcount`` of its running mean; the ``loss`` of
  ``logs`` is the epoch's running mean).

Not recorded: ``spread`` and ``input`` (the Probe computes them for ``nn.Linear``/``nn.ConvNd``
only). A ``LossScaleOptimizer`` (``mixed_float16``) is refused: its gradients are multiplied
by the loss scale.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
from torch import nn

import gradprobe as gp
from gradprobe.activations import ACTIVATIONS
from gradprobe.errors import ConfigError, UnsupportedModelError
from gradprobe.integrations import require

keras: Any = require("keras", "keras")


class LayerView(nn.Module):
    """One Keras layer as the Probe sees it: its **trainable** variables as parameters (a
    BatchNormalization's moving mean and variance are not weights the optimizer moves), and
    the layer's own forward hooks (registering a hook here registers it on the layer, which
    is not a submodule: its other variables stay out of ``parameters()``)."""

    layer: Any

    def __init__(self, layer: Any) -> None:
        super().__init__()
        object.__setattr__(self, "layer", layer)  # not registered as a submodule
        for i, v in enumerate(layer.trainable_weights):
            self.register_parameter(f"{i}_{v.path.replace('.', '_').replace('/', '_')}",
                                    v.value)

    def register_forward_hook(self, hook: Any, **kwargs: Any) -> Any:
        return self.layer.register_forward_hook(hook, **kwargs)

    def register_forward_pre_hook(self, hook: Any, **kwargs: Any) -> Any:
        return self.layer.register_forward_pre_hook(hook, **kwargs)


_SAME = ("relu", "relu6", "sigmoid", "tanh", "elu", "selu", "gelu", "silu", "softplus")
"""Keras activations (by function name) that are the torch activation of that name."""


def _activation(layer: Any) -> str | None:
    """The activation a Keras layer applies to its output (Dense(activation=...),
    Activation, ReLU with its defaults), if it is one of :data:`_SAME` and the Probe's unit
    axis is the layer's: the last dimension of an output of at most 3 dimensions, dimension 1
    (channels first) of a larger one. A channels-last image output (``N, H, W, C``, Keras's
    default) gets no rule (dead units would be counted along ``H``)."""
    try:
        rank = len(layer.output.shape)
    except (AttributeError, ValueError, TypeError):  # not built, or called more than once
        return None
    if rank >= 4 and getattr(layer, "data_format", None) != "channels_first":
        return None
    if isinstance(layer, keras.layers.ReLU):
        plain = (layer.max_value is None and not layer.negative_slope and not layer.threshold)
        return "relu" if plain else None
    name = getattr(getattr(layer, "activation", None), "__name__", None)
    return name if name in _SAME else None


def _view(layer: Any) -> LayerView:
    """A view of ``layer`` whose type has the Keras class's name (``meta.json``'s layer type)
    and, where the layer applies a known activation, is also that torch activation module, so
    that the Probe counts saturated and dead units of its output (:mod:`gradprobe.activations`)."""
    return _view_class(layer.__class__, _activation(layer))(layer)


@functools.cache
def _view_class(cls: Any, act: str | None) -> type[LayerView]:
    bases: tuple[type, ...] = (LayerView,)
    if act is not None:
        bases += ACTIVATIONS[act].module_types[:1]
    return type(cls.__name__, bases, {"__module__": __name__})


class KerasLayers(nn.Module):
    """The layers of a Keras model as the children of one ``nn.Module`` (see the module
    docstring): the model the Probe sees."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        for name, layer in _walk(model, ""):
            self.add_module(name, _view(layer))


def _walk(model: Any, prefix: str) -> list[tuple[str, Any]]:
    """``(name, layer)`` for every layer of ``model``, into nested models (input layers left
    out)."""
    out: list[tuple[str, Any]] = []
    for layer in model.layers:
        name = prefix + layer.name.replace(".", "_")
        if isinstance(layer, keras.Model):
            out += _walk(layer, name + "/")
        elif isinstance(layer, nn.Module) and not isinstance(layer, keras.layers.InputLayer):
            out.append((name, layer))
    return out


class GradprobeCallback(keras.callbacks.Callback):  # type: ignore[misc]
    """Attach a Probe at ``on_train_begin``, record at each ``on_train_batch_end``, detach at
    ``on_train_end``.

    Args:
        run_dir: the run directory to create.
        **probe_kwargs: passed to :class:`gradprobe.Probe` (``every``, ``kinds``, ``layers``
            (globs on the Keras layer names), ``hist_every``, ``flush_every``, ``overwrite``).
    """

    def __init__(self, run_dir: str | Path, **probe_kwargs: Any) -> None:
        super().__init__()
        if not isinstance(run_dir, (str, Path)):
            raise ConfigError(f"run_dir must be a path, got {type(run_dir).__name__}",
                              hint='pass run_dir="runs/my-run"')
        taken = sorted({"optimizer", "scaler", "model", "layer_types"} & set(probe_kwargs))
        if taken:
            raise ConfigError(f"GradprobeCallback sets {', '.join(taken)} itself",
                              hint="leave them out: the callback probes the model's layers and "
                              "records each optimizer step at on_train_batch_end")
        if keras.backend.backend() != "torch":
            raise UnsupportedModelError(
                f"gradprobe's Keras callback needs the PyTorch backend; Keras runs on "
                f"{keras.backend.backend()!r}",
                hint="set the environment variable KERAS_BACKEND=torch before importing keras")
        self.run_dir = Path(run_dir)
        self.probe_kwargs = probe_kwargs
        self.probe: gp.Probe | None = None
        self._seen: tuple[torch.Tensor, torch.Tensor] | None = None

    def on_train_begin(self, logs: Any = None) -> None:
        if self.probe is not None and self.probe.attached:
            raise ConfigError("this GradprobeCallback is already recording a fit",
                              hint="use one GradprobeCallback per fit")
        model = self.model
        if isinstance(getattr(model, "optimizer", None), keras.optimizers.LossScaleOptimizer):
            raise UnsupportedModelError(
                "the model's optimizer is a LossScaleOptimizer: its gradients are multiplied "
                "by the dynamic loss scale, so gradprobe would record scaled gradients",
                hint="record a float32 run (keras.mixed_precision.set_dtype_policy('float32'))")
        layers = KerasLayers(model)
        if next(layers.parameters(), None) is None:
            raise UnsupportedModelError(
                f"the Keras model {model.name!r} has no built layer with weights",
                hint="build the model first (keras.Input(...) or call it on a batch)")
        self.probe = gp.Probe(layers, None, run_dir=self.run_dir,
                              layer_types=LayerView, **self.probe_kwargs)
        self.probe.attach()

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self._seen = None  # Keras resets its loss tracker before each epoch

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        probe = self.probe
        if probe is None or not probe.attached:
            return
        loss = self._batch_loss()
        if loss is not None:
            probe.observe_loss(loss)
        probe.step()  # the gradients are still set; the weights are updated

    def _batch_loss(self) -> torch.Tensor | None:
        """This batch's loss from the tracker's running sums (on the device, no sync)."""
        tracker = getattr(self.model, "_loss_tracker", None)
        total = getattr(getattr(tracker, "total", None), "value", None)
        count = getattr(getattr(tracker, "count", None), "value", None)
        if not isinstance(total, torch.Tensor) or not isinstance(count, torch.Tensor):
            return None
        now = (total.detach().clone(), count.detach().clone())
        before, self._seen = self._seen, now
        if before is None:
            return now[0] / now[1]
        return (now[0] - before[0]) / (now[1] - before[1])

    def on_train_end(self, logs: Any = None) -> None:
        self.close()

    def close(self) -> None:
        """Detach the Probe and write what it holds (Keras has no hook for a ``fit`` that
        raises: use ``with GradprobeCallback(...) as cb:`` around ``fit``). Idempotent."""
        if self.probe is not None and self.probe.attached:
            self.probe.detach()

    def __enter__(self) -> GradprobeCallback:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["GradprobeCallback", "KerasLayers", "LayerView"]
