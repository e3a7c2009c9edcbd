"""Planted failures in a run with gradprobe's default attach, read back with ``gp.Run``
(the correctness half of ``always_on.py``).

In one run of ``steps`` optimizer steps, at distinct steps drawn at random (``seed``) from
step 16 on:

* a non-finite activation: a forward hook multiplies the output of the middle parameter-owning
  module by ``inf`` (expected: an event of ``run.events()`` at that step, that layer, pass
  ``forward``);
* a non-finite activation gradient: a tensor hook multiplies the gradient of the output of the
  module three quarters down by ``inf`` (expected: an event at that step, that layer, pass
  ``act_grad``);
* three gradient-norm spikes: the loss is multiplied by 1e3 (expected: the step is in
  ``run.grad_norms()`` (the always-on tier; ``run.scalars(kinds="grad")`` where the installed
  gradprobe has no such reader) with every layer's gradient norm 1e3 times (to 0.1 %) that of an
  unplanted twin run, the same run with the same restores and nothing planted). The detail also
  says whether the diagnosis rule would call it a spike: the total norm
  ``sqrt(Σ_layers norm²)`` at least ``SPIKE`` (30x) the median of the 10 recorded steps before it
  that carry no planted event (a spike planted on a batch whose own gradient is small may not be).

The model and optimizer state are restored after each planted step (a user's "skip this
batch"), so one planted event does not cause the next, in the twin as well. Events at steps where nothing was planted
are reported as false alarms.
"""

from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from torch import Tensor, nn

import gradprobe as gp
from gradprobe.diagnose.growth import SPIKE

if TYPE_CHECKING:
    from always_on_workloads import Workload

WINDOW = 10
FIRST = 16
SPIKES = 3
SCALE = 1e3


@dataclass(frozen=True)
class Planted:
    """One planted event and whether the run read back has it."""

    what: str  # "nonfinite activation", "nonfinite act_grad", "gradient spike"
    step: int
    layer: str
    passname: str
    found: bool
    detail: str
    near: bool = False  # not found, but an event names its step and layer (another pass)


def sites(model: nn.Module) -> tuple[str, str]:
    """Qualified names of the modules where the activation and the activation gradient are
    made non-finite: the middle and the three-quarter parameter owner in module order."""
    owners = [n for n, m in model.named_modules() if next(m.parameters(recurse=False), None)
              is not None]
    return owners[(len(owners) - 1) // 2], owners[(3 * len(owners)) // 4]


def draw_steps(steps: int, seed: int) -> tuple[int, int, list[int]]:
    """Steps of the non-finite activation, the non-finite gradient and the spikes."""
    if steps < FIRST + SPIKES + 3:
        raise ValueError(f"planted run needs at least {FIRST + SPIKES + 3} steps, got {steps}")
    drawn = random.Random(seed).sample(range(FIRST, steps - 1), SPIKES + 2)
    return drawn[0], drawn[1], sorted(drawn[2:])


class Planter:
    """Forward hooks that plant the non-finite values at their steps (``now`` is the step)."""

    def __init__(self, model: nn.Module, fwd_site: str, grad_site: str, fwd_step: int,
                 grad_step: int) -> None:
        self.now = -1
        self.fwd_step, self.grad_step = fwd_step, grad_step
        mods = dict(model.named_modules())
        self.handles = [mods[fwd_site].register_forward_hook(self._inf_out),
                        mods[grad_site].register_forward_hook(self._inf_grad)]

    def _inf_out(self, mod: nn.Module, args: Any, out: Any) -> Any:
        if self.now != self.fwd_step:
            return None
        if isinstance(out, tuple):
            return (out[0] * math.inf, *out[1:])
        return out * math.inf

    def _inf_grad(self, mod: nn.Module, args: Any, out: Any) -> None:
        t = out[0] if isinstance(out, tuple) else out
        if self.now == self.grad_step and isinstance(t, Tensor) and t.requires_grad:
            t.register_hook(lambda g: g * math.inf)

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def train_planted(wl: Workload, run_dir: Path, steps: int, seed: int, plant: bool = True
                  ) -> tuple[str, str, int, int, list[int]]:
    """Train with the default attach and the planted events (none if ``plant`` is False:
    the reference a checker that cannot fail would pass)."""
    model, batches = wl.model(), wl.batches()
    opt = wl.optimizer(model)
    fwd_site, grad_site = sites(model)
    fwd_step, grad_step, spikes = draw_steps(steps, seed)
    planter = Planter(model, fwd_site, grad_site, fwd_step if plant else -1,
                      grad_step if plant else -1)  # registered before the Probe's hooks
    planted = {fwd_step, grad_step, *spikes}
    try:
        with gp.Probe(model, opt, run_dir=run_dir) as probe:
            for i in range(steps):
                planter.now = i
                saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())) \
                    if i in planted else None
                loss = wl.loss(model, batches[i % len(batches)])
                if plant and i in spikes:
                    loss = loss * SCALE
                probe.observe_loss(loss)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if saved is not None:
                    model.load_state_dict(saved[0])
                    opt.load_state_dict(saved[1])
    finally:
        planter.close()
    return fwd_site, grad_site, fwd_step, grad_step, spikes


