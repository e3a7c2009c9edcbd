"""``gradprobe runs ls DIR`` (the runs under a directory), ``gradprobe runs show RUN`` and
``gradprobe runs compare A B [...] [-o compare.html]`` (a table here, figures in the HTML).

Other ``runs`` subcommands attach to :data:`app` with ``@app.command``.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import typer

from gradprobe.errors import GradprobeError, RunDirError

app = typer.Typer(name="runs", help="List, inspect and compare recorded runs.", no_args_is_help=True)


def find_runs(root: Path, max_depth: int = 3) -> list[Path]:
    """Run directories (holding ``meta.json``) at or below ``root``, sorted by path."""
    if not root.is_dir():
        raise RunDirError(f"{str(root)!r} is not a directory", hint="pass a folder of runs")
    found: list[Path] = []

    def walk(d: Path, depth: int) -> None:
        if (d / "meta.json").is_file():
            found.append(d)
            return
        if depth >= max_depth:
            return
        for child in sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")):
            walk(child, depth + 1)

    walk(root, 0)
    return found


def summary(path: Path) -> dict[str, Any]:
    """One line of ``runs ls``: status, steps, layers, last loss, non-finite events, model,
    and a note naming what is missing (damaged or lost parts, an interrupted close).
    Damage is reported in the note, not as warnings."""
    from gradprobe.store.run import Run

    run = Run.open(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # RunDataWarning: run.damaged says it below
        meta = run.meta
        losses = run.losses()
        scalars = run.raw_scalars()
        events = len(run.events())
        damaged = run.damaged
    notes = []
    status = str(meta.get("status", "?"))
    if status in ("interrupted", "failed"):
        last = meta.get("committed_step")
        notes.append(f"{status}: nothing on disk after step {last}" if last is not None
                     else f"{status}: no step on disk")
    lost = [d for d in damaged if d.file != "events.jsonl"]
    if lost:
        notes.append(f"{len(lost)} damaged part{'s' if len(lost) > 1 else ''} ({lost[0]})")
    notes += [str(d) for d in damaged if d.file == "events.jsonl"]
    return {
        "run": str(path),
        "status": status + ("*" if lost or status in ("interrupted", "failed") else ""),
        "steps": int(scalars["step"].max()) + 1 if len(scalars) else 0,
        "layers": len(meta.get("layers", [])),
        "last_loss": float(losses["loss"].iloc[-1]) if len(losses) else math.nan,
        "events": events,
        "model": meta.get("config", {}).get("model", "?"),
        "note": "; ".join(notes),
    }


def _unreadable(path: Path, exc: Exception) -> dict[str, Any]:
    """The line of ``runs ls`` for a run that cannot be read at all."""
    reason = exc.message if isinstance(exc, GradprobeError) else f"{type(exc).__name__}: {exc}"
    return {"run": str(path), "status": "unreadable", "steps": "-", "layers": "-",
            "last_loss": math.nan, "events": "-", "model": "-", "note": reason}


def _cell(v: Any) -> str:
    """A table cell on one line: control characters (a newline in a module name) escaped."""
    text = ("-" if math.isnan(v) else f"{v:.4g}") if isinstance(v, float) else str(v)
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)



@app.command("ls")
def ls(directory: Path = typer.Argument(Path("runs"), help="Folder holding run directories.")) -> None:
    """List the runs under DIRECTORY with their status, steps, layers and last loss.

    A run that cannot be read is listed as ``unreadable`` with the reason; a status marked
    ``*`` has steps missing (the note says which)."""
    runs = find_runs(directory)
    if not runs:
        typer.echo(f"no runs under {directory}")
        return
    rows = []
    for p in runs:
        try:
            rows.append(summary(p))
        except Exception as exc:  # one bad run never hides the others
            rows.append(_unreadable(p, exc))
    cols = ["run", "status", "steps", "layers", "last_loss", "events", "model", "note"]
    widths = {c: max(len(c), *(len(_cell(r[c])) for r in rows)) for c in cols}
    typer.echo("  ".join(c.ljust(widths[c]) for c in cols).rstrip())
    for r in rows:
        typer.echo("  ".join(_cell(r[c]).ljust(widths[c]) for c in cols).rstrip())


@app.command("show")
def show(
    run_dir: Path = typer.Argument(..., help="A run directory."),
    kind: str = typer.Option("grad", help="Kind whose last recorded step is tabulated."),
) -> None:
    """Show a run: its configuration, and one line per layer with the last step's statistics."""
    from gradprobe.errors import ConfigError
    from gradprobe.stats.schema import KINDS
    from gradprobe.store.run import Run

    if kind not in KINDS:
        raise ConfigError(f"unknown kind {kind!r}", hint=f"choose from {', '.join(KINDS)}")
    run = Run.open(run_dir)
    info = summary(run_dir)
    typer.echo(_cell(f"run {run_dir}: {info['status']}, {info['steps']} steps, {info['layers']} "
                     f"layers, model {info['model']}, {info['events']} non-finite events"))
    if info["note"]:
        typer.echo(_cell(f"missing: {info['note']}"))
    cfg = run.meta.get("config", {})
    typer.echo(_cell("config: " + ", ".join(f"{k}={v}" for k, v in cfg.items())))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the damage is in the "missing:" line above
        df = run.scalars(kinds=kind)
    if df.empty:
        typer.echo(f"no {kind} statistics recorded yet")
        return
    last = df[df["step"] == df["step"].max()]
    cols = ["layer", "count", "norm", "rms", "abs_max", "zero_frac", "saturated_frac",
            "dead_frac", "nonfinite"]
    typer.echo(f"{kind} at step {int(last['step'].iloc[0])}:")
    table = [[_cell(v) for v in row] for row in last[cols].itertuples(index=False)]
    widths = [max(len(c), *(len(r[i]) for r in table)) for i, c in enumerate(cols)]
    typer.echo("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in table:
        typer.echo("  ".join(v.ljust(w) for v, w in zip(r, widths)))


@app.command("compare")
def compare_cmd(
    run_dirs: list[Path] = typer.Argument(..., help="Two or more run directories."),
    out: Path = typer.Option(Path("compare.html"), "-o", "--out",
                             help="HTML file to write (its folder must exist)."),
    label: list[str] = typer.Option(None, "--label", help="A name per run, in order (repeat)."),
) -> None:
    """Compare runs: a table of final loss, findings and first/last layer gradient RMS here,
    with overlaid loss curves, depth profiles and gradient RMS in the HTML page."""
    from rich.markup import escape
    from rich.table import Table

    from gradprobe.cli.lab import _console
    from gradprobe.report import comparison, page

    if len(run_dirs) < 2:
        from gradprobe.errors import ConfigError

        raise ConfigError("runs compare needs at least two runs",
                          hint="gradprobe runs compare RUN_A RUN_B [...] -o compare.html")
    page.check_out(out, "compare.html")  # before reading anything
    frames = comparison.load(run_dirs, labels=label or None)
    rows = comparison.rows(frames)
    table = Table(title="runs compared", title_style="bold")
    for col in comparison.TABLE_COLUMNS:
        table.add_column(col, justify="right" if "RMS" in col or col in ("steps", "last-step loss",
                                                                          "findings") else "left")
    for r in rows:
        table.add_row(*(escape(comparison.fmt(r[c])) for c in comparison.TABLE_COLUMNS))
    console = _console()
    console.print(table)
    path = comparison.compare(run_dirs, out, frames=frames)
    console.print(f"[dim]figures written to {escape(str(path))}[/]", highlight=False)


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="runs")


__all__ = ["app", "compare_cmd", "find_runs", "register", "summary"]
