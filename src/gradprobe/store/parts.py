"""Reading the files of a run directory, damaged or not: parts, ``events.jsonl``.

A run directory may be damaged after the fact: a part truncated or zeroed by a crash of the
machine (parts are not fsync'ed) or a full disk, a part deleted by hand, a line of
``events.jsonl`` torn by a kill or garbled. Reading never fails on such damage: the damaged
piece is skipped and described by a :class:`Damage` record (which file, why, and which steps
are missing), so one bad part costs its own steps only.

Parts are numbered by flush (``part-{index:05d}.parquet``) and a flush writes its ``scalars``
part last, so the ``scalars`` parts are numbered 0, 1, 2, ... without gaps: a missing number
is a lost flush. The steps of a lost flush are those between its neighbours' steps (read from
their Parquet footers).

Example
    >>> import tempfile, pandas as pd
    >>> from pathlib import Path
    >>> from gradprobe.store.writer import RunWriter
    >>> w = RunWriter.create(tempfile.mkdtemp() + "/run", config={}, overwrite=False)
    >>> for i in range(3):
    ...     _ = w.write_part("scalars", pd.DataFrame({"step": [2 * i, 2 * i + 1]}), w.next_flush())
    >>> _ = (w.path / "scalars" / "part-00001.parquet").write_bytes(b"")  # zeroed by a crash
    >>> frame, damage = read_parts_checked(w.path, "scalars")
    >>> frame["step"].tolist()
    [0, 1, 4, 5]
    >>> print(damage[0])
    scalars/part-00001.parquet: unreadable (ArrowInvalid: ...); steps 2-3 missing
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from gradprobe.errors import RunDataWarning

META = "meta.json"
EVENTS = "events.jsonl"
PART_DIRS = ("scalars", "hist", "losses", "time", "steps", "norms")
_INDEX = re.compile(r"part-(\d{5,})\.parquet")


@dataclass(frozen=True)
class Damage:
    """A piece of a run directory that could not be read, and what it costs."""

    file: str
    """Path relative to the run directory (``scalars/part-00003.parquet``, ``events.jsonl``)."""
    reason: str
    """``missing``, ``unreadable (...)`` or the skipped lines of ``events.jsonl``."""
    steps: tuple[int, int | None] | None = None
    """First and last step missing (``None`` last: every step after the first); ``None``
    when not known or when no step is missing (events)."""

    def __str__(self) -> str:
        text = f"{self.file}: {self.reason}"
        if self.steps is not None:
            lo, hi = self.steps
            text += (f"; steps {lo}-{hi} missing" if hi is not None and hi > lo
                     else f"; step {lo} missing" if hi is not None
                     else f"; steps from {lo} on missing")
        return text


def part_index(file: Path) -> int | None:
    m = _INDEX.fullmatch(file.name)
    return int(m.group(1)) if m else None


def part_files(path: Path, kind: str) -> list[Path]:
    """Finished parts of ``kind`` in order (temporary files are skipped)."""
    d = path / kind
    if not d.is_dir():
        return []
    return sorted(p for p in d.glob("part-*.parquet") if part_index(p) is not None)


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"unreadable ({type(exc).__name__}: {text[:120]})"


def _step_range(file: Path) -> tuple[int, int] | None:
    """First and last step of a part, from its footer's statistics (or its ``step`` column);
    ``None`` when it holds no step or cannot be read."""
    try:
        meta = pq.read_metadata(file)
        names = meta.schema.names
        if "step" not in names or meta.num_rows == 0:
            return None
        col = names.index("step")
        lo: int | None = None
        hi: int | None = None
        for g in range(meta.num_row_groups):
            stats = meta.row_group(g).column(col).statistics
            if stats is None or not stats.has_min_max:
                steps = pq.read_table(file, columns=["step"]).column("step").to_pandas()
                return (int(steps.min()), int(steps.max())) if len(steps) else None
            lo = int(stats.min) if lo is None else min(lo, int(stats.min))
            hi = int(stats.max) if hi is None else max(hi, int(stats.max))
        return None if lo is None or hi is None else (lo, hi)
    except (pa.ArrowException, OSError, ValueError):
        return None


def _flush_steps(index: int, ranges: dict[int, tuple[int, int] | None],
                 bad: set[int]) -> tuple[int, int | None]:
    """The steps of flush ``index``: its own scalars part's range if it is sound, else the
    steps between the nearest sound neighbours."""
    own = ranges.get(index) if index not in bad else None
    if own is not None:
        return own
    lo = 0
    for j in range(index - 1, -1, -1):
        r = ranges.get(j) if j not in bad else None
        if r is not None:
            lo = r[1] + 1
            break
    hi: int | None = None
    for j in sorted(k for k in ranges if k > index and k not in bad):
        r = ranges[j]
        if r is not None:
            hi = r[0] - 1
            break
    return lo, hi


def _lost(scalars: dict[int | None, Path]) -> dict[int, str]:
    """Flushes whose scalars part is missing below the last one."""
    last = max((i for i in scalars if i is not None), default=-1)
    return {i: "missing" for i in range(last) if i not in scalars}


def read_parts_checked(path: Path, kind: str, *, flushes: tuple[int, int] | None = None
                       ) -> tuple[pd.DataFrame, list[Damage]]:
    """Concatenate the committed parts of ``kind`` (an empty frame when there are none),
    skipping damaged ones: ``(frame, damage)``; ``flushes=(after, upto)``: only the parts
    numbered ``after < i <= upto`` (a reader following a run as it is written).

    A ``losses`` or ``hist`` part counts only once its flush's ``scalars`` part exists. For
    ``scalars``, a number missing below the last part is a lost flush (``missing``).
    """
    scalars = {part_index(p): p for p in part_files(path, "scalars")}
    files = part_files(path, kind)
    if kind != "scalars":
        files = [f for f in files if part_index(f) in scalars]
    if flushes is not None:
        after, upto = flushes
        files = [f for f in files if after < (part_index(f) or 0) <= upto]
    frames: list[pd.DataFrame] = []
    broken: dict[int, str] = {}
    for f in files:
        try:
            frames.append(pq.read_table(f).to_pandas())
        except (pa.ArrowException, OSError, ValueError) as exc:
            broken[part_index(f) or 0] = _reason(exc)
    if kind == "scalars":
        broken.update({i: r for i, r in _lost(scalars).items()
                       if flushes is None or flushes[0] < i <= flushes[1]})
    damage: list[Damage] = []
    if broken:
        ranges = {i: _step_range(p) for i, p in scalars.items() if i is not None}
        bad = set(broken) if kind == "scalars" else set()
        for i, reason in sorted(broken.items()):
            damage.append(Damage(f"{kind}/part-{i:05d}.parquet", reason,
                                 _flush_steps(i, ranges, bad)))
    if not frames:
        return pd.DataFrame(), damage
    frames = [f for f in frames if len(f)] or frames[:1]
    frame = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    return frame, damage


def warn_damage(path: Path, damage: list[Damage], *, stacklevel: int = 3) -> None:
    """One :class:`~gradprobe.errors.RunDataWarning` listing ``damage`` (nothing if none)."""
    if damage:
        warnings.warn(RunDataWarning(
            f"run {str(path)!r}: skipped what cannot be read: " + "; ".join(map(str, damage))),
            stacklevel=stacklevel)


def read_parts(path: Path, kind: str) -> pd.DataFrame:
    """:func:`read_parts_checked`'s frame; damage is reported as a RunDataWarning."""
    frame, damage = read_parts_checked(path, kind)
    warn_damage(path, damage)
    return frame


