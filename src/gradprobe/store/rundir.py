"""What a run directory may be: the files a run owns, a valid ``meta.json``, and whether a new
run may be written to a directory (what ``overwrite=True`` may clear).

:func:`check_run_dir` is asked when a :class:`gradprobe.Probe` is made and again by
:meth:`gradprobe.store.writer.RunWriter.create`; only a directory that is provably a previous run
(its ``meta.json`` parses and has every field of :data:`RUN_FIELDS`) is cleared, and only of the
run's own files (:func:`run_files`).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from gradprobe.errors import RunDirError
from gradprobe.store.parts import EVENTS, META, PART_DIRS

_PART = re.compile(r"part-\d{5,}\.parquet")
_PART_TMP = re.compile(r"\.part-\d{5,}\.parquet\.tmp")
_OWN_TOP = {META, EVENTS, "." + META + ".tmp", ".write-test"}
RUN_FIELDS = ("schema_version", "config", "environment", "layers", "status")
"""The fields every ``meta.json`` holds."""


def run_files(path: Path) -> tuple[list[Path], list[Path]]:
    """``(own, foreign)``: the entries of ``path`` a run writes (``meta.json``, ``events.jsonl``,
    the part folders and their parts, the temporary files of a killed writer), and the others.
    Part folders are listed before their parts; a symbolic link is never a run's own."""
    own: list[Path] = []
    foreign: list[Path] = []
    for child in sorted(path.iterdir()):
        if child.name in PART_DIRS and child.is_dir() and not child.is_symlink():
            own.append(child)
            for part in sorted(child.iterdir()):
                named = bool(_PART.fullmatch(part.name) or _PART_TMP.fullmatch(part.name))
                ok = named and part.is_file() and not part.is_symlink()
                (own if ok else foreign).append(part)
        elif child.name in _OWN_TOP and child.is_file() and not child.is_symlink():
            own.append(child)
        else:
            foreign.append(child)
    return own, foreign


def check_meta(meta: Any, where: Path, *, fields: tuple[str, ...] = ("schema_version",)
               ) -> dict[str, Any]:
    """``meta`` (parsed ``meta.json``) if it is a run's: a JSON object with ``fields``, a
    positive integer ``schema_version`` (``true`` is not one), ``config`` an object and
    ``layers`` a list when present. :class:`RunDirError` naming ``where`` otherwise."""
    if not isinstance(meta, dict):
        raise RunDirError(f"{where} is not a gradprobe meta.json: it holds a JSON "
                          f"{type(meta).__name__}, not an object",
                          hint="pass the run_dir given to gp.Probe")
    missing = [f for f in fields if f not in meta]
    if missing:
        raise RunDirError(f"{where} is not a gradprobe meta.json: no {', '.join(missing)}",
                          hint="pass the run_dir given to gp.Probe")
    version = meta.get("schema_version")
    if type(version) is not int or version < 1:
        raise RunDirError(f"{where} has schema_version {version!r}, not a positive integer",
                          hint="the file is damaged or not written by gradprobe")
    for name, kind in (("config", dict), ("layers", list)):
        if name in meta and not isinstance(meta[name], kind):
            raise RunDirError(f"{where} has a {name} that is a JSON {type(meta[name]).__name__}",
                              hint="the file is damaged or not written by gradprobe")
    return meta


def check_run_dir(run_dir: str | os.PathLike[str], *, overwrite: bool) -> Path:
    """``run_dir`` as a Path if a new run may be written there; nothing is changed.

    It must be absent or empty, or, with ``overwrite``, hold a previous run: its ``meta.json``
    parses and has every field of :data:`RUN_FIELDS` (or, without one, the folder holds nothing
    but a run's empty folders and temporary files). :class:`RunDirError` names the directory
    and why otherwise. The Probe calls this when it is made, :meth:`RunWriter.create` again.
    """
    if not isinstance(run_dir, (str, os.PathLike)):
        raise RunDirError(
            f"run_dir must be a path, got {type(run_dir).__name__}",
            hint='pass run_dir="runs/my-run"',
        )
    path = Path(run_dir)
    if path.exists() and not path.is_dir():
        raise RunDirError(f"run_dir {str(path)!r} exists and is not a directory",
                          hint="choose another run_dir")
    if not path.is_dir() or not any(path.iterdir()):
        return path
    if not overwrite:
        raise RunDirError(
            f"run_dir {str(path)!r} is not empty",
            hint="choose a new directory, or pass overwrite=True to replace a previous run",
        )
    refuse = (f"run_dir {str(path)!r} is not empty and holds no gradprobe run "
              "(overwrite=True only replaces a previous run; nothing was deleted)")
    hint = "choose a new or empty directory"
    own, foreign = run_files(path)
    meta_path = path / META
    if meta_path.is_file() and not meta_path.is_symlink():
        try:
            check_meta(json.loads(meta_path.read_text(encoding="utf-8")), meta_path,
                       fields=RUN_FIELDS)
        except (OSError, ValueError) as exc:
            why = exc.message if isinstance(exc, RunDirError) else f"cannot read it: {exc}"
            raise RunDirError(f"{refuse}: {why}", hint=hint) from exc
        clash = [p.name for p in foreign if p.parent == path and p.name in (*PART_DIRS, EVENTS)]
        if clash:  # e.g. a link named scalars: the new run would write through it
            raise RunDirError(f"run_dir {str(path)!r}: {clash[0]!r} is a link or not of the "
                              "kind a run writes there; nothing was deleted",
                              hint="choose a new or empty directory")
        return path  # RunWriter.create deletes `own`; `foreign` files stay
    data = [p for p in own if p.is_file() and not p.name.startswith(".")]
    if foreign or data:
        first = (foreign or data)[0]
        raise RunDirError(f"{refuse}: no {META}, and it holds {first.name!r}", hint=hint)
    return path  # only a killed writer's empty folders and temporary files


__all__ = ["RUN_FIELDS", "check_meta", "check_run_dir", "run_files"]
