"""The diagnosis on real short runs, its records, events.jsonl and the CLI."""

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

import gradprobe as gp


def _blobs(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(4, 8, generator=g) * 1.5
    y = torch.randint(0, 4, (n,), generator=g)
    x = centres[y] + torch.randn(n, 8, generator=g)
    return (x - x.mean(0)) / x.std(0), y


def _mlp(depth, act, width=32):
    mods = []
    d = 8
    for _ in range(depth):
        mods += [nn.Linear(d, width), act()]
        d = width
    return nn.Sequential(*mods, nn.Linear(d, 4))


def _train(path, model, opt, steps=40):
    torch.manual_seed(0)
    x, y = _blobs()
    g = torch.Generator().manual_seed(1)
    with gp.Probe(model, opt, run_dir=path) as probe:
        for _ in range(steps):
            i = torch.randint(0, len(x), (64,), generator=g)
            loss = nn.functional.cross_entropy(model(x[i]), y[i])
            probe.observe_loss(loss)
            loss.backward()
            opt.step()
            opt.zero_grad()
    return probe.run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("diag")
    torch.manual_seed(0)
    healthy = _mlp(3, nn.ReLU)
    sigmoid = _mlp(12, nn.Sigmoid, width=64)
    dead = _mlp(3, nn.ReLU)
    with torch.no_grad():
        for m in list(dead.modules())[1:-1]:
            if isinstance(m, nn.Linear):
                m.bias.fill_(-3.0)
    still = _mlp(3, nn.ReLU)
    return {
        "healthy": _train(root / "healthy", healthy, torch.optim.Adam(healthy.parameters(), 1e-3)),
        "sigmoid": _train(root / "sigmoid", sigmoid, torch.optim.SGD(sigmoid.parameters(), 0.1)),
        "dead": _train(root / "dead", dead, torch.optim.SGD(dead.parameters(), 0.05)),
        "lr0": _train(root / "lr0", still, torch.optim.SGD(still.parameters(), 0.0)),
    }


def test_healthy_run_has_no_findings(runs):
    d = gp.diagnose(runs["healthy"])
    assert d.healthy and len(d) == 0, str(d)


def test_deep_sigmoid_is_vanishing(runs):
    d = gp.diagnose(runs["sigmoid"].path)  # a path works too
    assert "vanishing-gradients" in d.rules
    f = next(f for f in d if f.rule == "vanishing-gradients")
    assert f.remedies[0].name == "swap_activations_"
    assert "Glorot" in f.explanation or "Hochreiter" in f.explanation


def test_negative_bias_is_dead_relu(runs):
    assert "dead-relu" in gp.diagnose(runs["dead"]).rules


def test_lr_zero_is_learning_rate_and_plateau(runs):
    rules = gp.diagnose(runs["lr0"]).rules
    assert "learning-rate" in rules and "loss-plateau" in rules


def test_to_dict_json_and_printing(runs):
    d = gp.diagnose(runs["sigmoid"])
    data = json.loads(d.to_json())
    assert data["run"] == str(runs["sigmoid"].path)
    f = data["findings"][0]
    assert {"rule", "severity", "layers", "steps", "evidence", "explanation",
            "remedies"} <= set(f)
    assert all({"name", "kwargs", "code", "why"} <= set(r) for r in f["remedies"])
    text = str(d)
    assert "vanishing-gradients" in text and "evidence:" in text and "fix 1:" in text
    assert "no findings" in str(gp.diagnose(runs["healthy"]))


def test_append_findings_keeps_run_events_nonfinite_only(runs, tmp_path):
    import shutil

    from gradprobe.diagnose import append_findings

    path = tmp_path / "copy"
    shutil.copytree(runs["dead"].path, path)
    d = gp.diagnose(path)
    n = append_findings(path, d)
    assert n == len(d) > 0
    lines = [json.loads(s) for s in (path / "events.jsonl").read_text().splitlines()]
    assert [ln["rule"] for ln in lines if ln["type"] == "finding"] == d.rules
    assert gp.Run.open(path).events().empty
    assert gp.diagnose(path).rules == d.rules  # findings in the file do not feed back


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "gradprobe.cli.main", *args],
                          capture_output=True, text=True)


def test_cli_bad_path_is_one_error_line(tmp_path):
    out = _cli("diagnose", str(tmp_path / "nope"))
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert lines[0].startswith("error:") and "not a gradprobe run" in lines[0]
    assert len(lines) == 2 and lines[1].startswith("hint:")


def test_cli_json_and_terminal(runs):
    out = _cli("diagnose", str(runs["dead"].path), "--json")
    assert out.returncode == 0, out.stderr
    assert "dead-relu" in [f["rule"] for f in json.loads(out.stdout)["findings"]]
    out = _cli("diagnose", str(runs["dead"].path))
    assert out.returncode == 0 and "dead-relu" in out.stdout and "fix 1" in out.stdout


def test_diagnose_imports_no_capture_or_report():
    code = ("import sys, gradprobe.diagnose.api; "
            "print(sorted(m for m in ('gradprobe.capture', 'gradprobe.capture.probe', "
            "'gradprobe.report.html', 'gradprobe.report.figures', 'gradprobe.lab', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stderr
