"""What the default attach costs, beside everything-every-step, its floor and the anchors a user
would otherwise pick; and whether the default attach finds planted failures (run by hand).

    python benchmarks/always_on.py                       # W1-W5, timing then planted events
    python benchmarks/always_on.py --quick               # smoke test (< 60 s)
    python benchmarks/always_on.py --workloads W2,W3 --repeats 9 --round-secs 0.5
    python benchmarks/always_on.py --gpt2 --device cuda --workloads GPT2

Workloads (synthetic data generated here, a pool of 4 batches cycled): W1 MLP 2-5-5-5-5-1
sigmoid, batch 32, SGD; W2 MLP 784 -> 10 x 512 ReLU -> 10, batch 128, SGD; W3 three conv blocks
(3x3 conv 16/32/64 channels, BatchNorm, ReLU, 2x2 max-pool) on 3x32x32, batch 64, Adam; W4 LSTM
2 layers hidden 128 on 50 steps of 32 features, batch 32, Adam; W5 MLP depth 300 width 16 ReLU
(He-initialised so nothing underflows), batch 64, SGD; GPT2 (``--gpt2``) GPT-2 small from a
``transformers`` config, no weights (on a CPU a tiny config: 2 layers, width 64, vocabulary 256).

Variants, each on its own copy of the model (same seed) and optimizer:

* ``bare``: the loop alone; ``bare2``: a second copy of it, the noise control (ratio 1 up to noise);
* ``default``: ``gp.Probe(model, opt, run_dir=...)`` with nothing else (whatever the installed
  gradprobe's default is), ``probe.observe_loss(loss)`` each step;
* ``everything``: ``budget=None, every=1`` where the installed Probe accepts ``budget``, else
  ``every=1`` (the output says which): every kind, every step;
* ``always_floor``: the floor of the default attach: the always-on tier's work (issue 14's
  list: a non-finite check of every output, every gradient's norm, the loss) done as cheaply as
  torch allows, with nothing else: a forward hook on each tracked module keeps
  ``output.detach().sum()`` (one reduction, on the device); after the optimizer step one
  ``torch._foreach_norm`` over the gradients, one ``torch.stack`` of sums, norms and loss into
  a preallocated row, its host view and one ``np.isfinite(...).all()``. No schedule, no
  storage, no spike detection, no budget accounting;
* ``floor``: the memory traffic the everything-variant cannot avoid, done as cheaply as torch
  allows: forward hooks on the modules the Probe tracks (parameter owners and known activations)
  keep each output and register a tensor hook keeping its gradient; before the optimizer step one
  ``torch._foreach_copy_`` keeps the weights (the update statistic needs W_t); after it one
  ``torch._foreach_norm`` (Σx² per tensor: one read of each element) over every gradient, weight,
  kept weight, W0, hooked activation, activation gradient and the first hooked module's input.
  No statistics beyond Σx², no histograms, nothing leaves the device;
* ``stats_plain``: not a floor but the hand-written reference: the same tensors as ``floor``
  reduced to the statistics' fields with plain torch calls per tensor (no gradprobe code):
  ``amin``, ``amax``, ``sum``, ``dot(x, x)``, ``abs`` into a scratch buffer, its ``sum`` and the
  ``sum`` of its ``sign_`` (the non-zero count), and ``Σ (W − W_prev)²``, ``Σ (W − W0)²``
  through one subtraction each (no histograms, no per-unit statistics): what the arithmetic of
  the full tier costs written the obvious way;
* ``wandb``: ``wandb.watch(model, log="all", log_freq=1)`` in offline mode and
  ``wandb.log({"loss": loss.item()})`` each step (which commits the histograms the hooks logged);
* ``tensorboard``: ``SummaryWriter.add_histogram`` of every parameter and gradient each step;
* ``anomaly``: forward and backward inside ``torch.autograd.detect_anomaly()``.

Timing: one process, one thread. Round 0 warms every variant up (at least ``--warmup`` steps,
the anchors one round's steps) and is discarded; then
``--repeats`` rounds, the variants in forward then reverse order alternately. In a round every
variant except the anchors runs the same number of steps (``--steps``, or as many as the bare loop
runs in ``--round-secs``); the anchors run as many as fit in ``--round-secs`` (at least 1). The
table gives the time per step over all timed steps, its ratio to ``bare`` (all steps: flushes
included), and the median, min and max of the per-round ratios (the noise; ``bare2`` shows it on
its own). The planted-event check is in ``always_on_planted.py``.
"""

