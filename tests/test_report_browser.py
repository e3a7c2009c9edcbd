"""The report in a real headless browser: it loads offline, logs nothing, and every figure decodes.

Needs Debian's ``chromium`` (``apt-get install chromium``); skipped with the reason where it is
absent. The page's own inline script writes ``data-figures="decoded/total"`` on ``<body>`` at the
load event; ``--dump-dom`` prints the DOM after it. Console messages (errors included) appear in
chromium's log as ``:CONSOLE`` lines.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile

import pytest

import gradprobe as gp
from gradprobe.diagnose import Diagnosis
from test_report import FIGURES, finding, make_run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed "
                                "(apt-get install chromium)")

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--enable-logging=stderr", "--v=0"]


def _chromium(*args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def report_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("browser")
    return gp.report(make_run(d / "run"), d / "report.html", diagnosis=Diagnosis([finding()]))


def _console(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


def test_report_loads_without_console_errors_and_shows_every_figure(report_file, tmp_path):
    out = report_file
    dom = _chromium("--dump-dom", out.resolve().as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert _console(dom.stderr) == []
    body = re.search(r"<body[^>]*>", dom.stdout)
    assert body is not None
    assert f'data-figures="{len(FIGURES)}/{len(FIGURES)}"' in body.group(0)
    png = tmp_path / "shot.png"
    shot = _chromium("--hide-scrollbars", "--window-size=1280,4000",
                     f"--screenshot={png}", out.resolve().as_uri())
    assert shot.returncode == 0 and png.stat().st_size > 50_000  # a page of figures, not blank


def test_counter_sees_a_broken_figure(tmp_path):
    """The check above can fail: a figure that does not decode is counted as missing."""
    page = tmp_path / "broken.html"
    from gradprobe.report import page as P

    page.write_text(P.page("t", "", [], '<img class="figure" src="data:image/png;base64,AAAA">'))
    dom = _chromium("--dump-dom", page.resolve().as_uri())
    assert 'data-figures="0/1"' in dom.stdout
