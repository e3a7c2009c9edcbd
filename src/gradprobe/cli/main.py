"""Entry point of the ``gradprobe`` command.

Errors that gradprobe raises on purpose print one line (and a hint); ``--debug`` shows the
traceback instead. Each command group lives in its own module and is registered in
:func:`_register`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import cache
from typing import Any, NoReturn

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


def _click_exceptions() -> tuple[type[Exception], type[Exception]]:
    """``(ClickException, UsageError)`` of the click that the installed typer raises.

    typer >= 0.24 vendors its own copy of click (``typer._click``), whose exceptions are not
    those of the ``click`` package; older releases use ``click`` itself.
    """
    import importlib

    try:
        exceptions = importlib.import_module("typer._click.exceptions")
    except ImportError:  # a typer that uses the click package
        exceptions = importlib.import_module("click.exceptions")
    return exceptions.ClickException, exceptions.UsageError


def _usage_error(exc: Exception) -> tuple[str, str]:
    """One line saying what is wrong with the command line, and a hint naming the help (and
    the subcommands, when a group was given none)."""
    ctx = getattr(exc, "ctx", None)
    command = getattr(ctx, "command_path", None) or "gradprobe"
    hint = f"see `{command} --help`"
    names = sorted(getattr(getattr(ctx, "command", None), "commands", None) or {})
    if names:
        hint = f"choose one of: {', '.join(names)}; " + hint
    message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
    return " ".join(str(message).split()), hint  # one line


def _command() -> Any:
    """The click command of :data:`app`, whose groups answer no arguments with a usage error
    ("Missing command.") instead of the help text (typer's ``no_args_is_help`` prints the
    whole help before raising)."""
    command = typer.main.get_command(app)
    todo = [command]
    while todo:
        cmd = todo.pop()
        sub = getattr(cmd, "commands", None)
        if sub is not None:
            cmd.no_args_is_help = False
            todo.extend(sub.values())
    return command


def _fail(message: str, hint: str | None) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    if hint:
        typer.echo(f"hint: {hint}", err=True)
    sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI: exit status 2, one line and a hint for a GradprobeError or a usage error
    (an unknown command or option, a missing or bad argument, no command at all)."""
    _register()
    args = sys.argv[1:] if argv is None else argv
    # read from the arguments: an error may come before the root callback builds CliContext
    debug = "--debug" in args
    click_exception, usage_error = _click_exceptions()
    try:
        # In non-standalone mode click returns typer.Exit's code instead of exiting.
        code = _command()(args=args, prog_name="gradprobe", standalone_mode=False)
        if isinstance(code, int) and code != 0:
            sys.exit(code)
    except GradprobeError as err:
        if debug:
            raise
        _fail(err.message, err.hint)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except usage_error as exc:
        if debug:
            raise
        _fail(*_usage_error(exc))
    except click_exception as exc:  # e.g. a file argument that cannot be opened
        if debug:
            raise
        _fail(" ".join(str(exc.format_message()).split()), None)  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
