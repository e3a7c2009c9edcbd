"""``gradprobe lab sweep``: a grid of training configurations, one run each, one table and one
figure (:func:`gradprobe.lab.sweep.sweep`).

The grid comes from ``--grid FILE`` (JSON or YAML: a mapping of field -> list of values, or a
list of configurations) and/or ``--set FIELD=V1,V2`` (repeatable; it adds a field to a mapping
grid, or replaces the file's values of that field)::

    gradprobe lab sweep --set activation=relu,tanh --set depth=2,8 --set epochs=20 --out sweeps/a
    gradprobe lab sweep --grid grid.yaml --out sweeps/b --workers 4
    gradprobe lab sweep --grid grid.json --out /shared/sweeps/c --backend ray --address auto
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from gradprobe.cli.lab import _console, _fmt, app
from gradprobe.errors import ConfigError

SHOWN = ("status", "final_loss", "test_acc", "grad_ratio_first_step", "grad_ratio_last_step",
         "rules")
"""The columns printed after the grid's axes, and ``error`` when a run failed (``sweep.csv``
holds them all)."""


def parse_sets(items: list[str]) -> dict[str, list[str]]:
    """``["activation=relu,tanh", "depth=4"]`` -> ``{"activation": ["relu", "tanh"], "depth": ["4"]}``.

    >>> parse_sets(["activation=relu,tanh", "depth=4"])
    {'activation': ['relu', 'tanh'], 'depth': ['4']}
    """
    out: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().replace("-", "_")
        parts = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key or not parts:
            raise ConfigError(f"--set {item!r} is not FIELD=VALUE[,VALUE...]",
                              hint="e.g. --set activation=relu,tanh --set depth=4,8")
        if key in out:
            raise ConfigError(f"--set gives {key!r} twice", hint=f"list every value once: "
                              f"--set {key}={','.join(out[key] + parts)}")
        out[key] = parts
    return out


def build_grid(grid_file: Path | None, sets: list[str]) -> Any:
    """The grid of ``--grid`` with the ``--set`` fields applied."""
    from gradprobe.lab.sweep import load_grid

    extra = parse_sets(sets)
    if grid_file is None:
        if not extra:
            raise ConfigError("no grid given",
                              hint="pass --grid grid.json or --set FIELD=V1,V2 (repeatable)")
        return extra
    grid = load_grid(grid_file)
    if extra:
        if not isinstance(grid, dict):
            raise ConfigError(f"--set needs a grid file holding a mapping; {grid_file} holds a "
                              "list of configurations", hint="put the field in each configuration")
        grid = {**grid, **extra}
    return grid


def sweep_cmd(
    grid_file: Path | None = typer.Option(
        None, "--grid", help="JSON or YAML file: field -> list of values, or a list of configurations."),
    sets: list[str] = typer.Option(
        [], "--set", help="FIELD=V1,V2: one grid axis (repeatable), e.g. --set depth=4,8."),
    out: Path = typer.Option(Path("results/sweep"), "--out",
                             help="Folder of the runs, the table and the figure."),
    workers: int = typer.Option(1, "--workers", help="Configurations run at once."),
    backend: str = typer.Option("local", "--backend", help="local (process pool) or ray."),
    address: str | None = typer.Option(
        None, "--address", help="Ray cluster to join (e.g. auto, ray://head:10001); "
        "without it a local Ray instance starts."),
) -> None:
    """Train a grid of MLP configurations (activation, init, depth, width, seed, lr, ...):
    one recorded run each, then one table (final loss, accuracy, gradient depth profile,
    findings) and one figure. Complete runs are skipped; a failing one is a row with its error."""
    from rich.markup import escape
    from rich.table import Table

    from gradprobe.lab.sweep import BACKENDS, sweep

    if backend not in BACKENDS:  # before any work, with the choices
        raise ConfigError(f"unknown backend {backend!r}", hint="use --backend local or --backend ray")
    grid = build_grid(grid_file, sets)
    console = _console()

    def notify(line: str) -> None:
        console.print(escape(line), highlight=False)

    result = sweep(grid, out=out, workers=workers, backend=backend,  # type: ignore[arg-type]
                   address=address, notify=notify)
    frame = result.table
    shown = [*frame.columns[1:frame.columns.get_loc("status")], *SHOWN]
    shown += ["error"] if result.failed else []
    table = Table(title=f"sweep: {len(frame)} configurations", title_style="bold")
    for col in shown:
        table.add_column(col, justify="right" if frame[col].dtype.kind in "fiu" else "left")
    for row in frame[shown].itertuples(index=False):
        table.add_row(*(escape("" if v is None else _fmt(v)) for v in row))
    console.print(table)
    console.print(f"[dim]{len(frame) - len(result.skipped) - len(result.failed)} ran, "
                  f"{len(result.skipped)} skipped (already complete), {len(result.failed)} failed; "
                  f"table and figure written to {escape(str(out))}[/]", highlight=False)


def register(root: typer.Typer) -> None:
    """Add ``sweep`` to the ``lab`` group (``root`` already holds it: see cli/groups.py)."""
    import dataclasses

    from gradprobe.lab.sweep_task import TaskConfig

    fields = ", ".join(f"{f.name} ({f.default})" for f in dataclasses.fields(TaskConfig))
    app.command("sweep", epilog=f"Grid fields (default): {fields}.")(sweep_cmd)
