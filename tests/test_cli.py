"""The CLI's own behaviour: env, one-line errors, --debug."""

import subprocess
import sys


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gradprobe.cli.main", *args], capture_output=True, text=True
    )


def test_env_prints_versions():
    out = _cli("env")
    assert out.returncode == 0, out.stderr
    assert "torch" in out.stdout and "gradprobe" in out.stdout


def test_unknown_command_is_a_usage_error():
    out = _cli("no-such-command")
    assert out.returncode != 0
    assert "No such command" in out.stderr


def test_typer_exit_code_is_kept():
    import typer

    from gradprobe.cli import main as cli_main

    @cli_main.app.command("_exit-three", hidden=True)
    def _exit_three() -> None:
        raise typer.Exit(3)

    try:
        import pytest

        with pytest.raises(SystemExit) as info:
            cli_main.main(["_exit-three"])
        assert info.value.code == 3
    finally:
        cli_main.app.registered_commands = [
            c for c in cli_main.app.registered_commands if c.name != "_exit-three"
        ]
