"""``gp.lab.sweep(grid, out=...)``: a grid of training configurations, one run each, one table
and one figure.

>>> import gradprobe as gp
>>> result = gp.lab.sweep({"activation": ["relu", "tanh"], "depth": [2, 8], "epochs": [5]},
...                       out="sweeps/demo", workers=2)                  # doctest: +SKIP
>>> result.table[["run", "final_loss", "grad_ratio_last_step", "rules"]]  # doctest: +SKIP

The grid is a dict of lists (their cartesian product, in the order given) or a list of dicts
(one configuration each); its fields are those of
:class:`~gradprobe.lab.sweep_task.TaskConfig` and every configuration runs
:func:`~gradprobe.lab.sweep_task.execute`: in a local process pool (``backend="local"``, spawned
processes of one torch thread each) or as Ray Tune trials (``backend="ray"``: ``ray.init(address)``
joins a cluster, else a local Ray instance starts; ``pip install gradprobe[ray]``). Every run is
written to ``out/<name>``; a configuration whose folder is already complete is skipped, a
failing one becomes a row with its ``error`` and the sweep goes on. ``out/sweep.csv``,
``out/sweep.md`` and ``out/sweep.png``/``.svg`` hold the table and the figure.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from gradprobe.errors import ConfigError
from gradprobe.lab.sweep_task import FIELDS, TaskConfig, coerce, read_record, run_name

Backend = Literal["local", "ray"]
BACKENDS: tuple[str, ...] = ("local", "ray")

Notify = Callable[[str], None]


@dataclass
class SweepResult:
    """What :func:`sweep` did: the table (one row per configuration, in grid order), every
    complete run's folder by name, the names skipped as already complete and those that
    failed, and the files written."""

    table: pd.DataFrame
    runs: dict[str, Path]
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)


def expand(grid: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> tuple[list[TaskConfig], list[str]]:
    """The configurations of ``grid`` (validated) and the grid's axes (the fields it names, in
    order): ``ConfigError`` with a hint for an empty grid, an unknown field, a value that is not
    a list, a bad value or a configuration given twice."""
    example = 'e.g. {"activation": ["relu", "tanh"], "depth": [4, 8]}'
    if isinstance(grid, Mapping):
        if not grid:
            raise ConfigError("the sweep grid is empty", hint=example)
        _check_fields(grid)
        for name, values in grid.items():
            if not isinstance(values, (list, tuple)):
                raise ConfigError(f"grid field {name!r} must be a list of values, got {values!r}",
                                  hint=f"write {name}: [{values!r}] for a single value")
            if not values:
                raise ConfigError(f"grid field {name!r} has no values",
                                  hint=f"give {name} at least one value, or leave it out")
        axes = list(grid)
        combos = [dict(zip(axes, vs)) for vs in itertools.product(*(grid[a] for a in axes))]
    elif isinstance(grid, (list, tuple)):
        if not grid:
            raise ConfigError("the sweep grid is an empty list", hint=example)
        for i, entry in enumerate(grid):
            if not isinstance(entry, Mapping):
                raise ConfigError(f"grid entry {i} is {entry!r}, not a configuration",
                                  hint='a list grid holds dicts such as {"depth": 4}')
            _check_fields(entry)
            lists = [k for k, v in entry.items() if isinstance(v, (list, tuple))]
            if lists:
                raise ConfigError(f"grid entry {i} gives a list for {lists[0]!r}",
                                  hint="in a list of configurations each field has one value; "
                                  "use a dict of lists for a cartesian product")
        axes = list(dict.fromkeys(k for entry in grid for k in entry))
        combos = [dict(entry) for entry in grid]
    else:
        raise ConfigError(f"the sweep grid must be a dict of lists or a list of dicts, got "
                          f"{type(grid).__name__}", hint=example)
    configs = []
    for combo in combos:
        config = TaskConfig(**{k: coerce(k, v) for k, v in combo.items()})
        config.validate()
        configs.append(config)
    names = [run_name(c, axes) for c in configs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"the grid gives configuration {twice[0]!r} more than once",
                          hint="list each value of a field once")
    return configs, axes


def _check_fields(entry: Mapping[str, Any]) -> None:
    unknown = [k for k in entry if k not in FIELDS]
    if unknown:
        raise ConfigError(f"unknown grid field {unknown[0]!r}",
                          hint="the fields are: " + ", ".join(FIELDS))


def load_grid(path: str | os.PathLike[str]) -> Any:
    """A grid from a ``.json``, ``.yaml`` or ``.yml`` file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"grid file {str(p)!r} does not exist", hint="pass --grid grid.json")
    text = p.read_text(encoding="utf-8")
    errors: tuple[type[Exception], ...] = (ValueError,)  # JSONDecodeError is a ValueError
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ConfigError("reading a YAML grid needs PyYAML",
                                  hint="pip install pyyaml, or write the grid as JSON") from None
            errors = (ValueError, yaml.YAMLError)
            return yaml.safe_load(text)
        return json.loads(text)
    except errors as exc:  # both say where (line, column)
        raise ConfigError(f"cannot read grid file {str(p)!r}: {' '.join(str(exc).split())}",
                          hint="a grid is a mapping of field -> list of values") from None


