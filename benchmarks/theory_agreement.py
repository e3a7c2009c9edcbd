"""Theory against measurement at full size, and the cost of the theory tools.

Run by hand: ``.venv/bin/python benchmarks/theory_agreement.py`` (``--quick`` for smaller sizes).
Prints markdown tables:

1. tanh MLP (width 1000, depth 30, σ_b² = 0.05) and ReLU without bias: measured per-layer
   gradient-variance ratio (geometric mean over layers past the q transient, two seeds) against
   χ₁ from quadrature.
2. Linear chain depth 50, width 100: orthogonal vs Gaussian 1/√n Jacobian singular values.
3. Glorot & Bengio (2010) width 1000: mean singular value of W and of the tanh layer Jacobian
   diag(φ'(h)) W for the normalised and the standard initialisation.
4. preflight's verdict against what training then shows on 20-, 24- and 30-layer networks (SGD
   and Adam), judged by the gradient phenomenon itself as the Probe records it during training.
5. Timings (median of repeats, variants alternated in one process): preflight against one plain
   forward+backward; Lanczos (top 10) against materialising the Jacobian.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import gradprobe as gp
from gradprobe.activations import ACTIVATIONS
from gradprobe.lab.data import circles
from gradprobe.lab.zoo import linear_chain, mlp
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


def table_chain(n=100, depth=50):
    print(f"\n## Linear chain, depth {depth}, width {n}: Jacobian singular values (float32)\n")
    print("| weights | max abs(s - 1) | median s | predicted median (Lyapunov) | spread |")
    print("|---|---|---|---|---|")
    pred = math.exp(float(np.median(cf.gaussian_product_log_singular_values(n, depth))))
    for kind in ("orthogonal", "gaussian"):
        s = jacobian_spectrum(linear_chain(n, depth, kind), torch.randn(1, n), k=n)
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
    """Gaussian weights with fan-in second moment ``s2``, biases N(0, b2); ``s2="xavier"``:
    ``xavier_normal_`` weights and zero biases."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Linear):
                if s2 == "xavier":
                    nn.init.xavier_normal_(m.weight, generator=gen)
                    m.bias.zero_()
                    continue
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen)
                               * math.sqrt(s2 / m.in_features))
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * math.sqrt(b2))
    return net


# What training shows, in preflight's own scale-free quantity. At every step the Probe records
# the back-propagated gradient ∂L/∂h at each Linear output (kind "act_grad"); its sum of squares
# between the first and last weight layers gives G_t = ln(‖δ_first‖² / ‖δ_last‖²), the quantity
# preflight thresholds at ±6 before training. The window is the learning phase: the steps before
# the training loss first falls below FIT_LOSS (at least MIN_STEPS; the whole run if it never
# does). After the fit the backward signal comes from a few residual examples through growing
# logits, and G_t drifts upwards in most nets that fitted, critical ones included (column "G at
# last step"), which is the learned function's steepness, not gradient propagation.
FIT_LOSS = 0.1 * math.log(2)
MIN_STEPS = 10


def train_with_probe(net, opt, x, y, steps):
    """Full-batch training under gp.Probe (Linear layers: grad, drift, act_grad); scalars, losses."""
    bce = F.binary_cross_entropy_with_logits
    with tempfile.TemporaryDirectory() as d:
        with gp.Probe(net, opt, run_dir=d, kinds=("grad", "drift", "act_grad"),
                      layer_types=(nn.Linear,)) as probe:
            for _ in range(steps):
                loss = bce(net(x), y)
                probe.observe_loss(loss)
                opt.zero_grad()
                loss.backward()
                opt.step()
        run = gp.Run.open(d)
        return run.scalars(), run.losses()


def training_verdict(scalars, losses, first="fc1", last="out", threshold=6.0):
    """"vanishing" / "exploding" / "fine" from what the Probe recorded (see FIT_LOSS above).

    exploding: a non-finite loss or gradient anywhere in the run, or median G_t > threshold over
    the learning phase; vanishing: median G_t < -threshold; fine: neither. Also returns the
    learning phase's length, the median log ratio of the first to the last layer's weight-gradient
    sum of squares, ln(drift_first / drift_last) at the end of the learning phase, and G at the
    last step when the net fitted before it (outside the window, for comparison).
    """
    loss = losses.set_index("step")["loss"].astype(float)
    nonfinite = not np.isfinite(loss.to_numpy()).all() or bool(scalars["nonfinite"].gt(0).any())
    below = loss.index[(loss < FIT_LOSS).to_numpy()]
    t_fit = int(below[0]) if len(below) else len(loss)
    window = scalars["step"] < max(t_fit, MIN_STEPS)
    s = scalars[window]

    def norm(layer, kind, frame=s):
        rows = frame[(frame["layer"] == layer) & (frame["kind"] == kind)]
        return rows.set_index("step")["norm"].astype(float)

    with np.errstate(divide="ignore", invalid="ignore"):
        g = (2 * np.log(norm(first, "act_grad") / norm(last, "act_grad"))).to_numpy()
        gw = (2 * np.log(norm(first, "grad") / norm(last, "grad"))).to_numpy()
        drift = np.log(norm(first, "drift") / norm(last, "drift")).to_numpy()
        after = scalars[~window]
        g_after = (2 * np.log(norm(first, "act_grad", after) / norm(last, "act_grad", after)))
    g = g[np.isfinite(g)]
    g_med = float(np.median(g)) if len(g) else math.nan
    g_after = g_after[np.isfinite(g_after.to_numpy())]
    if nonfinite or g_med > threshold:
        verdict = "exploding"
    elif g_med < -threshold:
        verdict = "vanishing"
    else:
        verdict = "fine"
    gw = gw[np.isfinite(gw)]
    return {"verdict": verdict, "G": g_med, "Gw": float(np.median(gw)) if len(gw) else math.nan,
            "drift": float(drift[-1]), "t_fit": t_fit,
            "G_after": float(g_after.iloc[-1]) if len(g_after) else math.nan, "nonfinite": nonfinite,
            "loss": float(loss.iloc[-1])}


