"""``gradprobe export tensorboard RUN [--out DIR]`` and ``gradprobe export wandb RUN --project P``:
a recorded run as TensorBoard event files or a W&B run (tags in
:mod:`gradprobe.integrations.export`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

import typer

app = typer.Typer(name="export", help="Export a run to TensorBoard or Weights & Biases.",
                  no_args_is_help=True)

_COLUMNS_HELP = "Columns per kind: 'default' (those the diagnosis reads) or 'all'."


def _columns(value: str) -> Literal["default", "all"]:
    from gradprobe.errors import ConfigError

    if value not in ("default", "all"):
        raise ConfigError(f"--columns must be 'default' or 'all', got {value!r}",
                          hint="e.g. --columns all")
    return "all" if value == "all" else "default"


@app.command("tensorboard")
def tensorboard_cmd(
    run_dir: Path = typer.Argument(..., help="A run directory (the run_dir given to gp.Probe)."),
    out: Path = typer.Option(None, "-o", "--out",
                             help="Folder for the event files (default RUN/tensorboard)."),
    columns: str = typer.Option("default", "--columns", help=_COLUMNS_HELP),
    overwrite: bool = typer.Option(False, "--overwrite",
                                   help="Replace the event files already in the folder."),
) -> None:
    """Write RUN as TensorBoard event files: scalars per layer and kind, histograms, non-finite
    events. View them with `tensorboard --logdir DIR`."""
    from gradprobe.integrations import tensorboard
    from gradprobe.integrations.export import open_run

    cols = _columns(columns)
    run = open_run(run_dir)  # a bad RUN is reported before a folder is made
    log_dir = out if out is not None else run_dir / "tensorboard"
    started = time.perf_counter()
    steps = tensorboard.export(run, log_dir, columns=cols,
                               overwrite=overwrite)
    typer.echo(f"{steps} steps written to {log_dir} ({time.perf_counter() - started:.1f} s); "
               f"view with: tensorboard --logdir {log_dir}")


@app.command("wandb")
def wandb_cmd(
    run_dir: Path = typer.Argument(..., help="A run directory (the run_dir given to gp.Probe)."),
    project: str = typer.Option(..., "--project", help="W&B project to log to."),
    name: str = typer.Option(None, "--name", help="W&B run name (default: RUN's folder name)."),
    dir: Path = typer.Option(None, "--dir", help="Folder for W&B's local files."),
    mode: str = typer.Option(None, "--mode",
                             help="online, offline or disabled (default: W&B's settings)."),
    columns: str = typer.Option("default", "--columns", help=_COLUMNS_HELP),
) -> None:
    """Log RUN to a new W&B run in PROJECT: scalars per layer and kind against `probe/step`,
    histograms, non-finite events."""
    from gradprobe.integrations import wandb as gp_wandb
    from gradprobe.integrations.export import open_run

    cols = _columns(columns)
    run = open_run(run_dir)
    gp_wandb._wandb()  # "not installed" before anything starts
    started = time.perf_counter()
    steps = gp_wandb.export(run, project=project, name=name, dir=dir, mode=mode,
                            columns=cols)
    typer.echo(f"{steps} steps logged to W&B project {project} "
               f"({time.perf_counter() - started:.1f} s)")


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="export")


__all__ = ["app", "register"]
