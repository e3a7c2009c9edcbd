"""The Probe's hooks on the model's modules: activations, their gradients, the first dense
layer's input and the gradients through time of recurrent layers.

Every hook of this module reads the Probe's open step (``slot``: ``None`` on a step without the
full tier), the hook generation (hooks of an earlier attach do nothing) and whether the step
records histograms, through the small :class:`Steps` protocol; it records into the Probe's
:class:`~gradprobe.capture.recorder.Recorder` (the full tier) and
:class:`~gradprobe.capture.always.AlwaysOn` (every step: one reduction per output). No hook
synchronises the host: no ``.item()``, no ``.cpu()``, no branch on a tensor's values. The time
spent in the hooks is added to the Probe's own time (``probe_s``), which its budget reads.
"""

from __future__ import annotations

from functools import partial
from time import perf_counter
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from gradprobe.capture.always import HALF, AlwaysOn
from gradprobe.capture.hooks import as_real, first_float_tensor
from gradprobe.capture.recorder import Recorder
from gradprobe.capture.select import Layer
from gradprobe.layers import RECURRENT


class Steps(Protocol):
    """What the hooks read of the Probe."""

    slot: int | None
    gen: int
    hist_now: bool
    full_checked: bool
    recorder: Recorder
    always: AlwaysOn
    probe_s: float


