"""The HTML report: self-contained, escaped, every section, figures that draw the run's values."""

from __future__ import annotations

import html
import re
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import gradprobe as gp
from gradprobe.diagnose import Diagnosis, Evidence, Finding, Remedy

HOSTILE = "<script>alert('x')</script>"
SECTIONS = ("diagnosis", "grad-rms", "grad-heatmap", "act-grad-profile", "weights", "act-hist",
            "dead-saturated", "loss", "layers")
FIGURES = SECTIONS[1:-1]


def make_run(path: Path, *, steps: int = 12, hist_every: int = 4, activation=nn.Sigmoid,
             seed: int = 0) -> gp.Run:
    """A small MLP whose modules carry hostile names (HTML, mathtext, a leading underscore)."""
    torch.manual_seed(seed)
    model = nn.Sequential(OrderedDict([
        ("inp", nn.Linear(3, 6)), ("a$1$", activation()),
        (HOSTILE, nn.Linear(6, 6)), ("_act", activation()),
        ("out", nn.Linear(6, 2)),
    ]))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gp.Probe(model, opt, run_dir=path, hist_every=hist_every) as probe:
        for _ in range(steps):
            x = torch.randn(16, 3)
            loss = nn.functional.cross_entropy(model(x), (x[:, 0] > 0).long())
            probe.observe_loss(loss)
            loss.backward()
            opt.step()
            opt.zero_grad()
    return probe.run


def finding() -> Finding:
    return Finding(
        rule="vanishing-gradients", severity="error", layers=("inp", HOSTILE), steps=(0, 11),
        evidence=(Evidence("act_grad decay per layer", 0.2, 0.5, "<", note="<b>note</b>"),),
        explanation="Each sigmoid multiplies the backward signal by at most 1/4 & more.",
        remedies=(Remedy("init_", {"scheme": "xavier_uniform"},
                         'gp.remedies.init_(model, "xavier_uniform")', "keeps the variance"),),
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("report")
    run = make_run(d / "run")
    out = gp.report(run, d / "report.html", diagnosis=Diagnosis([finding()], run="run"))
    return run, out, out.read_text(encoding="utf-8")


def test_report_is_self_contained(built):
    _, _, text = built
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.I)
    assert "<link" not in text.lower()
    assert not re.search(r"<script[^>]*\bsrc\s*=", text, re.I)
    assert "url(http" not in text and "@import" not in text
    # the one script is the page's own figure counter
    assert len(re.findall(r"<script\b", text)) == 1
    for src in re.findall(r'<img[^>]*src="([^"]*)"', text):
        assert src.startswith(("data:image/svg+xml;base64,", "data:image/png;base64,"))


def test_hostile_layer_name_is_escaped(built):
    _, _, text = built
    assert HOSTILE not in text
    assert html.escape(HOSTILE, quote=True) in text  # in the findings and the layer table
    assert "&lt;b&gt;note&lt;/b&gt;" in text  # evidence notes are escaped too
    assert "1/4 &amp; more" in text


def test_every_section_and_figure_present(built):
    _, _, text = built
    for sec in SECTIONS:
        assert f'<section id="{sec}">' in text, sec
    for fig in FIGURES:
        assert re.search(rf'<figure id="fig-{fig}"><img class="figure"', text), fig
    assert 'id="time-grads"' not in text  # no recurrent data in this run
    # the diagnosis comes first, with severity, rule, steps, evidence, remedy code
    assert text.index('id="diagnosis"') < text.index('id="grad-rms"')
    assert 'class="badge error"' in text and "vanishing-gradients" in text
    assert "0 – 11" in text and "act_grad decay per layer = 0.2 &lt; 0.5" in text
    assert "gp.remedies.init_(model, &quot;xavier_uniform&quot;)" in text


