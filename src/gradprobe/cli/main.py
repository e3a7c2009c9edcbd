"""Entry point of the ``gradprobe`` command.

Errors that gradprobe raises on purpose print one line (and a hint); ``--debug`` shows the
traceback instead. Each command group lives in its own module and is registered in
:func:`_register`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import cache

import typer

from gradprobe.errors import GradprobeError

app = typer.Typer(
    name="gradprobe",
    help="Find, explain and fix unstable gradients in PyTorch networks.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)



@dataclass(frozen=True)
class CliContext:
    """What the root options tell every command: Typer's ``ctx.obj`` (a command reads it as
    ``ctx.ensure_object(CliContext)``), so no command depends on module state."""

    debug: bool = False


@app.callback()
def _root(
    ctx: typer.Context,
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks instead of one-line errors."),
) -> None:
    ctx.obj = CliContext(debug=debug)


@app.command("env")
def env() -> None:
    """Print the versions and devices gradprobe sees (paste this into bug reports)."""
    import platform

    import numpy
    import torch

    from gradprobe._version import __version__

    rows = [
        ("gradprobe", __version__),
        ("python", platform.python_version()),
        ("platform", platform.platform()),
        ("torch", torch.__version__),
        ("numpy", numpy.__version__),
        ("cuda available", str(torch.cuda.is_available())),
        ("threads", str(torch.get_num_threads())),
    ]
    for name, value in rows:
        typer.echo(f"{name:>15}  {value}")


@cache
def _register() -> None:
    """Attach the command groups to :data:`app`, once (``cache``: a second call is a no-op).
    Each import is cheap: heavy work happens inside commands."""
    from gradprobe.cli import groups

    groups.register(app)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; exit code 2 and a one-line message for a GradprobeError."""
    _register()
    args = sys.argv[1:] if argv is None else argv
    # read from the arguments: an error may come before the root callback builds CliContext
    debug = "--debug" in args
    try:
        # In non-standalone mode click returns typer.Exit's code instead of exiting.
        code = app(args=args, standalone_mode=False)
        if isinstance(code, int) and code != 0:
            sys.exit(code)
    except GradprobeError as err:
        if debug:
            raise
        typer.echo(f"error: {err.message}", err=True)
        if err.hint:
            typer.echo(f"hint: {err.hint}", err=True)
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except Exception as exc:  # click usage errors come through here in non-standalone mode
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
