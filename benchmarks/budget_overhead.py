"""Cost of the default attach (always-on tier + the budget's full steps) against the bare loop.

    OMP_NUM_THREADS=1 python benchmarks/budget_overhead.py                 # all workloads
    python benchmarks/budget_overhead.py --only W1 W5 --rounds 20 --steps 10

Workloads (as in ``benchmarks/overhead.py``, but W5 deep and narrow): W1 MLP 2-5-5-5-5-1 sigmoid,
batch 32; W2 MLP 784 -> 10x512 ReLU -> 10, batch 128; W3 six 3x3 conv layers of 64 channels with
BatchNorm on 3x32x32, batch 64; W4 LSTM hidden 128, input 32, length 100, batch 64; W5 MLP of
depth 300 and width 16, ReLU, batch 64.

Variants, each on its own copy of the model and optimizer, in one process, alternated round by
round (the order reversed every other round) so that the drifts of a shared machine hit all of
them alike: ``bare`` (no instrumentation), ``default`` (``gp.Probe(model, opt, run_dir=...)``:
``budget=0.05``) and ``all`` (``budget=None, every=1``: every kind every step). Each variant
first runs ``--warmup`` steps (the default attach's warm-up of full steps falls there: it is
reported apart, in the schedule line). A round times ``--steps`` steps of each variant; the
table gives, per variant, the median over rounds of its time per step divided by the bare
loop's time in the same round, and the 25-75 % range of those per-round ratios (the noise).
The schedule line says how many of the measured steps were full and the Probe's own estimate
of its time against the bare step time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import gradprobe as gp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import mlp
from overhead import workloads as shared_workloads

Workload = tuple[Callable[[], nn.Module], torch.Tensor, torch.Tensor]
VARIANTS = {"default": {}, "all": {"budget": None, "every": 1}}


def workloads() -> dict[str, Workload]:
    """W1-W4 of ``benchmarks/overhead.py``; W5 deep and narrow (depth 300, width 16)."""
    out = {k: v for k, v in shared_workloads().items() if k in ("W1", "W2", "W3", "W4")}
    g = torch.Generator().manual_seed(1)
    out["W5"] = (lambda: mlp([16] * 301 + [10], nn.ReLU), torch.randn(64, 16, generator=g),
                 torch.randint(0, 10, (64,), generator=g))
    return out


def make(variant: str, wl: Workload, tmp: Path) -> tuple[Callable[[], None], gp.Probe | None]:
    build, x, y = wl
    torch.manual_seed(0)
    model = build()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    loss_fn = nn.functional.mse_loss if y.is_floating_point() else nn.functional.cross_entropy
    probe = None
    if variant != "bare":
        probe = gp.Probe(model, opt, run_dir=tmp / variant, **VARIANTS[variant]).attach()

    observe = probe.observe_loss if probe is not None else (lambda loss: None)

    def step() -> None:  # the user's loop: forward, loss (observed), backward, update
        loss = loss_fn(model(x), y)
        observe(loss)
        loss.backward(), opt.step(), opt.zero_grad(set_to_none=True)

    return step, probe


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    return q[0], statistics.median(xs), q[2]


def bench(name: str, wl: Workload, rounds: int, steps: int, warmup: int) -> None:
    variants = ["bare", *VARIANTS]
    with tempfile.TemporaryDirectory() as d:
        fns = {v: make(v, wl, Path(d) / name) for v in variants}
        for step, _ in fns.values():
            for _ in range(warmup):
                step()
        times: dict[str, list[float]] = {v: [] for v in variants}
        full0 = {v: (p._schedule.n_full, p._schedule.n_steps) for v, (_, p) in fns.items()
                 if p is not None}
        for r in range(rounds):
            for v in variants if r % 2 == 0 else variants[::-1]:
                step = fns[v][0]
                t0 = time.perf_counter()
                for _ in range(steps):
                    step()
                times[v].append((time.perf_counter() - t0) / steps)
        sched = {}
        for v, (_, p) in fns.items():
            if p is not None:
                s = p._schedule  # the schedule as used (also in meta.json after detach)
                sched[v] = (s.n_full - full0[v][0], s.n_steps - full0[v][1],
                           s.spent / s.bare if s.bare else 0.0)
                p.detach()
    bare = statistics.median(times["bare"])
    line = f"{name:<4} {bare * 1e3:>9.2f}"
    for v in VARIANTS:
        ratios = [t / b for t, b in zip(times[v], times["bare"])]
        lo, med, hi = quartiles(ratios)
        line += f"  {med:>6.3f} [{lo:.3f}-{hi:.3f}]"
    n_full, n_steps, frac = sched["default"]
    line += f"  default: {n_full}/{n_steps} full steps, own estimate {frac:.3f} of bare"
    print(line, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="workloads (W1 ... W5)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=10, help="steps per variant per round")
    ap.add_argument("--warmup", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(1)
    wls = workloads()
    print(f"torch {torch.__version__}, 1 thread, {args.rounds} rounds x {args.steps} steps "
          f"after {args.warmup} warm-up steps; ratio to bare: median [25%-75%] over rounds")
    print(f"{'wl':<4} {'bare ms':>9}  {'default':>22}  {'all (every=1)':>22}")
    for name, wl in wls.items():
        if not args.only or name in args.only:
            bench(name, wl, args.rounds, args.steps, args.warmup)


if __name__ == "__main__":
    main()