def test_lines_are_the_runs_values(built):
    """The gradient-RMS figure draws run.scalars()' rms at every shown step, layer by layer."""
    from gradprobe.report import figures as F
    from gradprobe.report.html import layer_info

    run, _, _ = built
    info = layer_info(run)
    scalars = run.scalars(kinds="grad")
    plot = F.grad_rms(scalars, info)
    lines = plot.figure.axes[0].lines
    weights = ["inp", HOSTILE, "out"]
    assert len(lines) == len(weights)
    for line, name in zip(lines, weights):
        ref = scalars[scalars["layer"] == name].set_index("step")["rms"]
        np.testing.assert_array_equal(line.get_xdata(), ref.index.to_numpy())
        np.testing.assert_array_equal(line.get_ydata(), ref.to_numpy())
    # depth order and one colour per layer, the same in every figure
    assert info.order == ["inp", "a$1$", HOSTILE, "_act", "out"]
    assert [tuple(line.get_color()) for line in lines] == [info.colors[n] for n in weights]


def test_thinning_rule():
    from gradprobe.report import figures as F

    steps = np.arange(10_000)
    shown = F.thin_steps(steps)
    assert len(shown) <= F.MAX_POINTS + 1 and shown[0] == 0 and shown[-1] == 9_999
    assert set(np.diff(shown[:-1])) == {25}
    assert "every 25th of 10000" in F.thin_note(steps, shown)
    assert F.thin_note(steps[:50], F.thin_steps(steps[:50])) == ""
    names = [f"l{i}" for i in range(100)]
    picked = F.legend_pick(names)
    assert len(picked) == F.MAX_LEGEND and picked[0] == "l0" and picked[-1] == "l99"


def test_log_axis_spans_the_positive_data_only():
    from matplotlib.figure import Figure

    from gradprobe.report import figures as F

    ax = Figure().subplots()
    values = np.array([0.0, 1e-8, 1e-3, 1e-1, np.nan])
    assert F.scale_y(ax, values) == "log"
    lo, hi = ax.get_ylim()
    assert 1e-9 < lo < 1e-8 and 1e-1 < hi < 1.0  # the zero does not stretch it to 1e-300
    assert "1 exact zeros" in F.gaps_note(values, "log")
    assert F.scale_y(Figure().subplots(), np.array([-1.0, 1e-6, 1.0])) == "linear"
    assert F.scale_y(Figure().subplots(), np.array([0.2, 0.9])) == "linear"


