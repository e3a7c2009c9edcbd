"""Theory against measurement at full size, and the cost of the theory tools.

Run by hand: ``.venv/bin/python benchmarks/theory_agreement.py`` (``--quick`` for smaller sizes).
Prints markdown tables:

1. tanh MLP (width 1000, depth 30, σ_b² = 0.05) and ReLU without bias: measured per-layer
   gradient-variance ratio (geometric mean over layers past the q transient, two seeds) against
   χ₁ from quadrature.
2. Linear chain depth 50, width 100: orthogonal vs Gaussian 1/√n Jacobian singular values.
3. Glorot & Bengio (2010) width 1000: mean singular value of W and of the tanh layer Jacobian
   diag(φ'(h)) W for the normalised and the standard initialisation.
4. preflight's verdict against what 150 steps of SGD then show on 20-layer networks.
5. Timings (median of repeats, variants alternated in one process): preflight against one plain
   forward+backward; Lanczos (top 10) against materialising the Jacobian.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import gradprobe as gp
from gradprobe.activations import ACTIVATIONS
from gradprobe.lab.data import circles
from gradprobe.lab.zoo import mlp
from gradprobe.theory import closed_form as cf
from gradprobe.theory import meanfield as mf
from gradprobe.theory.jacobian import jacobian_spectrum


def measured_ratio(act, s2, b2, width, depth, batch, seed):
    gen = torch.Generator().manual_seed(seed)
    fn = ACTIVATIONS[act].fn
    x = torch.randn(batch, width, generator=gen).requires_grad_(True)
    hs, h = [], x
    for i in range(depth):
        w = torch.randn(width, width, generator=gen) * math.sqrt(s2 / width)
        b = torch.randn(width, generator=gen) * math.sqrt(b2)
        pre = (fn(h) if i else h) @ w.T + b
        pre.retain_grad()
        hs.append(pre)
        h = pre
    out = fn(h)
    out.backward(torch.randn(out.shape, generator=gen))
    g = np.array([float(t.grad.double().pow(2).mean()) for t in hs])
    return g[:-1] / g[1:]


def table_chi1(width, depth, batch):
    print(f"\n## Gradient-variance ratio per layer vs chi1 (width {width}, depth {depth}, "
          f"batch {batch}, 2 seeds, layers 10..{depth - 1})\n")
    print("| activation | sigma_w2 | sigma_b2 | chi1 (quadrature) | measured | rel. error |")
    print("|---|---|---|---|---|---|")
    for act, s2, b2 in [("tanh", 1.0, 0.05), ("tanh", 1.76, 0.05), ("tanh", 2.5, 0.05),
                        ("relu", 1.0, 0.0), ("relu", 2.0, 0.0), ("relu", 3.0, 0.0)]:
        logs = [np.log(measured_ratio(act, s2, b2, width, depth, batch, s)[10:]) for s in (0, 1)]
        meas = math.exp(float(np.mean(logs)))
        chi = mf.chi1(act, s2, b2)
        print(f"| {act} | {s2} | {b2} | {chi:.4f} | {meas:.4f} | {meas / chi - 1:+.2%} |")


def chain(kind, n, depth, seed=0):
    torch.manual_seed(seed)
    layers = []
    for _ in range(depth):
        lin = nn.Linear(n, n, bias=False)
        if kind == "orthogonal":
            nn.init.orthogonal_(lin.weight)
        else:
            nn.init.normal_(lin.weight, std=n**-0.5)
        layers.append(lin)
    return nn.Sequential(*layers)


def table_chain(n=100, depth=50):
    print(f"\n## Linear chain, depth {depth}, width {n}: Jacobian singular values (float32)\n")
    print("| weights | max abs(s - 1) | median s | predicted median (Lyapunov) | spread |")
    print("|---|---|---|---|---|")
    pred = math.exp(float(np.median(cf.gaussian_product_log_singular_values(n, depth))))
    for kind in ("orthogonal", "gaussian"):
        s = jacobian_spectrum(chain(kind, n, depth), torch.randn(1, n), k=n)
        dev = float(np.max(np.abs(s.singular_values - 1)))
        p = "1" if kind == "orthogonal" else f"{pred:.2e}"
        print(f"| {kind} | {dev:.2e} | {s.median:.2e} | {p} | {s.spread:.3g} |")


def table_glorot(n=1000):
    print(f"\n## Glorot & Bengio, width {n}: mean singular value\n")
    print("| init | weight W (measured) | quarter-circle law | tanh layer diag(phi')W, layer 3 |")
    print("|---|---|---|---|")
    for init, var in [("normalised U[+-sqrt(6/(2n))]", 1 / n), ("standard U[+-1/sqrt(n)]",
                                                               1 / (3 * n))]:
        torch.manual_seed(0)
        a = math.sqrt(3 * var)
        net = mlp([n] * 6, "tanh")
        for m in net:
            if isinstance(m, nn.Linear):
                nn.init.uniform_(m.weight, -a, a)
                nn.init.zeros_(m.bias)
        w_mean = float(torch.linalg.svdvals(net[0].weight.detach()).mean())
        x = torch.randn(1, n)
        with torch.no_grad():
            h = net[3](net[2](net[1](net[0](x))))  # input to the third hidden block
        layer = nn.Sequential(net[4], net[5])
        s = jacobian_spectrum(layer, h, k=n)
        print(f"| {init} | {w_mean:.3f} | {cf.quarter_circle_mean_singular_value(n, var):.3f} |"
              f" {s.mean:.3f} |")


def init_(net, s2, b2, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen)
                               * math.sqrt(s2 / m.in_features))
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * math.sqrt(b2))
    return net


def table_verdicts(seeds=3, steps=150):
    x, y, xt, yt = circles(400, seed=0)
    bce = F.binary_cross_entropy_with_logits
    print(f"\n## preflight verdict vs training (circles, 20 x 32 MLP, SGD momentum 0.9, "
          f"lr 0.05, {steps} steps, {seeds} seeds)\n")
    print("| net | phase | chi1 | verdicts | predicted depth limit | final loss (per seed) "
          "| test acc (per seed) |")
    print("|---|---|---|---|---|---|---|")
    cases = [("tanh", 0.5, 0.05), ("tanh", mf.critical_sigma_w2("tanh", 0.05), 0.05),
             ("tanh", 4.0, 0.05), ("relu", 1.0, 0.0), ("relu", 2.0, 0.0), ("relu", 3.0, 0.0)]
    for act, s2, b2 in cases:
        verdicts, losses, accs = [], [], []
        rep = None
        for seed in range(seeds):
            torch.manual_seed(seed)
            net = init_(mlp([2] + [32] * 20 + [1], act), s2, b2, seed)
            rep = gp.preflight(net, x, bce, y)
            verdicts.append(rep.verdict)
            opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
            for _ in range(steps):
                loss = bce(net(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
            losses.append(float(loss.detach()))
            with torch.no_grad():
                accs.append(float(((net(xt) > 0).float() == yt).float().mean()))
        assert rep is not None and rep.meanfield is not None
        m = rep.meanfield
        print(f"| {act} sigma_w2={s2:.3g} sigma_b2={b2} | {m.phase} | {m.chi1:.3f} | "
              f"{', '.join(verdicts)} | {m.max_depth:.3g} | "
              f"{', '.join(f'{v:.3g}' for v in losses)} | {', '.join(f'{a:.2f}' for a in accs)} |")


def median_time(fn, repeats):
    return statistics.median(_timed(fn) for _ in range(repeats))


def _timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def table_timings(width, depth, repeats=5):
    print(f"\n## Cost (median of {repeats}, alternated; shared, noisy CPU)\n")
    torch.manual_seed(0)
    net = mlp([width] * (depth + 1) + [10], "tanh")
    x = torch.randn(256, width)

    def plain():
        out = net(x)
        out.backward(torch.randn_like(out))
        net.zero_grad(set_to_none=True)

    def pre():
        gp.preflight(net, x)

    def measure_only():  # the pass itself, without the mean-field summary
        from gradprobe.theory import preflight as pf

        pf._measure(net, (x,), None, None, 0)

    times: dict[str, list[float]] = {"plain": [], "measure": [], "preflight": []}
    for _ in range(repeats):
        times["plain"].append(_timed(plain))
        times["measure"].append(_timed(measure_only))
        times["preflight"].append(_timed(pre))
    base = statistics.median(times["plain"])
    print(f"| variant (MLP {width}x{depth}, batch 256) | median s | ratio to plain fwd+bwd |")
    print("|---|---|---|")
    for k, v in times.items():
        print(f"| {k} | {statistics.median(v):.4f} | {statistics.median(v) / base:.2f} |")

    n = width
    deep = mlp([n] * 6, "tanh")
    x1 = torch.randn(1, n)

    def lanczos():
        jacobian_spectrum(deep, x1, k=10)

    def full():
        j = torch.func.jacrev(lambda v: deep(v.reshape(1, n)).reshape(-1))(x1.reshape(-1))
        torch.linalg.svdvals(j.detach())

    tl, tf = [], []
    for _ in range(repeats):
        tl.append(_timed(lanczos))
        tf.append(_timed(full))
    print(f"\n| Jacobian of a {n}-wide 5-layer tanh MLP | median s | ratio |")
    print("|---|---|---|")
    print(f"| materialise (jacrev) + svdvals, all values | {statistics.median(tf):.4f} | 1.00 |")
    print(f"| Lanczos k=10 (top values) | {statistics.median(tl):.4f} | "
          f"{statistics.median(tl) / statistics.median(tf):.2f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a minute)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    width, depth, batch = (300, 20, 64) if args.quick else (1000, 30, 256)
    t0 = time.time()
    table_chi1(width, depth, batch)
    table_chain()
    table_glorot(300 if args.quick else 1000)
    table_verdicts(seeds=2 if args.quick else 3)
    table_timings(width=300 if args.quick else 1000, depth=10)
    print(f"\n(total {time.time() - t0:.0f} s; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
