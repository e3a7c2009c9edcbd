"""Comparing runs: the HTML page, its table, and the CLI (``report``, ``runs compare``)."""

from __future__ import annotations

import html
import math
import re
import subprocess
import sys

import pytest
from torch import nn

import gradprobe as gp
from gradprobe.diagnose import Diagnosis
from gradprobe.report import compare
from gradprobe.report import comparison as C
from test_report import FIGURES, HOSTILE, make_run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("cmp")
    return make_run(d / "before", steps=10), make_run(d / "after", steps=8, activation=nn.ReLU)


def test_compare_two_runs(runs, tmp_path):
    before, after = runs
    out = compare([before, after.path], tmp_path / "c.html", labels=["before", HOSTILE],
                  diagnoses=[Diagnosis([]), None])
    text = out.read_text(encoding="utf-8")
    for sec in ("table", "loss", "act-grad-profile", "first-last"):
        assert f'<section id="{sec}">' in text
        if sec != "table":
            assert f'<figure id="fig-{sec}"><img class="figure"' in text
    assert HOSTILE not in text and html.escape(HOSTILE) in text
    assert len(re.findall(r"<script\b", text)) == 1 and "http://" not in text.replace(
        "http://www.w3.org", "")


def test_table_rows_are_the_runs_values(runs):
    before, after = runs
    frames = C.load([before, after], diagnoses=[Diagnosis([]), None])
    rows = C.rows(frames)
    assert [r["run"] for r in rows] == ["before", "after"]
    assert [r["steps"] for r in rows] == [10, 8]
    assert rows[0]["last-step loss"] == pytest.approx(float(before.losses()["loss"].iloc[-1]))
    grads = before.scalars(kinds="grad")
    last = grads[grads["step"] == grads["step"].max()].set_index("layer")["rms"]
    assert rows[0]["first layer"] == "inp" and rows[0]["last layer"] == "out"
    assert rows[0]["first-layer grad RMS"] == pytest.approx(last["inp"])
    assert rows[0]["last-layer grad RMS"] == pytest.approx(last["out"])
    assert rows[0]["findings"] == 0 and rows[0]["rules"] == "none"
    assert C.fmt(math.nan) == "-" and C.fmt(None) == "n/a"


def test_compare_needs_two_runs(runs, tmp_path):
    before, _ = runs
    with pytest.raises(gp.ConfigError, match="at least two runs"):
        compare([before], tmp_path / "c.html")
    with pytest.raises(gp.ConfigError, match="at least two runs"):
        compare(before.path, tmp_path / "c.html")
    with pytest.raises(gp.ConfigError, match="labels"):
        compare([before, before], tmp_path / "c.html", labels=["one"])


def _cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gradprobe.cli.main", *args],
                          capture_output=True, text=True, cwd=cwd)


def test_cli_report_and_compare(runs, tmp_path):
    before, after = runs
    out = _cli("report", str(before.path), "-o", str(tmp_path / "r.html"))
    assert out.returncode == 0, out.stderr
    assert "report written to" in out.stdout and (tmp_path / "r.html").is_file()
    text = (tmp_path / "r.html").read_text()
    assert all(f'id="fig-{f}"' in text for f in FIGURES)
    out = _cli("runs", "compare", str(before.path), str(after.path), "-o",
               str(tmp_path / "c.html"))
    assert out.returncode == 0, out.stderr
    assert "last-step loss" in out.stdout and "before" in out.stdout and "after" in out.stdout
    assert (tmp_path / "c.html").is_file()


@pytest.mark.parametrize("args, message", [
    (["report", "{tmp}/nowhere"], "not a gradprobe run"),
    (["report", "{before}", "-o", "{tmp}/missing/r.html"], "does not exist"),
    (["runs", "compare", "{before}"], "at least two runs"),
    (["runs", "compare", "{before}", "{tmp}/nowhere"], "not a gradprobe run"),
    (["runs", "compare", "{before}", "{before}", "-o", "{tmp}/missing/c.html"], "does not exist"),
], ids=["bad-run", "report-out-dir", "one-run", "compare-bad-run", "compare-out-dir"])
def test_cli_bad_inputs(runs, tmp_path, args, message):
    before, _ = runs
    argv = [a.format(tmp=tmp_path, before=before.path) for a in args]
    out = _cli(*argv)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert lines[0].startswith("error:") and message in lines[0]
    assert len(lines) == 2 and lines[1].startswith("hint:")
    assert not list(tmp_path.glob("*.html"))
