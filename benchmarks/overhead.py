"""Training-step overhead of gradprobe against an un-instrumented baseline (run by hand).

    python benchmarks/overhead.py                      # all workloads
    python benchmarks/overhead.py --only W2 W3 --repeats 9 --steps 20

Workloads: W1 tiny MLP 2-5-5-5-5-1 sigmoid, batch 32; W2 MLP 784 -> 10x512 ReLU -> 10, batch 128;
W3 six 3x3 conv layers of 64 channels with BatchNorm on 3x32x32, batch 64; W4 LSTM hidden 128,
input 32, length 100, batch 64; W5 MLPs of width 64 and depth 10, 100, 300 (batch 64).

Variants, each on its own copy of the model and optimizer, measured in the same process and
alternated round by round (so drifts of a shared machine hit all of them alike): ``baseline``
(no instrumentation), ``hooks`` (the forward, tensor and optimizer hooks the Probe registers, with
empty bodies: the floor of any hook-based tool), ``every1`` (gradprobe, all kinds, every step), ``every10`` (gradprobe,
every 10th step) and ``naive`` (forward/tensor hooks and a step loop calling ``.item()`` per
statistic, the pattern of simple tools). A round times ``--steps`` optimizer steps of each
variant; the table gives the median over ``--repeats`` rounds of the time per step and its ratio
to the baseline's median.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import gradprobe as gp


def mlp(widths: list[int], act: type[nn.Module]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for _ in range(6):
            layers += [nn.Conv2d(cin, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU()]
            cin = 64
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean((2, 3)))


class LSTMNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(32, 128, batch_first=True)
        self.head = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


Workload = tuple[Callable[[], nn.Module], torch.Tensor, torch.Tensor]


def workloads() -> dict[str, Workload]:
    g = torch.Generator().manual_seed(0)

    def cls(n: int, k: int) -> torch.Tensor:
        return torch.randint(0, k, (n,), generator=g)

    out: dict[str, Workload] = {
        "W1": (lambda: mlp([2, 5, 5, 5, 5, 1], nn.Sigmoid), torch.randn(32, 2, generator=g),
               torch.randn(32, 1, generator=g)),
        "W2": (lambda: mlp([784] + [512] * 10 + [10], nn.ReLU),
               torch.randn(128, 784, generator=g), cls(128, 10)),
        "W3": (ConvNet, torch.randn(64, 3, 32, 32, generator=g), cls(64, 10)),
        "W4": (LSTMNet, torch.randn(64, 100, 32, generator=g), cls(64, 10)),
    }
    for depth in (10, 100, 300):
        out[f"W5-d{depth}"] = (lambda d=depth: mlp([64] * (d + 1) + [10], nn.ReLU),
                               torch.randn(64, 64, generator=g), cls(64, 10))
    return out


class NaiveProbe:
    """What a simple tool does: ``.item()`` per statistic per layer per step."""

    STATS = ("mean", "std", "norm", "min", "max", "abs_mean", "zero_frac", "nonfinite")

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer) -> None:
        self.log: list[tuple[str, str, str, float]] = []
        self.handles = []
        for name, m in model.named_modules():
            if next(m.parameters(recurse=False), None) is not None or isinstance(
                m, (nn.ReLU, nn.Sigmoid, nn.Tanh)
            ):
                self.handles.append(m.register_forward_hook(self._fwd(name)))
        self.model = model
        self.handles.append(opt.register_step_pre_hook(lambda o, a, k: self._params("grad")))
        self.handles.append(opt.register_step_post_hook(lambda o, a, k: self._params("weight")))

    def _stats(self, name: str, kind: str, t: torch.Tensor) -> None:
        t = t.detach().float()
        self.log += [
            (name, kind, "mean", t.mean().item()), (name, kind, "std", t.std(correction=0).item()),
            (name, kind, "norm", t.norm().item()), (name, kind, "min", t.min().item()),
            (name, kind, "max", t.max().item()), (name, kind, "abs_mean", t.abs().mean().item()),
            (name, kind, "zero_frac", (t == 0).float().mean().item()),
            (name, kind, "nonfinite", (~torch.isfinite(t)).sum().item()),
        ]

    def _fwd(self, name: str) -> Callable[..., None]:
        def hook(mod: nn.Module, args: object, out: torch.Tensor) -> None:
            if isinstance(out, tuple):
                out = out[0]
            self._stats(name, "act", out)
            if out.requires_grad:
                out.register_hook(lambda g: self._stats(name, "act_grad", g))

        return hook

    def _params(self, kind: str) -> None:
        for name, p in self.model.named_parameters():
            t = p.grad if kind == "grad" else p
            if t is not None:
                self._stats(name, kind, t)
        if len(self.log) > 1_000_000:
            self.log.clear()


class HooksOnly:
    """The floor of any hook-based tool: the forward hooks, output-gradient tensor hooks and
    optimizer step hooks the Probe registers (on the same modules), with empty bodies."""

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer) -> None:
        from gradprobe.activations import spec_for_module

        self.handles = []
        for m in model.modules():
            if next(m.parameters(recurse=False), None) is not None or spec_for_module(m):
                self.handles.append(m.register_forward_hook(self._fwd))
        self.handles.append(opt.register_step_pre_hook(lambda o, a, k: None))
        self.handles.append(opt.register_step_post_hook(lambda o, a, k: None))

    @staticmethod
    def _fwd(mod: nn.Module, args: object, out: object) -> None:
        t = out[0] if isinstance(out, tuple) else out
        if isinstance(t, torch.Tensor) and t.requires_grad:
            t.register_hook(lambda g: None)


def make_variant(name: str, wl: Workload, tmp: Path) -> tuple[Callable[[], None], Callable[[], None]]:
    make, x, y = wl
    torch.manual_seed(0)
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    loss_fn = nn.functional.mse_loss if y.is_floating_point() else nn.functional.cross_entropy
    probe: gp.Probe | None = None
    naive: NaiveProbe | None = None
    hooks: HooksOnly | None = None
    if name.startswith("every"):
        probe = gp.Probe(model, opt, run_dir=tmp / name, every=int(name[5:]), flush_every=100)
        probe.attach()
    elif name == "naive":
        naive = NaiveProbe(model, opt)
    elif name == "hooks":
        hooks = HooksOnly(model, opt)

    def step() -> None:
        loss = loss_fn(model(x), y)
        if probe is not None:
            probe.observe_loss(loss)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def close() -> None:
        if probe is not None:
            probe.detach()
        for owner in (naive, hooks):
            for h in getattr(owner, "handles", ()):
                h.remove()

    return step, close


def bench(wname: str, wl: Workload, variants: list[str], repeats: int, steps: int,
          warmup: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as d:
        fns = {v: make_variant(v, wl, Path(d) / wname) for v in variants}
        for step, _ in fns.values():
            for _ in range(warmup):
                step()
        times: dict[str, list[float]] = {v: [] for v in variants}
        for r in range(repeats):
            order = variants if r % 2 == 0 else variants[::-1]
            for v in order:
                step = fns[v][0]
                t0 = time.perf_counter()
                for _ in range(steps):
                    step()
                times[v].append((time.perf_counter() - t0) / steps)
        for _, close in fns.values():
            close()
    return {v: statistics.median(ts) for v, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="workloads to run (W1 W2 W3 W4 W5)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--steps", type=int, default=10, help="steps per variant per round")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--variants", nargs="*",
                    default=["baseline", "hooks", "every1", "every10", "naive"])
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = ["baseline"] + [v for v in args.variants if v != "baseline"]
    wls = workloads()
    names = [n for n in wls if not args.only or n.split("-")[0] in args.only or n in args.only]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{args.repeats} rounds x {args.steps} steps, median")
    head = f"{'workload':<10} {'baseline ms':>12}" + "".join(
        f" {v + ' ms':>11} {'ratio':>6}" for v in variants[1:])
    print(head)
    ratios: dict[str, dict[str, float]] = {}
    for n in names:
        med = bench(n, wls[n], variants, args.repeats, args.steps, args.warmup)
        base = med["baseline"]
        ratios[n] = {v: med[v] / base for v in variants}
        line = f"{n:<10} {base * 1e3:>12.3f}" + "".join(
            f" {med[v] * 1e3:>11.3f} {med[v] / base:>6.2f}" for v in variants[1:])
        print(line, flush=True)
    if "W5-d10" in ratios and "W5-d300" in ratios:
        for v in variants[1:]:
            print(f"W5 {v}: ratio(d300) / ratio(d10) = "
                  f"{ratios['W5-d300'][v] / ratios['W5-d10'][v]:.2f}")


if __name__ == "__main__":
    main()