def sweep(
    grid: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    *,
    out: str | os.PathLike[str],
    workers: int = 1,
    backend: Backend = "local",
    address: str | None = None,
    figure: bool = True,
    notify: Notify | None = None,
) -> SweepResult:
    """Run every configuration of ``grid`` into ``out/<name>``; write and return the table.

    ``workers`` configurations run at once (local: processes; Ray: concurrent trials, on a
    cluster at most that many). ``address`` (Ray only) joins a running cluster, e.g.
    ``"auto"`` or ``"ray://head:10001"``; ``out`` must then be a folder every node sees.
    ``notify`` receives one line per event (skipped, done, failed).
    """
    configs, axes = expand(grid)
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}", hint="choose 'local' or 'ray'")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers={workers!r} must be a positive integer", hint="e.g. workers=2")
    if address is not None and backend != "ray":
        raise ConfigError("address is for the Ray backend", hint="add backend='ray'")
    say = notify or (lambda line: None)
    root = Path(out).resolve()
    if root.exists() and not root.is_dir():
        raise ConfigError(f"out={str(out)!r} is a file, not a folder",
                          hint="give the sweep a folder for its runs, e.g. out='sweeps/a'")
    root.mkdir(parents=True, exist_ok=True)
    names = [run_name(c, axes) for c in configs]
    records: dict[str, dict[str, Any]] = {}
    todo: list[tuple[TaskConfig, str]] = []
    for config, name in zip(configs, names):
        done = read_record(root / name)
        if done is None and (root / name).exists():
            raise ConfigError(f"{root / name} exists and is not a complete run of this sweep",
                              hint="move or delete it, or give the sweep a new --out folder")
        if done is None:
            todo.append((config, name))
            continue
        if done["config"] != dataclasses.asdict(config):
            raise ConfigError(
                f"{root / name} holds a run of another configuration than {name!r} now asks for",
                hint="give the sweep a new --out folder, or delete that run to redo it")
        records[name] = done
        say(f"skipped {name}: already complete")
    if todo:
        from gradprobe.lab import sweep_backends

        run_all = sweep_backends.ray_pool if backend == "ray" else sweep_backends.local_pool
        for record in run_all(todo, root, workers=workers, address=address, notify=say):
            records[record["name"]] = record
    skipped = [n for n in names if n in records and n not in {name for _, name in todo}]
    table = make_table([records[n] for n in names], axes, skipped)
    result = SweepResult(table=table, runs={n: root / n for n in names if not records[n]["error"]},
                         skipped=skipped, failed=[n for n in names if records[n]["error"]])
    result.files = write(result, root, axes, figure=figure)
    return result


