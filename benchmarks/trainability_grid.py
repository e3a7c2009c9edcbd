"""The trainability grid: preflight at initialisation against training, over widths, depths,
activations, initialisations and seeds; one JSON line per run, then the agreement tables.

Run by hand (one thread per worker, two workers at most on a shared machine)::

    OMP_NUM_THREADS=1 python benchmarks/trainability_grid.py --out /tmp/grid.jsonl
    python benchmarks/trainability_grid.py --analyse /tmp/grid.jsonl --hold-out-width 128

Set-up as in ``benchmarks/trainability.py``: standardised ``load_digits`` (1297 train / 500
validation), ``mlp([64] + [width] * depth + [10], act)``, the five initialisations, zero biases;
preflight with cross-entropy on 256 training examples, together with the Gauss–Newton sharpness
on the same batch (:func:`gradprobe.theory.curvature.sharpness`); then 300 steps of SGD (lr 0.01,
momentum 0.9, batch 128, seeded); *trains* = validation loss below ``ln(10) / 2``; a non-finite
loss does not train. Seeds set the weights and the mini-batch order (the split is fixed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from itertools import product

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gradprobe as gp
from gradprobe.lab.zoo import mlp
from gradprobe.theory.curvature import sharpness
from trainability import ACTIVATIONS, CHANCE, INITS, digits, initialise, train

LR, MOMENTUM, STEPS, BATCH = 0.01, 0.9, 300, 128  # trainability.train: momentum 0.9
_DATA: tuple[torch.Tensor, ...] | None = None


def _data() -> tuple[torch.Tensor, ...]:
    global _DATA
    if _DATA is None:
        torch.set_num_threads(1)
        _DATA = digits()
    return _DATA


def train_curve(net, data, *, lr: float, seed: int) -> dict[str, float]:
    """Validation loss after training, and the training loss's first, largest and last values."""
    losses: list[float] = []
    val = train(net, data, steps=STEPS, lr=lr, batch=BATCH, seed=seed, losses=losses)
    finite = [v for v in losses if math.isfinite(v)]
    return {
        "val": val,
        "first": losses[0], "max": max(finite) if finite else math.inf,
        "last": sum(losses[-10:]) / 10, "nonfinite": len(finite) < len(losses),
    }


def one(cfg: tuple[str, str, int, int, int], lr: float = LR) -> dict:
    act, init, width, depth, seed = cfg
    data = _data()
    t0 = time.time()
    torch.manual_seed(seed)
    net = initialise(mlp([64] + [width] * depth + [10], act), init, seed)
    x, y = data[0][:256], data[1][:256]
    rep = gp.preflight(net, x, F.cross_entropy, y)
    lam = sharpness(net, x, F.cross_entropy, y)
    mfd = rep.meanfield
    row = {
        "act": act, "init": init, "width": width, "depth": depth, "seed": seed, "lr": lr,
        "verdict": rep.verdict, "G": (rep.predicted_log_gain if rep.verdict_basis == "theory"
                                      else rep.measured_log_gain),
        "degree": rep.degree, "trainable": rep.trainable, "reasons": list(rep.reasons),
        "saturation": rep.saturation, "mean_shift": rep.mean_shift,
        "depth_over_xi_c": rep.depth_over_xi_c, "phase": rep.phase,
        "chi1": None if mfd is None else mfd.chi1, "sharpness": lam,
    }
    row.update(train_curve(net, data, lr=lr, seed=seed))
    row["trains"] = row["val"] < CHANCE / 2
    row["seconds"] = time.time() - t0
    return row


def grid(args: argparse.Namespace) -> None:
    cfgs = list(product(ACTIVATIONS, INITS, args.widths, args.depths, range(args.seeds)))
    cfgs.sort(key=lambda c: -c[2] * c[3])  # longest first, for the pool
    t0 = time.time()
    with ProcessPoolExecutor(max_workers=args.workers) as pool, open(args.out, "a") as f:
        for i, row in enumerate(pool.map(one, cfgs, [args.lr] * len(cfgs))):
            f.write(json.dumps(row) + "\n")
            f.flush()
            if i % 20 == 0:
                print(f"{i + 1}/{len(cfgs)} {time.time() - t0:.0f} s", flush=True)
    print(f"grid: {len(cfgs)} runs, {time.time() - t0:.0f} s wall, {args.workers} workers")


def rerun(args: argparse.Namespace) -> None:
    """Every disagreement of a finished grid trained again at the step sizes ``--rerun-lr``."""
    from trainability_tables import predict

    rows = [predict(json.loads(line)) for line in open(args.rerun)]
    keys = ("act", "init", "width", "depth", "seed")
    cfgs = [tuple(r[k] for k in keys) for r in rows
            if r["pred_lr"] != r["trains"] or r["pred_base"] != r["trains"]]
    jobs = [(c, lr) for c in cfgs for lr in args.rerun_lr]
    with ProcessPoolExecutor(max_workers=args.workers) as pool, open(args.out, "a") as f:
        for row in pool.map(one, [c for c, _ in jobs], [lr for _, lr in jobs]):
            f.write(json.dumps(row) + "\n")
            f.flush()
            print(*(row[k] for k in keys), row["lr"], f"val {row['val']:.3g}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/trainability_grid.jsonl")
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--depths", type=int, nargs="+", default=[10, 20, 30])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--lr", type=float, default=LR)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--analyse", metavar="JSONL", help="print the tables of a finished grid")
    parser.add_argument("--hold-out-width", type=int, default=128,
                        help="the width on which rules were decided (reported apart)")
    parser.add_argument("--rerun", metavar="JSONL", help="train the disagreements again")
    parser.add_argument("--rerun-lr", type=float, nargs="+", default=[0.003, 0.001])
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.rerun:
        rerun(args)
    elif args.analyse:
        from trainability_tables import analyse

        analyse(args.analyse, args.hold_out_width)
    else:
        grid(args)


if __name__ == "__main__":
    main()