from __future__ import annotations

import argparse
import inspect
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import numpy as np
import torch
from torch import Tensor, nn

import gradprobe as gp
from always_on_workloads import WORKLOADS, Workload, workloads
from gradprobe.activations import spec_for_module

VARIANTS = ("bare", "bare2", "default", "always_floor", "everything", "floor", "stats_plain",
            "wandb", "tensorboard", "anomaly")
ANCHORS = ("wandb", "tensorboard", "anomaly")



# ------------------------------------------------------------------ variants


def probe_accepts_budget() -> bool:
    return "budget" in inspect.signature(gp.Probe.__init__).parameters


def everything_kwargs() -> dict[str, Any]:
    """``budget=None, every=1`` where the Probe has a budget, else ``every=1``."""
    return {"budget": None, "every": 1} if probe_accepts_budget() else {"every": 1}


def tracked(model: nn.Module) -> list[nn.Module]:
    """The Probe's default layers: modules owning parameters directly, and known activations."""
    return [m for m in model.modules()
            if next(m.parameters(recurse=False), None) is not None or spec_for_module(m)]


class FusedRead:
    """The floor of the everything-variant (see the module docstring): one foreach copy of the
    weights before the step, one ``torch._foreach_norm`` over every tensor after it."""

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        with torch.no_grad():
            self.w0 = [p.detach().clone() for p in self.params]
            self.prev = [torch.empty_like(p) for p in self.params]
        self.acts: list[Tensor] = []
        self.act_grads: list[Tensor] = []
        self.input: Tensor | None = None
        self.last: Tensor | None = None
        self.handles = [m.register_forward_hook(self._fwd) for m in tracked(model)]
        self.handles.append(opt.register_step_pre_hook(self._pre))
        self.handles.append(opt.register_step_post_hook(self._post))

    def _fwd(self, mod: nn.Module, args: Any, out: Any) -> None:
        if not torch.is_grad_enabled():
            return
        if self.input is None and args and isinstance(args[0], Tensor) \
                and args[0].is_floating_point():
            self.input = args[0].detach()
        t = out[0] if isinstance(out, tuple) else out
        if isinstance(t, Tensor) and t.is_floating_point():
            self.acts.append(t.detach())
            if t.requires_grad:
                t.register_hook(self.act_grads.append)

    def _pre(self, opt: Any, args: Any, kwargs: Any) -> None:
        with torch.no_grad():
            torch._foreach_copy_(self.prev, [p.detach() for p in self.params])

    def _post(self, opt: Any, args: Any, kwargs: Any) -> None:
        ts = [p.grad for p in self.params if p.grad is not None]
        ts += [p.detach() for p in self.params] + self.prev + self.w0 + self.acts + self.act_grads
        if self.input is not None:
            ts.append(self.input)
        with torch.no_grad():
            self.last = torch.stack(torch._foreach_norm(ts))  # kept on the device: no sync
        self.acts, self.act_grads, self.input = [], [], None

    def close(self) -> None:
        for h in self.handles:
            h.remove()


class StatsRead(FusedRead):
    """The statistics written the obvious way (see the module docstring, ``stats_plain``)."""

    scratch: Tensor | None = None  # |x| and W - W_ref, as large as the largest tensor

    def _post(self, opt: Any, args: Any, kwargs: Any) -> None:
        ws = [p.detach() for p in self.params]
        ts = [p.grad for p in self.params if p.grad is not None] + ws + self.acts + self.act_grads
        if self.input is not None:
            ts.append(self.input)
        out: list[Tensor] = []
        with torch.no_grad():
            big = max(t.numel() for t in ts)
            if self.scratch is None or self.scratch.numel() < big:
                self.scratch = torch.empty(big, device=ts[0].device)
            for t in ts:
                f = t.reshape(-1)
                a = torch.abs(f, out=self.scratch[: f.numel()])
                out += [f.amin(), f.amax(), f.sum(), torch.dot(f, f), a.sum(), a.sign_().sum()]
            for w, prev, w0 in zip(ws, self.prev, self.w0):
                for ref in (prev, w0):
                    d = torch.sub(w, ref, out=self.scratch[: w.numel()].view_as(w)).reshape(-1)
                    out.append(torch.dot(d, d))
            self.last = torch.stack(out)  # kept on the device: no sync
        self.acts, self.act_grads, self.input = [], [], None


