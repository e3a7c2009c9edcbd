"""The Probe: per-layer gradient, weight, update and activation statistics of a training run.

Three lines around an unchanged training loop::

    >>> import tempfile, torch, gradprobe as gp
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Sigmoid(), torch.nn.Linear(8, 1))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> with gp.Probe(model, opt, run_dir=tempfile.mkdtemp() + "/demo") as probe:
    ...     for _ in range(5):
    ...         loss = model(torch.randn(16, 4)).pow(2).mean()
    ...         probe.observe_loss(loss)
    ...         loss.backward(); opt.step(); opt.zero_grad()
    >>> df = probe.run.scalars(kinds="grad")
    >>> sorted(df["layer"].unique()), int(df["step"].max())
    (['0', '2'], 4)

Every step, the always-on tier (:mod:`gradprobe.capture.always`): per layer the gradient norm
and whether its output or gradient held a NaN/Inf, the loss's finiteness, the AMP scale
(``run.grad_norms()``, ``run.steps()``). On the full tier's steps (:mod:`gradprobe.capture.schedule`:
by default the first steps, the steps after a spike or a NaN and as many others as
``budget=0.05`` of the step time allows; ``every=N`` for a fixed schedule; ``budget=None``
every step), per tracked layer:

* ``grad``: the parameter gradients at the optimizer step (accumulated over micro-batches;
  unscaled by an AMP ``GradScaler``), ``weight``: the parameters after the step, ``update``:
  ``‖W_{t+1} − W_t‖ / ‖W_{t+1}‖`` in column ``norm``, ``drift``: ``‖W_t − W_0‖ / ‖W_0‖`` in column
  ``norm`` (W0 = the parameters when the probe attached);
* ``spread``: how different a dense layer's units are, ``sqrt(Σ_i ‖w_i − w̄‖² / Σ_i ‖w_i‖²)``
  over the rows ``w_i`` of its weight after the step (Linear and ConvNd layers; column
  ``norm``; :mod:`gradprobe.stats.spread`): 0 for units with identical incoming weights;
* ``input``: the input of the first dense layer (Linear, ConvNd) to run in the forward pass,
  fixed at the first forward call (a forward pre-hook on every dense layer until one has run,
  then on that layer only): the model's input where the model starts with such a layer;
* ``act``: the module's output (forward hooks), with the fraction of saturated units and of dead
  units for activation modules of :mod:`gradprobe.activations`; ``act_grad``: the gradient of
  the loss with respect to that output (a tensor hook registered on the output in the forward
  hook; full backward hooks break on in-place activations, pytorch issue 61519).
  These are the back-propagated gradients whose variance Glorot & Bengio (2010) follow across
  layers. Forward passes under ``torch.no_grad()`` are not recorded (evaluation does not mix into
  training statistics).

Recurrent layers (``nn.RNN``, ``nn.LSTM``, ``nn.GRU``), with ``act_grad`` recorded and on the
histogram schedule (``hist_every``): the gradient of the loss with respect to each time step of
the layer's input and output sequences, reduced on the device to ``Σ grad²`` per time step
(:meth:`gradprobe.Run.time_gradients`). The input side carries the gradient back-propagated
through time; where the input does not require a gradient (data fed straight to the layer)
the layer is handed a detached copy that does, whose gradient is reduced and dropped once
accumulated (parameter gradients are unchanged). Packed sequences and bidirectional layers are
not recorded (a packed batch has no time axis to reduce along without unpacking; the two
directions of a bidirectional layer carry gradients in opposite directions of time).

Statistics are the mergeable sums of :mod:`gradprobe.stats`, computed on the tensors' device
with no host synchronisation in any hook; one device-to-host transfer per flush (every
``flush_every`` steps, ``flush_secs`` seconds, and on exit). Memory: see :mod:`gradprobe.capture.recorder`, plus one
copy of the tracked parameters for ``update``/``drift`` and one more for ``drift`` (W0).

Note:
    Gradients are those of the loss as the user reduced it (a ``sum`` loss has gradients
    ``batch`` times those of a ``mean`` loss). With an AMP ``GradScaler`` passed as ``scaler``,
    gradient and activation-gradient statistics are divided by the loss scale; steps the scaler
    skips are recorded with ``skipped=True`` (their non-finite gradients are expected). Under
    DistributedDataParallel the gradients seen at the optimizer step are already all-reduced;
    activation statistics are merged across the ranks at each flush and rank 0 writes
    (:mod:`gradprobe.capture.distributed`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from gradprobe.capture.always import AlwaysOn
from gradprobe.capture.forward import ForwardHooks
from gradprobe.capture.memory import memory_bytes
from gradprobe.capture.options import check_options
from gradprobe.capture.params import ParamStats
from gradprobe.capture.recorder import Recorder, RowInfo
from gradprobe.capture.schedule import Schedule
from gradprobe.capture.select import (
    check_kinds,
    check_optimizer,
    closure_error,
    select_layers,
)
from gradprobe.capture.steps import StepLoop
from gradprobe.errors import ConfigError, RunDirError, UnsupportedModelError
from gradprobe.stats import schema as S
from gradprobe.store.writer import RunWriter, check_run_dir

MAX_ALWAYS_ROWS = 4096
"""Steps buffered by the always-on tier at most between flushes (with a sparse fixed schedule)."""
Kind = Literal["grad", "weight", "update", "drift", "spread", "input", "act", "act_grad"]


class Probe:
    """Records per-layer statistics of a training run into ``run_dir``.

    Args:
        model: the ``nn.Module`` being trained (move it to its device before attaching).
        optimizer: its optimizer; a step is one ``optimizer.step()`` (step hooks). Without one,
            call :meth:`step` after each update.
        run_dir: directory to create (absent or empty; ``overwrite=True`` replaces a previous
            run there).
        every: a fixed schedule: the full tier at every ``every``-th step (``budget`` is then
            ignored). Default ``None``: the schedule is the budget's.
        budget: the fraction of the training step's own time the Probe may take (default
            0.05: at most about 1.05x); it measures its own time and chooses the full tier's
            steps (:mod:`gradprobe.capture.schedule`): the first steps, the steps after a
            gradient-norm spike or a non-finite value, and as many others as the budget
            allows. ``budget=None``: every step full (as ``every=1``).
        layers: glob pattern(s) on qualified module names (``"encoder.*"``); each must match.
        layer_types: module types to track instead of the default (modules owning parameters
            directly, plus the activation modules known to :mod:`gradprobe.activations`).
        kinds: subset of ``("grad", "weight", "update", "drift", "spread", "input", "act",
            "act_grad")``.
        hist_every: also record histograms every ``hist_every`` steps (0: never).
        hist_bins: number of histogram bins.
        flush_every: steps held in the device buffers between writes.
        flush_secs: also write the buffered steps once this many seconds passed since the
            last write (checked at each step's end), so that a run killed early has its rows.
        scaler: the ``torch.amp.GradScaler`` in use, to unscale and to mark skipped steps.
        on_nonfinite: ``"record"`` an event, or also ``"raise"`` :class:`NonFiniteError` once the
            data is on disk.
        overwrite: allow replacing a previous run in ``run_dir``: only a directory that is
            provably a gradprobe run (its ``meta.json`` parses and has the run's fields), and
            only the run's own files; others are kept (see ``store.writer.check_run_dir``).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        run_dir: str | Path,
        every: int | None = None,
        budget: float | None = 0.05,
        flush_secs: float = 30.0,
        layers: str | Sequence[str] | None = None,
        layer_types: type[nn.Module] | Sequence[type[nn.Module]] | None = None,
        kinds: Iterable[Kind] = S.KINDS,  # type: ignore[assignment]
        hist_every: int = 0,
        hist_bins: int = 64,
        flush_every: int = 100,
        scaler: Any = None,
        on_nonfinite: Literal["record", "raise"] = "record",
        overwrite: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise UnsupportedModelError(
                f"model must be a torch.nn.Module, got {type(model).__name__}",
                hint="pass the nn.Module you train, e.g. gp.Probe(model, optimizer, run_dir=...)",
            )
        self.kinds = check_kinds(kinds)
        root: nn.Module = model
        if type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod"):
            if set(self.kinds) & {*S.ACT_KINDS, "input"}:
                raise UnsupportedModelError(
                    "model is a torch.compile'd module: forward hooks on its submodules are "
                    "compiled away, so activation statistics cannot be recorded",
                    hint="pass kinds=('grad', 'weight', 'update', 'drift', 'spread') for a "
                    "compiled model, "
                    "or attach the Probe to the uncompiled model",
                )
            root = model._orig_mod  # type: ignore[assignment]
        self.model = model
        if next(root.parameters(), None) is None:
            raise UnsupportedModelError(
                f"model {type(root).__name__} has no parameters: nothing to probe",
                hint="attach the Probe to the model you train",
            )
        opts = check_options(every=every, budget=budget, flush_every=flush_every,
                             flush_secs=flush_secs, hist_every=hist_every, hist_bins=hist_bins,
                             on_nonfinite=on_nonfinite)
        self.options = opts
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}",
                hint="pass the optimizer, or None and call probe.step() after each update",
            )
        if scaler is not None and not all(hasattr(scaler, a) for a in ("update", "is_enabled")):
            raise ConfigError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        if scaler is not None and optimizer is None:
            raise ConfigError("scaler needs the optimizer", hint="pass the optimizer as well")
        self.optimizer = optimizer
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None
        self.every = opts.every
        self.budget = opts.budget
        self.flush_every = opts.flush_every
        self.flush_secs = opts.flush_secs
        self.hist_every = opts.hist_every
        self.hist_bins = opts.hist_bins
        self.on_nonfinite = opts.on_nonfinite
        self.overwrite = overwrite
        self.run_dir = Path(run_dir) if isinstance(run_dir, (str, Path)) else run_dir
        if not isinstance(self.run_dir, Path):
            raise RunDirError(f"run_dir must be a path, got {type(run_dir).__name__}",
                              hint='pass run_dir="runs/my-run"')
        from gradprobe.capture.distributed import rank

        # Only rank 0 writes run_dir; on other ranks it may already hold rank 0's files.
        if rank() == 0:  # the store decides: empty, or (overwrite) provably a previous run
            check_run_dir(self.run_dir, overwrite=overwrite)
        self._layers = select_layers(root, layers, layer_types, self.kinds)
        from gradprobe.capture.distributed import check_sharded

        check_sharded(self._layers, self.kinds)  # FSDP2: parameter kinds not yet
        check_optimizer(optimizer, root)
        self._attached = False
        self._used = False
        self._handles: list[Any] = []
        self._writer: RunWriter | None = None
        self._recorder: Recorder | None = None
        self._params: ParamStats | None = None
        self._stepped = False
        self._orig_update: Any = None
        self._hooks: ForwardHooks | None = None
        self._loop: StepLoop | None = None  # the steps of the attached run
        self._schedule = Schedule(opts)
        self._passive = False  # attached on a non-zero rank: records nothing
        self._raising = False  # detaching because an exception left `with probe:`
        self._sync: Any = None  # the flush exchange across torch.distributed ranks

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Probe:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self._raising = exc[0] is not None  # the loop's exception speaks for itself: no warning
        try:
            self.detach()
        finally:
            self._raising = False

    def attach(self) -> Probe:
        """Register every hook and create the run directory. Prefer ``with probe:``."""
        if self._attached:
            raise ConfigError("this Probe is already attached",
                              hint="use one `with probe:` block; detach() before attaching again")
        if self._used:
            raise ConfigError("this Probe has already recorded a run and was detached",
                              hint="create a new gp.Probe with a new run_dir")
        from gradprobe.capture import distributed as _dist

        # every rank records and rank 0 writes: see gradprobe.capture.distributed
        sync = _dist.Sync.create([k for lay in self._layers for k in lay.rows],
                                 [k == "act" and lay.spec is not None
                                  and lay.spec.inactive is not None
                                  for lay in self._layers for k in lay.rows])
        if sync is None and _dist.rank() != 0:  # a rank without a process group: passive
            self._attached = self._used = self._passive = True
            return self
        self._sync = sync
        if sync is not None:  # every rank must take the same steps in full, with no exchange
            self._schedule.across_ranks()
        rows: list[RowInfo] = []
        for lay in self._layers:
            for kind in lay.rows:
                lay.rows[kind] = len(rows)
                sat = kind == "act" and lay.spec is not None and lay.spec.saturated is not None
                dead = kind == "act" and lay.spec is not None and lay.spec.inactive is not None
                rows.append(RowInfo(lay.layer_id, lay.name, kind, sat, dead))
            lay.act_row = lay.rows.get("act")
            lay.act_grad_row = lay.rows.get("act_grad")
            lay.input_row = lay.rows.get("input")
            lay.sat_rule = lay.spec.saturated if lay.spec is not None else None
            lay.dead_rule = lay.spec.inactive if lay.spec is not None else None
        device = next(self.model.parameters()).device
        config = self._config()
        if sync is not None and sync.rank != 0:  # only rank 0 writes
            writer: RunWriter = _dist.NullWriter()  # type: ignore[assignment]
        else:
            writer = RunWriter.create(self.run_dir, config=config, overwrite=self.overwrite)
        self._writer = writer
        # steps between flushes: flush_every full steps, and at most as many always-on rows
        # (a fixed schedule: flush_every periods of `every` steps, up to MAX_ALWAYS_ROWS)
        steps = self._ring_steps()
        self._recorder = Recorder(
            rows, capacity=self.flush_every, loss_capacity=steps,
            device=device, writer=writer, hist_bins=self.hist_bins,
        )
        # the copy to the host at a flush: asynchronous on a GPU, unless the data is needed on
        # the training thread at once (raise mode, the exchange across ranks)
        self._recorder.async_copy = (device.type == "cuda" and sync is None
                                     and self.on_nonfinite == "record")
        always = AlwaysOn(self._layers, acts="act" in self.kinds, grads="grad" in self.kinds,
                          device=device, capacity=steps, scaler=self.scaler is not None,
                          sync=self.on_nonfinite == "raise")
        self._params = ParamStats(self._layers, self.kinds, device, self._recorder)
        always.link_stage(self._recorder.staged)
        if sync is not None:  # unit masks are ANDed across ranks at each flush
            self._recorder.kept_units = []
        writer.write_meta(layers=[lay.record() for lay in self._layers],
                          memory_bytes=self.memory_bytes(), schedule=self._schedule.describe(),
                          stats_kernels=self._recorder.summary.describe(device))
        self._loop = StepLoop(layers=self._layers, kinds=self.kinds, options=self.options,
                              schedule=self._schedule, recorder=self._recorder, always=always,
                              params=self._params, writer=writer, scaler=self.scaler, sync=sync,
                              snapshot=self.optimizer is None and "update" in self.kinds)
        self._hooks = ForwardHooks(self._loop, self._layers)
        self._hooks.register(outputs=any(k in S.ACT_KINDS for k in self.kinds),
                             time_grads=bool(self.hist_every and "act_grad" in self.kinds))
        if self.optimizer is not None:
            self._handles.append(self.optimizer.register_step_pre_hook(self._pre_step_hook))
            self._handles.append(self.optimizer.register_step_post_hook(self._post_step_hook))
        if self.scaler is not None:
            self._orig_update = self.scaler.__dict__.get("update")
            orig = self.scaler.update

            def update(new_scale: Any = None) -> Any:
                self._scaler_update()
                return orig(new_scale)

            self.scaler.update = update
        self._attached = True
        self._used = True
        self._loop.begin()
        return self

    def detach(self) -> None:
        """Remove every hook, write the buffered steps and close the run. Idempotent.

        Waits until every flush is written (the writer thread is joined); a background write
        that failed and was not reported yet is raised here as :class:`RunDirError`.
        """
        if not self._attached:
            return
        self._attached = False
        if self._passive:
            return
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._hooks is not None:
            self._hooks.remove()
        if self.scaler is not None:
            if self._orig_update is None:
                del self.scaler.update
            else:
                self.scaler.update = self._orig_update
        assert self._loop is not None
        self._loop.finish(None if self._raising else self._warn_no_step)

    def _warn_no_step(self, kept: bool) -> None:
        import warnings

        how = ("optimizer.step() was never called on the optimizer given to the Probe "
               "(a step is one optimizer.step(); is it another optimizer, or a step "
               "function that bypasses it?)" if self.optimizer is not None else
               "probe.step() was never called (without an optimizer, call probe.step() "
               "after each weight update)")
        what = ("step 0 is kept, marked incomplete" if kept else
                "nothing was recorded")
        warnings.warn(f"gradprobe: the Probe detached with no completed step: {how}; {what}",
                      RuntimeWarning, stacklevel=3)

    @property
    def attached(self) -> bool:
        return self._attached

    @property
    def run(self) -> Any:
        """The :class:`gradprobe.Run` of ``run_dir`` (readable while still being written): every
        step flushed so far, once the writer thread has written it."""
        # the reader through the public facade: capture writes runs and never depends on the
        # reader's module (tests/test_layout.py)
        import gradprobe

        if self._passive or (self._sync is not None and self._sync.rank != 0):
            raise RunDirError("this Probe runs on a non-zero torch.distributed rank and writes "
                              "nothing", hint="read the run on rank 0")
        if self._writer is None:
            raise RunDirError("the Probe has not been attached yet: no run to read",
                              hint="use `with probe:` around the training loop first")
        self._writer.wait()  # every flush handed to the writer is on disk
        return gradprobe.Run.open(self.run_dir)

    @property
    def step_index(self) -> int:
        """Index of the current (not yet finished) step."""
        return self._loop.step if self._loop is not None else 0

    def memory_bytes(self) -> dict[str, int]:
        """Upper bound of the memory the probe holds, by part (bytes)."""
        return memory_bytes(self)

    def _ring_steps(self) -> int:
        """Steps between flushes: ``flush_every`` full steps, and as many always-on rows (a
        fixed schedule: ``flush_every`` periods of ``every`` steps, at most
        :data:`MAX_ALWAYS_ROWS`)."""
        return max(self.flush_every, min(self.flush_every * self.every, MAX_ALWAYS_ROWS))

    def _config(self) -> dict[str, Any]:
        return {
            "every": self.every if self.budget is None else None, "budget": self.budget,
            "flush_secs": self.flush_secs,
            "kinds": list(self.kinds), "hist_every": self.hist_every,
            "hist_bins": self.hist_bins, "flush_every": self.flush_every,
            "on_nonfinite": self.on_nonfinite, "scaler": self.scaler is not None,
            "optimizer": type(self.optimizer).__name__ if self.optimizer is not None else None,
            "model": type(self.model).__name__,
            "n_params": sum(p.numel() for p in self.model.parameters()),
        }

    # ------------------------------------------------------------------ steps

    def _manual(self, what: str) -> bool:
        """Refuse ``probe.<what>()`` unless attached without an optimizer; False: passive."""
        if not self._attached:
            raise ConfigError(f"probe.{what}() called while the Probe is not attached",
                              hint="call it inside `with probe:`")
        if self.optimizer is not None:
            raise ConfigError(f"probe.{what}() is for probes without an optimizer",
                              hint="steps are counted by optimizer.step() already")
        return not self._passive

    def before_update(self) -> None:
        """Without an optimizer: record the step's gradients now, before anything changes them
        (gradient clipping, the update); :meth:`step` after the update records the weights.
        For loops that clip between ``backward`` and the update (Lightning records at
        ``on_before_optimizer_step``). A second call in one step does nothing."""
        if self._manual("before_update"):
            assert self._loop is not None
            self._loop.take_grads()

    def step(self, *, skipped: bool = False) -> None:
        """End the current step when no optimizer was given (call after updating weights).
        ``skipped=True``: the update did not happen (an AMP ``GradScaler`` found inf/NaN
        gradients); the step is marked as the Probe marks the steps a scaler skips."""
        if not self._manual("step"):
            return
        assert self._loop is not None
        self._loop.take_grads()
        self._loop.end(skipped=bool(skipped))

    def observe_loss(self, loss: Tensor) -> None:
        """Record the loss of the current step (the mean over micro-batches); stays on device."""
        if not self._attached:
            raise ConfigError("observe_loss() called while the Probe is not attached",
                              hint="call it inside `with probe:`")
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ConfigError("observe_loss expects a scalar loss tensor",
                              hint="pass the tensor you call .backward() on")
        if not loss.is_floating_point():
            raise ConfigError(
                f"observe_loss expects a real floating-point loss, got dtype {loss.dtype}",
                hint="pass the float loss you call .backward() on (not an accuracy count or "
                "a boolean); convert with loss.float() if it is one on purpose")
        if self._passive:
            return
        assert self._loop is not None
        self._loop.observe_loss(loss)

    def _pre_step_hook(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        # args are (optimizer, *step_args): a closure is the first step argument
        if (len(args) > 1 and args[1] is not None) or (kwargs or {}).get("closure") is not None:
            raise closure_error(type(optimizer).__name__)
        assert self._loop is not None
        self._loop.before_update("live", live=True)

    def _post_step_hook(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._stepped = True
        assert self._loop is not None
        self._loop.end(skipped=False)

    def _scaler_update(self) -> None:
        # GradScaler.step skips optimizer.step() when it found inf/NaN gradients, so the step
        # hooks did not run: close the step here, marked as skipped.
        if not self._stepped and self._attached:
            assert self._loop is not None
            self._loop.before_update("none")
            self._loop.end(skipped=True)
        self._stepped = False



__all__ = ["Probe"]
