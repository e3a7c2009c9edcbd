"""The doctor on pathological training runs: how many does it repair, and at what cost?

Each case is one model and data set in two configurations: *sick* (the pathology) and *healthy*
(the textbook configuration of the same model, same data, same training budget). For each case
the healthy run is trained once under the Probe (its final validation loss is the target), then
``gp.doctor`` runs on the sick configuration. A case is **repaired** when

* the best remedy's final validation loss is within the tolerance of the healthy run's:
  ``loss_best <= loss_healthy * (1 + RTOL) + ATOL`` (RTOL = 0.10, ATOL = 0.02; losses are binary
  cross-entropy, chance ≈ 0.69, or MSE divided by the targets' variance, chance ≈ 1), and
* none of the case's expected pathology rules is among the best run's warning/error findings.

Also printed: the doctor's wall time in units of one (baseline) training run under the Probe.

The real measurement needs ``gradprobe.diagnose.diagnose`` and the model remedies
(``swap_activations_``, ``add_norm_``, ...); they are imported when the doctor applies them.
``--diagnose fake`` uses a small heuristic diagnosis defined here (depth profile, non-finite
values, loss plateau; it names only ``init_`` and the optimizer remedies), to check the
plumbing before those parts exist. ``--check`` only trains sick and healthy once each.

    .venv/bin/python benchmarks/doctor_suite.py                 # the measurement
    .venv/bin/python benchmarks/doctor_suite.py --diagnose fake --cases lr-10x,zero-init
    .venv/bin/python benchmarks/doctor_suite.py --check
    .venv/bin/python benchmarks/doctor_suite.py --seeds 9    # + the spread over seeds 1..9

``--seeds N`` retrains, for each case, the healthy twin and the doctor's best remedy at seeds
1..N and prints their spread and at how many seeds the remedy meets the criterion against the
healthy twin of the same seed: whether seed 0's verdict is typical. It does not change the
count, which stays seed 0's.
"""

from __future__ import annotations

import argparse
import functools
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import gradprobe as gp
from gradprobe.lab import zoo

RTOL, ATOL = 0.10, 0.02


# ------------------------------------------------------------------------------------ data
@functools.cache
def _data(task: str) -> tuple[torch.Tensor, ...]:
    """``(x, y, x_val, y_val)`` of a task, fixed seed. Targets of regressions have variance 1."""
    g = torch.Generator().manual_seed(0)
    if task.startswith("circles"):
        from gradprobe.lab.data import circles

        x, y, xv, yv = circles(1000, noise=0.08)
        if task == "circles-raw":  # unnormalised: offset, scale, and 2 % outliers 5x further out
            def raw(a: torch.Tensor) -> torch.Tensor:
                a = a * torch.tensor([80.0, 3.0]) + torch.tensor([500.0, -40.0])
                a[::50] *= 5.0
                return a
            x, xv = raw(x.clone()), raw(xv.clone())
        if task == "circles-std":  # the healthy version: the same points standardised
            raw_x, _, raw_xv, _ = _data("circles-raw")
            mean, std = raw_x.mean(0), raw_x.std(0)
            x, xv = (raw_x - mean) / std, (raw_xv - mean) / std
        return x, y, xv, yv
    if task == "linear":  # a linear teacher in 8 dimensions, targets of variance 1
        x = torch.randn(1200, 8, generator=g)
        y = x @ torch.randn(8, 1, generator=g)
        y = (y - y.mean()) / y.std()
        return x[:1000], y[:1000], x[1000:], y[1000:]
    if task == "seq":  # a long-range dependency: the target is the mean of the first 5 of 80 steps
        x = torch.randn(1200, 80, 1, generator=g)
        y = x[:, :5, 0].mean(1, keepdim=True) * math.sqrt(5.0)
        return x[:1000], y[:1000], x[1000:], y[1000:]
    raise ValueError(task)


class SeqRegressor(nn.Module):
    """An RNN reading the sequence, a Linear on its last hidden state."""

    def __init__(self, nonlinearity: str, hidden: int = 32) -> None:
        super().__init__()
        self.rnn = nn.RNN(1, hidden, nonlinearity=nonlinearity, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


# ---------------------------------------------------------------------------------- models
def make_mlp(sizes: tuple[int, ...], act: str, init: str, *, std: float | None = None,
             gain: float | None = None, bias: float = 0.0, lr: float = 0.1,
             optim: str = "sgd") -> tuple[nn.Module, torch.optim.Optimizer]:
    model = zoo.mlp(list(sizes), act)
    gp.remedies.init_(model, init, std=std, gain=gain, bias=bias, activation=act)
    opt = (torch.optim.Adam(model.parameters(), lr=lr) if optim == "adam"
           else torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9))
    return model, opt