class AlwaysFloor:
    """The floor of the default attach (see the module docstring, ``always_floor``)."""

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer) -> None:
        mods = tracked(model)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.sums: list[Tensor] = []
        self.losses: list[Tensor] = []
        dev = self.params[0].device
        self.row = torch.zeros(len(mods) + len(self.params) + 1, device=dev)
        self.bad = 0
        self.handles = [m.register_forward_hook(self._fwd) for m in mods]
        self.handles.append(opt.register_step_post_hook(self._post))

    def _fwd(self, mod: nn.Module, args: Any, out: Any) -> None:
        t = out[0] if isinstance(out, tuple) else out
        if isinstance(t, Tensor) and t.is_floating_point():
            self.sums.append(t.detach().sum())

    def observe(self, loss: Tensor) -> None:
        self.losses.append(loss.detach())

    def _post(self, opt: Any, args: Any, kwargs: Any) -> None:
        with torch.no_grad():
            norms = torch._foreach_norm([p.grad for p in self.params])  # type: ignore[arg-type]
            vals = self.sums + list(norms) + self.losses[-1:]
            row = self.row[: len(vals)]
            torch.stack(vals, out=row)
        self.bad += not np.isfinite(row.cpu().numpy()).all()  # the host check of the row
        self.sums, self.losses = [], []

    def close(self) -> None:
        for h in self.handles:
            h.remove()


_WANDB: list[Any] = []


def wandb_run(tmp: Path) -> Any:
    """One offline W&B run for the whole process (``wandb.watch`` uses the current run)."""
    if not _WANDB:
        import wandb

        _WANDB.append(wandb.init(dir=str(tmp), mode="offline", project="gradprobe-always-on",
                                 settings=wandb.Settings(console="off")))
    return _WANDB[0]


def finish_wandb() -> None:
    while _WANDB:
        _WANDB.pop().finish()


def _anomaly() -> AbstractContextManager[Any]:
    with warnings.catch_warnings():  # "Anomaly Detection has been enabled", every step
        warnings.simplefilter("ignore", UserWarning)
        return torch.autograd.detect_anomaly()


@dataclass
class Variant:
    step: Callable[[], None]
    close: Callable[[], None]


def make_variant(name: str, wl: Workload, tmp: Path) -> Variant:
    """A training step of workload ``wl`` instrumented as variant ``name``."""
    model, batches = wl.model(), wl.batches()
    opt = wl.optimizer(model)
    it = [0]
    observe: Callable[[Tensor], None] | None = None
    after_backward: Callable[[], None] | None = None
    after_step: Callable[[Tensor], None] | None = None
    context: Callable[[], AbstractContextManager[Any]] = nullcontext
    closers: list[Callable[[], None]] = []
    if name in ("default", "everything"):
        kw = {} if name == "default" else everything_kwargs()
        probe = gp.Probe(model, opt, run_dir=tmp / f"{wl.name}-{name}", **kw)
        probe.attach()
        observe = probe.observe_loss
        closers.append(probe.detach)
    elif name == "always_floor":
        floor = AlwaysFloor(model, opt)
        observe = floor.observe
        closers.append(floor.close)
    elif name == "floor":
        closers.append(FusedRead(model, opt).close)
    elif name == "stats_plain":
        closers.append(StatsRead(model, opt).close)
    elif name == "wandb":
        run = wandb_run(tmp)
        run.watch(model, log="all", log_freq=1)
        after_step = lambda loss: run.log({"loss": loss.item()})  # noqa: E731
        closers.append(lambda: run.unwatch(model))
    elif name == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(tmp / f"tb-{wl.name}"))
        named = list(model.named_parameters())

        def histograms() -> None:
            for n, p in named:
                writer.add_histogram(f"weight/{n}", p.detach(), it[0])
                if p.grad is not None:
                    writer.add_histogram(f"grad/{n}", p.grad, it[0])

        after_backward = histograms
        closers.append(writer.close)
    elif name == "anomaly":
        context = _anomaly
    elif name not in ("bare", "bare2"):
        raise ValueError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")

    def step() -> None:
        batch = batches[it[0] % len(batches)]
        with context():
            loss = wl.loss(model, batch)
            if observe is not None:
                observe(loss)
            loss.backward()
        if after_backward is not None:
            after_backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step(loss)
        it[0] += 1

    def close() -> None:
        for c in closers:
            c()

    return Variant(step, close)


