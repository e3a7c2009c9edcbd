"""The C statistics kernels (gradprobe.stats.native) against the eager kernels and one read of the
same memory, per element (run by hand).

    python benchmarks/native_kernels.py                    # one thread, sizes 8K to 4M
    python benchmarks/native_kernels.py --sizes 65536 262144 --repeats 100

For each size, in one process and alternated call by call (a shared machine's drift hits every
variant alike), on one float32 tensor:

* ``read``: ``torch.dot(x, x)``, the BLAS sum of squares: one read of the elements, the floor;
* ``stats``: the statistics row, eager (``chunked_stats`` and the non-finite check, the six
  reductions) and C (``NativeKernels.rows``);
* ``weight``: the row of a weight with ``Σ (W − W_prev)²``, ``Σ (W − W0)²`` and the column sums
  of its rows (the spread), eager (the row, two differences through a scratch buffer and
  ``W.sum(0)``, as the Probe runs them without the C kernels) and C (``weight_stats``);

then the rows of 10 tensors of 5 x 5 elements (a tiny MLP's step), eager
(``batched_stats``) against one C call. Medians; ratios eager / C and C / read (the weight
variants read three tensors: their floor is about three reads).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

from gradprobe.stats import batched, eager
from gradprobe.stats.native import NativeKernels


def eager_stats(x: torch.Tensor) -> torch.Tensor:
    return eager.fix_nonfinite_([x], eager.chunked_stats([x]))[0]


def eager_weight(w: torch.Tensor, prev: torch.Tensor, init: torch.Tensor,
                 scratch: torch.Tensor, units: int) -> torch.Tensor:
    vec = eager_stats(w)
    up = eager.diff_sumsq(prev, w, scratch)
    dr = eager.diff_sumsq(w, init, scratch)
    cs = torch.linalg.vector_norm(w.reshape(units, -1).sum(0)).square()
    return torch.cat([vec, torch.stack([up, dr, cs]).double()])


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def alternated(variants: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per call of each variant, the variants called in turn."""
    for _ in range(3):
        for fn in variants.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for k, fn in variants.items():
            times[k].append(timed(fn))
    return {k: statistics.median(v) for k, v in times.items()}


def measure(k: NativeKernels, n: int, repeats: int) -> dict[str, float]:
    """ns per element of each variant on ``n`` float32 elements (rows of 512 for the weight)."""
    g = torch.Generator().manual_seed(0)
    units = max(1, n // 512)
    w = torch.randn(units, n // units, generator=g)
    prev = w + 1e-3 * torch.randn(w.shape, generator=g)
    init = torch.randn(w.shape, generator=g)
    scratch = torch.empty(w.numel())
    cols = w.shape[1]

    def native_weight() -> torch.Tensor:
        out = k.weight_stats(w, prev, init, cols)
        assert out is not None
        return out

    # the same numbers first (sums to the accuracy of float32 sums of this size)
    got, want = native_weight(), eager_weight(w, prev, init, scratch, units)
    scale = torch.ones_like(want)
    scale[0] = w.double().abs().sum()  # Σx may cancel: its error is bounded by Σ|x|
    assert ((got - want).abs() <= 1e-4 * torch.maximum(want.abs(), scale)).all(), (got, want)
    f = w.reshape(-1)
    sec = alternated({
        "read": lambda: torch.dot(f, f),
        "stats_eager": lambda: eager_stats(w),
        "stats_c": lambda: k.rows([w]),
        "weight_eager": lambda: eager_weight(w, prev, init, scratch, units),
        "weight_c": native_weight,
    }, repeats)
    return {v: s / w.numel() * 1e9 for v, s in sec.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+",
                    default=[8_192, 65_536, 262_144, 1_048_576, 4_194_304])
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(1)
    k = NativeKernels("on")
    t0 = time.perf_counter()
    k.available()
    print(f"torch {torch.__version__}, one thread; C kernels {k.path} (built or loaded and "
          f"checked in {time.perf_counter() - t0:.2f} s); medians of {args.repeats} calls")
    print(f"{'numel':>9} {'read':>6} | {'stats eager':>11} {'C':>6} {'eager/C':>7} {'C/read':>6} | "
          f"{'weight eager':>12} {'C':>6} {'eager/C':>7} {'C/read':>6}   (ns/element)")
    for n in args.sizes:
        m = measure(k, n, args.repeats)
        print(f"{n:>9} {m['read']:>6.3f} | {m['stats_eager']:>11.3f} {m['stats_c']:>6.3f} "
              f"{m['stats_eager'] / m['stats_c']:>7.2f} {m['stats_c'] / m['read']:>6.2f} | "
              f"{m['weight_eager']:>12.3f} {m['weight_c']:>6.3f} "
              f"{m['weight_eager'] / m['weight_c']:>7.2f} {m['weight_c'] / m['read']:>6.2f}")
    small = [torch.randn(5, 5) for _ in range(10)]
    torch.testing.assert_close(k.rows(small), batched.batched_stats(small), rtol=1e-5, atol=1e-5)
    sec = alternated({"eager": lambda: batched.batched_stats(small),
                      "c": lambda: k.rows(small)}, args.repeats * 10)
    print(f"10 tensors of 5 x 5: eager batched {sec['eager'] * 1e6:.1f} us, C {sec['c'] * 1e6:.1f} "
          f"us, ratio {sec['eager'] / sec['c']:.2f}")


if __name__ == "__main__":
    main()
