"""The frames every rule reads, and the small helpers the rules share.

A :class:`Frames` holds what :class:`gradprobe.Run` returns (``layers``, ``scalars``,
``losses``, non-finite ``events``, the recorded ``config``), read once. Rules are pure functions
``rule(frames) -> list[Finding]``; tests build :class:`Frames` from hand-made DataFrames.

Layer roles are read from the layer table's ``type`` names through the small tables below
(until the project's one table of layer kinds, ``gradprobe.layers``, owns them):

* *normalisers* rescale the backward signal by ``γ/σ`` and are initialised to constants on
  purpose (BatchNorm's ``γ = 1, β = 0``): they are left out of depth profiles and of the
  symmetry rule;
* *embeddings* take indices, not values: no input-scale estimate through them;
* *affine* layers compute ``y = W x + b``: their output scale estimates their input's scale.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

NORMALISER_TYPES = frozenset({
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "LazyBatchNorm1d",
    "LazyBatchNorm2d", "LazyBatchNorm3d", "LayerNorm", "GroupNorm", "InstanceNorm1d",
    "InstanceNorm2d", "InstanceNorm3d", "RMSNorm", "LocalResponseNorm",
})
EMBEDDING_TYPES = frozenset({"Embedding", "EmbeddingBag"})
RECURRENT_TYPES = frozenset({"RNN", "LSTM", "GRU"})
AFFINE_TYPES = frozenset({
    "Linear", "LazyLinear", "Conv1d", "Conv2d", "Conv3d", "LazyConv1d", "LazyConv2d",
    "LazyConv3d",
})

_EMPTY_LAYERS = ["layer_id", "name", "type", "depth", "param_shapes", "activation"]


@dataclass(frozen=True)
class Frames:
    """A run's frames as the rules read them.

    ``scalars`` is :meth:`Run.scalars` (one row per step, layer, kind) plus the ``units``
    column of the raw statistics; ``events`` holds non-finite events only; ``config`` is
    ``meta["config"]`` (a user may record ``n_classes`` there).
    """

    layers: pd.DataFrame
    scalars: pd.DataFrame
    losses: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["step", "loss"]))
    events: pd.DataFrame = field(default_factory=pd.DataFrame)
    config: dict[str, Any] = field(default_factory=dict)
    time: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(
        columns=["step", "layer", "t", "grad_norm"]))
    """:meth:`Run.time_gradients`: per-time-step gradients of recurrent layers."""
    norms: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(
        columns=["step", "layer", "grad_norm", "grad_nonfinite", "skipped"]))
    """:meth:`Run.grad_norms`, every step's per-layer gradient norms (the always-on tier), with
    the step's ``skipped`` (AMP) flag; empty: the full steps' ``grad`` rows are used."""
    found: dict[Any, list[Any]] = field(default_factory=dict, compare=False, repr=False)
    """Each rule's findings on these frames, once computed (:meth:`findings`)."""

    def findings(self, rule: Any) -> list[Any]:
        """``rule(self)``, computed once per rule: a rule that needs another's verdict (the
        too-small rate is silenced by the gradient-flow rules) reads it here instead of
        running that rule a second time."""
        out = self.found.get(rule)
        if out is None:
            out = self.found[rule] = rule(self)
        return out

    @classmethod
    def of(cls, run: Any) -> Frames:
        """Read ``run`` (a :class:`gradprobe.Run`) once."""
        scalars = run.scalars()
        raw = run.raw_scalars()
        if len(scalars) and "units" in raw:
            units = raw[["step", "layer_id", "kind", "units"]].drop_duplicates(
                ["step", "layer_id", "kind"])
            scalars = scalars.merge(units, on=["step", "layer_id", "kind"], how="left")
        meta = run.meta
        norms = run.grad_norms()
        steps = run.steps()
        if len(norms):
            norms = norms.merge(steps[["step", "skipped"]], on="step", how="left")
        return cls(layers=run.layers, scalars=scalars, losses=run.losses(),
                   events=run.events(), config=dict(meta.get("config") or {}),
                   time=run.time_gradients(), norms=norms)

    # ------------------------------------------------------------------ views

    def kind(self, kind: str) -> pd.DataFrame:
        """Rows of one kind, AMP-skipped steps removed (a skipped step is not a finding)."""
        s = self.scalars
        if s.empty or "kind" not in s:
            return s.iloc[0:0]
        rows = s[s["kind"] == kind]
        if "skipped" in rows:
            rows = rows[~rows["skipped"].fillna(False).astype(bool)]
        return rows

    def wide(self, kind: str, column: str, layers: list[str] | None = None) -> pd.DataFrame:
        """``step x layer`` table of one column of one kind, layers in depth order."""
        rows = self.kind(kind)
        if rows.empty:
            return pd.DataFrame()
        table = rows.pivot_table(index="step", columns="layer", values=column, aggfunc="first",
                                 dropna=False)
        present = set(rows["layer"])
        order = [n for n in (layers if layers is not None else self.depth_order())
                 if n in present]
        return table.reindex(columns=order).sort_index()

    def depth_order(self) -> list[str]:
        """Layer names in the order of their first forward call (never-called layers last)."""
        lay = self.layers
        if lay.empty:
            return []
        depth = lay["depth"].astype("float64").fillna(np.inf)
        return list(lay.assign(_d=depth).sort_values(["_d", "layer_id"])["name"])

    def chain(self) -> list[str]:
        """The weight layers along depth: layers with parameters that ran, not normalisers or
        embeddings, in depth order. The depth profiles of the vanishing and exploding rules
        are fitted over them."""
        lay = self.layers
        if lay.empty:
            return []
        keep = lay[
            lay["param_shapes"].map(lambda s: bool(s) and len(s) > 0)
            & lay["depth"].notna()
            & ~lay["type"].isin(NORMALISER_TYPES | EMBEDDING_TYPES)
        ]
        names = set(keep["name"])
        return [n for n in self.depth_order() if n in names]

    def recurrent(self) -> list[str]:
        """Names of the recurrent layers (RNN, LSTM, GRU) that ran, in depth order."""
        lay = self.layers
        if lay.empty:
            return []
        names = set(lay[lay["type"].isin(RECURRENT_TYPES) & lay["depth"].notna()]["name"])
        return [n for n in self.depth_order() if n in names]

    def layer_row(self, name: str) -> dict[str, Any]:
        rows = self.layers[self.layers["name"] == name]
        return rows.iloc[0].to_dict() if len(rows) else {}

    def activations(self) -> set[str]:
        """Names of the activation functions the model uses (from the layer table)."""
        acts = self.layers["activation"] if "activation" in self.layers else []
        return {a for a in acts if isinstance(a, str)}

    def n_steps(self) -> int:
        s = self.scalars
        return int(s["step"].nunique()) if len(s) else 0


