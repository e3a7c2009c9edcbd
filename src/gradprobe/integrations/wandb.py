"""A run in Weights & Biases: export a finished run, or follow one while it trains.

    >>> from gradprobe.integrations import wandb as gp_wandb                  # doctest: +SKIP
    >>> gp_wandb.export("runs/demo", project="my-project")                     # doctest: +SKIP
    >>> follower = gp_wandb.live(probe, wandb_run=wandb.run, every_secs=10)    # doctest: +SKIP
    >>> train(model, optimizer, probe)  # your own wandb.log calls as usual  # doctest: +SKIP
    >>> follower.close()  # after the Probe detached: logs the last steps       # doctest: +SKIP

CLI: ``gradprobe export wandb RUN --project P [--name N] [--dir D] [--mode offline]``.

The keys are the TensorBoard tags (:mod:`gradprobe.integrations.export`): ``grad/norm/<layer>``,
``act/mean/<layer>``, ``nonfinite/<kind>/<layer>``, ``<kind>/hist/<layer>``
(``wandb.Histogram(np_histogram=(counts, edges))`` from the stored bins; more than 512 bins, W&B's
limit, are merged in adjacent groups: counts add, no value is re-binned), ``probe/loss``,
``events/nonfinite`` (a string). Each ``log`` call carries ``probe/step``, the run's step, which
is declared (``define_metric``) the x axis of those keys: gradprobe never passes ``step=`` to
``log``, so a live follower does not fight the training loop's own ``wandb.log`` calls over
W&B's step counter.

A ``wandb_run`` passed in is left open; a run this module starts (``wandb.init(project=...,
config=<the run's config>, reinit="create_new")``: a W&B run already open in the process is
neither reused nor finished; wandb 0.19.10 or later) is finished when the export or the follower
closes. W&B's own
settings apply (``WANDB_MODE=offline`` writes the run under ``dir`` to ``wandb sync`` later).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np

from gradprobe.errors import ConfigError
from gradprobe.integrations import export as _export
from gradprobe.integrations.export import Follower, StepRecord
from gradprobe.stats.schema import KINDS

Columns = Literal["default", "all"] | Mapping[str, Iterable[str]] | None
STEP = "probe/step"
MAX_BINS = 512
"""W&B's largest histogram (``wandb.Histogram.MAX_LENGTH``)."""


def _wandb() -> Any:
    try:
        import wandb
    except ImportError as exc:
        raise ConfigError(f"Weights & Biases is not installed ({exc})",
                          hint="pip install 'gradprobe[wandb]'") from None
    return wandb


def coarsen(counts: np.ndarray, edges: np.ndarray, max_bins: int = MAX_BINS,
            ) -> tuple[np.ndarray, np.ndarray]:
    """At most ``max_bins`` bins by adding the counts of ``ceil(B / max_bins)`` adjacent bins
    (their outer edges kept): exact, no value is moved to another bin than one containing it."""
    b = len(counts)
    if b <= max_bins:
        return counts, edges
    g = math.ceil(b / max_bins)
    starts = np.arange(0, b, g)
    return np.add.reduceat(counts, starts), np.append(edges[starts], edges[-1])


class WandbSink:
    """Logs :class:`~gradprobe.integrations.export.StepRecord` s to a W&B run."""

    def __init__(self, wandb_run: Any, *, finish: bool) -> None:
        self.wandb = _wandb()
        self.run = wandb_run
        self.finish = finish
        wandb_run.define_metric(STEP)
        for prefix in (*KINDS, "nonfinite", "events", "probe"):
            wandb_run.define_metric(f"{prefix}/*", step_metric=STEP)

    def write(self, record: StepRecord) -> None:
        payload: dict[str, Any] = {STEP: record.step, **record.scalars, **record.texts}
        for tag, h in record.histograms.items():
            counts, edges = coarsen(h.counts, h.edges)
            payload[tag] = self.wandb.Histogram(np_histogram=(counts.tolist(), edges.tolist()))
        self.run.log(payload)

    def flush(self) -> None:
        pass  # W&B sends in the background

    def close(self) -> None:
        if self.finish:
            self.run.finish()


def _sink(run: Any, *, wandb_run: Any, project: str | None, name: str | None,
          dir: str | Path | None, mode: str | None) -> WandbSink:
    wandb = _wandb()
    if wandb_run is not None:
        if project is not None or name is not None:
            raise ConfigError("pass either wandb_run= or project=/name=, not both",
                              hint="the project and name of a wandb_run are already set")
        return WandbSink(wandb_run, finish=False)
    if mode not in (None, "online", "offline", "disabled"):
        raise ConfigError(f"mode must be 'online', 'offline' or 'disabled', got {mode!r}",
                          hint="offline writes the run to sync later with `wandb sync`")
    path = run.path if isinstance(run, _export.Run) else Path(getattr(run, "run_dir", run))
    config = run.meta.get("config", {}) if isinstance(run, _export.Run) else {}
    try:
        started = wandb.init(project=project, name=name or path.name, mode=mode,
                             dir=None if dir is None else str(dir), job_type="gradprobe",
                             config={"gradprobe": config, "run_dir": str(path)},
                             reinit="create_new")
    except wandb.errors.Error as exc:  # W&B's own errors: a bad project name, no login, ...
        raise ConfigError(f"W&B could not start a run: {' '.join(str(exc).split())}",
                          hint="check --project, run `wandb login`, or pass --mode offline",
                          ) from exc
    return WandbSink(started, finish=True)


def export(run: Any, *, project: str | None = None, name: str | None = None,
           dir: str | Path | None = None, mode: str | None = None, wandb_run: Any = None,
           columns: Columns = None) -> int:
    """Log every step of ``run`` (a run directory or a :class:`gradprobe.Run`) to W&B: to
    ``wandb_run`` (left open), or to a new W&B run in ``project`` named ``name`` (default: the
    run directory's name), finished at the end. Returns the number of steps logged."""
    run = _export.open_run(run)
    cols = _export.columns_for(columns)
    sink = _sink(run, wandb_run=wandb_run, project=project, name=name, dir=dir, mode=mode)
    return _export.export(run, sink, columns=cols)


def live(source: Any, *, project: str | None = None, name: str | None = None,
         dir: str | Path | None = None, mode: str | None = None, wandb_run: Any = None,
         every_secs: float = 30.0, columns: Columns = None, start: bool = True) -> Follower:
    """Follow ``source`` (a :class:`gradprobe.Probe`, a run directory or a Run) into W&B, polling
    from a daemon thread every ``every_secs`` (``start=False``: only on ``.poll()``). Close it (or
    use it as a context manager) after the Probe detached, so that the last flush is logged."""
    _export.check_follow(source, every_secs)
    cols = _export.columns_for(columns)
    sink = _sink(source, wandb_run=wandb_run, project=project, name=name, dir=dir, mode=mode)
    follower = Follower(source, sink, every_secs=every_secs, columns=cols)
    return follower.start() if start else follower


__all__ = ["WandbSink", "coarsen", "export", "live"]
