"""Held-out measurement of gp.gradcheck_fn across PyTorch's own differentiable operators.

Run by hand:  .venv/bin/python benchmarks/gradcheck_operators.py [--samples 3] [--max-numel 2000]
             [--ops 0] [--verbose]

For every operator of ``torch.testing._internal.common_methods_invocations.op_db`` that supports
autograd in float64 on the CPU, the first ``--samples`` sample inputs (at most ``--max-numel``
elements in their differentiable tensors) are checked as the scalar function

    J(params) = Σ_outputs Σ w ⊙ op(params)       (w fixed random weights, one per output)

against autograd's gradient of J, whose formulas PyTorch tests with its own gradcheck, so they
are taken as right. Reported:

- agreement: the share of samples whose correct gradient reads no "bug" and raises nothing
  (and, separately, how many read "ok"/"kink" and how many "suspicious");
- detection: the share of planted errors found ("bug" in the planted tensor) -- every tensor
  scaled by 1.01; one tensor (the largest) zeroed; the sign flipped on the largest coordinate --
  among samples where the planted error changes the gradient;
- the operators behind every disagreement and every missed detection, and every exception.

Random operators draw from torch's RNG reseeded at every evaluation (they become functions of
their parameters); operators whose J is still not deterministic are skipped and counted. Casts to
lower precision (half, bfloat16, float) and sparse inputs are left out: a cast is piecewise
constant in float64, and the check does not take sparse tensors.

Figures and the reading of every remaining disagreement: docs/gradcheck.md, "Across PyTorch's
operators" (autograd is not the derivative of J for normal, native_*_norm, max_unpool and
as_strided_scatter; those verdicts are right).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
import types
import unittest
import warnings
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch

import gradprobe as gp


def _tensors(sample: Any) -> list[torch.Tensor]:
    found = [sample.input] if isinstance(sample.input, torch.Tensor) else list(sample.input) \
        if isinstance(sample.input, (list, tuple)) else []
    found += [a for a in sample.args if isinstance(a, torch.Tensor)]
    return [t for t in found if isinstance(t, torch.Tensor) and t.requires_grad]


def _problem(op: Any, sample: Any, gen: torch.Generator) -> tuple[Callable, dict, dict] | None:
    params = _tensors(sample)
    if not params or sum(p.numel() for p in params) == 0 and len(params) == 1:
        return None
    ids = {id(p): f"t{i}" for i, p in enumerate(params)}

    def call(values: dict[str, torch.Tensor]) -> Any:
        def swap(x: Any) -> Any:
            if isinstance(x, torch.Tensor) and id(x) in ids:
                return values[ids[id(x)]]
            if isinstance(x, (list, tuple)):
                return type(x)(swap(v) for v in x)
            return x

        return op.gradcheck_wrapper(
            op.get_op(), swap(sample.input), *swap(tuple(sample.args)), **sample.kwargs
        )

    if any(p.layout != torch.strided for p in params):
        return None  # sparse tensors: not supported by the check (docs/gradcheck.md)

    def outputs(values: dict[str, torch.Tensor]) -> list[Any]:
        torch.manual_seed(0)  # random operators (normal, dropout) become functions of params
        # output_process_fn_grad keeps the differentiable outputs (not the saved mean and rstd
        # of native_layer_norm, say), as PyTorch's own gradcheck of the operator does.
        out = sample.output_process_fn_grad(call(values))
        return list(out) if isinstance(out, (tuple, list)) else [out]

    with torch.no_grad():
        outs0 = outputs({ids[id(p)]: p.detach() for p in params})
    if any(isinstance(o, torch.Tensor) and o.is_floating_point() and o.dtype != torch.float64
           for o in outs0):
        return None  # casts to lower precision (half, bfloat16): piecewise constant in float64
    weights = [
        torch.randn(o.shape, generator=gen, dtype=torch.float64)
        if isinstance(o, torch.Tensor) and o.is_floating_point() else None
        for o in outs0
    ]
    if not any(w is not None for w in weights):
        return None

    def f(values: dict[str, torch.Tensor]) -> torch.Tensor:
        outs = outputs(values)
        total = torch.zeros((), dtype=torch.float64)
        for o, w in zip(outs, weights):
            if w is not None:
                total = total + (o.to(torch.float64) * w).sum()
        return total

    values = {ids[id(p)]: p.detach().clone().requires_grad_(True) for p in params}
    j = f(values)
    if not j.requires_grad:
        return None
    grads = torch.autograd.grad(j, list(values.values()), allow_unused=True)
    claimed = {k: (torch.zeros_like(v) if g is None else g.detach())
               for (k, v), g in zip(values.items(), grads)}
    base = {k: v.detach() for k, v in values.items()}
    with torch.no_grad():
        if float(f(base)) != float(f(base)):
            raise _Random
    return f, base, claimed


class _Random(Exception):
    pass


def _plants(claimed: dict[str, torch.Tensor]) -> dict[str, tuple[str, dict[str, torch.Tensor]]]:
    """name -> (the tensor that is wrong, the wrong gradients), where the error changes g."""
    out: dict[str, tuple[str, dict[str, torch.Tensor]]] = {}
    big = max(claimed, key=lambda k: float(claimed[k].abs().max()) if claimed[k].numel() else 0.0)
    g = claimed[big]
    if g.numel() == 0 or float(g.abs().max()) == 0.0:
        return out
    out["scale 1.01"] = (big, {k: v * 1.01 for k, v in claimed.items()})
    out["zeroed"] = (big, {**claimed, big: torch.zeros_like(g)})
    flipped = g.clone().reshape(-1)
    flipped[flipped.abs().argmax()] *= -1
    out["sign flip"] = (big, {**claimed, big: flipped.view_as(g)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--max-numel", type=int, default=2000)
    ap.add_argument("--ops", type=int, default=0, help="first N operators only (0: all)")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    if importlib.util.find_spec("expecttest") is None:
        # torch's test utilities subclass expecttest.TestCase; the operator table needs no more.
        stub = types.ModuleType("expecttest")
        stub.TestCase = unittest.TestCase  # type: ignore[attr-defined]
        sys.modules["expecttest"] = stub
    from torch.testing._internal.common_methods_invocations import op_db

    ops = [o for o in op_db if o.supports_autograd
           and torch.float64 in o.supported_dtypes("cpu")]
    if args.ops:
        ops = ops[: args.ops]
    gen = torch.Generator().manual_seed(0)
    verdicts: Counter[str] = Counter()
    detect: Counter[str] = Counter()
    planted: Counter[str] = Counter()
    refined = partial = skipped_random = 0
    problems: list[str] = []
    missed: list[str] = []
    n_ops: set[str] = set()
    started = time.perf_counter()
    for op in ops:
        name = op.name + (f".{op.variant_test_name}" if op.variant_test_name else "")
        try:
            samples = list(op.sample_inputs("cpu", torch.float64, requires_grad=True))
        except Exception:
            continue
        taken = 0
        for s_i, sample in enumerate(samples):
            if taken >= args.samples:
                break
            tens = _tensors(sample)
            if not tens or sum(t.numel() for t in tens) > args.max_numel:
                continue
            try:
                prob = _problem(op, sample, gen)
            except _Random:
                skipped_random += 1
                break
            except Exception:
                continue
            if prob is None:
                continue
            taken += 1
            n_ops.add(name)
            f, base, claimed = prob
            where = f"{name}[{s_i}]"
            try:
                rep = gp.gradcheck_fn(f, base, claimed)
            except Exception as e:
                verdicts["exception"] += 1
                problems.append(f"{where}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
                continue
            verdicts[rep.verdict] += 1
            refined += any(len(r.steps) > 1 or (r.steps and r.steps[0] != 1e-7) for r in rep.rows)
            partial += bool(rep.fallback_reason)
            if rep.verdict in ("bug", "suspicious"):
                worst = max(rep.rows, key=lambda r: r.rel_error)
                problems.append(f"{where}: {rep.verdict} {worst.name} {tuple(worst.shape)} "
                                f"rel {worst.rel_error:.1e} floor {worst.noise_floor:.1e}")
            for kind, (tensor, wrong) in _plants(claimed).items():
                planted[kind] += 1
                try:
                    bad = gp.gradcheck_fn(f, base, wrong)
                    hit = tensor in bad.failed
                except Exception as e:
                    hit = False
                    problems.append(f"{where} {kind}: {type(e).__name__}")
                detect[kind] += hit
                if not hit:
                    missed.append(f"{where} {kind} ({tensor} {tuple(claimed[tensor].shape)})")
    seconds = time.perf_counter() - started
    total = sum(verdicts.values())
    fine = verdicts["ok"] + verdicts["kink"]
    print(f"torch {torch.__version__}: {len(n_ops)} operators, {total} samples, "
          f"{seconds:.0f} s ({skipped_random} random operators skipped)")
    print(f"correct gradients: {total - verdicts['bug'] - verdicts['exception']}/{total} no bug "
          f"and no exception ({100 * (total - verdicts['bug'] - verdicts['exception']) / max(total, 1):.1f} %); "
          f"ok or kink {fine}, suspicious {verdicts['suspicious']}, bug {verdicts['bug']}, "
          f"exception {verdicts['exception']}")
    print(f"  step ladder used in {refined} samples; vmap fell back for some tensor in {partial}")
    for kind in planted:
        print(f"planted {kind:<11}: detected {detect[kind]}/{planted[kind]} "
              f"({100 * detect[kind] / planted[kind]:.1f} %)")
    print("\nnot a clean verdict on a correct gradient:" if problems else "")
    for p in problems if args.verbose else problems[:40]:
        print("  " + p)
    print("\nmissed planted errors:" if missed else "")
    for m in missed if args.verbose else missed[:40]:
        print("  " + m)


if __name__ == "__main__":
    main()
