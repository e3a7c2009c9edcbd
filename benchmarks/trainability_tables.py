"""Agreement tables of a finished trainability grid (``trainability_grid.py --analyse FILE``).

Three predictions per run, all from preflight's own rules (nothing fitted here):

* ``base``: ``preflight(net, x, loss, y).trainable`` (gradient degree, chaos, saturation);
* ``lr``: the same, and the training step within the stability limit
  (:func:`gradprobe.theory.curvature.step_status`: ``lr ≤ 2(1+β)/λ_max``), which is what
  ``preflight(..., lr=0.01, momentum=0.9)`` decides;
* ``borderline``: the ``lr`` prediction flagged as borderline (degree within a factor 1.5 of 1
  when the gradient is the only reason, or a step above half its limit when there is no reason). Agreement is given both counting borderline runs by their
  yes/no prediction (strict) and leaving them out (decided runs only), with the borderline count.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict

from gradprobe.theory.curvature import step_status
from gradprobe.theory.preflight import degree_borderline

SLICES = ("act", "init", "width", "depth", "seed")


def predict(row: dict) -> dict:
    """Adds ``pred_base``, ``pred_lr``, ``step_ratio``, ``borderline`` to one run's row."""
    status, ratio = step_status(row["sharpness"], row["lr"], 0.9)
    out = dict(row)
    out["step_ratio"] = ratio
    out["pred_base"] = bool(row["trainable"])
    out["pred_lr"] = bool(row["trainable"]) and status != "unstable"
    only_gradient = all(r.startswith("gradient") for r in row["reasons"])
    out["borderline"] = (status == "borderline" and not row["reasons"]) or (
        only_gradient and degree_borderline(row["degree"])
    )
    return out


def _count(rows: list[dict]) -> str:
    n = len(rows)
    if not n:
        return "0 | - | - | - | - | -"
    base = sum(r["pred_base"] == r["trains"] for r in rows)
    strict = sum(r["pred_lr"] == r["trains"] for r in rows)
    decided = [r for r in rows if not r["borderline"]]
    dec = sum(r["pred_lr"] == r["trains"] for r in decided)
    return (f"{n} | {sum(r['trains'] for r in rows)} | {base}/{n} ({base / n:.0%}) | "
            f"{strict}/{n} ({strict / n:.0%}) | {n - len(decided)} | "
            f"{dec}/{len(decided)} ({dec / max(len(decided), 1):.0%})")


COLS = "runs | train | base agrees | with lr (strict) | borderline | decided agree |"


def _head(first: str = "") -> str:
    n = COLS.count("|") + (1 if first else 0)
    return ("| " + (first + " | " if first else "") + COLS + "\n" + "|---" * n + "|")


def analyse(path: str, hold_out_width: int) -> None:
    rows = [predict(json.loads(line)) for line in open(path)]
    print(f"\n### All runs\n\n{_head()}\n| " + _count(rows) + " |")
    part = [r for r in rows if r["width"] == hold_out_width]
    rest = [r for r in rows if r["width"] != hold_out_width]
    print(f"\n### Rules decided on width {hold_out_width} / checked on the other widths\n")
    print(_head("part"))
    print(f"| width {hold_out_width} | " + _count(part) + " |")
    print("| other widths | " + _count(rest) + " |")
    for key in SLICES:
        groups: dict = defaultdict(list)
        for r in rows:
            groups[r[key]].append(r)
        print(f"\n### Per {key}\n\n" + _head(key))
        for k in sorted(groups):
            print(f"| {k} | " + _count(groups[k]) + " |")
    print("\n### Disagreements (strict, with lr) and borderline runs\n")
    print("| act | init | width | depth | seed | G | degree | λ_max | lr/limit | reasons | "
          "base | lr | borderline | val | first→max train loss | trains |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["pred_lr"] == r["trains"] and r["pred_base"] == r["trains"] and not r["borderline"]:
            continue
        reasons = "; ".join(x.split(":")[0] for x in r["reasons"]) or "-"
        print(f"| {r['act']} | {r['init']} | {r['width']} | {r['depth']} | {r['seed']} | "
              f"{r['G']:+.1f} | {r['degree']:.2f} | {r['sharpness']:.3g} | "
              f"{r['step_ratio']:.2f} | {reasons} | {_yn(r['pred_base'])} | {_yn(r['pred_lr'])} "
              f"| {'yes' if r['borderline'] else '-'} | {_f(r['val'])} | "
              f"{_f(r['first'])}→{_f(r['max'])} | {'yes' if r['trains'] else 'no'} |")
    secs = sum(r["seconds"] for r in rows)
    print(f"\n{len(rows)} runs, {secs:.0f} s of run time summed over workers.")


def _yn(b: bool) -> str:
    return "trains" if b else "fails"


def _f(v: float) -> str:
    return "inf" if not math.isfinite(v) else f"{v:.3g}"
