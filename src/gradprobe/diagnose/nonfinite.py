"""Non-finite values: the first layer, pass and step where a NaN or Inf appeared.

The Probe writes one event per step with a NaN/Inf, naming the first record in execution order
(forward activations, then activation gradients in backward order, then parameter gradients).
The first event of the run is where the trouble started: a forward NaN points at the data or
an overflowing layer, a backward one at an exploding gradient (or a ``log``/``sqrt`` at 0), a
parameter-gradient one at the optimizer. Steps that an AMP GradScaler skipped are expected to
hold Inf gradients (the scaler probes its scale that way) and are not findings. Without events
(a run written by an older Probe), the scalars' ``nonfinite`` counts and the loss decide.
No threshold: one non-finite value is one too many.
"""

from __future__ import annotations

import numpy as np

from gradprobe.diagnose import cures
from gradprobe.diagnose.finding import Evidence, Finding
from gradprobe.diagnose.frames import Frames

_EXPLAIN = ("A NaN or Inf appeared and propagates through every later step: an overflow from "
            "exploding activations or gradients (Pascanu et al. 2013), too large a learning "
            "rate, or an undefined operation (log 0, 0/0) in the first place named.")


def _first_event(frames: Frames) -> dict | None:
    ev = frames.events
    if ev is None or ev.empty or "step" not in ev:
        return None
    if "amp_skipped" in ev:
        ev = ev[~ev["amp_skipped"].fillna(False).astype(bool)]
    if ev.empty:
        return None
    return ev.sort_values("step").iloc[0].to_dict() | {"n_events": len(ev)}


def _first_scalar(frames: Frames) -> dict | None:
    s = frames.scalars
    if s.empty or "nonfinite" not in s:
        return None
    rows = s[s["nonfinite"].fillna(0) > 0]
    if "skipped" in rows:
        rows = rows[~rows["skipped"].fillna(False).astype(bool)]
    if rows.empty:
        return None
    first = rows.sort_values("step").iloc[0]
    kind = str(first["kind"])
    return {"step": int(first["step"]), "layer": first["layer"], "kind": kind,
            "pass": {"input": "forward", "act": "forward",
                     "act_grad": "backward"}.get(kind, "step"),
            "nonfinite": float(first["nonfinite"]), "n_events": int(rows["step"].nunique())}


def nonfinite(frames: Frames) -> list[Finding]:
    """One error finding at the first non-finite value (event, else scalars, else loss)."""
    first = _first_event(frames) or _first_scalar(frames)
    loss = frames.losses
    bad_loss = loss[~np.isfinite(loss["loss"].astype("float64"))] if len(loss) else loss
    if first is None and bad_loss.empty:
        return []
    if first is None:
        step = int(bad_loss["step"].min())
        evidence: tuple[Evidence, ...] = (Evidence("non-finite losses", float(len(bad_loss)), 0.0, ">",
                             f"first at step {step}"),)
        layers: tuple[str, ...] = ()
        last = int(bad_loss["step"].max())
    else:
        step = int(first["step"])
        note = f"step {step}, {first['pass']} pass, kind {first['kind']}"
        if isinstance(first.get("inferred"), (bool, np.bool_)) and first["inferred"]:
            note += " (the pass inferred from the parameter gradients)"
        count = float(first["nonfinite"])
        if count >= 0:
            head = Evidence("non-finite values in the first record", count, 0.0, ">", note)
        else:  # an always-on step: the layers are flagged, their values not counted
            head = Evidence("layers flagged non-finite at the first step (flags, not counts)",
                            float(first.get("n_layers", 1)), 0.0, ">", note)
        evidence = (head,
                    Evidence("steps with non-finite values", float(first["n_events"]), 0.0, ">"))
        layers = (str(first["layer"]),)
        last = step
        if len(frames.events) and "step" in frames.events:
            last = int(frames.events["step"].max())
    where = f"{first['pass']} pass of {first['layer']}" if first is not None else "the loss"
    return [Finding(
        rule="nonfinite", severity="error", layers=layers, steps=(step, max(step, last)),
        evidence=evidence,
        explanation=f"First non-finite value in the {where} at step {step}. " + _EXPLAIN,
        remedies=(
            cures.lr(0.1, "too large a step is the commonest source of overflow"),
            cures.clip_for(frames, "bounds the update a huge gradient can make "
                           "(Pascanu et al. 2013)"),
            cures.standardize("inputs of large scale overflow the first layer"),
        ),
    )]


__all__ = ["nonfinite"]
