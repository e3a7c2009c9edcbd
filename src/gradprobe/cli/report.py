"""``gradprobe report RUN [-o report.html]``: the self-contained HTML report of a run."""

from __future__ import annotations

from pathlib import Path

import typer


def report_cmd(
    run_dir: Path = typer.Argument(..., help="A run directory (the run_dir given to gp.Probe)."),
    out: Path = typer.Option(Path("report.html"), "-o", "--out",
                             help="HTML file to write (its folder must exist)."),
) -> None:
    """Write the HTML report of RUN: the diagnosis, then the figures. One file, works offline."""
    import time

    from gradprobe.report.html import report

    started = time.perf_counter()
    path = report(run_dir, out)
    size = path.stat().st_size / 1e6
    typer.echo(f"report written to {path} ({size:.2f} MB, "
               f"{time.perf_counter() - started:.1f} s)")


def register(root: typer.Typer) -> None:
    root.command("report")(report_cmd)


__all__ = ["register", "report_cmd"]
