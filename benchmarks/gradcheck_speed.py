"""Speed of gp.gradcheck against the textbook loop and torch.autograd.gradcheck.

Run by hand:  .venv/bin/python benchmarks/gradcheck_speed.py [--repeats 3] [--threads 1]
             [--big-params 10e6] [--skip-big]

1. MLP 20-64-64-1, tanh, float64, batch 16 (5,569 parameters), every coordinate checked:
   - gp.gradcheck(mode="full") (perturbed forward passes batched with torch.func.vmap),
   - the same with vectorize=False (gradprobe's own loop),
   - the textbook loop: one coordinate at a time, θ_i ± ε in place, two forward passes each,
   - torch.autograd.gradcheck on the same function (fast_mode=False, its default).
   Variants alternate within each repeat; the median of the repeats is reported, with the ratio
   to the textbook loop measured in the same process. All must give the same verdict.
2. gp.gradcheck(mode="directional") on an MLP with about 10 million parameters.

Timings on a shared machine are noisy: read the ratios, not the absolute seconds.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import gradprobe as gp


def mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def textbook(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float = 1e-7) -> bool:
    """One coordinate at a time, two forward passes each; the relative error formula at the end."""
    model = copy.deepcopy(model).double()
    loss = F.mse_loss(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    num, ana = [], []
    with torch.no_grad():
        for p, g in zip(model.parameters(), grads):
            flat = p.view(-1)
            for i in range(flat.numel()):
                old = float(flat[i])
                flat[i] = old + eps
                jp = float(F.mse_loss(model(x), y))
                flat[i] = old - eps
                jm = float(F.mse_loss(model(x), y))
                flat[i] = old
                num.append((jp - jm) / (2 * eps))
            ana.append(g.reshape(-1))
    n, a = torch.tensor(num, dtype=torch.float64), torch.cat(ana)
    rel = float((n - a).norm() / (n.norm() + a.norm()))
    return rel < 1e-7


def torch_gradcheck(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> bool:
    model = copy.deepcopy(model).double()
    names = [n for n, _ in model.named_parameters()]

    def fn(*ps: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(torch.func.functional_call(model, dict(zip(names, ps)), (x,)), y)

    params = tuple(p.detach().clone().requires_grad_(True) for p in model.parameters())
    return bool(torch.autograd.gradcheck(fn, params, eps=1e-7, raise_exception=False))


def timed(fn: Callable[[], bool]) -> tuple[float, bool]:
    t = time.perf_counter()
    ok = fn()
    return time.perf_counter() - t, ok


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--big-params", type=float, default=10e6)
    ap.add_argument("--skip-big", action="store_true")
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads; 1 keeps a shared, loaded machine from thrashing")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")

    torch.manual_seed(0)
    model = mlp([20, 64, 64, 1]).double()
    x = torch.randn(16, 20, dtype=torch.float64)
    y = torch.randn(16, 1, dtype=torch.float64)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"\n1. MLP 20-64-64-1 tanh float64 batch 16: {n_params} parameters, full check")
    variants: dict[str, Callable[[], bool]] = {
        "gp.gradcheck (vmap)": lambda: gp.gradcheck(model, F.mse_loss, x, y).ok,
        "gp.gradcheck (loop)": lambda: gp.gradcheck(model, F.mse_loss, x, y,
                                                    vectorize=False).ok,
        "textbook loop": lambda: textbook(model, x, y),
        "torch.autograd.gradcheck": lambda: torch_gradcheck(model, x, y),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    verdicts: dict[str, set[bool]] = {k: set() for k in variants}
    for r in range(args.repeats):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in order:
            dt, ok = timed(variants[name])
            times[name].append(dt)
            verdicts[name].add(ok)
    base = statistics.median(times["textbook loop"])
    print(f"{'variant':<28}{'median s':>10}{'min s':>9}{'speed-up vs textbook':>23}  passed")
    for name in variants:
        med = statistics.median(times[name])
        print(f"{name:<28}{med:>10.3f}{min(times[name]):>9.3f}{base / med:>22.1f}x  "
              f"{sorted(verdicts[name])}")

    if args.skip_big:
        return
    width = 2048
    n_in = max(16, int((args.big_params - 2 * width * width) / width))
    big = mlp([n_in, width, width, width, 10])
    n_big = sum(p.numel() for p in big.parameters())
    xb, yb = torch.randn(32, n_in), torch.randn(32, 10)
    print(f"\n2. directional mode, MLP {n_in}-{width}-{width}-{width}-10 tanh, batch 32: "
          f"{n_big / 1e6:.1f}M parameters in {len(list(big.parameters()))} tensors (float64)")
    for n_dir in (2, 4):
        t = time.perf_counter()
        rep = gp.gradcheck(big, F.mse_loss, xb, yb, mode="directional", n_directions=n_dir)
        dt = time.perf_counter() - t
        print(f"n_directions={n_dir}: {dt:.2f} s, {rep.n_evaluations} evaluations, "
              f"vectorised={rep.vectorized}, verdict {rep.verdict}, rel error {rep.rel_error:.1e}")


if __name__ == "__main__":
    main()
