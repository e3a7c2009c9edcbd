"""The steps of one attached run: what happens between two optimizer steps.

:class:`StepLoop` owns the open step (its slot in the full tier's ring, whether it is full, whether
it records histograms), the Probe's own time in it, and the end of each step: the full tier's
statistics of the parameters, the always-on row (:mod:`gradprobe.capture.always`), the non-finite
events, the schedule's account (:mod:`gradprobe.capture.schedule`) and the flushes, by the step
bound (``flush_every``) and the time bound (``flush_secs``). The Probe
(:mod:`gradprobe.capture.probe`) owns the lifecycle: it makes a loop at ``attach`` and closes it
at ``detach`` (:meth:`StepLoop.finish`); its module hooks (:mod:`gradprobe.capture.forward`) and
optimizer step hooks read and drive this loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from gradprobe.capture.always import AlwaysOn
from gradprobe.capture.options import Options
from gradprobe.capture.params import ParamStats, WeightsBefore
from gradprobe.capture.recorder import HostFlush, Recorder
from gradprobe.capture.schedule import Clock, Schedule
from gradprobe.capture.select import Layer
from gradprobe.errors import NonFiniteError, RunDirError
from gradprobe.store.writer import RunWriter


class StepLoop:
    """The open step and the end of each step of one attached run."""

    def __init__(self, *, layers: list[Layer], kinds: tuple[str, ...], options: Options,
                 schedule: Schedule, recorder: Recorder, always: AlwaysOn, params: ParamStats,
                 writer: RunWriter, scaler: Any, sync: Any, snapshot: bool) -> None:
        self.layers = layers
        self.kinds = kinds
        self.opts = options
        self.schedule = schedule
        self.recorder = recorder
        self.always = always
        self.params = params
        self.writer = writer
        self.scaler = scaler
        self.sync = sync  # the flush exchange across torch.distributed ranks
        self.snapshot = snapshot  # copy the weights when a full step begins (no optimizer)
        self.clock = Clock(recorder.device)
        self.step = 0
        self.slot: int | None = None  # the open step's slot in the full tier's ring
        self.full = False  # the open step has the full tier
        self.hist_now = False
        # the open step is full and its non-finite values are found on the host at its end
        # (CPU, or on_nonfinite="raise"): the hooks leave the always-on sums of the outputs it
        # records to the full tier
        self.full_checked = False
        self._host_checks = recorder.device.type == "cpu" or options.on_nonfinite == "raise"
        self.gen = 1  # hooks of an earlier attach do nothing
        self.probe_s = 0.0  # the Probe's own time in the open step (seconds)
        self.grads_taken = False  # take_grads() ran in the open step (no optimizer)
        self._last_hist = -(1 << 30)  # the last step with histograms (budget schedule)
        self._last_bad = -2  # the last step whose always-on row was non-finite
        self._last_flush = time.perf_counter()

    # ------------------------------------------------------------------ the open step

    def begin(self) -> None:
        for row in self.always.ready():  # GPU: rows whose copies have arrived (no wait)
            self.check_always(*row)
        self.full = self.schedule.full(self.step)
        self.hist_now = self.full and self._hist_due()  # read by the hooks of this step
        if self.hist_now:
            self._last_hist = self.step
        self.full_checked = self.full and self._host_checks
        if self.full:
            self.slot = self.recorder.begin(self.step)
            if self.snapshot:
                self.params.snapshot()
        else:
            self.slot = None

    def _hist_due(self) -> bool:
        every = self.opts.hist_every
        if every <= 0:
            return False
        if self.schedule.mode == "every":
            return self.step % every == 0
        return self.step - self._last_hist >= every  # at most every hist_every steps

    def observe_loss(self, loss: torch.Tensor) -> None:
        t0 = time.perf_counter()
        loss = loss.detach()  # both tiers keep this one detached tensor (no history)
        self.recorder.losses.add(self.step, loss)
        self.always.loss(loss)
        self.probe_s += time.perf_counter() - t0

    def before_update(self, wpre: WeightsBefore, live: bool = False) -> None:
        """The step's gradients and (staged) weights before the update (``live``: the
        optimizer is about to step: also copy the weights for ``update``)."""
        if self.slot is None:
            return
        t0 = time.perf_counter()
        with torch.no_grad():
            self.params.grads(self.slot, self.hist_now)
            self.params.stage_before(self.slot, wpre, self.hist_now)
            if live:
                self.params.before_update()
        self.probe_s += time.perf_counter() - t0

    def take_grads(self) -> None:
        """Without an optimizer: the open step's gradients, read once, before whatever the loop
        does next (clipping, the update): both tiers' gradient columns come from here."""
        if self.grads_taken:
            return
        self.grads_taken = True
        self.before_update("prev")
        t0 = time.perf_counter()
        self.always.take_grad_norms()
        self.probe_s += time.perf_counter() - t0

    def _scale(self) -> Any:
        return self.scaler._scale if self.scaler is not None else None

    # ------------------------------------------------------------------ the always-on row

    def end_always(self, *, skipped: bool, incomplete: bool = False,
                   reported: bool = False) -> list[dict[str, Any]]:
        """Close the open step's always-on row; its event (if read on the host now; not
        where the full tier ``reported`` the step's event already)."""
        v = self.always.end(self.step, full=self.full, skipped=skipped, scale=self._scale())
        if v is None:  # on its way to the host: read by a later step (begin)
            return []
        return self.check_always(self.step, self.full, skipped, v, incomplete, reported)

    def check_always(self, step: int, full: bool, skipped: bool, v: Any,
                     incomplete: bool = False, reported: bool = False) -> list[dict[str, Any]]:
        """Write the event of an always-on row (unless ``reported`` by the full tier), and
        make the next steps full after a spike or a non-finite value
        (:meth:`Schedule.trigger`)."""
        bad, event, spike = self.always.check(step, full, skipped, v)
        if spike is not None:
            self.schedule.trigger(step, "spike", self.layers[spike].name)
        if bad and not skipped:
            self._nonfinite(step, event["layer"] if event else None)
        if event is None or reported:
            return []
        if incomplete:
            event["incomplete"] = True
        self.writer.append_event(event)
        return [event]

    def _nonfinite(self, step: int, layer: str | None) -> None:
        """A step held a non-finite value: the first of a run of such steps makes the next
        steps full (:meth:`Schedule.trigger`)."""
        if self._last_bad != step - 1 and self._last_bad != step:
            self.schedule.trigger(step, "nonfinite", layer)
        self._last_bad = step

    # ------------------------------------------------------------------ the end of a step

    def _end_full(self, slot: int, skipped: bool) -> list[dict[str, Any]]:
        """The full tier's end of the step: the parameters after the update, the event."""
        rec = self.recorder
        check = rec.device.type == "cpu" or self.opts.on_nonfinite == "raise"
        with torch.no_grad():
            self.params.params(slot, skipped, self.hist_now)
            complete = rec.staged.post(slot, self.params.staged_after, check)
            rec.process_pending()
        rec.end(slot, skipped=skipped, scale=self._scale())
        if complete and check:
            # the staged row was finite and nothing else was recorded: nothing to read
            rec.checked[slot] = True
        elif check:
            # Host read of one slot's non-finite counts: free on CPU (no device to wait
            # for); with on_nonfinite="raise" the user asked for it (one sync per step).
            nonfinite = rec.slot_nonfinite(slot)
            if nonfinite.any():
                ev = rec.event_for(slot, nonfinite, self.always.loss_nonfinite())
                if ev is not None:
                    self.writer.append_event(ev)
                    return [ev]
        return []

    def end(self, *, skipped: bool) -> None:
        """End the open step (the optimizer stepped, or the scaler skipped it), flush when a
        bound is reached, begin the next step; raise what the step found."""
        t0 = time.perf_counter()
        if self.slot is not None:  # the norms from the stage's row, before it is consumed
            self.always.take_staged_norms()
        events = self._end_full(self.slot, skipped) if self.slot is not None else []
        if events and not skipped:  # found by the full tier (the always-on row may lack
            self._nonfinite(self.step, events[0]["layer"])  # the outputs it records)
        events += self.end_always(skipped=skipped, reported=bool(events))
        self.step += 1
        self.slot = None
        self.grads_taken = False
        failed: RunDirError | None = None
        if (self.recorder.full() or self.always.full_ring()
                or (self.sync is None  # ranks flush together: by steps only
                    and time.perf_counter() - self._last_flush >= self.opts.flush_secs)):
            try:
                events += self.flush()
            except RunDirError as err:  # an earlier write failed: raise it once the next
                failed = err            # step has begun, so a loop that goes on loses none
        self.probe_s += time.perf_counter() - t0
        for done in self.clock.end(self.step - 1, self.full, self.probe_s):
            self.schedule.measured(*done, device_time=self.clock.cuda)
        self.probe_s = 0.0
        self.begin()
        if failed is not None:
            raise failed
        self.writer.raise_error()  # a failed write surfaces at the step after it
        raise_on = [e for e in events if not e["amp_skipped"]]
        if self.opts.on_nonfinite == "raise" and raise_on:
            self.flush()
            ev = raise_on[0]
            count = f", {ev['nonfinite']} values" if ev["nonfinite"] >= 0 else ""
            raise NonFiniteError(
                f"non-finite values at step {ev['step']} in layer {ev['layer']!r} "
                f"({ev['pass']} pass{count})",
                hint="see run.events(); lower the learning rate, clip gradients or check the "
                "inputs of that layer",
            )

    def flush(self) -> list[dict[str, Any]]:
        """Hand the buffered steps to the run's writer thread; returns the non-finite events
        found in steps not checked before (already in ``events.jsonl``).

        The training thread only starts the copy of the buffers to the host
        (:meth:`Recorder.take`); the frames, the Parquet parts and ``meta.json`` are written
        by the writer thread (:meth:`RunWriter.submit`), flush after flush. With
        ``on_nonfinite="raise"`` a flush holding a NaN/Inf of a step the scaler did not skip
        is waited for, so that :class:`NonFiniteError` is raised once its data is on disk. A
        failed earlier write is raised here (once), after this flush was handed over.
        """
        recorder, writer = self.recorder, self.writer
        self._last_flush = time.perf_counter()
        data = recorder.take(self.always)
        if self.sync is not None:  # merged across ranks; None on the ranks that do not write
            masks, recorder.kept_units = recorder.kept_units or [], []
            data = self.sync.exchange(data, masks, writer)
            if self.sync.rank != 0:
                return []
        layers = [lay.record() for lay in self.layers]
        steps = self.step
        schedule = self.schedule.describe()

        def job() -> None:
            if data is not None:
                recorder.write(data)
            writer.write_meta(layers=layers, steps=steps, schedule=schedule)

        writer.submit(job, what=data.what if data is not None else "meta.json")
        if isinstance(data, HostFlush) and data.nonfinite and self.opts.on_nonfinite == "raise":
            writer.wait()
        writer.raise_error()
        return data.events if isinstance(data, HostFlush) else []

    # ------------------------------------------------------------------ detach

    def finish(self, warn_no_step: Callable[[bool], None] | None) -> None:
        """Close the run at detach: keep the open step if a pass of it ran (marked
        incomplete), hand every buffered step to the writer, write the final ``meta.json``
        and join the writer thread (:meth:`RunWriter.close`). ``warn_no_step(kept)`` is
        called when no step was completed."""
        self.gen += 1
        rec, writer = self.recorder, self.writer
        incomplete: int | None = None
        reported = False  # the open step's event was written by the full tier
        if self.slot is not None:  # a step begun but never finished by an optimizer step
            slot, self.slot = self.slot, None
            if rec.recorded(slot):  # e.g. a NaN-loss guard raised before the step
                incomplete = self.step
                reported = self._close_incomplete(slot)
            else:  # nothing of it was recorded (the step after the last optimizer step)
                rec.discard_open(slot)
        if self.always.open():  # the open step's outputs or loss were seen: keep its row
            incomplete = self.step
            self.end_always(skipped=False, incomplete=True, reported=reported)
        self.always.discard_open()
        for row in self.always.ready(wait=True):  # GPU: the rows still on their way
            self.check_always(*row)
        extra: dict[str, Any] = {} if incomplete is None else {"incomplete_step": incomplete}
        if self.step == 0 and warn_no_step is not None:
            warn_no_step(incomplete is not None)
        status = "interrupted"  # unless every buffered step is handed to the writer
        try:
            self.flush()
            status = "closed"
        except BaseException:
            if writer.held():  # a Ctrl-C caught the hand-over: close() writes the flush
                status = "closed"
            raise
        finally:
            try:
                # every flush handed over is written and the writer thread joined; a write
                # that failed is raised here if it was not raised before. meta.json's status
                # says what is on disk (failed, or interrupted also by a Ctrl-C in this wait)
                writer.close(status=status, steps=self.step, schedule=self.schedule.describe(),
                             layers=[lay.record() for lay in self.layers], **extra)
            finally:
                self.params.release()

    def _close_incomplete(self, slot: int) -> bool:
        """Keep the open step that never reached its optimizer step (the loop stopped before
        ``optimizer.step()``): its activations, the gradients as they are now and the weights
        (unchanged: update 0), and its non-finite event marked ``incomplete``, written whatever
        the device or ``on_nonfinite`` (one host read, at detach). Returns whether it wrote
        an event."""
        rec, params = self.recorder, self.params
        with torch.no_grad():
            if not rec.staged.pre_done and not self.grads_taken:  # no pre-step hook ran
                params.grads(slot, self.hist_now)
                params.stage_before(slot, "none", self.hist_now)
            params.params(slot, True, self.hist_now)
            rec.staged.post(slot, params.staged_after, True)
            rec.process_pending()
        rec.end(slot, skipped=False, scale=self._scale())
        nonfinite = rec.slot_nonfinite(slot)
        if nonfinite.any():
            ev = rec.event_for(slot, nonfinite, self.always.loss_nonfinite())
            if ev is not None:
                ev["incomplete"] = True
                self.writer.append_event(ev)
                return True
        return False


__all__ = ["StepLoop"]
