"""Eager against compiled (gradprobe.stats.compiled) statistics of large tensors, per element (run by hand).

    python benchmarks/fused_kernels.py                 # one thread, sizes 8K to 4M
    python benchmarks/fused_kernels.py --sizes 65536 1048576 --repeats 50

For each size, in one process and alternated call by call (so a shared machine's drift hits both
alike): ``stats`` is the statistics vector of one float32 tensor (eager: the chunked reductions of
``stats._chunked_eager`` and the non-finite check, as ``stats.tensor_stats`` ran them before;
fused: ``_fused.rows``), ``weight`` adds ``Σ(W − W_prev)²`` and ``Σ(W − W0)²`` (eager: the
statistics and two differences through a scratch buffer, as ``Probe._record_params`` ran them;
fused: ``_fused.weight_stats``). The table gives medians in ns per element and the ratio
eager / fused. The first call of each kernel, which compiles it, is timed apart.

``--workloads W2 W3 W4`` then times whole training steps of benchmarks/overhead.py's workloads:
the baseline, the Probe (all kinds, every step) with the compiled kernels, and the same Probe
with them off (``_fused.set_mode("off")``), alternated round by round in this process.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from gradprobe.stats import compiled as F
from gradprobe.stats import eager, schema
from overhead import make_variant, workloads


def eager_stats(x: torch.Tensor) -> torch.Tensor:
    return eager.fix_nonfinite_([x], eager.chunked_stats([x]))[0]


def eager_weight(w: torch.Tensor, prev: torch.Tensor, init: torch.Tensor,
                 scratch: torch.Tensor) -> torch.Tensor:
    vec = eager.fix_nonfinite_([w], eager.chunked_stats([w]))[0]
    out = scratch[: w.numel()].view_as(w)
    up = torch.linalg.vector_norm(torch.sub(prev, w, out=out)).square()
    dr = torch.linalg.vector_norm(torch.sub(w, init, out=out)).square()
    return torch.cat([vec, torch.stack([up, dr]).double()])


def fused_stats(x: torch.Tensor) -> torch.Tensor:
    out = F.KERNELS.rows([x])
    assert out is not None
    return out[0]


def fused_weight(w: torch.Tensor, prev: torch.Tensor, init: torch.Tensor) -> torch.Tensor:
    out = F.KERNELS.weight_stats(w, prev, init)
    assert out is not None
    return out


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+",
                    default=[8_193, 32_768, 65_536, 262_144, 1_048_576, 4_194_304])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workloads", nargs="*", default=[],
                    help="overhead.py workloads to time with the kernels on and off")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    F.KERNELS.set_mode("on")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{args.repeats} calls each, median")
    x0 = torch.randn(3 * F.CHUNK)
    t_stats = timed(lambda: F.KERNELS.rows([x0]))
    t_weight = timed(lambda: F.KERNELS.weight_stats(x0, x0, x0))
    print(f"first call (compile, or load from the inductor cache): stats {t_stats:.1f} s, "
          f"weight {t_weight:.1f} s")
    print(f"{'numel':>10} {'stats eager':>12} {'fused':>8} {'ratio':>6}   "
          f"{'weight eager':>12} {'fused':>8} {'ratio':>6}   (ns/element)")
    scratch = torch.empty(max(args.sizes))
    for n in args.sizes:
        med = measure(n, args.repeats, scratch)
        print(f"{n:>10} {med['se']:>12.3f} {med['sf']:>8.3f} {med['se'] / med['sf']:>6.2f}   "
              f"{med['we']:>12.3f} {med['wf']:>8.3f} {med['we'] / med['wf']:>6.2f}")
    if args.workloads:
        F.KERNELS.set_mode("auto")
        print(f"\ntraining steps, {args.rounds} rounds x {args.steps} steps, median ms per step")
        print(f"{'workload':<9} {'baseline':>9} {'eager':>9} {'ratio':>6} {'fused':>9} {'ratio':>6}")
    for name in args.workloads:
        st = probe_steps(name, args.steps, args.rounds)
        print(f"{name:<9} {st['baseline']:>9.1f} {st['eager']:>9.1f} "
              f"{st['eager'] / st['baseline']:>6.2f} {st['fused']:>9.1f} "
              f"{st['fused'] / st['baseline']:>6.2f}")


def probe_steps(name: str, steps: int, rounds: int) -> dict[str, float]:
    """Median ms per training step: no Probe, Probe with eager statistics, Probe with fused."""
    wl = workloads()[name]
    tmp = Path(tempfile.mkdtemp())
    variants = {"baseline": make_variant("baseline", wl, tmp),
                "eager": make_variant("every1", wl, tmp / "eager"),
                "fused": make_variant("every1", wl, tmp / "fused")}
    mode = {"baseline": "auto", "eager": "off", "fused": "auto"}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for k, (step, _) in variants.items():  # warm-up (compiles the kernels)
        F.KERNELS.set_mode(mode[k])  # type: ignore[arg-type]
        for _ in range(3):
            step()
    for _ in range(rounds):
        for k, (step, _) in variants.items():
            F.KERNELS.set_mode(mode[k])  # type: ignore[arg-type]
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            times[k].append((time.perf_counter() - t0) / steps * 1e3)
    for _, close in variants.values():
        close()
    return {k: statistics.median(v) for k, v in times.items()}


def measure(n: int, repeats: int, scratch: torch.Tensor) -> dict[str, float]:
    """Median ns per element of the four variants on tensors of ``n`` elements."""
    torch.manual_seed(0)
    w = torch.randn(n)
    prev = w + 1e-3 * torch.randn(n)
    init = torch.randn(n)
    variants: dict[str, Callable[[], object]] = {
        "se": lambda: eager_stats(w), "sf": lambda: fused_stats(w),
        "we": lambda: eager_weight(w, prev, init, scratch),
        "wf": lambda: fused_weight(w, prev, init),
    }
    # agreement first, against float64: the fused sums to 1e-5 relative; the eager float32
    # norms drift further (2e-5 relative at 1M elements), hence only 1e-3 for them
    wd = w.double()
    truth = torch.stack([wd.sum(), wd.square().sum(), wd.abs().sum(),
                         (wd - prev.double()).square().sum(), (wd - init.double()).square().sum()])
    cols = [schema.SUM, schema.SUMSQ, schema.ABS_SUM, schema.N_STATS, schema.N_STATS + 1]
    scale = torch.stack([wd.abs().sum()] * 5)  # Σx may cancel: bound its error by Σ|x|
    for fn, rtol in ((lambda: fused_weight(w, prev, init), 1e-5),
                     (lambda: eager_weight(w, prev, init, scratch), 1e-3)):
        got = fn()[cols]
        assert ((got - truth).abs() <= rtol * torch.maximum(truth.abs(), 1e-3 * scale)).all()
    assert torch.equal(eager_stats(w)[schema.NONZERO:], fused_stats(w)[schema.NONZERO:])
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(3):  # warm-up
        for fn in variants.values():
            fn()
    for _ in range(repeats):
        for k, fn in variants.items():
            times[k].append(timed(fn))
    return {k: statistics.median(v) / n * 1e9 for k, v in times.items()}

if __name__ == "__main__":
    main()
