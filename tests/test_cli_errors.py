"""Every usage error of the ``gradprobe`` command is one line and a hint, exit status 2.

Run as a real process against the installed typer (which raises the exceptions of its own
vendored click), never a mock.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "gradprobe.cli.main", *args],
                          capture_output=True, text=True, env=env, timeout=300)


CASES = {
    "unknown-command": (["bogus"], "No such command 'bogus'", "see `gradprobe --help`"),
    "no-arguments": ([], "Missing command", "choose one of: "),
    "group-without-command": (["runs"], "Missing command", "choose one of: compare, ls, show"),
    "missing-argument": (["runs", "show"], "Missing argument", "`gradprobe runs show --help`"),
    "option-without-value": (["runs", "show", "x", "--kind"], "'--kind' requires an argument",
                             "--help"),
    "bad-option-value": (["preflight", "--batch", "abc"], "Invalid value for '--batch'",
                         "`gradprobe preflight --help`"),
    "value-out-of-range": (["doctor", "--workers", "0"], "Invalid value for '--workers'",
                           "`gradprobe doctor --help`"),
    "unknown-option": (["--bogus"], "No such option: --bogus", "`gradprobe --help`"),
    "extra-argument": (["runs", "ls", "a", "b"], "unexpected extra argument", "gradprobe runs ls"),
    "bad-kind": (["runs", "show", ".", "--kind", "nope"], "unknown kind 'nope'", "choose from"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_usage_error_is_one_line_and_a_hint(case):
    args, message, hint = CASES[case]
    out = _cli(*args)
    assert out.returncode == 2, (out.returncode, out.stderr)
    lines = out.stderr.splitlines()
    assert len(lines) == 2, out.stderr
    assert lines[0].startswith("error: ") and message in lines[0], lines[0]
    assert lines[1].startswith("hint: ") and hint in lines[1], lines[1]
    assert "Traceback" not in out.stderr and out.stdout == ""


def test_debug_shows_the_traceback():
    out = _cli("--debug", "bogus")
    assert out.returncode != 0 and "Traceback" in out.stderr and "bogus" in out.stderr


def test_help_still_works():
    out = _cli("runs", "--help")
    assert out.returncode == 0 and "ls" in out.stdout and out.stderr == ""


def test_the_caught_classes_are_those_the_installed_typer_raises():
    import typer

    from gradprobe.cli.main import _click_exceptions, app

    click_exception, usage_error = _click_exceptions()
    with pytest.raises(Exception) as info:
        typer.main.get_command(app).main(["bogus"], standalone_mode=False)
    assert isinstance(info.value, usage_error) and isinstance(info.value, click_exception)