# ------------------------------------------------------------------ timing


@dataclass
class Timing:
    """Seconds per step of each variant, one entry per timed round, and the steps per round."""

    workload: str
    per_step: dict[str, list[float]]
    steps: dict[str, int]

    def ratios(self, variant: str, base: str = "bare") -> list[float]:
        return [a / b for a, b in zip(self.per_step[variant], self.per_step[base])]

    def ms(self, variant: str) -> float:
        return 1e3 * statistics.fmean(self.per_step[variant])

    def overall(self, variant: str, base: str = "bare") -> float:
        """Ratio over all timed steps (time per step averaged over rounds)."""
        return statistics.fmean(self.per_step[variant]) / statistics.fmean(self.per_step[base])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run(v: Variant, n: int, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        v.step()
    _sync(device)
    return (time.perf_counter() - t0) / n


def time_workload(wl: Workload, variants: list[str], *, repeats: int, steps: int,
                  round_secs: float, tmp: Path, warm: int = 20) -> Timing:
    """Rounds of alternated variants; round 0, discarded, warms up (the variants other than the
    anchors for at least ``warm`` steps; no round 0 where ``warm`` is 0). See the module
    docstring."""
    built = {v: make_variant(v, wl, tmp) for v in variants}
    try:
        # first steps: lazy initialisation, allocator caches; the second step sets the counts
        first = {v: _run(built[v], 1 + bool(warm), wl.device) for v in variants}
        # the round's steps from the faster of that step and ten more bare steps: one step the
        # machine stalled does not shrink every round to a few steps
        bare_s = min(first["bare"], _run(built["bare"], 10, wl.device))
        n_main = steps or max(3, min(5000, round(round_secs / bare_s)))
        counts = {v: n_main if v not in ANCHORS or steps
                  else max(1, min(n_main, round(round_secs / first[v]))) for v in variants}
        per_step: dict[str, list[float]] = {v: [] for v in variants}
        for r in range(int(not warm), repeats + 1):
            order = variants if r % 2 == 0 else variants[::-1]
            for v in order:
                n = counts[v] if r or v in ANCHORS else max(counts[v], warm)
                t = _run(built[v], n, wl.device)
                if r > 0:
                    per_step[v].append(t)
    finally:
        for b in built.values():
            b.close()
    return Timing(wl.name, per_step, counts)


def format_timing(t: Timing) -> str:
    lines = [f"{t.workload:<5} {'variant':<12} {'ms/step':>9} {'ratio':>6}   "
             f"{'round ratios: median [min, max]':<32} steps/round"]
    for v in t.per_step:
        r = t.ratios(v)
        lines.append(f"{t.workload:<5} {v:<12} {t.ms(v):>9.3f} {t.overall(v):>6.2f}   "
                     f"{statistics.median(r):>6.2f} [{min(r):.2f}, {max(r):.2f}]"
                     f"{'':<15} {t.steps[v]}")
    for top, base in (("default", "always_floor"), ("everything", "floor"),
                      ("everything", "stats_plain")):
        if top in t.per_step and base in t.per_step:
            r = t.ratios(top, base)
            lines.append(f"{t.workload:<5} {top} / {base}: {t.overall(top, base):.2f} over all "
                         f"steps, rounds {statistics.median(r):.2f} [{min(r):.2f}, {max(r):.2f}] "
                         f"({base} {t.ms(base):.3f} ms, {top} {t.ms(top):.3f} ms)")
    return "\n".join(lines)


def schedule_line(run_dir: Path) -> str:
    """What the default attach recorded: its schedule where the Probe has one."""
    run = gp.Run.open(run_dir)
    sched = getattr(run, "schedule", None)
    if sched is None:
        return f"      default: every={run.meta['config'].get('every')} (no schedule in this Probe)"
    keep = {k: f"{v:.3g}" if isinstance(v, float) else v for k, v in sched.items()
            if not isinstance(v, (list, dict))}
    return "      default schedule: " + ", ".join(f"{k}={v}" for k, v in keep.items())


# ------------------------------------------------------------------ command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 1 timed step per variant, no warm-up, 25 planted steps")
    ap.add_argument("--workloads", default="W1,W2,W3,W4,W5",
                    help="comma-separated, from " + ",".join(WORKLOADS))
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help="comma-separated, from " + ",".join(VARIANTS) + " (bare is always run)")
    ap.add_argument("--steps", type=int, default=0,
                    help="steps per variant per round (0: as many as bare runs in --round-secs)")
    ap.add_argument("--round-secs", type=float, default=0.4)
    ap.add_argument("--repeats", type=int, default=7, help="timed rounds (after one warm-up)")
    ap.add_argument("--warmup", type=int, default=20,
                    help="steps of the warm-up round at least (anchors: one round's steps); "
                    "the default attach records its first steps in full")
    ap.add_argument("--planted-steps", type=int, default=150,
                    help="length of the run with planted events (0: skip that part)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the planted steps")
    ap.add_argument("--gpt2", action="store_true", help="add the GPT2 workload")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.workloads.split(",") if n.strip()]
    if args.gpt2 and "GPT2" not in names:
        names.append("GPT2")
    bad = [n for n in names if n not in WORKLOADS]
    if bad or not names:
        ap.error(f"--workloads: unknown {bad or 'none given'}; choose from {','.join(WORKLOADS)}")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        ap.error(f"--variants: unknown {bad}; choose from {','.join(VARIANTS)}")
    args.names = names
    args.variant_list = ["bare"] + [v for v in VARIANTS if v in variants and v != "bare"]
    for opt in ("steps", "planted_steps", "warmup"):
        if getattr(args, opt) < 0:
            ap.error(f"--{opt.replace('_', '-')} must be >= 0, got {getattr(args, opt)}")
    if args.repeats < 1 or args.round_secs <= 0:
        ap.error("--repeats must be >= 1 and --round-secs > 0")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA device; "
                 "use --device cpu")
    if args.quick:
        args.steps, args.repeats, args.warmup = args.steps or 1, 1, 0
        args.planted_steps = min(args.planted_steps, 25) if args.planted_steps else 0
    return args