COLUMNS = ("status", "final_loss", "train_acc", "test_acc", "last_step_loss",
           "first_layer", "last_layer", "first_grad_rms_first_step", "last_grad_rms_first_step",
           "grad_ratio_first_step", "first_grad_rms_last_step", "last_grad_rms_last_step",
           "grad_ratio_last_step", "findings", "rules", "seconds", "error")
"""The table's columns after ``run`` and the grid's axes."""


def make_table(records: Sequence[Mapping[str, Any]], axes: Sequence[str],
               skipped: Sequence[str] = ()) -> pd.DataFrame:
    """One row per record: ``run``, the grid's axes, then :data:`COLUMNS` (``status`` is
    ``ran``, ``skipped`` (complete before this sweep) or ``failed``; missing values NaN)."""
    rows = []
    for r in records:
        row: dict[str, Any] = {"run": r["name"], **{a: r["config"][a] for a in axes}}
        for col in COLUMNS:
            row[col] = r.get(col)
        row["status"] = "failed" if r.get("error") else \
            "skipped" if r["name"] in skipped else "ran"
        row["rules"] = (", ".join(r.get("rules") or []) or "none") if not r.get("error") else None
        rows.append(row)
    table = pd.DataFrame(rows, columns=["run", *axes, *COLUMNS])
    numeric = [c for c in COLUMNS if c not in ("status", "first_layer", "last_layer", "rules",
                                               "error")]
    table[numeric] = table[numeric].apply(pd.to_numeric, errors="coerce")
    return table


def seed_means(table: pd.DataFrame, axes: Sequence[str]) -> pd.DataFrame:
    """One row per configuration apart from its seed (the grid's other axes), over the runs
    that did not fail: ``runs``, the mean ``final_loss`` and the geometric mean of
    ``grad_ratio_last_step`` (a ratio, drawn on a log axis; its positive values only)."""
    ok = table[table["status"] != "failed"].assign(_all="all")
    keys = [a for a in axes if a != "seed"] or ["_all"]
    ratio = ok["grad_ratio_last_step"].where(ok["grad_ratio_last_step"] > 0)
    groups = ok.assign(_log_ratio=np.log(ratio)).groupby(keys, sort=False, dropna=False)
    means = groups.agg(runs=("run", "size"), final_loss=("final_loss", "mean"),
                       grad_ratio_last_step=("_log_ratio", "mean"))
    means["grad_ratio_last_step"] = np.exp(means["grad_ratio_last_step"])
    return means.reset_index().drop(columns=["_all"], errors="ignore")


def write(result: SweepResult, root: Path, axes: Sequence[str], *, figure: bool = True) -> list[Path]:
    """``sweep.csv``, ``sweep.md`` and (with ``figure``) ``sweep.png``/``.svg`` under ``root``,
    each written to a temporary name and renamed."""
    from gradprobe.lab.base import _markdown, _save_figure

    files = []

    def atomic(name: str, writer: Callable[[Path], object]) -> None:
        path = root / name
        tmp = path.with_name(f".{name}.tmp")
        writer(tmp)
        tmp.replace(path)
        files.append(path)

    atomic("sweep.csv", lambda p: result.table.to_csv(p, index=False))
    atomic("sweep.md", lambda p: p.write_text(_markdown(result.table) + "\n"))
    if figure and result.runs:
        from gradprobe.lab.sweep_plot import plot

        fig = plot(result.table, seed_means(result.table, axes), axes)
        for fmt in ("png", "svg"):
            atomic(f"sweep.{fmt}", lambda p, f=fmt: _save_figure(fig, f, p))  # type: ignore[misc]
    return files


__all__ = ["BACKENDS", "COLUMNS", "SweepResult", "expand", "load_grid", "make_table",
           "seed_means", "sweep", "write"]