def make_rnn(act: str, init: str, *, std: float | None = None, gain: float | None = None,
             lr: float = 1e-3) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = SeqRegressor(act)
    gp.remedies.init_(model, init, std=std, gain=gain, layers=["rnn"])
    return model, torch.optim.Adam(model.parameters(), lr=lr)


def train(model: nn.Module, optimizer: torch.optim.Optimizer, probe: Any, *, task: str,
          steps: int, batch: int = 128) -> float:
    x, y, xv, yv = _data(task)
    bce = y.dtype == torch.float32 and task.startswith("circles")
    loss_fn = nn.functional.binary_cross_entropy_with_logits if bce else nn.functional.mse_loss
    g = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        loss = loss_fn(model(x[idx]), y[idx])
        probe.observe_loss(loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        val = loss_fn(model(xv), yv)
    return float(val) if math.isfinite(float(val)) else math.inf  # end of training: one host read


# ----------------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    name: str
    sick: Any  # make()
    healthy: Any  # make()
    train: Any  # train(model, optimizer, probe)
    rules: tuple[str, ...]  # the pathology's findings (any of them)
    what: str


def _p(fn: Any, *args: Any, **kw: Any) -> Any:
    return functools.partial(fn, *args, **kw)


DEEP = (2, 5, 5, 5, 5, 1)  # the circles study's network
CASES: tuple[Case, ...] = (
    Case("deep-sigmoid-N01", _p(make_mlp, DEEP, "sigmoid", "normal", std=1.0, lr=0.3),
         _p(make_mlp, DEEP, "sigmoid", "xavier_normal", gain=4.0, lr=0.3), _p(train, task="circles", steps=300),
         ("vanishing-gradients", "saturation"), "the circles study's 2-5-5-5-5-1 sigmoid network, N(0,1) weights (healthy: Xavier x4, Glorot 2010)"),
    Case("deep-relu-xavier", _p(make_mlp, (2, *([64] * 20), 1), "relu", "xavier_normal", gain=1.0,
                                lr=0.01),
         _p(make_mlp, (2, *([64] * 20), 1), "relu", "he_normal", lr=0.01), _p(train, task="circles", steps=300),
         ("vanishing-gradients",), "20 ReLU layers, Xavier without ReLU's gain √2"),
    Case("zero-init", _p(make_mlp, (2, 32, 32, 32, 1), "tanh", "zeros"),
         _p(make_mlp, (2, 32, 32, 32, 1), "tanh", "xavier_normal"), _p(train, task="circles", steps=300),
         ("symmetry", "vanishing-gradients", "loss-plateau"), "every weight zero"),
    Case("relu-rnn-long", _p(make_rnn, "relu", "normal", std=0.3),
         _p(make_rnn, "relu", "identity"), _p(train, task="seq", steps=300),
         ("exploding-gradients", "vanishing-gradients", "nonfinite"),
         "ReLU RNN over 80 steps, N(0, 0.3²) recurrent weights (IRNN is healthy)"),
    Case("tanh-rnn-large", _p(make_rnn, "tanh", "normal", std=0.5, lr=1e-2),
         _p(make_rnn, "tanh", "orthogonal", lr=1e-2), _p(train, task="seq", steps=300),
         ("exploding-gradients", "saturation", "vanishing-gradients"),
         "tanh RNN over 80 steps, N(0, 0.5²) recurrent weights"),
    Case("lr-10x", _p(make_mlp, (2, 64, 64, 1), "relu", "he_normal", lr=5.0),
         _p(make_mlp, (2, 64, 64, 1), "relu", "he_normal", lr=0.5), _p(train, task="circles", steps=300),
         ("learning-rate", "exploding-gradients", "nonfinite", "dead-relu"), "SGD+momentum, lr 10x too large"),
    Case("lr-100x-small", _p(make_mlp, (2, 64, 64, 1), "relu", "he_normal", lr=1e-3),
         _p(make_mlp, (2, 64, 64, 1), "relu", "he_normal", lr=0.1), _p(train, task="circles", steps=300),
         ("learning-rate", "loss-plateau"), "SGD+momentum, lr 100x too small"),
    Case("dead-relu-bias", _p(make_mlp, (2, 64, 64, 64, 1), "relu", "he_normal", bias=-3.0),
         _p(make_mlp, (2, 64, 64, 64, 1), "relu", "he_normal"), _p(train, task="circles", steps=300),
         ("dead-relu",), "ReLU layers with bias -3: most units never fire"),
    Case("raw-inputs-outliers", _p(make_mlp, (2, 64, 64, 1), "tanh", "xavier_normal", lr=0.05),
         _p(make_mlp, (2, 64, 64, 1), "tanh", "xavier_normal", lr=0.05),
         _p(train, task="circles-raw", steps=300), ("input-scale", "saturation"),
         "inputs offset by 500, scaled by 80, 2 % outliers 5x out (healthy: standardised)"),
    Case("saturated-tanh", _p(make_mlp, (2, *([64] * 5), 1), "tanh", "normal", std=3.0),
         _p(make_mlp, (2, *([64] * 5), 1), "tanh", "xavier_normal"), _p(train, task="circles", steps=300),
         ("saturation", "vanishing-gradients"), "5 tanh layers with N(0, 3²) weights (fan-in 64)"),
    Case("exploding-linear-chain", _p(make_mlp, (8, *([32] * 12), 1), "identity", "normal", std=0.3,
                                      lr=0.01),
         _p(make_mlp, (8, *([32] * 12), 1), "identity", "orthogonal", lr=0.01),
         _p(train, task="linear", steps=300),
         ("exploding-gradients", "nonfinite", "learning-rate"), "12 linear layers, gain 1.7 each"),
    Case("deep-tanh-tiny-init", _p(make_mlp, (2, *([32] * 8), 1), "tanh", "normal", std=0.01),
         _p(make_mlp, (2, *([32] * 8), 1), "tanh", "xavier_normal"), _p(train, task="circles", steps=300),
         ("vanishing-gradients", "loss-plateau"), "8 tanh layers, N(0, 0.01²) weights"),
    Case("adam-lr-too-large", _p(make_mlp, (2, 64, 64, 64, 1), "relu", "he_normal", lr=1.0, optim="adam"),
         _p(make_mlp, (2, 64, 64, 64, 1), "relu", "he_normal", lr=3e-3, optim="adam"),
         _p(train, task="circles", steps=300), ("learning-rate", "dead-relu", "exploding-gradients"),
         "Adam with lr 1 (300x the healthy 3e-3)"),
)
# the healthy twin of raw-inputs-outliers reads the standardised inputs
HEALTHY_TRAIN = {"raw-inputs-outliers": _p(train, task="circles-std", steps=300)}


# -------------------------------------------------------------- the plumbing check diagnosis
def fake_diagnose(run: Any) -> Any:
    """A heuristic stand-in for gradprobe.diagnose (plumbing only; names init_/optimizer remedies)."""
    from gradprobe.diagnose import Diagnosis, Finding, Remedy
    from gradprobe.remedies.doctor import depth_profile

    findings = []
    grad = run.scalars(kinds="grad")
    losses = run.losses()["loss"].to_numpy()
    if grad["nonfinite"].sum() > 0 or (len(losses) and not math.isfinite(losses[-1])):
        findings.append(Finding("nonfinite", "error", (), None, (), "non-finite values", (
            Remedy("set_lr_", {"factor": 0.1}), Remedy("clip_gradients_", {"max_norm": 1.0}))))
    prof = [v for _, v in depth_profile(run)]
    if len(prof) > 1 and prof[-1] > 0:
        ratio = prof[0] / prof[-1]
        if ratio < 1e-2:
            findings.append(Finding("vanishing-gradients", "error", (), None, (), "ratio", (
                Remedy("init_", {"scheme": "xavier_normal"}), Remedy("init_", {"scheme": "he_normal"}),
                Remedy("init_", {"scheme": "orthogonal"}))))
        elif ratio > 1e2:
            findings.append(Finding("exploding-gradients", "error", (), None, (), "ratio", (
                Remedy("clip_gradients_", {"max_norm": 1.0}), Remedy("init_", {"scheme": "orthogonal"}))))
    n = len(losses)
    if n > 10 and math.isfinite(losses[-1]) and losses[-n // 10:].mean() > 0.9 * losses[: n // 10].mean():
        findings.append(Finding("loss-plateau", "warning", (), None, (), "flat loss", (
            Remedy("set_lr_", {"factor": 10.0}), Remedy("set_lr_", {"factor": 0.1}),
            Remedy("init_", {"scheme": "xavier_normal"}))))
    return Diagnosis(findings)


# ---------------------------------------------------------------------------------- running
def _healthy(case: Case, out: Path, seed: int = 0) -> tuple[float, float]:
    from gradprobe.remedies.doctor import _seed

    _seed(seed)
    model, opt = case.healthy()
    _seed(seed)
    fit = HEALTHY_TRAIN.get(case.name, case.train)
    start = time.perf_counter()
    run_dir = out / case.name / ("healthy" if seed == 0 else f"seed{seed}-healthy")
    with gp.Probe(model, opt, run_dir=run_dir, overwrite=True, budget=None) as probe:
        loss = fit(model, opt, probe)
    return loss, time.perf_counter() - start


def _repaired(case: Case, loss: float | None, pathologies: Any, healthy: float) -> bool:
    """The criterion of the module docstring."""
    return (loss is not None and loss <= healthy * (1 + RTOL) + ATOL
            and not set(case.rules) & set(pathologies))


def _spread(case: Case, best: Any, seeds: range, out: Path, diagnose: Any) -> str:
    """The healthy twin and the doctor's best remedy, each at the other seeds: is seed 0 typical?

    The remedy is applied to ``case.sick`` exactly as the doctor applies it (same seeding, same
    Probe settings, diagnosed again). Reported, not counted: the criterion is seed 0's.
    """
    from gradprobe.remedies.doctor import HIST_EVERY, _Task, _treat

    healthy, cured, ok = [], [], 0
    for s in seeds:
        h = _healthy(case, out, seed=s)[0]
        e = _treat(_Task(case.sick, case.train, best.remedy, out / case.name / f"seed{s}-best", s,
                         {"hist_every": HIST_EVERY}, _data(case.train.keywords["task"])[:2],
                         diagnose))
        loss = e.final_loss if e.final_loss is not None else math.inf
        healthy.append(h)
        cured.append(loss)
        ok += _repaired(case, e.final_loss, e.pathologies, h)

    def med(v: list[float]) -> str:
        v = sorted(v)
        return f"median {v[len(v) // 2]:.4g} [{v[0]:.4g}, {v[-1]:.4g}]"

    return (f"  seeds {seeds.start}-{seeds.stop - 1}: healthy {med(healthy)}; {best.label} "
            f"{med(cured)}; repaired at {ok}/{len(seeds)} seeds")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    ap.add_argument("--diagnose", choices=["real", "fake"], default="real")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--max-remedies", type=int, default=6)
    ap.add_argument("--check", action="store_true", help="train sick and healthy only")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--seeds", type=int, default=0,
                    help="also train the healthy twin and the best remedy at seeds 1..N and print "
                         "their spread (reported, not counted)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = args.out or Path(tempfile.mkdtemp(prefix="doctor-suite-"))
    chosen = [c for c in CASES if not args.cases or c.name in args.cases.split(",")]
    diagnose = fake_diagnose if args.diagnose == "fake" else None
    rows = []
    for case in chosen:
        healthy_loss, healthy_s = _healthy(case, out)
        if args.check:
            torch.manual_seed(0)
            model, opt = case.sick()
            torch.manual_seed(0)
            with gp.Probe(model, opt, run_dir=out / case.name / "sick", overwrite=True,
                          budget=None) as probe:
                sick_loss = case.train(model, opt, probe)
            print(f"{case.name:<24} sick {sick_loss:8.4f}  healthy {healthy_loss:8.4f}  "
                  f"({healthy_s:.1f} s)  {case.what}", flush=True)
            continue
        report = gp.doctor(case.sick, case.train, out=out / case.name / "doctor", workers=args.workers,
                           max_remedies=args.max_remedies, diagnose=diagnose,
                           data=_data(case.train.keywords["task"])[:2])
        best = report.best
        ok = best is not None and _repaired(case, best.final_loss, best.pathologies, healthy_loss)
        rows.append((case, report, healthy_loss, ok))
        print(f"{case.name:<24} baseline {report.baseline.final_loss or math.nan:8.4f} "
              f"[{', '.join(report.baseline.pathologies) or 'healthy'}]  healthy {healthy_loss:.4f}  "
              f"best {best.label if best else '-'} {best.final_loss if best else math.nan:.4f} "
              f"[{', '.join(best.pathologies) if best else '-'}]  repaired={ok}  "
              f"time {report.time_ratio:.1f}x", flush=True)
        if args.seeds and best is not None:
            print(_spread(case, best, range(1, args.seeds + 1), out, diagnose), flush=True)
    if rows:
        repaired = sum(r[3] for r in rows)
        ratios = sorted(r[1].time_ratio for r in rows)
        print(f"\nrepaired {repaired}/{len(rows)} = {repaired / len(rows):.0%} "
              f"(tolerance: loss <= healthy x {1 + RTOL:g} + {ATOL:g}, pathology gone); "
              f"doctor time / one run: median {ratios[len(ratios) // 2]:.1f}x, max {ratios[-1]:.1f}x")
    print(f"runs under {out}")


if __name__ == "__main__":
    main()