def header() -> str:
    note = ("everything = budget=None, every=1" if probe_accepts_budget() else
            "everything = every=1 (this gradprobe's Probe has no budget parameter)")
    return (f"gradprobe {gp.__version__} from {Path(gp.__file__).parent}, torch "
            f"{torch.__version__}, threads {torch.get_num_threads()}, {os.cpu_count()} CPUs "
            f"(shared machine: figures are ratios within one process); {note}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    device = torch.device(args.device)
    wls = workloads(args.names, device)
    print(header())
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        try:
            for wl in wls:
                print(f"\n{wl.name}: {wl.title}", flush=True)
                t = time_workload(wl, args.variant_list, repeats=args.repeats, steps=args.steps,
                                  round_secs=args.round_secs, tmp=tmp, warm=args.warmup)
                print(format_timing(t), flush=True)
                if "default" in t.per_step:
                    print(schedule_line(tmp / f"{wl.name}-default"), flush=True)
        finally:
            finish_wandb()
        if args.planted_steps:
            from always_on_planted import format_planted, norms_source, planted_check

            print(f"\nPlanted events, default attach (non-finite: Run.events(); spikes: "
                  f"Run.{norms_source()} against an unplanted twin run)")
            for wl in wls:
                res = planted_check(wl, steps=args.planted_steps, seed=args.seed, tmp=tmp)
                print(format_planted(wl.name, res), flush=True)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
