"""``gradprobe diagnose RUN [--json] [--append]``: the findings of a recorded run.

In a terminal the findings are drawn with rich (severity colours, evidence, remedies); ``--json``
prints :meth:`Diagnosis.to_json` for machines; ``--append`` also writes them to the run's
``events.jsonl``. The exit code is 0 whatever was found (a diagnosis is not a failure); a path
that is not a run is one error line with a hint.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from gradprobe.diagnose.finding import Diagnosis

_COLOURS = {"error": "bold red", "warning": "yellow", "info": "cyan"}


def render(diagnosis: Diagnosis) -> None:
    """Draw a :class:`~gradprobe.Diagnosis` in the terminal with rich."""
    from rich.console import Console
    from rich.markup import escape
    from rich.panel import Panel

    console = Console()
    head = f"Diagnosis of {diagnosis.run}" if diagnosis.run else "Diagnosis"
    findings = list(diagnosis)
    if not findings:
        console.print(f"[green]{escape(head)}: no findings: gradients look healthy.[/green]")
        return
    console.print(f"[bold]{escape(head)}[/bold]: {len(findings)} finding(s)")
    for f in findings:
        where = ", ".join(f.layers[:8]) + (" ..." if len(f.layers) > 8 else "")
        steps = "" if f.steps is None else f"  steps {f.steps[0]}-{f.steps[1]}"
        lines = [f"[dim]where:[/dim] {escape(where or 'whole model')}{steps}"]
        lines += [f"[dim]evidence:[/dim] {escape(str(e))}" for e in f.evidence]
        lines.append(f"[dim]why:[/dim] {escape(f.explanation)}")
        lines += [f"[dim]fix {i}:[/dim] [bold]{escape(r.code or r.name)}[/bold]  "
                  f"{escape(r.why)}" for i, r in enumerate(f.remedies, 1)]
        colour = _COLOURS.get(f.severity, "white")
        console.print(Panel("\n".join(lines), title=f"[{colour}]{f.severity}[/{colour}] "
                            f"{escape(f.rule)}", title_align="left", expand=True))


def diagnose(
    run_dir: Path = typer.Argument(..., help="A run directory written by gp.Probe."),
    as_json: bool = typer.Option(False, "--json", help="Print the findings as JSON."),
    append: bool = typer.Option(False, "--append",
                                help="Also append the findings to the run's events.jsonl."),
) -> None:
    """Diagnose a recorded run: findings, the evidence behind each, and ranked remedies."""
    from gradprobe.diagnose import api

    result = api.diagnose(run_dir)
    if append:
        api.append_findings(run_dir, result)
    if as_json:
        typer.echo(result.to_json())
    else:
        render(result)


def register(root: typer.Typer) -> None:
    root.command("diagnose")(diagnose)


__all__ = ["diagnose", "register", "render"]
