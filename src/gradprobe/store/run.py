"""Reading a run directory written by :class:`gradprobe.Probe` (also while it is being written).

Example
    >>> import tempfile, torch, gradprobe as gp
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> with gp.Probe(model, opt, run_dir=tempfile.mkdtemp() + "/r") as probe:
    ...     for _ in range(3):
    ...         loss = model(torch.randn(8, 3)).pow(2).mean()
    ...         probe.observe_loss(loss)
    ...         loss.backward(); opt.step(); opt.zero_grad()
    >>> run = probe.run
    >>> sorted(run.scalars()["kind"].unique())
    ['act', 'act_grad', 'drift', 'grad', 'input', 'spread', 'update', 'weight']
    >>> len(run.losses())
    3
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gradprobe.errors import ConfigError, RunDirError
from gradprobe.stats.schema import DERIVED_COLUMNS, KINDS, RAW_COLUMNS, derive
from gradprobe.store import parts
from gradprobe.store import writer as store
from gradprobe.store.parts import Damage

_SCALAR_COLUMNS = ["step", "layer", "kind", *DERIVED_COLUMNS]


def _as_list(value: str | Iterable[str] | None) -> list[str] | None:
    if value is None:
        return None
    return [value] if isinstance(value, str) else list(value)


TRUNCATED = ("interrupted", "failed")
"""Statuses of a run that holds fewer steps than were trained."""


class Run:
    """A run directory, read lazily: each accessor re-reads the finished parts on disk.

    Damage (a truncated, zeroed or deleted part, a garbled line of ``events.jsonl``) does not
    stop a read: the damaged piece is skipped, a :class:`~gradprobe.errors.RunDataWarning`
    says which steps are missing (once per piece), and :attr:`damaged` lists it.
    """

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path = path
        self._meta = meta
        self._seen: dict[str, Damage] = {}

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Run:
        """Open the run in ``path``; :class:`~gradprobe.RunDirError` if it is not one."""
        p = Path(path)
        return cls(p, store.read_meta(p))

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    @property
    def meta(self) -> dict[str, Any]:
        """``meta.json`` as a dict (schema_version, config, environment, layers, status)."""
        self._meta = store.read_meta(self.path)
        return self._meta

    @property
    def status(self) -> str:
        """What ``meta.json`` says: ``running`` (being written, or its process was killed),
        ``closed`` (every step is on disk), ``interrupted`` (detach was interrupted, e.g. a
        second Ctrl-C: the steps after ``meta["committed_step"]`` are lost) or ``failed`` (a
        write failed: some steps are not in the run)."""
        return str(self.meta.get("status", "unknown"))

    @property
    def damaged(self) -> list[Damage]:
        """Pieces that cannot be read: parts whose footer is unreadable, lost flushes (a gap in
        the part numbers), skipped lines of ``events.jsonl``, and whatever a read met so far
        (a part unreadable past its footer). Each says which steps are missing."""
        found = {d.file: d for d in parts.scan(self.path)}
        return list({**self._seen, **found}.values())

    @property
    def truncated(self) -> bool:
        """Whether steps are missing: the status says so (``interrupted``, ``failed``) or a
        part is damaged or lost. A run whose process was killed keeps status ``running``."""
        return (self.status in TRUNCATED
                or any(d.file != parts.EVENTS for d in self.damaged))

    def _read(self, kind: str) -> pd.DataFrame:
        frame, damage = parts.read_parts_checked(self.path, kind)
        self._report(damage)
        return frame

    def _report(self, damage: list[Damage]) -> None:
        new = [d for d in damage if self._seen.get(d.file) != d]
        for d in new:
            self._seen[d.file] = d
        parts.warn_damage(self.path, new, stacklevel=4)

    def _check_kinds(self, frame: pd.DataFrame) -> None:
        unknown = sorted(set(frame["kind"].astype(str)) - set(KINDS)) if "kind" in frame else []
        if unknown:
            from gradprobe._version import __version__

            written = self.meta.get("environment", {}).get("gradprobe", "?")
            raise RunDirError(
                f"run {str(self.path)!r} holds kinds {unknown} unknown to gradprobe "
                f"{__version__}: it was written by a newer gradprobe ({written})",
                hint="upgrade gradprobe to read it",
            )

    @property
    def layers(self) -> pd.DataFrame:
        """One row per tracked layer: ``layer_id, name, type, depth, param_shapes, activation``.

        ``depth`` is the order of the layer's first forward call (0 first; ``<NA>`` when it was
        never called); ``activation`` is the name in :mod:`gradprobe.activations` or None.
        """
        rows = self.meta.get("layers", [])
        frame = pd.DataFrame(
            rows, columns=["layer_id", "name", "type", "depth", "param_shapes", "activation"]
        )
        frame["layer_id"] = frame["layer_id"].astype("int64")
        frame["depth"] = pd.array(frame["depth"].tolist(), dtype="Int64")
        frame["activation"] = pd.Series([r.get("activation") for r in rows], dtype=object)
        return frame

    def raw_scalars(self) -> pd.DataFrame:
        """The stored sufficient statistics (``step, layer_id, layer, kind, count, sum, ...``)."""
        raw = self._read("scalars")
        self._check_kinds(raw)
        if raw.empty:
            cols = ["step", "layer_id", "layer", "kind", *RAW_COLUMNS, "skipped"]
            return pd.DataFrame({c: pd.Series(dtype="float64") for c in cols})
        names = {int(r["layer_id"]): r["name"] for r in self.meta.get("layers", [])}
        raw.insert(2, "layer", raw["layer_id"].map(names))
        return raw

    def scalars(
        self,
        kinds: str | Iterable[str] | None = None,
        layers: str | Iterable[str] | None = None,
    ) -> pd.DataFrame:
        """Long frame, one row per (step, layer, kind), sorted by step, depth and kind.

        Columns ``step, layer, kind, count, mean, std, rms, abs_mean, norm, min, max, abs_max,
        zero_frac, nonfinite, saturated_frac, dead_frac`` (definitions in
        :mod:`gradprobe.stats`), then ``layer_id`` and ``skipped`` (True on steps an AMP
        GradScaler skipped). For kinds ``update`` and ``drift`` the ``norm`` column holds the
        ratio ``‖ΔW‖/‖W‖`` resp. ``‖W − W0‖/‖W0‖``. ``layers`` are qualified names.
        """
        kind_list = _as_list(kinds)
        if kind_list is not None:
            bad = [k for k in kind_list if k not in KINDS]
            if bad:
                raise ConfigError(f"unknown kinds {bad}", hint=f"choose from {list(KINDS)}")
        layer_list = _as_list(layers)
        raw = self.raw_scalars()
        if kind_list is not None:
            raw = raw[raw["kind"].isin(kind_list)]
        if layer_list is not None:
            known = set(self.layers["name"])
            bad = [n for n in layer_list if n not in known]
            if bad:
                raise ConfigError(f"unknown layers {bad}", hint="see run.layers['name']")
            raw = raw[raw["layer"].isin(layer_list)]
        if raw.empty:
            return pd.DataFrame({c: pd.Series(dtype="float64") for c in _SCALAR_COLUMNS})
        derived = derive(raw)
        out = pd.concat(
            [raw[["step", "layer", "kind"]], derived, raw[["layer_id", "skipped"]]], axis=1
        )
        depth = dict(zip(self.layers["layer_id"], self.layers["depth"].fillna(10**9)))
        order = np.lexsort(
            (out["kind"].map(KINDS.index).to_numpy(), out["layer_id"].map(depth).to_numpy(),
             out["step"].to_numpy())
        )
        return out.iloc[order].reset_index(drop=True)

    @property
    def schedule(self) -> dict[str, Any]:
        """The full tier's schedule as used (``meta.json``'s ``schedule``: ``mode`` ``"budget"``
        or ``"every"``, the counts of steps and full steps, the Probe's measured cost and the
        triggers). A run written before the schedule existed: ``{"mode": "every", "every":
        config["every"]}``."""
        meta = self.meta
        found = meta.get("schedule")
        if isinstance(found, dict):
            return found
        return {"mode": "every", "every": meta.get("config", {}).get("every", 1)}

    def steps(self) -> pd.DataFrame:
        """One row per recorded step: ``step, tier`` (``"full"``: every kind; ``"always"``:
        the always-on tier only), ``loss_nonfinite``, ``scale`` (AMP), ``skipped``. A run
        written before the two tiers existed: its full steps, from the scalars."""
        frame = self._read("steps")
        if frame.empty:
            steps = np.sort(self.raw_scalars()["step"].unique()).astype(np.int64)
            return pd.DataFrame({"step": steps, "tier": "full", "loss_nonfinite": False,
                                 "scale": np.nan, "skipped": False})
        return frame.sort_values("step").reset_index(drop=True)

    def grad_norms(self) -> pd.DataFrame:
        """The always-on tier, one row per (step, layer): ``step, layer, grad_norm``
        (``sqrt(Σ_p ‖g_p‖²)`` over the layer's parameters, NaN for a layer without any),
        ``grad_nonfinite``, ``act_nonfinite`` (an output of the layer held a NaN/Inf), and
        ``layer_id``; every step, whatever its tier. A run written before the two tiers
        existed: its full steps' ``grad`` norms."""
        frame = self._read("norms")
        cols = ["step", "layer", "grad_norm", "grad_nonfinite", "act_nonfinite", "layer_id"]
        if frame.empty:
            grad = self.scalars(kinds="grad")
            return pd.DataFrame({"step": grad["step"], "layer": grad["layer"],
                                 "grad_norm": grad["norm"], "grad_nonfinite": grad["nonfinite"] > 0,
                                 "act_nonfinite": False, "layer_id": grad["layer_id"]})[cols]
        names = {int(r["layer_id"]): r["name"] for r in self.meta.get("layers", [])}
        frame["layer"] = frame["layer_id"].map(names)
        return frame[cols].sort_values(["step", "layer_id"]).reset_index(drop=True)

    def losses(self) -> pd.DataFrame:
        """``step, loss``: the mean of the losses observed in each step."""
        frame = self._read("losses")
        if frame.empty:
            return pd.DataFrame({"step": pd.Series(dtype="int64"),
                                 "loss": pd.Series(dtype="float64")})
        return frame[["step", "loss"]].sort_values("step").reset_index(drop=True)

    def histograms(self) -> pd.DataFrame:
        """``step, layer, kind, bin_edges (B+1 floats), counts (B ints), nonfinite``.

        Bins are linear between the finite minimum and maximum of the values; non-finite values
        are not dropped silently but counted in ``nonfinite``.
        """
        frame = self._read("hist")
        cols = ["step", "layer", "kind", "bin_edges", "counts", "nonfinite"]
        if frame.empty:
            return pd.DataFrame({c: pd.Series(dtype="object") for c in cols})
        self._check_kinds(frame)
        names = {int(r["layer_id"]): r["name"] for r in self.meta.get("layers", [])}
        frame["layer"] = frame["layer_id"].map(names)
        frame["bin_edges"] = frame["bin_edges"].map(lambda a: [float(v) for v in a])
        frame["counts"] = frame["counts"].map(lambda a: [int(v) for v in a])
        return frame[cols + ["layer_id"]].reset_index(drop=True)

    def time_gradients(self, wrt: str = "input") -> pd.DataFrame:
        """``step, layer, t, grad_norm, layer_id``: per time step ``t``, the norm (over the
        batch and features) of the gradient of the loss with respect to a recurrent layer's
        (``nn.RNN``, ``nn.LSTM``, ``nn.GRU``) ``wrt`` sequence, on the histogram schedule.

        ``wrt="input"`` (default): ``∂L/∂x_t`` of the layer's input sequence, which carries the
        gradient back-propagated *through time* (``∂L/∂x_t = W_ihᵀ · diag(f') · dL/dh_t``,
        where ``dL/dh_t`` sums the paths through every later step): its decay with the
        distance from the end of the sequence is the vanishing gradient through time
        (Bengio et al. 1994; Pascanu et al. 2013). ``wrt="output"``: ``∂L/∂h_t`` of the
        output sequence as the layers after the recurrent one send it back (the direct part
        only: the recurrence is inside the module). Sorted by step, layer and ``t``.
        """
        if wrt not in ("input", "output"):
            raise ConfigError(f"wrt must be 'input' or 'output', got {wrt!r}")
        frame = store.read_parts(self.path, "time")
        cols = ["step", "layer", "t", "grad_norm", "layer_id"]
        if frame.empty:
            return pd.DataFrame({c: pd.Series(dtype="object" if c == "layer" else "float64")
                                 for c in cols})
        frame = frame[frame["wrt"] == wrt]
        names = {int(r["layer_id"]): r["name"] for r in self.meta.get("layers", [])}
        out = pd.DataFrame({
            "step": frame["step"].to_numpy(),
            "layer": frame["layer_id"].map(names).to_numpy(),
            "t": frame["t"].to_numpy(),
            "grad_norm": np.sqrt(frame["sumsq"].to_numpy(dtype=float)),
            "layer_id": frame["layer_id"].to_numpy(),
        })
        return out.sort_values(["step", "layer_id", "t"]).reset_index(drop=True)

    def events(self) -> pd.DataFrame:
        """Non-finite events: ``step, layer, pass, kind, nonfinite, amp_skipped, layer_id``.

        One event per step in which a NaN/Inf appeared, naming the first layer and pass in
        execution order (``forward`` activations, then ``act_grad`` in backward order, then
        parameter ``grad``); ``n_layers`` counts all (layer, kind) records affected that step.
        """
        found, damage = parts.read_events_checked(self.path)
        self._report(damage)  # lines skipped: torn by a kill, not UTF-8, not a JSON object
        events = [e for e in found if e.get("type", "nonfinite") == "nonfinite"]
        cols = ["step", "layer", "pass", "kind", "nonfinite", "n_layers", "amp_skipped",
                "layer_id"]
        if not events:
            return pd.DataFrame({c: pd.Series(dtype="object") for c in cols})
        frame = pd.DataFrame(events)
        return frame[[c for c in cols if c in frame] + [c for c in frame if c not in cols]]


__all__ = ["Run"]
