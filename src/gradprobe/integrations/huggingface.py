"""A ``transformers.TrainerCallback`` that runs a :class:`gradprobe.Probe` through ``Trainer.train``.

    >>> from gradprobe.integrations.huggingface import GradprobeCallback   # doctest: +SKIP
    >>> trainer = Trainer(model, args, train_dataset=ds,
    ...                   callbacks=[GradprobeCallback()])                 # doctest: +SKIP
    >>> trainer.train()                                                     # doctest: +SKIP
    >>> run = gp.Run.open(f"{args.output_dir}/gradprobe")                  # doctest: +SKIP

Which gradient is which (transformers 5.x, ``Trainer._inner_training_loop``): after the last
micro-batch of an optimizer step the Trainer clips (``max_grad_norm > 0``,
``clip_grad_norm_``, which returns the norm *before* clipping and logs it as ``grad_norm``),
then calls ``on_pre_optimizer_step``, then ``optimizer.step()``. So:

* kind ``grad`` (the Probe's optimizer step hook, as ``on_pre_optimizer_step`` would see it):
  the gradients **after clipping**, the ones the optimizer applies;
* ``preclip.parquet`` in the run directory (:func:`preclip`): per step and layer, the norm of
  the gradient **before clipping** (``norm``), with ``total_norm`` (over all parameters: the
  Trainer's logged ``grad_norm``) and ``clip_coef = min(1, max_grad_norm / (total_norm + 1e-6))``,
  the factor clipping multiplied every gradient by. The pre-clip norm is what exposes an
  explosion (clipping hides it). It is measured by a ``register_post_accumulate_grad_hook`` on
  every trainable parameter: ``Σ g²`` of the accumulated gradient, on the device, overwritten at
  each micro-batch, so the value kept at the optimizer step is that of the complete
  accumulated gradient before the Trainer's clipping. One host transfer at the end of training.
  Every other statistic of the pre-clip gradient is the ``grad`` row divided by ``clip_coef``
  (clipping scales all gradients by one factor).

The loss of each micro-batch is read from the model's output (``output.loss``, a forward hook;
the step's loss is their mean). One record per optimizer step under gradient accumulation (the
Probe counts optimizer steps). The run directory defaults to ``{output_dir}/gradprobe``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

import gradprobe as gp

PRECLIP = "preclip.parquet"


def _inner(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's wrapper (its step hooks fire on the inner one)."""
    while (not type(optimizer).__module__.startswith("torch.optim")
           and isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer)):
        optimizer = optimizer.optimizer
    return optimizer  # type: ignore[no-any-return]


class GradprobeCallback(TrainerCallback):  # type: ignore[misc]
    """Attach a Probe at ``on_train_begin``, detach at ``on_train_end``.

    Args:
        run_dir: the run directory (default ``{args.output_dir}/gradprobe``).
        **probe_kwargs: passed to :class:`gradprobe.Probe` (``every``, ``kinds``,
            ``hist_every``, ``flush_every``, ``overwrite``, ...).
    """

    def __init__(self, run_dir: str | Path | None = None, **probe_kwargs: Any) -> None:
        self.run_dir = run_dir
        self.probe_kwargs = probe_kwargs
        self.probe: gp.Probe | None = None
        self._handles: list[Any] = []
        self._sumsq: dict[str, torch.Tensor] = {}
        self._rows: list[torch.Tensor] = []
        self._steps: list[int] = []
        self._names: list[str] = []
        self._max_norm = 0.0

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                       optimizer: Any = None, **kwargs: Any) -> None:
        run_dir = Path(self.run_dir) if self.run_dir is not None else (
            Path(args.output_dir) / "gradprobe")
        self.run_dir = run_dir
        self._max_norm = float(args.max_grad_norm or 0.0)
        self.probe = gp.Probe(model, _inner(optimizer), run_dir=run_dir, **self.probe_kwargs)
        self.probe.attach()
        self._handles.append(model.register_forward_hook(self._loss_hook))
        layers: dict[str, list[torch.nn.Parameter]] = {}
        for name, p in model.named_parameters():
            if p.requires_grad:
                layers.setdefault(name.rpartition(".")[0], []).append(p)
        self._names = list(layers)
        for layer, params in layers.items():
            for p in params:
                self._handles.append(p.register_post_accumulate_grad_hook(
                    lambda t, layer=layer, p=p: self._grad_hook(layer, p, t)))

    def _loss_hook(self, module: Any, args: Any, output: Any) -> None:
        loss = getattr(output, "loss", None)
        if (self.probe is not None and isinstance(loss, torch.Tensor) and loss.numel() == 1
                and torch.is_grad_enabled()):
            self.probe.observe_loss(loss.detach())

    def _grad_hook(self, layer: str, param: Any, t: torch.Tensor) -> None:
        # Σ g² of the gradient accumulated so far; on the device, no sync. The hooks of one
        # micro-batch rewrite their layer's entry (a dict keyed by layer and parameter).
        if t.grad is not None:
            g = t.grad.detach()
            self._sumsq[f"{layer}\0{id(param)}"] = torch.linalg.vector_norm(
                g, dtype=torch.float64).square() if g.is_floating_point() else g.new_zeros(())

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not self._sumsq:
            return
        per_layer = []
        for layer in self._names:
            vals = [v for k, v in self._sumsq.items() if k.partition("\0")[0] == layer]
            per_layer.append(torch.stack(vals).sum() if vals else torch.zeros((), dtype=torch.float64))
        self._rows.append(torch.stack(per_layer))
        self._steps.append(int(state.global_step))
        self._sumsq.clear()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self.probe is None:
            return
        self.probe.detach()
        from gradprobe.capture.distributed import rank

        if self._rows and rank() == 0:
            self._write_preclip()

    def _write_preclip(self) -> None:
        import numpy as np
        import pandas as pd

        sumsq = torch.stack(self._rows).cpu().numpy()  # the one host transfer
        total = np.sqrt(sumsq.sum(1))
        coef = (np.minimum(1.0, self._max_norm / (total + 1e-6)) if self._max_norm > 0
                else np.ones_like(total))
        n, k = sumsq.shape
        frame = pd.DataFrame({
            "step": np.repeat(np.asarray(self._steps), k),
            "layer": np.tile(np.asarray(self._names, dtype=object), n),
            "norm": np.sqrt(sumsq).reshape(-1),
            "total_norm": np.repeat(total, k),
            "clip_coef": np.repeat(coef, k),
        })
        assert self.run_dir is not None
        tmp = Path(self.run_dir) / (PRECLIP + ".tmp")
        frame.to_parquet(tmp, index=False)
        tmp.replace(Path(self.run_dir) / PRECLIP)


def preclip(run_dir: str | Path) -> Any:
    """The pre-clip gradient norms a :class:`GradprobeCallback` wrote: a DataFrame with
    ``step, layer, norm, total_norm, clip_coef`` (see the module docstring)."""
    import pandas as pd

    return pd.read_parquet(Path(run_dir) / PRECLIP)


__all__ = ["GradprobeCallback", "preclip"]
