"""``gradprobe lab list`` and ``gradprobe lab run NAME [--option value ...] [--out DIR] [--seed N]``
(``gradprobe lab sweep`` lives in :mod:`gradprobe.cli.lab_sweep`).

Options after the experiment's name are its config fields (``--depth 20``, ``--scales 1.5,0.5``,
``--depth=20``; dashes and underscores are interchangeable; a bare ``--flag`` sets a boolean),
converted by :func:`gradprobe.lab.base.make_config`, which rejects unknown names and bad values
with one clear error.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import typer

from gradprobe.errors import ConfigError

app = typer.Typer(
    name="lab",
    help="Classic experiments on vanishing and exploding gradients, with figures and tables.",
    no_args_is_help=True,
)


def parse_options(args: list[str]) -> dict[str, str]:
    """Turn ``["--depth", "20", "--scales=1.5,0.5", "--flag"]`` into ``{"depth": "20", ...}``.

    >>> parse_options(["--depth", "20", "--scales=1.5,0.5", "--log-scale"])
    {'depth': '20', 'scales': '1.5,0.5', 'log_scale': 'true'}
    """
    options: dict[str, str] = {}
    i = 0
    while i < len(args):
        token = args[i]
        if not token.startswith("--") or token == "--":
            raise ConfigError(
                f"unexpected argument {token!r}",
                hint="experiment options are given as --name value (see `gradprobe lab list`)",
            )
        key, sep, value = token[2:].partition("=")
        key = key.replace("-", "_")
        if not sep:
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                value = args[i + 1]
                i += 1
            else:
                value = "true"
        if key in options:
            raise ConfigError(f"option --{key} given twice", hint="give each option once")
        options[key] = value
        i += 1
    return options


def _console() -> Any:
    """A rich console; when output is not a terminal (a file, a pipe), wide enough for tables."""
    import sys

    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=140)


def _fmt(value: Any) -> str:
    if isinstance(value, bool):  # as the option is typed: --part1 false
        return "true" if value else "false"
    if isinstance(value, float):
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.4g}"
        return f"{value:.3e}"
    if isinstance(value, tuple):
        return ",".join(_fmt(v) for v in value)
    return str(value)


@app.command("list")
def list_cmd() -> None:
    """List the experiments with their options and defaults."""
    from rich.table import Table

    from gradprobe.lab import list_experiments

    table = Table(title="gradprobe lab experiments", show_lines=True)
    table.add_column("name", style="bold cyan", no_wrap=True)
    table.add_column("what it shows")
    table.add_column("options (default)")
    for exp in list_experiments():
        defaults = exp.config_cls()
        opts = ", ".join(
            f"--{f.name.replace('_', '-')} {_fmt(getattr(defaults, f.name))}"
            for f in dataclasses.fields(exp.config_cls)
        )
        table.add_row(exp.name, exp.summary, opts)
    _console().print(table)


@app.command(
    "run", context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def run_cmd(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Experiment name (see `gradprobe lab list`)."),
    out: Path | None = typer.Option(
        None, "--out", help="Output folder for figures, tables and runs [default: results/NAME]."
    ),
    seed: int | None = typer.Option(None, "--seed", help="Random seed (the config's seed)."),
    strict: bool = typer.Option(
        False, "--strict", help="Exit with status 1 when a claim does not hold."
    ),
) -> None:
    """Run one experiment: progress bar, the main table, the claims (✓/✗), files under --out."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from gradprobe import lab
    from gradprobe.lab import base

    options: dict[str, Any] = dict(parse_options(list(ctx.args)))
    if seed is not None:
        if "seed" in options:
            raise ConfigError("--seed given twice", hint="give --seed once")
        options["seed"] = seed
    exp = base.get(name)
    if "seed" in options and "seed" not in {f.name for f in dataclasses.fields(exp.config_cls)}:
        raise ConfigError(f"experiment {name!r} has no seed", hint="run it without --seed")
    config = base.make_config(name, **options)  # validate before any work or output
    out_dir = out if out is not None else Path("results") / name
    console = _console()

    with Progress(
        TextColumn("[bold]{task.fields[exp]}[/] {task.description}"), BarColumn(),
        TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
        console=console, transient=False,
    ) as bar:
        task = bar.add_task("starting", total=None, exp=name)

        def progress(description: str, done: int, total: int) -> None:
            bar.update(task, description=description, completed=done, total=total)

        result = exp.run(config, progress=progress, out=out_dir)
        bar.update(task, description="writing figures and tables")
        lab.write(result, out_dir)
        bar.update(task, description="done")

    print_result(result, console, out_dir)
    if strict and not all(c.holds for c in result.claims):
        # sys.exit, not typer.Exit: the entry point runs click with standalone_mode=False, where
        # click turns Exit into a return value that would be dropped
        import sys

        sys.exit(1)


def print_result(result: Any, console: Any, out_dir: Path) -> None:
    """The main table, then the claims with ✓/✗ and their evidence, then where files went."""
    from rich.table import Table

    frame = result.table
    table = Table(title=f"{result.name}: main table", title_style="bold")
    for col in frame.columns:
        table.add_column(str(col), justify="right" if frame[col].dtype.kind in "fiu" else "left")
    for row in frame.itertuples(index=False):
        table.add_row(*(_fmt(v) for v in row))
    console.print(table)
    for claim in result.claims:
        mark = "[green]✓[/]" if claim.holds else "[red]✗[/]"
        evidence = f" [dim]({claim.evidence})[/]" if claim.evidence else ""
        console.print(f"{mark} {claim.text}{evidence}", highlight=False)
    console.print(f"[dim]figures, tables and runs written to {out_dir}[/]")


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="lab")
