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
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from gradprobe.errors import RunDirError
from gradprobe.store.parts import (  # the layout, and the reading side kept importable here
    EVENTS,
    META,
    PART_DIRS,
    part_files,
    read_events,
    read_parts,
)
from gradprobe.store.rundir import RUN_FIELDS, check_meta, check_run_dir, run_files

SCHEMA_VERSION = 1
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
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk, an interrupt: leave no temporary file behind
        tmp.unlink(missing_ok=True)
        raise


class RunWriter:
    """Writes one run directory. Create it with :meth:`create`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._flushes = 0
        self.meta: dict[str, Any] = {}
        # the writer thread, started by the first submit(); MAX_PENDING - 1 jobs wait in the
        # queue while one is being written
        self._queue: queue.Queue[list[Any] | None] = queue.Queue(maxsize=MAX_PENDING - 1)
        self._held: list[Any] | None = None  # a job whose submit() was interrupted
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._error: RunDirError | None = None
        self._failed_after = 0
        self.failed_writes = 0
        """Jobs that failed (their steps are not in the run); never reset."""
        self._committed: set[int] = set()  # flushes whose scalars part is written
        self.committed_step: int | None = None
        """The last step of the flushes whose scalars part is written (``None``: none yet)."""
        self._flush_last: dict[int, int] = {}
        self._meta_lock = threading.Lock()  # meta.json is written by both threads
        self._final = False  # the final meta.json is written: later updates are ignored
        self._abandon = threading.Event()  # close() was interrupted: the thread stops
        self._drained = False  # the abandoned thread has finished its last job
        self._close_status = "closed"  # what close() was asked to write

    @classmethod
    def create(cls, run_dir: str | os.PathLike[str], *, config: dict[str, Any],
               overwrite: bool) -> RunWriter:
        """Make ``run_dir`` and write its first ``meta.json``. Errors are :class:`RunDirError`.

        ``run_dir`` must be absent or empty. With ``overwrite``, a directory that is provably a
        previous run (see :func:`check_run_dir`) is cleared of the run's own files (``meta.json``,
        ``events.jsonl``, the parts and the temporary files a killed writer left behind); other
        files in it are kept, and a directory that is not a run is refused with nothing deleted.
        """
        path = check_run_dir(run_dir, overwrite=overwrite)
        for own in run_files(path)[0] if path.is_dir() else []:
            if own.is_dir():
                continue  # a part folder: its own files are in the list, foreign ones stay
            try:
                own.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise RunDirError(f"cannot remove {own} of the previous run: "
                                  f"{exc.strerror or exc}",
                                  hint="check the permissions of run_dir") from exc
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
        """Update ``meta.json`` (atomically; from either thread). Ignored once :meth:`close`
        wrote the final one."""
        with self._meta_lock:
            if self._final:
                return
            self._write_meta_locked(fsync=fsync, **updates)

    def _write_meta_locked(self, *, fsync: bool, **updates: Any) -> None:
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

    def write_part(self, kind: str, frame: pd.DataFrame | Mapping[str, Any], index: int) -> Path:
        """Write ``frame`` as part ``index`` of ``kind`` (one of ``PART_DIRS``), atomically.
        ``frame`` is a DataFrame or its columns (name to numpy array or pyarrow array, of one
        length): the flushes hand columns, which skip pandas (half the writer thread's time).

        A flush writes its ``losses`` and ``hist`` parts first and its ``scalars`` part last:
        the scalars part commits the flush.
        """
        target = self.path / kind / f"part-{index:05d}.parquet"
        tmp = target.with_name("." + target.name + ".tmp")
        # One conversion thread (pyarrow's pool costs more than it saves on frames this small);
        # dictionary encoding only for the repeated strings and statistics only for `step`:
        # the defaults cost twice the time of the whole write for a larger file.
        if isinstance(frame, pd.DataFrame):
            table = pa.Table.from_pandas(frame, preserve_index=False, nthreads=1)
        else:  # NaN stored as null (missing), as pandas' conversion does
            table = pa.table({k: pa.array(v, from_pandas=True) if isinstance(v, np.ndarray) else v
                              for k, v in frame.items()})
        names = set(table.column_names)
        try:
            pq.write_table(table, tmp,  # no fsync: see atomic_write_bytes
                           use_dictionary=[c for c in ("kind",) if c in names],
                           write_statistics=["step"] if "step" in names else False)
            os.replace(tmp, target)
        except BaseException:  # a full disk: leave no temporary file behind
            tmp.unlink(missing_ok=True)
            raise
        if "step" in names and table.num_rows:
            top = int(pc.max(table.column("step")).as_py())
            self._flush_last[index] = max(top, self._flush_last.get(index, top))
        if kind == "scalars":  # the flush is committed
            self._committed.add(index)
            last = self._flush_last.pop(index, None)
            if last is not None and (self.committed_step is None or last > self.committed_step):
                self.committed_step = last
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
        item = [job, what, False]  # [2]: taken by the writer thread
        self._held = item  # until the queue has it: a Ctrl-C in put() leaves it here
        self._queue.put(item)
        self._held = None

    def held(self) -> bool:
        """Whether a job was caught on its way into the queue (an interrupted
        :meth:`submit`); :meth:`close` writes it on the calling thread."""
        return self._held is not None and not self._held[2]

    def raise_error(self) -> None:
        """Raise the error of a failed background write, if any (each error once)."""
        if self._error is None:  # every step: no lock taken until a write failed
            return
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

    def close(self, *, status: str | None = None, **meta: Any) -> None:
        """Finish every submitted job and stop the writer thread (joined), then raise a
        failure, if any. The writer may be used again: the next submit starts a new thread.

        A job caught by a Ctrl-C on its way into the queue (:meth:`held`) is written here,
        after the others, on the calling thread. With ``status`` (``"closed"`` when every step
        was handed over, ``"interrupted"`` when the caller lost some) the final ``meta.json`` is
        written, fsync'ed, saying what is on
        disk: ``status`` becomes ``"failed"`` if a write failed, and ``"interrupted"`` if a
        flush was taken (:meth:`next_flush`) and never written, e.g. a :meth:`submit`
        interrupted by a Ctrl-C, or if the wait is itself interrupted (a
        second Ctrl-C: the interrupt is re-raised at once, and the writer thread stops after
        the part it is writing, skipping the flushes still queued, then corrects the status and
        ``committed_step``, the last step whose flush was written). ``meta`` updates other
        fields (e.g. ``steps``). Later :meth:`write_meta` calls are ignored.
        """
        interrupted: BaseException | None = None
        try:
            thread = self._thread
            if thread is not None:
                if thread.is_alive():
                    self._queue.put(None)
                    thread.join()
                self._thread = None
            if self.held():  # the flush a Ctrl-C caught in submit(): written here, in order
                item, self._held = self._held, None
                assert item is not None
                self._run(item)
        except BaseException as exc:  # KeyboardInterrupt while waiting for the writer thread
            interrupted = exc
            self._abandon.set()
            if thread is not None and not thread.is_alive():  # it had finished every job
                with self._meta_lock:
                    self._drained = True
            try:  # wake a thread waiting for work; a full queue: it sees the flag next
                self._queue.put_nowait(None)
            except queue.Full:
                pass
        finally:
            if status is not None:
                self._finish(status, meta)
        if interrupted is not None:
            raise interrupted
        self.raise_error()

    def _status(self) -> str:
        """The final status: what close() was asked to write, unless steps were lost."""
        if self.failed_writes:
            return "failed"
        if (len(self._committed) < self._flushes  # a flush taken and never written
                or (self._abandon.is_set() and not self._drained)):
            return "interrupted"
        return self._close_status

    def _finish(self, status: str, meta: dict[str, Any]) -> None:
        with self._meta_lock:
            if self._final:
                return
            self._close_status = status
            self._write_meta_locked(fsync=True, status=self._status(),
                                    committed_step=self.committed_step, **meta)
            self._final = True

    def _abandoned(self) -> None:
        """The writer thread's last act after an interrupted close(): drop the jobs it will
        not write, and correct the final ``meta.json`` (its status and last committed step)."""
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
            self._queue.task_done()
        with self._meta_lock:
            self._drained = True
            if self._final:
                self._write_meta_locked(fsync=True, status=self._status(),
                                        committed_step=self.committed_step)

    def _run(self, item: list[Any]) -> None:
        job, what, _ = item
        item[2] = True
        try:
            job()
        except Exception as exc:  # kept for the training thread, never lost
            with self._lock:
                self.failed_writes += 1
                if self._error is None:
                    self._error = _write_error(self.path, what, exc)
                else:  # an earlier failure is not raised yet: counted in its message
                    self._failed_after += 1

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    if self._abandon.is_set():
                        self._abandoned()
                    return
                item[2] = True
                if not self._abandon.is_set():
                    self._run(item)
            finally:
                self._queue.task_done()
            if self._abandon.is_set():  # close() was interrupted: stop after this job
                self._abandoned()
                return


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
    """``meta.json`` of the run in ``path``, checked (:func:`check_meta`); a run written by a
    newer gradprobe is refused. Errors are :class:`RunDirError`."""
    meta_path = path / META
    if not meta_path.is_file():
        raise RunDirError(
            f"{str(path)!r} is not a gradprobe run (no {META})",
            hint="pass the run_dir given to gp.Probe",
        )
    try:
        meta = check_meta(json.loads(meta_path.read_text(encoding="utf-8")), meta_path)
    except RunDirError:
        raise
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or bad UTF-8
        raise RunDirError(f"cannot read {meta_path}: {exc}",
                          hint="the file is damaged; the parts may still be read with "
                          "pyarrow") from exc
    version = meta["schema_version"]
    if version > SCHEMA_VERSION:
        raise RunDirError(
            f"{meta_path} has schema_version {version}: written by a newer gradprobe "
            f"(this one reads up to {SCHEMA_VERSION})",
            hint="upgrade gradprobe",
        )
    return meta


__all__ = ["EVENTS", "META", "PART_DIRS", "RUN_FIELDS", "SCHEMA_VERSION", "RunWriter",
           "check_meta", "check_run_dir", "part_files", "read_events", "read_meta", "read_parts",
           "run_files"]
