"""The lab's training loop: what its pieces cost on the circles networks.

Variants (one epoch of the 2-5-5-5-5-1 sigmoid network on 1000 points, batch 32 = 32 steps):

* ``plain``       the obvious loop, written out here (baseline);
* ``fit``         ``gradprobe.lab.train.fit`` without a Probe (should cost the same);
* ``fit+probe``   ``fit`` recording grad and weight statistics once per epoch (the circles setting);
* ``fit+probe/1`` ``fit`` recording every step, all kinds (the Probe's worst case here);
* ``5x fit``      five seeds one after the other, against
* ``stacked x5``  ``fit_stacked`` with five seeds at once;
* ``2 threads``   ``fit`` with torch's 2 intra-op threads instead of the lab's 1.

Every variant is timed in the same process, alternating, and the median of ``--repeats`` is
reported with its ratio to ``plain`` (per seed for the two five-seed variants).

    .venv/bin/python benchmarks/bench_lab_train.py --repeats 7
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from gradprobe.lab import train, zoo
from gradprobe.lab.data import circles


def _model(seed: int) -> torch.nn.Sequential:
    with train.seeded(seed):
        m = zoo.mlp([2, 5, 5, 5, 5, 1], "sigmoid")
        for p in m.parameters():
            torch.nn.init.normal_(p)
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args()
    x, y, _, _ = circles(1000, test_fraction=0.0)
    tmp = Path(tempfile.mkdtemp(prefix="bench-lab-"))
    counter = [0]

    def plain() -> None:
        m = _model(0)
        opt = torch.optim.RMSprop(m.parameters(), lr=1e-3, alpha=0.9, eps=1e-7)
        with train.threads(1):
            for epoch in range(args.epochs):
                order = torch.randperm(1000, generator=torch.Generator().manual_seed(epoch))
                for xb, yb in zip(x[order].split(32), y[order].split(32)):
                    loss = torch.nn.functional.binary_cross_entropy_with_logits(m(xb), yb)
                    loss.backward()
                    opt.step()
                    opt.zero_grad()

    def fit(**kw: object) -> Callable[[], None]:
        def go() -> None:
            counter[0] += 1
            extra = dict(kw)
            if extra.pop("probe", False):
                extra["run_dir"] = tmp / f"r{counter[0]}"
            train.fit(_model(0), x, y, optimizer="rmsprop", epochs=args.epochs, **extra)  # type: ignore[arg-type]
        return go

    def five_fits() -> None:
        for s in range(5):
            train.fit(_model(s), x, y, optimizer="rmsprop", epochs=args.epochs, seed=s)

    def stacked() -> None:
        train.fit_stacked([_model(s) for s in range(5)], [(x, y)] * 5, seeds=list(range(5)),
                          optimizer="rmsprop", epochs=args.epochs)

    variants: dict[str, tuple[Callable[[], None], int]] = {
        "plain": (plain, 1),
        "fit": (fit(), 1),
        "fit+probe": (fit(probe=True, probe_options={"kinds": ("grad", "weight")}), 1),
        "fit+probe/1": (fit(probe=True, probe_every=1), 1),
        "5x fit": (five_fits, 5),
        "stacked x5": (stacked, 5),
        "2 threads": (fit(num_threads=2), 1),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn, _ in variants.values():  # warm-up (imports, first optimizer)
        fn()
    for _ in range(args.repeats):
        for name, (fn, _) in variants.items():
            time.sleep(0.3)  # let idle OpenMP workers of the previous variant stop spinning
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    steps = args.epochs * 32
    base = statistics.median(times["plain"])
    print(f"{'variant':<14}{'median s':>10}{'µs/step/seed':>14}{'ratio vs plain':>16}")
    for name, (_, seeds) in variants.items():
        med = statistics.median(times[name])
        print(f"{name:<14}{med:>10.3f}{med / steps / seeds * 1e6:>14.0f}{med / seeds / base:>16.2f}")


if __name__ == "__main__":
    main()
