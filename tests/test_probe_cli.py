"""``gradprobe runs ls`` and ``gradprobe runs show`` on a recorded run."""

from __future__ import annotations

import pytest
import torch
import typer
from torch import nn
from typer.testing import CliRunner

import gradprobe as gp
from gradprobe.cli import runs


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gp.Probe(model, opt, run_dir=root / "exp" / "a") as probe:
        for _ in range(3):
            loss = model(torch.randn(5, 3)).pow(2).mean()
            probe.observe_loss(loss)
            loss.backward()
            opt.step()
            opt.zero_grad()
    (root / "not-a-run").mkdir()
    return root, probe.run


def _app():
    app = typer.Typer()
    runs.register(app)

    @app.callback()
    def _root() -> None:
        pass

    return app


def test_runs_ls(recorded):
    root, run = recorded
    out = CliRunner().invoke(_app(), ["runs", "ls", str(root)])
    assert out.exit_code == 0, out.output
    lines = out.output.strip().splitlines()
    assert lines[0].split()[:4] == ["run", "status", "steps", "layers"]
    assert len(lines) == 2  # the folder without meta.json is not a run
    fields = lines[1].split()
    assert fields[0].endswith("a") and fields[1] == "closed" and fields[2] == "3" and fields[3] == "3"
    assert float(fields[4]) == pytest.approx(float(run.losses()["loss"].iloc[-1]), rel=1e-3)


def test_runs_show(recorded):
    root, run = recorded
    out = CliRunner().invoke(_app(), ["runs", "show", str(root / "exp" / "a"), "--kind", "grad"])
    assert out.exit_code == 0, out.output
    assert "grad at step 2" in out.output
    want = run.scalars(kinds="grad")
    want = want[want.step == 2].set_index("layer")["norm"]
    rows = {ln.split()[0]: float(ln.split()[2]) for ln in out.output.splitlines()
            if ln.split() and ln.split()[0] in set(want.index)}
    assert rows.keys() == set(want.index)
    for layer, norm in rows.items():
        assert norm == pytest.approx(want[layer], rel=1e-3)


def test_runs_show_not_a_run_is_one_line_error(tmp_path, capsys):
    from gradprobe.cli.main import main

    with pytest.raises(SystemExit) as exit_:
        main(["runs", "show", str(tmp_path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not a gradprobe run" in err
    assert "hint: " in err
