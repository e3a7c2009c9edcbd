"""Registration of the command groups: one line per group module."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    # Each group module defines `app` (a typer.Typer) or `register(app)`.
    from gradprobe.cli import lab

    lab.register(app)
    from gradprobe.cli import lab_sweep

    lab_sweep.register(app)
    from gradprobe.cli import preflight

    preflight.register(app)
    from gradprobe.cli import runs

    runs.register(app)
    from gradprobe.cli import diagnose

    diagnose.register(app)
    from gradprobe.cli import doctor

    doctor.register(app)
    from gradprobe.cli import report

    report.register(app)
    from gradprobe.cli import export

    export.register(app)
