"""Process memory of a long probed run stays within the probe's stated bound (run by hand).

    python benchmarks/memory.py                 # 10,000 steps of W2 (MLP 784 -> 10x512 -> 10)
    python benchmarks/memory.py --steps 1000    # shorter

Trains W2 with every statistic every step (and histograms every 100 steps), samples the
resident set size (RSS, from /proc/self/statm) every ``--sample`` steps after a warm-up of two
flushes, and compares its growth with ``Probe.memory_bytes()`` (ring buffer, parameter copies).
The probe allocates all of that when it attaches, so after warm-up the RSS should stay flat:
growth is reported next to the stated buffer size.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import gradprobe as gp


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: peak RSS is the best available
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10_000)
    ap.add_argument("--flush-every", type=int, default=100)
    ap.add_argument("--sample", type=int, default=100)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    widths = [784] + [512] * 10 + [10]
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    model = nn.Sequential(*layers)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x, y = torch.randn(128, 784), torch.randint(0, 10, (128,))
    warm = 2 * args.flush_every
    samples: list[tuple[int, int]] = []
    with tempfile.TemporaryDirectory() as d:
        probe = gp.Probe(model, opt, run_dir=Path(d) / "run", flush_every=args.flush_every,
                         hist_every=100)
        bound = probe.memory_bytes()
        t0 = time.perf_counter()
        with probe:
            for step in range(args.steps):
                loss = nn.functional.cross_entropy(model(x), y)
                probe.observe_loss(loss)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if step + 1 >= warm and (step + 1) % args.sample == 0:
                    samples.append((step + 1, rss_bytes()))
        elapsed = time.perf_counter() - t0
        n_rows = len(probe.run.raw_scalars())
    mib = 1 / 2**20
    print(f"steps {args.steps}, {elapsed:.1f} s, rows written {n_rows}")
    print(f"stated bound: buffer {bound['buffer'] * mib:.2f} MiB, parameter copies "
          f"{bound['param_copies'] * mib:.2f} MiB, total {bound['total'] * mib:.2f} MiB")
    if len(samples) < 2:
        print("too few samples: raise --steps")
        return
    first, last = samples[0][1], samples[-1][1]
    peak = max(s for _, s in samples)
    print(f"RSS after warm-up {first * mib:.1f} MiB, at the end {last * mib:.1f} MiB, "
          f"peak {peak * mib:.1f} MiB")
    growth = last - first
    print(f"growth after warm-up {growth * mib:+.2f} MiB "
          f"({growth / max(bound['buffer'], 1):+.2f} x the stated ring buffer)")
    # a slope over the second half tells a leak from allocator noise
    half = samples[len(samples) // 2 :]
    if len(half) >= 2:
        slope = (half[-1][1] - half[0][1]) / max(half[-1][0] - half[0][0], 1)
        print(f"RSS slope over the second half: {slope / 1024:+.3f} KiB per step")


if __name__ == "__main__":
    main()
