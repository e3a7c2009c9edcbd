"""A run in TensorBoard: export a finished run, or follow one while it trains.

    >>> from gradprobe.integrations import tensorboard               # doctest: +SKIP
    >>> tensorboard.export("runs/demo", "tb/demo")                    # doctest: +SKIP
    >>> follower = tensorboard.live(probe, "tb/demo", every_secs=10)  # doctest: +SKIP
    >>> train(model, optimizer, probe)  # TensorBoard shows each flush once on disk  # doctest: +SKIP
    >>> follower.close()  # after the Probe detached: writes the last steps     # doctest: +SKIP

CLI: ``gradprobe export tensorboard RUN [--out DIR]`` (default ``RUN/tensorboard``), then
``tensorboard --logdir DIR``. The tags are listed in :mod:`gradprobe.integrations.export`:
``grad/norm/<layer>``, ``act/mean/<layer>``, ``update/ratio/<layer>``, ``nonfinite/<kind>/<layer>``,
``<kind>/hist/<layer>``, ``probe/loss``, ``events/nonfinite`` (text), each at the run's step.

Histograms are written with ``SummaryWriter.add_histogram_raw`` from the run's stored bin edges
and counts (bucket ``i`` spans ``(edges[i], edges[i+1]]``; TensorBoard is given the right edges as
its ``bucket_limits`` and ``edges[0]`` as ``min``); nothing is re-binned. ``add_histogram`` would
raise on NaN/Inf: the stored bins hold the finite values only, and the non-finite ones are counted
in ``nonfinite/<kind>/<layer>``, so a run with NaN exports without error.

The live writer is a :class:`~gradprobe.integrations.export.Follower`: it reads the committed
parts of the run directory (no change to the Probe or the training loop), from a daemon thread
every ``every_secs`` or when :meth:`~gradprobe.integrations.export.Follower.poll` is called.
TensorBoard sees a flush (``flush_every`` steps of the Probe) once it is on disk.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from gradprobe.errors import ConfigError
from gradprobe.integrations import export as _export
from gradprobe.integrations.export import Follower, StepRecord

Columns = Literal["default", "all"] | Mapping[str, Iterable[str]] | None
EVENT_FILES = "events.out.tfevents.*"
"""The files a ``SummaryWriter`` writes (those ``overwrite=True`` removes, and no other)."""


def _summary_writer(log_dir: str | Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ConfigError(f"TensorBoard is not installed ({exc})",
                          hint="pip install 'gradprobe[tensorboard]'") from None
    return SummaryWriter(log_dir=str(log_dir))


class TensorBoardSink:
    """Writes :class:`~gradprobe.integrations.export.StepRecord` s with a ``SummaryWriter``."""

    def __init__(self, log_dir: str | Path, *, overwrite: bool = False) -> None:
        self.log_dir = Path(log_dir)
        if self.log_dir.exists() and not self.log_dir.is_dir():
            raise ConfigError(f"{str(self.log_dir)!r} is a file, not a folder",
                              hint="pass a folder for the TensorBoard event files")
        old = sorted(self.log_dir.glob(EVENT_FILES)) if self.log_dir.is_dir() else []
        if old and not overwrite:  # TensorBoard would show both exports, step by step
            raise ConfigError(f"{str(self.log_dir)!r} already holds TensorBoard event files "
                              f"({old[0].name}{', ...' if len(old) > 1 else ''})",
                              hint="pass overwrite=True (--overwrite) to replace them, or "
                              "another folder")
        self.writer = _summary_writer(self.log_dir)
        for f in old:  # only once the writer could be made
            f.unlink()

    def write(self, record: StepRecord) -> None:
        w, step = self.writer, record.step
        for tag, value in record.scalars.items():
            w.add_scalar(tag, value, global_step=step)
        for tag, h in record.histograms.items():
            w.add_histogram_raw(tag, min=float(h.edges[0]), max=float(h.edges[-1]), num=h.num,
                                sum=h.sum, sum_squares=h.sum_squares,
                                bucket_limits=h.edges[1:].tolist(),
                                bucket_counts=h.counts.tolist(), global_step=step)
        for tag, text in record.texts.items():
            w.add_text(tag, text, global_step=step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def export(run: Any, log_dir: str | Path, *, columns: Columns = None,
           overwrite: bool = False) -> int:
    """Write every step of ``run`` (a run directory or a :class:`gradprobe.Run`) as TensorBoard
    event files in ``log_dir``; returns the number of steps written. A ``log_dir`` that already
    holds event files is refused unless ``overwrite=True`` (which removes those files only)."""
    run = _export.open_run(run)  # before the writer makes a folder
    cols = _export.columns_for(columns)
    return _export.export(run, TensorBoardSink(log_dir, overwrite=overwrite), columns=cols)


def live(source: Any, log_dir: str | Path, *, every_secs: float = 30.0,
         columns: Columns = None, start: bool = True, overwrite: bool = False) -> Follower:
    """Follow ``source`` (a :class:`gradprobe.Probe`, a run directory or a Run) into TensorBoard
    event files in ``log_dir``, polling from a daemon thread every ``every_secs`` (``start=False``:
    only when you call ``.poll()``). Close it (or use it as a context manager) after the Probe
    detached, so that the last flush is written."""
    _export.check_follow(source, every_secs)
    cols = _export.columns_for(columns)
    follower = Follower(source, TensorBoardSink(log_dir, overwrite=overwrite), every_secs=every_secs, columns=cols)
    return follower.start() if start else follower


__all__ = ["TensorBoardSink", "export", "live"]