def verdict_cases():
    return [("tanh", 0.5, 0.05), ("tanh", mf.critical_sigma_w2("tanh", 0.05), 0.05),
            ("tanh", 4.0, 0.05), ("relu", 1.0, 0.0), ("relu", 2.0, 0.0), ("relu", 3.0, 0.0),
            ("sigmoid", "xavier", 0.0)]


def table_verdicts(seeds=3, steps=200, depth=24, width=64):
    x, y, _, _ = circles(1000, seed=0)
    bce = F.binary_cross_entropy_with_logits
    optimisers = [("SGD 0.01 m0.9", lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9)),
                  ("Adam 1e-3", lambda p: torch.optim.Adam(p, lr=1e-3))]
    print(f"\n## preflight verdict vs what training shows (circles, {depth} hidden layers x "
          f"{width}, full batch, {steps} steps, {seeds} seeds; G = ln sum-of-squares gain of "
          "dL/dh from the last to the first weight layer)\n")
    print("| net | optimiser | preflight (G) per seed | training: median G over learning steps "
          "per seed | verdict from training | ln drift first/last | steps to fit | G at last step "
          "(after fit) | final loss | agree |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    total = agree_total = 0
    counts = {}
    for act, s2, b2 in verdict_cases():
        label = (f"{act} Xavier" if s2 == "xavier" else f"{act} sigma_w2={s2:.3g} sigma_b2={b2}")
        for opt_name, make_opt in optimisers:
            pre, tr = [], []
            for seed in range(seeds):
                torch.manual_seed(seed)
                net = init_(mlp([2] + [width] * depth + [1], act), s2, b2, seed)
                pre.append(gp.preflight(net, x, bce, y))
                tr.append(training_verdict(*train_with_probe(net, make_opt(net.parameters()),
                                                             x, y, steps)))
            agree = sum(p.verdict == t["verdict"] for p, t in zip(pre, tr))
            total += seeds
            agree_total += agree
            counts[(label, opt_name)] = agree
            print(f"| {label} | {opt_name} | "
                  + ", ".join(f"{p.verdict} ({_gain(p):+.1f})" for p in pre) + " | "
                  + ", ".join(f"{t['G']:+.1f}" for t in tr) + " | "
                  + ", ".join(t["verdict"] for t in tr) + " | "
                  + ", ".join(f"{t['drift']:+.1f}" for t in tr) + " | "
                  + ", ".join(str(t["t_fit"]) if t["t_fit"] < steps else "-" for t in tr) + " | "
                  + ", ".join(f"{t['G_after']:+.1f}" if t["t_fit"] < steps else "-"
                              for t in tr) + " | "
                  + ", ".join(f"{t['loss']:.2g}" for t in tr) + f" | {agree}/{seeds} |")
    print(f"\nAgreement: {agree_total} of {total} runs.")
    return counts, seeds


def table_verdict_depths(depths, seeds=3, width=64):
    """The verdict table at each depth, then the agreement counts side by side."""
    per_depth = {d: table_verdicts(seeds=seeds, depth=d, width=width)[0] for d in depths}
    print(f"\n## Agreement (runs of {seeds}) by depth, width {width}\n")
    print("| net | optimiser | " + " | ".join(f"depth {d}" for d in depths) + " |")
    print("|---|---|" + "---|" * len(depths))
    for key in per_depth[depths[0]]:
        print(f"| {key[0]} | {key[1]} | "
              + " | ".join(f"{per_depth[d][key]}/{seeds}" for d in depths) + " |")
    for d in depths:
        n_agree = sum(per_depth[d].values())
        print(f"\ndepth {d}: {n_agree} of {seeds * len(per_depth[d])} runs agree", end="")
    print()


def _gain(report):
    return report.predicted_log_gain if report.verdict_basis == "theory" else (
        report.measured_log_gain)


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
        from gradprobe.theory.measure import measure

        measure(net, (x,), None, None, 0)

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
    table_verdict_depths((20,) if args.quick else (20, 24, 30), seeds=2 if args.quick else 3)
    table_timings(width=300 if args.quick else 1000, depth=10)
    print(f"\n(total {time.time() - t0:.0f} s; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
