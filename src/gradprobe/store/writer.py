"""The run directory: crash-safe Parquet parts, ``meta.json`` and ``events.jsonl``.

Layout::

    RUN/
      meta.json                  schema_version, config, environment, layers, status
      scalars/part-00000.parquet one row per (step, layer, kind): raw sufficient statistics
      hist/part-00000.parquet    one row per (step, layer, kind): bin_edges, counts, nonfinite
      losses/part-00000.parquet  step, loss, count (micro-batches averaged)
      time/part-00000.parquet    step, layer_id, wrt, t, sumsq: per-time-step gradients of
                                 recurrent layers (on the histogram schedule)
      events.jsonl               one JSON object per line (non-finite events), fsync'ed at once

Every file is written under a hidden temporary name (``.NAME.tmp``) and renamed into place, so a
process killed at any instant leaves only complete files behind; readers ignore the temporary
names. Parts are not fsync'ed (that would cost milliseconds per flush): they survive the death
of the process, and ``meta.json`` at close and every event line are fsync'ed. The Parquet
files are plain pyarrow tables, readable by pandas, polars and DuckDB.

Parts are written off the training thread: :meth:`RunWriter.submit` hands a flush to one
daemon writer thread per run, which writes flushes in the order they were handed over (within a
flush: losses, histograms and time profiles first, scalars last). At most ``MAX_PENDING`` flushes are handed
over and not yet written; the next one waits on the training thread until the writer catches up,
so host memory stays bounded. A flush is durable once it was handed over **and** written; a
process killed before that loses the flush as a whole (its scalars part, the commit marker, is
the last file written). A write that fails is reported on the training thread, once, as
:class:`RunDirError` (:meth:`RunWriter.raise_error`, :meth:`RunWriter.wait`,
:meth:`RunWriter.close`).

Example
    >>> import tempfile, pandas as pd
    >>> d = tempfile.mkdtemp()
    >>> w = RunWriter.create(d + "/run", config={}, overwrite=False)
    >>> i = w.next_flush()
    >>> _ = w.write_part("losses", pd.DataFrame({"step": [0], "loss": [1.5], "count": [1]}), i)
    >>> read_parts(w.path, "losses").empty   # not committed until its scalars part exists
    True
    >>> _ = w.write_part("scalars", pd.DataFrame({"step": [0]}), i)
    >>> read_parts(w.path, "losses")["loss"].tolist()
    [1.5]
"""

from __future__ import annotations

import json
import os
import platform
import queue
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from gradprobe.errors import RunDirError

SCHEMA_VERSION = 1
META = "meta.json"
EVENTS = "events.jsonl"
PART_DIRS = ("scalars", "hist", "losses", "time")
MAX_PENDING = 2
"""Flushes handed to the writer thread and not yet written (one being written, one waiting)."""


def environment() -> dict[str, Any]:
    """Versions and devices, recorded in ``meta.json``."""
    import torch

    from gradprobe._version import __version__

    return {
        "gradprobe": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.cuda.is_available(),
        "pid": os.getpid(),
    }