def read_events_checked(path: Path) -> tuple[list[dict[str, Any]], list[Damage]]:
    """Events from ``events.jsonl`` and at most one :class:`Damage` counting the lines that
    were skipped: a torn last line (killed mid-write), invalid UTF-8, a line that is not a
    JSON object."""
    f = path / EVENTS
    if not f.is_file():
        return [], []
    out: list[dict[str, Any]] = []
    skipped: list[str] = []
    for number, raw in enumerate(f.read_bytes().split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            event = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            skipped.append(f"{number} (not UTF-8)")
            continue
        except ValueError:
            skipped.append(f"{number} (not JSON)")
            continue
        if not isinstance(event, dict):
            skipped.append(f"{number} (not an object)")
            continue
        out.append(event)
    if not skipped:
        return out, []
    s = "s" if len(skipped) > 1 else ""
    shown = ", ".join(skipped[:5]) + (", ..." if len(skipped) > 5 else "")
    return out, [Damage(EVENTS, f"{len(skipped)} line{s} skipped: line{s} {shown}")]


def read_events(path: Path) -> list[dict[str, Any]]:
    """:func:`read_events_checked`'s events (skipped lines are not reported)."""
    return read_events_checked(path)[0]


def scan(path: Path) -> list[Damage]:
    """Every damaged piece of the run in ``path`` that can be found without reading the data:
    parts whose footer cannot be read, lost flushes (missing ``scalars`` numbers) and skipped
    lines of ``events.jsonl``."""
    scalars = {part_index(p): p for p in part_files(path, "scalars")}
    ranges = {i: _step_range(p) for i, p in scalars.items() if i is not None}
    damage: list[Damage] = []
    broken: dict[int, str] = {}
    for i, p in scalars.items():
        try:
            pq.read_metadata(p)
        except (pa.ArrowException, OSError, ValueError) as exc:
            broken[i or 0] = _reason(exc)
    broken.update(_lost(scalars))
    bad = set(broken)
    for i, reason in sorted(broken.items()):
        damage.append(Damage(f"scalars/part-{i:05d}.parquet", reason,
                             _flush_steps(i, ranges, bad)))
    for kind in PART_DIRS[1:]:
        for p in part_files(path, kind):
            i = part_index(p)
            if i not in scalars:
                continue
            try:
                pq.read_metadata(p)
            except (pa.ArrowException, OSError, ValueError) as exc:
                damage.append(Damage(f"{kind}/{p.name}", _reason(exc),
                                     _flush_steps(i or 0, ranges, bad)))
    return damage + read_events_checked(path)[1]


__all__ = ["EVENTS", "META", "PART_DIRS", "Damage", "part_files", "read_events",
           "read_events_checked", "read_parts", "read_parts_checked", "scan", "warn_damage"]