def test_run_without_histograms_or_loss_says_so(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gp.Probe(model, opt, run_dir=tmp_path / "run") as probe:
        for _ in range(3):
            model(torch.randn(8, 3)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    text = gp.report(probe.run, tmp_path / "r.html", diagnosis=Diagnosis([])).read_text()
    assert "This run has no histograms" in text and "hist_every=N" in text
    assert "No loss recorded" in text
    assert "No findings" in text
    for sec in SECTIONS:
        assert f'<section id="{sec}">' in text, sec


def test_time_section_shows_when_the_run_has_time_data(built, tmp_path):
    run, _, _ = built

    class TimedRun(gp.Run):
        def time_gradients(self, wrt: str = "input") -> pd.DataFrame:
            rows = [(s, HOSTILE, t, 0.5 ** (20 - t), 0) for s in (0, 10) for t in range(20)]
            return pd.DataFrame(rows, columns=["step", "layer", "t", "grad_norm", "layer_id"])

    timed = TimedRun(run.path, run.meta)
    text = gp.report(timed, tmp_path / "t.html", diagnosis=Diagnosis([])).read_text()
    assert '<section id="time-grads">' in text and '<figure id="fig-time-grads">' in text


def test_diagnose_is_called_when_no_diagnosis_is_given(built, tmp_path, monkeypatch):
    from gradprobe.diagnose import api

    run, _, _ = built
    calls = []

    def fake(r):
        calls.append(r)
        return Diagnosis([finding()])

    monkeypatch.setattr(api, "diagnose", fake)
    text = gp.report(run, tmp_path / "a.html").read_text()
    assert calls and "vanishing-gradients" in text
    text = gp.report(run, tmp_path / "b.html", diagnosis=Diagnosis([])).read_text()
    assert len(calls) == 1 and "vanishing-gradients" not in text


def test_failed_report_leaves_nothing_half_written(built, tmp_path, monkeypatch):
    from gradprobe.report import page

    run, _, _ = built
    out = tmp_path / "r.html"
    out.write_text("previous")

    def broken(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(page, "embed", broken)
    with pytest.raises(RuntimeError):
        gp.report(run, out, diagnosis=Diagnosis([]))
    assert out.read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html"]


def test_bad_inputs_are_one_clear_error(built, tmp_path):
    run, _, _ = built
    with pytest.raises(gp.RunDirError, match="not a gradprobe run"):
        gp.report(tmp_path / "nowhere", tmp_path / "r.html")
    with pytest.raises(gp.ConfigError, match="does not exist") as info:
        gp.report(run, tmp_path / "missing" / "r.html")
    assert info.value.hint
    with pytest.raises(gp.ConfigError, match="gp.Run or a path"):
        gp.report(42, tmp_path / "r.html")
    # a folder as out means out/report.html
    assert gp.report(run, tmp_path, diagnosis=Diagnosis([])) == tmp_path / "report.html"


def test_unwritable_folder(built, tmp_path, monkeypatch):
    from gradprobe.report import page

    run, _, _ = built
    # os.access is what the check asks (chmod cannot be tested as root, who may write anyway)
    monkeypatch.setattr(page.os, "access", lambda *a, **k: False)
    with pytest.raises(gp.ConfigError, match="not writable") as info:
        gp.report(run, tmp_path / "r.html")
    assert "-o" in info.value.hint and not list(tmp_path.iterdir())


def test_gp_report_is_the_function_in_any_import_order():
    code = (
        "import gradprobe.report.style, gradprobe as gp, matplotlib; "
        "print(callable(gp.report), gp.report.__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "True"
    light = subprocess.run(
        [sys.executable, "-c", "import sys, gradprobe, gradprobe.report as r; "
         "f = gradprobe.report; print('matplotlib' in sys.modules, callable(f))"],
        capture_output=True, text=True)
    assert light.stdout.split() == ["False", "True"], light.stderr


def test_time_section_from_a_real_recurrent_run(tmp_path):
    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = torch.nn.RNN(3, 8, batch_first=True)
            self.head = torch.nn.Linear(8, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.rnn(x)[0][:, -1])

    net = Net()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    with gp.Probe(net, opt, run_dir=tmp_path / "r", hist_every=2) as probe:
        for _ in range(4):
            loss = net(torch.randn(4, 12, 3)).pow(2).mean()
            probe.observe_loss(loss)
            loss.backward()
            opt.step()
            opt.zero_grad()
    assert len(probe.run.time_gradients())
    text = gp.report(probe.run, tmp_path / "t.html", diagnosis=Diagnosis([])).read_text()
    assert '<figure id="fig-time-grads">' in text


@pytest.mark.parametrize("k,word", [(2, "2nd"), (3, "3rd"), (4, "4th"), (11, "11th"),
                                    (12, "12th"), (13, "13th"), (22, "22nd"), (101, "101st")])
def test_thin_note_ordinals(k, word):
    from gradprobe.report import figures as F

    steps = np.arange(k * F.MAX_POINTS)
    assert f"every {word} of" in F.thin_note(steps, F.thin_steps(steps))


def test_a_budgeted_run_draws_every_steps_gradient(tmp_path):
    from gradprobe.report.select import grad_every_step

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gp.Probe(model, opt, run_dir=tmp_path / "r", budget=1e-9):  # warm-up steps only full
        for _ in range(40):
            model(torch.randn(8, 4)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    run = gp.Run.open(tmp_path / "r")
    grad = run.scalars(kinds=["grad"])
    assert grad["step"].nunique() < 40
    every = grad_every_step(run, grad)
    assert sorted(every["step"].unique()) == list(range(40))
    both = every.merge(grad[["step", "layer", "rms"]], on=["step", "layer"],
                       suffixes=("", "_full"))
    assert len(both) == len(grad)  # the full steps' rows, from the other tier
    np.testing.assert_allclose(both["rms"], both["rms_full"], rtol=1e-5)
    assert grad_every_step(run, every) is every  # nothing more to add
