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