class ForwardHooks:
    """Registers and runs the module hooks of ``probe`` on ``layers``; owns the handles."""

    def __init__(self, probe: Steps, layers: list[Layer]) -> None:
        self.p = probe
        self.layers = layers
        self.handles: list[Any] = []
        self.depth_counter = 0
        self._depth_handles: dict[int, Any] = {}
        self._input_handles: dict[int, Any] = {}
        self._input_layer: Layer | None = None

    def register(self, *, outputs: bool, time_grads: bool) -> None:
        """Forward hooks on every layer (``outputs``: activations and their gradients; else
        one call each, for the layer's depth), the input hook until the first dense layer ran,
        and (``time_grads``) the time-step hooks of recurrent layers."""
        for lay in self.layers:
            if outputs:
                self.handles.append(lay.module.register_forward_hook(partial(self.output, lay)))
            else:  # removed once the layer has run (see depth)
                h = lay.module.register_forward_hook(partial(self.depth, lay))
                self.handles.append(h)
                self._depth_handles[lay.layer_id] = h
        for lay in self.layers:
            if lay.input_row is not None:  # until the first dense layer has run
                h = lay.module.register_forward_pre_hook(partial(self.input, lay))
                self.handles.append(h)
                self._input_handles[lay.layer_id] = h
            if (time_grads and isinstance(lay.module, RECURRENT)
                    and not getattr(lay.module, "bidirectional", False)):
                self.handles.append(lay.module.register_forward_pre_hook(
                    partial(self.rnn_input, lay)))
                self.handles.append(lay.module.register_forward_hook(
                    partial(self.rnn_output, lay)))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _set_depth(self, lay: Layer) -> None:
        if lay.depth is None:
            lay.depth = self.depth_counter
            self.depth_counter += 1

    def depth(self, lay: Layer, module: nn.Module, args: Any, output: Any) -> None:
        self._set_depth(lay)
        h = self._depth_handles.pop(lay.layer_id, None)
        if h is not None:  # the depth is known: no hook left on the forward pass
            h.remove()

    def output(self, lay: Layer, module: nn.Module, args: Any, output: Any) -> None:
        # runs on every call of every tracked module: kept to a few Python operations
        t0 = perf_counter()
        if lay.depth is None:
            self._set_depth(lay)
        p = self.p
        if torch.is_grad_enabled():
            if type(output) is Tensor and output.is_floating_point():  # the common case
                t: Tensor | None = output if output.numel() else None
            else:
                t = first_float_tensor(output)
            if t is not None:
                always = p.always
                # the always-on tier: one reduction, on the device; not where this step's
                # full tier records the output and reads its non-finite count on the host at
                # the step's end (the flush fills the always-on flag from that count)
                if always.acts and (lay.act_row is None or not p.full_checked):
                    x = t.detach()
                    dtype = x.dtype
                    if dtype in HALF:
                        always.sums.append(x.sum(dtype=torch.float32))
                    else:
                        always.sums.append(as_real(x).sum() if x.is_complex() else x.sum())
                    always.sum_cols.append(lay.layer_id)
                if p.slot is not None:
                    self._full_output(lay, t, p.slot)
        p.probe_s += perf_counter() - t0

    def _full_output(self, lay: Layer, t: Tensor, slot: int) -> None:
        """The full tier's records of a module output: ``act`` and its hooks."""
        p = self.p
        rec = p.recorder
        row = lay.act_row
        if row is not None:
            x = t.detach()  # nothing below records autograd history
            if x.is_complex():  # no activation's saturation or dead rule applies
                x = as_real(x)
                rec.observe(slot, row, x)
            else:
                rec.observe(slot, row, x, lay.sat_rule, lay.dead_rule)
            if p.hist_now:
                with torch.no_grad():
                    rec.add_hist(slot, row, x)
        row = lay.act_grad_row
        if row is not None and t.requires_grad:
            t.register_hook(partial(self.act_grad, row, slot, p.gen))

    def input(self, lay: Layer, module: nn.Module, args: Any) -> None:
        if self._input_layer is None:  # the first dense layer to run: the input's layer
            self._input_layer = lay
            for lid, h in list(self._input_handles.items()):
                if lid != lay.layer_id:
                    h.remove()
                    del self._input_handles[lid]
        elif lay is not self._input_layer:
            return
        slot = self.p.slot
        if slot is None or not torch.is_grad_enabled() or not args:
            return
        x = args[0]
        if (not isinstance(x, Tensor) or not x.is_floating_point() or x.numel() == 0
                or lay.input_row is None):
            return
        t0 = perf_counter()
        rec = self.p.recorder
        xd = x.detach()
        rec.observe(slot, lay.input_row, xd)
        if self.p.hist_now:
            with torch.no_grad():
                rec.add_hist(slot, lay.input_row, xd)
        self.p.probe_s += perf_counter() - t0

    def rnn_input(self, lay: Layer, module: nn.Module, args: Any) -> Any:
        """Hook ``∂L/∂x_t`` of a recurrent layer's input sequence (histogram steps only)."""
        slot = self.p.slot
        if slot is None or not self.p.hist_now or not torch.is_grad_enabled() or not args:
            return None
        x = args[0]
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.numel() == 0:
            return None  # a PackedSequence, or no float sequence
        tdim = 1 if getattr(module, "batch_first", False) and x.dim() == 3 else 0
        hook = partial(self.time, lay.layer_id, "input", slot, self.p.gen, tdim)
        if x.requires_grad:
            x.register_hook(hook)
            return None
        # data fed straight to the layer: a detached copy (same storage and values) that
        # requires a gradient; its gradient is reduced, then dropped once accumulated
        leaf = x.detach().requires_grad_()

        def reduce_and_drop(t: Tensor) -> None:
            if t.grad is not None:
                hook(t.grad)
            t.grad = None

        leaf.register_post_accumulate_grad_hook(reduce_and_drop)
        return (leaf, *args[1:])

    def rnn_output(self, lay: Layer, module: nn.Module, args: Any, output: Any) -> None:
        """Hook ``∂L/∂h_t`` of a recurrent layer's output sequence (histogram steps only)."""
        slot = self.p.slot
        if slot is None or not self.p.hist_now or not torch.is_grad_enabled():
            return
        out = output[0] if isinstance(output, (tuple, list)) else output
        if not isinstance(out, Tensor) or not out.requires_grad or out.numel() == 0:
            return  # a PackedSequence: skipped (see the Probe's docstring)
        tdim = 1 if getattr(module, "batch_first", False) and out.dim() == 3 else 0
        out.register_hook(partial(self.time, lay.layer_id, "output", slot, self.p.gen, tdim))

    def time(self, layer_id: int, wrt: str, slot: int, gen: int, tdim: int,
             grad: Tensor) -> None:
        p = self.p
        if gen != p.gen or slot != p.slot or grad is None:
            return
        t0 = perf_counter()
        rec = p.recorder
        with torch.no_grad():
            g = grad.detach()
            dims = tuple(d for d in range(g.dim()) if d != tdim)
            acc = torch.float32 if g.dtype in (torch.float16, torch.bfloat16) else None
            norm = torch.linalg.vector_norm(g, 2, dim=dims, dtype=acc) if dims else g.abs()
            rec.add_time(slot, layer_id, wrt, norm.to(torch.float64).square())
        p.probe_s += perf_counter() - t0

    def act_grad(self, row: int, slot: int, gen: int, grad: Tensor) -> None:
        p = self.p
        if gen != p.gen or slot != p.slot or grad is None:
            return
        t0 = perf_counter()
        rec = p.recorder
        # detached where it records history (a double backward): nothing below records any
        g = grad.detach() if grad.requires_grad else grad
        if g.is_complex():
            g = as_real(g)
        rec.observe(slot, row, g)
        if p.hist_now:
            with torch.no_grad():
                rec.add_hist(slot, row, g)
        p.probe_s += perf_counter() - t0


__all__ = ["ForwardHooks", "Steps"]