def empty_layers() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="object") for c in _EMPTY_LAYERS})


def log10(x: Any) -> np.ndarray:
    """``log10`` of positive finite values; NaN elsewhere (zeros and non-finite values)."""
    a = np.asarray(x, dtype="float64")
    out = np.full(a.shape, np.nan)
    ok = np.isfinite(a) & (a > 0)
    out[ok] = np.log10(a[ok])
    return out


def depth_slope(logs: np.ndarray) -> tuple[float, float]:
    """Least-squares slope (decades per layer) of ``log10`` values against their position in
    depth order, and the fraction of successive layers that move the same way as the slope.

    Positions, not recorded depths: the rate is per weight layer, whatever lies between.
    Returns ``(nan, nan)`` with fewer than three finite values.
    """
    y = np.asarray(logs, dtype="float64")
    x = np.arange(len(y), dtype="float64")
    ok = np.isfinite(y)
    if ok.sum() < 3:
        return float("nan"), float("nan")
    slope = float(np.polyfit(x[ok], y[ok], 1)[0])
    d = np.diff(y[ok])
    agree = float(np.mean(np.sign(d) == np.sign(slope))) if len(d) else float("nan")
    return slope, agree


def grad_norm(frames: Frames) -> pd.Series:
    """Total gradient norm per step, ``G_t = sqrt(Σ_layers ‖∇θ_l‖²)`` (finite steps only,
    AMP-skipped steps removed): every step's, from the always-on tier where the run has it, so
    a rule comparing a step with the steps before it compares neighbours (the full steps of a
    budgeted run can lie hundreds of steps apart, where a gradient that grew slowly looks like
    a spike); else the full steps' ``grad`` rows."""
    norms = frames.norms
    if len(norms):
        bad = norms["grad_nonfinite"].fillna(False).astype(bool)
        if "skipped" in norms:
            bad |= norms["skipped"].fillna(False).astype(bool)
        if "skipped" in frames.scalars:  # a run written before the two tiers says it here
            rows = frames.scalars
            bad |= norms["step"].isin(rows.loc[rows["skipped"].fillna(False).astype(bool),
                                               "step"])
        drop = norms.loc[bad, "step"].unique()
        rows = norms[~norms["step"].isin(drop)].rename(columns={"grad_norm": "norm"})
    else:
        rows = frames.kind("grad")
    if rows.empty:
        return pd.Series(dtype="float64")
    sq = (rows["norm"].astype("float64") ** 2).groupby(rows["step"]).sum(min_count=1)
    g = np.sqrt(sq)
    return g[np.isfinite(g)].sort_index()


def spike_ratios(values: pd.Series, window: int) -> pd.Series:
    """``value / median of the previous window``, for steps with a full window."""
    prev = values.shift(1).rolling(window, min_periods=window).median()
    return (values / prev).dropna()


def step_range(steps: Any) -> tuple[int, int] | None:
    s = [int(v) for v in steps]
    return (min(s), max(s)) if s else None


def tail(values: pd.Series | np.ndarray, frac: float = 1.0 / 3.0, minimum: int = 1) -> np.ndarray:
    """The last ``frac`` of a series (at least ``minimum`` values)."""
    a = np.asarray(values, dtype="float64")
    k = max(minimum, int(round(len(a) * frac)))
    return a[-k:]


__all__ = ["AFFINE_TYPES", "EMBEDDING_TYPES", "NORMALISER_TYPES", "RECURRENT_TYPES", "Frames", "depth_slope",
           "empty_layers", "grad_norm", "log10", "spike_ratios", "step_range", "tail"]