def norms_source() -> str:
    """The reader of every step's gradient norms: ``Run.grad_norms()`` (the always-on tier)
    where the installed gradprobe has it, else ``Run.scalars(kinds="grad")``."""
    return "grad_norms()" if hasattr(gp.Run, "grad_norms") else "scalars(kinds='grad')"


def _norms(run_dir: Path) -> pd.DataFrame:
    """Gradient norms, one row per recorded step, one column per layer."""
    run = gp.Run.open(run_dir)
    if hasattr(run, "grad_norms"):
        frame, col = run.grad_norms(), "grad_norm"
    else:
        frame, col = run.scalars(kinds="grad"), "norm"
    if not len(frame):
        return pd.DataFrame()
    return frame.pivot_table(index="step", columns="layer", values=col, aggfunc="first",
                             dropna=False)


def _spike(norms: pd.DataFrame, twin: pd.DataFrame, step: int, skip: set[int]
           ) -> tuple[bool, str]:
    """Whether ``step`` holds the planted spike (every layer 1e3 x the twin's norm), and
    whether the diagnosis rule sees it."""
    if step not in norms.index:
        return False, f"step not recorded in {norms_source()}"
    if step not in twin.index:
        return False, "step not recorded in the twin run"
    ref = twin.loc[step]
    usable = ref.gt(0) & ref.lt(float("inf"))
    scale = norms.loc[step][usable] / ref[usable]
    ok = int(((scale / SCALE - 1).abs() < 1e-3).sum())
    steps = sorted(s for s in norms.index if s < step and s not in skip)[-WINDOW:]
    total = (norms ** 2).sum(axis=1, min_count=1) ** 0.5
    rule = total[step] / total[steps].median() if steps else float("nan")
    return ok == int(usable.sum()) > 0, (
        f"{ok}/{int(usable.sum())} layers at 1e3 x the twin (median {scale.median():.4g} x); "
        f"total norm {rule:.3g} x the median of {len(steps)} steps before "
        f"({'a' if rule >= SPIKE else 'not a'} spike to the {SPIKE:g}x rule)")


def planted_check(wl: Workload, *, steps: int, seed: int, tmp: Path, plant: bool = True
                  ) -> list[Planted]:
    """Run the planted run and its twin and read them back (see the module docstring).
    ``plant=False`` plants nothing in either: the checker must then find nothing."""
    run_dir, twin_dir = tmp / f"planted-{wl.name}-{plant}", tmp / f"twin-{wl.name}-{plant}"
    fwd_site, grad_site, fwd_step, grad_step, spikes = train_planted(wl, run_dir, steps, seed,
                                                                     plant)
    train_planted(wl, twin_dir, steps, seed, plant=False)
    run = gp.Run.open(run_dir)
    events = run.events()
    out: list[Planted] = []
    for what, step, layer, passname in [("nonfinite activation", fwd_step, fwd_site, "forward"),
                                        ("nonfinite act_grad", grad_step, grad_site, "act_grad")]:
        at = events[events["step"] == step] if len(events) else events
        hit = at[(at["layer"] == layer) & (at["pass"] == passname)] if len(at) else at
        seen = "; ".join(f"{r['layer']} {r['pass']}/{r['kind']}" for _, r in at.iterrows())
        near = len(hit) == 0 and len(at) > 0 and bool((at["layer"] == layer).any())
        out.append(Planted(what, step, layer, passname, len(hit) > 0,
                           "event found" if len(hit) else
                           f"no such event (at this step: {seen or 'none'})", near))
    norms, twin = _norms(run_dir), _norms(twin_dir)
    for s in spikes:
        found, detail = _spike(norms, twin, s, {fwd_step, grad_step, *spikes})
        out.append(Planted("gradient spike", s, "(every layer)", "grad", found, detail))
    extra = sorted(set(events["step"].astype(int)) - {fwd_step, grad_step}) if len(events) else []
    out.append(Planted("false alarms", -1, "", "", not extra,
                       f"events at unplanted steps: {extra[:10] or 'none'}"))
    return out


def format_planted(name: str, res: list[Planted]) -> str:
    lines = []
    for p in res:
        where = f"step {p.step:>4} layer {p.layer!r} pass {p.passname}" if p.step >= 0 else ""
        verdict = ("FOUND " if p.found else "MISSED") if p.step >= 0 else \
            ("none  " if p.found else "SOME  ")
        lines.append(f"{name:<5} {p.what:<21} {where:<45} {verdict} {p.detail}")
    planted = [p for p in res if p.step >= 0]
    near = sum(p.near for p in planted)
    lines.append(f"{name:<5} planted events found: {sum(p.found for p in planted)}/{len(planted)}"
                 + (f" ({near} more at its step and layer, in another pass)" if near else ""))
    return "\n".join(lines)


__all__ = ["Planted", "draw_steps", "format_planted", "norms_source", "planted_check", "sites",
           "train_planted"]
