"""A Lightning 2.x ``Callback`` that runs a :class:`gradprobe.Probe` through ``Trainer.fit``.

    >>> from gradprobe.integrations.lightning import GradprobeCallback    # doctest: +SKIP
    >>> trainer = L.Trainer(max_epochs=3, callbacks=[GradprobeCallback()])  # doctest: +SKIP
    >>> trainer.fit(model, loader)                                          # doctest: +SKIP
    >>> run = gp.Run.open(f"{trainer.log_dir}/gradprobe")                   # doctest: +SKIP

``lightning.pytorch`` is used, or ``pytorch_lightning`` where only that is installed.

Which gradient is which: Lightning runs ``optimizer.step(closure)``; the closure does the
training step and ``backward``, then (``Precision._after_closure``) calls
``on_before_optimizer_step``, then clips (``gradient_clip_val``), then the optimizer updates.
Under AMP with a ``GradScaler`` (``precision="16-mixed"``) the gradients are unscaled before that
hook. So the Probe's optimizer step hooks cannot be used (they fire before the closure has run:
the Probe refuses closure optimizers); the callback drives a Probe without an optimizer:

* kind ``grad``: read at ``on_before_optimizer_step`` (:meth:`gradprobe.Probe.before_update`):
  the accumulated gradients of the step, **unscaled and before clipping**;
* ``weight``, ``update``, ``drift``, ``spread``: read at ``on_train_batch_end`` of the batch
  that stepped (:meth:`gradprobe.Probe.step`), after the update; ``update`` is measured against
  a copy of the weights taken when the step began;
* ``act``, ``act_grad``, ``input``: every training forward pass of the step; the micro-batches
  of gradient accumulation (``accumulate_grad_batches > 1``) are merged into one record per
  optimizer step, as the Probe does for micro-batches;
* the loss: ``outputs["loss"]`` of ``on_train_batch_end`` (the training step's loss, which
  Lightning divides by ``accumulate_grad_batches``; multiplied back here), the mean over the
  micro-batches of the step.

The run directory defaults to ``{trainer.log_dir}/gradprobe`` (the first logger's folder, or
``default_root_dir`` without a logger). The Probe detaches at ``on_train_end`` and at
``on_exception`` (what was recorded stays readable). One optimizer only. A step whose
optimizer did not step (the AMP ``GradScaler`` skips ``optimizer.step()`` on inf/NaN gradients;
seen by a step post hook on the torch optimizer) is recorded with ``skipped=True``, as the
Probe records the steps a scaler skips.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import gradprobe as gp
from gradprobe.errors import ConfigError
from gradprobe.integrations import require

try:
    import lightning.pytorch as pl
except ImportError:  # the older package name, or the extra to install
    pl = require("pytorch_lightning", "lightning")


class GradprobeCallback(pl.Callback):  # type: ignore[misc]
    """Attach a Probe to the LightningModule at ``on_train_start``, detach at ``on_train_end``.

    Args:
        run_dir: the run directory (default ``{trainer.log_dir}/gradprobe``).
        **probe_kwargs: passed to :class:`gradprobe.Probe` (``every``, ``kinds``, ``layers``,
            ``hist_every``, ``flush_every``, ``overwrite``, ...); not ``optimizer`` or
            ``scaler`` (the callback drives the steps).
    """

    def __init__(self, run_dir: str | Path | None = None, **probe_kwargs: Any) -> None:
        if run_dir is not None and not isinstance(run_dir, (str, Path)):
            raise ConfigError(f"run_dir must be a path, got {type(run_dir).__name__}",
                              hint='pass run_dir="runs/my-run", or leave it out to use the '
                              "trainer's log_dir")
        taken = sorted({"optimizer", "scaler", "model"} & set(probe_kwargs))
        if taken:
            raise ConfigError(f"GradprobeCallback sets {', '.join(taken)} itself",
                              hint="leave them out: the callback probes the LightningModule and "
                              "records each optimizer step from Lightning's hooks")
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.probe_kwargs = probe_kwargs
        self.probe: gp.Probe | None = None
        self._stepped = False  # on_before_optimizer_step ran in this batch
        self._updated = False  # the torch optimizer stepped since (its step post hook)
        self._handle: Any = None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self.probe is not None and self.probe.attached:
            raise ConfigError("this GradprobeCallback is already recording a fit",
                              hint="use one GradprobeCallback per Trainer")
        n_opt = len(trainer.optimizers)
        if n_opt != 1:
            raise ConfigError(
                f"GradprobeCallback needs exactly one optimizer, the module configures {n_opt}",
                hint="return one optimizer from configure_optimizers(), or use gp.Probe in "
                "a manual training loop")
        if self.run_dir is None:
            root = trainer.log_dir or trainer.default_root_dir
            self.run_dir = Path(root) / "gradprobe"
        self.probe = gp.Probe(pl_module, None, run_dir=self.run_dir, **self.probe_kwargs)
        self.probe.attach()
        self._stepped = self._updated = False
        # the torch optimizer's own step: it does not run when a GradScaler skips the step
        self._handle = _torch_optimizer(trainer.optimizers[0]).register_step_post_hook(
            self._post_step)

    def _post_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._updated = True

    def _close_step(self) -> None:
        assert self.probe is not None
        self.probe.step(skipped=not self._updated)  # the weights after the update
        self._stepped = self._updated = False

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        probe = self.probe
        if probe is None or not probe.attached:
            return
        if self._stepped:  # manual optimization stepping twice in one batch: close the first
            self._close_step()
        probe.before_update()  # unscaled, before clipping (see the module docstring)
        self._stepped = True

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        probe = self.probe
        if probe is None or not probe.attached:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor) and loss.numel() == 1 and loss.is_floating_point():
            k = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
            probe.observe_loss(loss.detach() * k)  # stays on the device
        if self._stepped:
            self._close_step()

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._detach()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._detach()

    def _detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self.probe is not None and self.probe.attached:
            self.probe.detach()


def _torch_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside Lightning's (or another) wrapper."""
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


__all__ = ["GradprobeCallback"]