def atomic_write_bytes(path: Path, data: bytes, *, fsync: bool = False) -> None:
    """Write ``data`` to ``path`` through a temporary name, then rename it into place.

    The rename makes the file appear whole or not at all to readers and survives the death of
    the writing process (SIGKILL, OOM); ``fsync`` also makes it survive a crash of the machine
    (power loss), at a cost of milliseconds per file.
    """
    tmp = path.with_name("." + path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        if fsync:
            os.fsync(f.fileno())
    os.replace(tmp, path)


class RunWriter:
    """Writes one run directory. Create it with :meth:`create`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._flushes = 0
        self.meta: dict[str, Any] = {}
        # the writer thread, started by the first submit(); MAX_PENDING - 1 jobs wait in the
        # queue while one is being written
        self._queue: queue.Queue[tuple[Callable[[], None], str] | None] = queue.Queue(
            maxsize=MAX_PENDING - 1)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._error: RunDirError | None = None
        self._failed_after = 0

    @classmethod
    def create(cls, run_dir: str | os.PathLike[str], *, config: dict[str, Any],
               overwrite: bool) -> RunWriter:
        """Make ``run_dir`` (must be absent or empty; with ``overwrite``, a previous run there is
        removed) and write its first ``meta.json``. Errors are :class:`RunDirError`."""
        if not isinstance(run_dir, (str, os.PathLike)):
            raise RunDirError(
                f"run_dir must be a path, got {type(run_dir).__name__}",
                hint='pass run_dir="runs/my-run"',
            )
        path = Path(run_dir)
        if path.exists() and not path.is_dir():
            raise RunDirError(f"run_dir {str(path)!r} exists and is not a directory",
                              hint="choose another run_dir")
        if path.is_dir() and any(path.iterdir()):
            if not overwrite:
                raise RunDirError(
                    f"run_dir {str(path)!r} is not empty",
                    hint="choose a new directory, or pass overwrite=True to replace a previous run",
                )
            if not (path / META).exists():
                raise RunDirError(
                    f"run_dir {str(path)!r} is not empty and holds no gradprobe run; "
                    "overwrite=True only replaces a previous run",
                    hint="choose a new or empty directory",
                )
            for child in path.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        try:
            path.mkdir(parents=True, exist_ok=True)
            for d in PART_DIRS:
                (path / d).mkdir(exist_ok=True)
            probe_file = path / ".write-test"
            probe_file.write_bytes(b"")
            probe_file.unlink()
        except OSError as exc:
            raise RunDirError(
                f"cannot write run_dir {str(path)!r}: {exc.strerror or exc}",
                hint="choose a directory you can write to",
            ) from exc
        writer = cls(path)
        writer.meta = {
            "schema_version": SCHEMA_VERSION,
            "config": config,
            "environment": environment(),
            "layers": [],
            "status": "running",
        }
        writer.write_meta()
        return writer

    def write_meta(self, *, fsync: bool = False, **updates: Any) -> None:
        self.meta.update(updates)
        data = json.dumps(self.meta, indent=1, default=str).encode()
        try:
            atomic_write_bytes(self.path / META, data, fsync=fsync)
        except OSError as exc:
            raise RunDirError(f"cannot write {self.path / META}: {exc}") from exc

    def next_flush(self) -> int:
        """Index of the next flush; its parts share it (``part-{index:05d}.parquet``)."""
        index = self._flushes
        self._flushes += 1
        return index

    def write_part(self, kind: str, frame: pd.DataFrame, index: int) -> Path:
        """Write ``frame`` as part ``index`` of ``kind`` (one of ``PART_DIRS``), atomically.

        A flush writes its ``losses`` and ``hist`` parts first and its ``scalars`` part last:
        the scalars part commits the flush.
        """
        target = self.path / kind / f"part-{index:05d}.parquet"
        tmp = target.with_name("." + target.name + ".tmp")
        # One conversion thread (pyarrow's pool costs more than it saves on frames this small);
        # dictionary encoding only for the repeated strings and statistics only for `step`:
        # the defaults cost twice the time of the whole write for a larger file.
        table = pa.Table.from_pandas(frame, preserve_index=False, nthreads=1)
        names = set(table.column_names)
        pq.write_table(table, tmp,  # no fsync: see atomic_write_bytes
                       use_dictionary=[c for c in ("kind",) if c in names],
                       write_statistics=["step"] if "step" in names else False)
        os.replace(tmp, target)
        return target

    def append_event(self, event: dict[str, Any]) -> None:
        """Append one JSON line to ``events.jsonl`` and fsync it before returning."""
        self.append_events([event])

    def append_events(self, events: list[dict[str, Any]]) -> None:
        """Append one JSON line per event to ``events.jsonl``, with one fsync for all of them."""
        if not events:
            return
        with open(self.path / EVENTS, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(ev, default=float) + "\n" for ev in events))
            f.flush()
            os.fsync(f.fileno())

    # ------------------------------------------------------------------ the writer thread

    def submit(self, job: Callable[[], None], *, what: str) -> None:
        """Run ``job`` (which writes parts and ``meta.json``) on the writer thread, after every
        job submitted before it. Waits while ``MAX_PENDING`` jobs are not finished yet.

        ``what`` names the job in the error raised if it fails (e.g. ``"flush 3 (steps
        300-399)"``). A failure is kept and raised once, on the calling thread, by the next
        :meth:`raise_error`, :meth:`wait` or :meth:`close`; later jobs still run.
        """
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._work, daemon=True,
                                            name=f"gradprobe-writer:{self.path.name}")
            self._thread.start()
        self._queue.put((job, what))

    def raise_error(self) -> None:
        """Raise the error of a failed background write, if any (each error once)."""
        with self._lock:
            err, self._error = self._error, None
            more, self._failed_after = self._failed_after, 0
        if err is not None:
            if more:
                err.message += f" (and {more} later write{'s' if more > 1 else ''} failed too)"
                err.args = (err.message,)
            raise err

    def wait(self) -> None:
        """Block until every submitted job is finished, then raise a failure, if any."""
        self._queue.join()
        self.raise_error()

    def close(self) -> None:
        """Finish every submitted job and stop the writer thread (joined), then raise a
        failure, if any. The writer may be used again: the next submit starts a new thread."""
        thread = self._thread
        if thread is not None:
            if thread.is_alive():
                self._queue.put(None)
                thread.join()
            self._thread = None
        self.raise_error()

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                job, what = item
                try:
                    job()
                except Exception as exc:  # kept for the training thread, never lost
                    with self._lock:
                        if self._error is None:
                            self._error = _write_error(self.path, what, exc)
                        else:  # an earlier failure is not raised yet: counted in its message
                            self._failed_after += 1
            finally:
                self._queue.task_done()


def _write_error(path: Path, what: str, exc: Exception) -> RunDirError:
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    err = RunDirError(
        f"cannot write {what} to run_dir {str(path)!r}: {type(exc).__name__}: {reason}; "
        "those steps are not in the run",
        hint="check that run_dir still exists, is writable and its disk has space",
    )
    err.__cause__ = exc
    return err


def read_meta(path: Path) -> dict[str, Any]:
    meta_path = path / META
    if not meta_path.is_file():
        raise RunDirError(
            f"{str(path)!r} is not a gradprobe run (no {META})",
            hint="pass the run_dir given to gp.Probe",
        )
    try:
        meta: dict[str, Any] = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RunDirError(f"cannot read {meta_path}: {exc}") from exc
    version = meta.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise RunDirError(
            f"{meta_path} has schema_version {version!r}; this gradprobe reads up to "
            f"{SCHEMA_VERSION}",
            hint="upgrade gradprobe",
        )
    return meta


def part_files(path: Path, kind: str) -> list[Path]:
    """Finished parts of ``kind`` in order (temporary files are skipped)."""
    d = path / kind
    if not d.is_dir():
        return []
    return sorted(p for p in d.glob("part-*.parquet") if not p.name.startswith("."))


def read_parts(path: Path, kind: str) -> pd.DataFrame:
    """Concatenate the committed parts of ``kind`` (an empty frame when there are none)."""
    files = part_files(path, kind)
    if kind != "scalars":
        committed = {p.name for p in part_files(path, "scalars")}
        files = [f for f in files if f.name in committed]
    if not files:
        return pd.DataFrame()
    frames = [pq.read_table(f).to_pandas() for f in files]
    frames = [f for f in frames if len(f)] or frames[:1]
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]


def read_events(path: Path) -> list[dict[str, Any]]:
    """Events from ``events.jsonl``; a torn last line (killed mid-write) is ignored."""
    f = path / EVENTS
    if not f.is_file():
        return []
    out = []
    for line in f.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


__all__ = ["SCHEMA_VERSION", "RunWriter", "part_files", "read_events", "read_meta", "read_parts"]
