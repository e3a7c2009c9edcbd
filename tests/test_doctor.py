"""The doctor: candidates from the findings only, a cure found and ranked first, failures reported,
a healthy run left alone, parallel runs equal to serial ones, and the CLI with good and bad scripts.

The diagnosis is injected: `_vanishing` flags vanishing gradients from the run's own act_grad
depth profile, so the tests do not depend on the rule set's thresholds.
"""

import json
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import gradprobe as gp
from gradprobe.diagnose import Diagnosis, Evidence, Finding, Remedy
from gradprobe.errors import ConfigError
from gradprobe.remedies.doctor import candidates, depth_profile, doctor

XAVIER = Remedy("init_", {"scheme": "xavier_uniform"})  # keeps the variance, not sigmoid's 1/4
LARGER = Remedy("init_", {"scheme": "normal", "std": 2.0})  # cures it on this task (measured)
IDENTITY = Remedy("init_", {"scheme": "identity"})  # raises: the layers are not square


def make_sigmoid(std=0.1):
    layers = []
    for i in range(8):
        layers += [nn.Linear(2 if i == 0 else 32, 32), nn.Sigmoid()]
    model = nn.Sequential(*layers, nn.Linear(32, 1))
    gp.remedies.init_(model, "normal", std=std)
    return model, torch.optim.SGD(model.parameters(), lr=0.5)


def make_healthy():
    return make_sigmoid(std=2.0)


def train(model, optimizer, probe, steps=60):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 2, generator=g)
    y = (x[:, :1] * x[:, 1:] > 0).float()
    for _ in range(steps):
        loss = nn.functional.binary_cross_entropy_with_logits(model(x), y)
        probe.observe_loss(loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return float(loss.detach())


def _vanishing(run):
    profile = depth_profile(run)
    ratio = profile[0][1] / profile[-1][1]
    if ratio >= 1e-3:
        return Diagnosis([Finding("loss-plateau", "info", (), None, (), "fine", (XAVIER,))])
    return Diagnosis([
        Finding("vanishing-gradients", "error", tuple(n for n, _ in profile), None,
                (Evidence("act_grad RMS first/last", ratio, 1e-3, "<"),), "sigmoid's 1/4 per layer",
                (XAVIER, LARGER, IDENTITY, Remedy("pretrain_", {"epochs": 1}))),
        Finding("learning-rate", "warning", (), None, (), "slow",
                (Remedy("init_", {"scheme": "xavier_uniform"}), Remedy("setting", {}, "lr=1.0"))),
    ])


def test_candidates_rank_by_severity_dedupe_and_skip_non_remedies():
    f_warn = Finding("learning-rate", "warning", (), None, (), "", (Remedy("set_lr_", {"factor": 0.1}),
                                                                   XAVIER))
    f_err = Finding("exploding-gradients", "error", (), None, (), "",
                    (Remedy("clip_gradients_", {"max_norm": 1.0}), XAVIER, Remedy("setting", {}, "x")))
    f_info = Finding("symmetry", "info", (), None, (), "", (Remedy("regularize_", {"l2": 1e-4}),))
    chosen, skipped = candidates([f_warn, f_info, f_err])
    assert [(r.name, dict(r.kwargs)) for r in chosen] == [
        ("clip_gradients_", {"max_norm": 1.0}), ("init_", {"scheme": "xavier_uniform"}),
        ("set_lr_", {"factor": 0.1})]
    assert [r.name for r, _ in skipped] == ["setting"]
    chosen, skipped = candidates([f_err, f_warn], allowed=["set_lr_"])
    assert [r.name for r in chosen] == ["set_lr_"]
    assert "left out by remedies=" in dict((r.name, w) for r, w in skipped)["clip_gradients_"]


def test_deep_sigmoid_is_cured_and_the_cure_ranks_first(tmp_path):
    report = doctor(make_sigmoid, train, out=tmp_path / "doc", diagnose=_vanishing)
    base = report.baseline
    assert base.pathologies == ("vanishing-gradients", "learning-rate")
    assert base.depth_ratio < 1e-3
    labels = [e.label for e in report.entries]
    assert labels == ["init_(scheme='normal', std=2.0)", "init_(scheme='xavier_uniform')",
                      "init_(scheme='identity')"]
    cure, same, failed = report.entries
    assert cure.gone == ("vanishing-gradients", "learning-rate") and cure.new == ()
    assert cure.final_loss < 0.5 * base.final_loss
    assert cure.depth_ratio > 1e-3
    assert report.best is cure
    assert same.gone == () and not same.improved
    assert failed.error.startswith("apply: ConfigError: scheme 'identity'")
    assert failed.run_dir is not None and failed.findings == ()
    reasons = {r.name: why for r, why in report.skipped}
    assert "needs data" in reasons["pretrain_"] and "not a gradprobe remedy" in reasons["setting"]
    # each run is a readable run directory, the remedy applied (std 2 draws, not std 0.1)
    w = gp.Run.open(cure.run_dir).scalars(kinds="weight", layers="2")["std"].iloc[0]
    assert 1.5 < w < 2.5
    text = str(report)
    assert "best: init_(scheme='normal', std=2.0)" in text and "failed: apply" in text
    saved = json.loads((tmp_path / "doc" / "doctor.json").read_text())
    assert saved["best"] == cure.label and saved["entries"][0]["gone"] == list(cure.gone)
    page = report.html()
    html = page.read_text()
    assert '<section id="summary">' in html and "best: init_(scheme=&#x27;normal&#x27;" in html
    assert html.index('id="summary"') < html.index('id="table"')  # the ranking comes first
    assert "<h1>gradprobe doctor: the baseline and each remedy" in html


def test_healthy_baseline_has_nothing_to_cure(tmp_path):
    report = doctor(make_healthy, train, out=tmp_path, diagnose=_vanishing)
    assert report.healthy and report.entries == () and report.best is None
    assert "nothing to cure" in str(report)
    assert report.to_dict()["message"] == "nothing to cure"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["baseline", "doctor.json"]


def test_max_remedies_and_the_remedies_filter(tmp_path):
    report = doctor(make_sigmoid, train, out=tmp_path, diagnose=_vanishing, max_remedies=1,
                    probe_kwargs={"kinds": ("act_grad",)})
    assert [e.label for e in report.entries] == ["init_(scheme='xavier_uniform')"]
    assert sum("beyond max_remedies=1" in why for _, why in report.skipped) == 2
    with pytest.raises(ConfigError, match="unknown remedies"):
        doctor(make_sigmoid, train, out=tmp_path, remedies=["cure_all_"], diagnose=_vanishing)


def _fake_model_remedies(monkeypatch, seen):
    """A model remedy that returns a new module and adds a parameter; one that needs inputs."""

    def residual_(model, *, optimizer=None):
        wrapper = nn.Sequential(model, nn.Linear(1, 1))
        if optimizer is not None:
            optimizer.add_param_group({"params": list(wrapper[1].parameters())})
        seen["optimizer"] = optimizer
        return wrapper

    def standardize_inputs_(model, x):
        seen["x"] = tuple(x.shape)
        return "standardised"

    monkeypatch.setattr(gp.remedies, "residual_", residual_, raising=False)
    monkeypatch.setattr(gp.remedies, "standardize_inputs_", standardize_inputs_, raising=False)


def test_model_remedy_gets_the_optimizer_and_its_new_model_is_trained(tmp_path, monkeypatch):
    seen = {}
    _fake_model_remedies(monkeypatch, seen)
    rems = (Remedy("residual_"), Remedy("standardize_inputs_"))

    def diag(run):
        return Diagnosis([Finding("input-scale", "error", (), None, (), "", rems)])

    data = (torch.randn(10, 2), torch.randn(10, 1))
    report = doctor(make_sigmoid, train, out=tmp_path, diagnose=diag, data=data)
    by = {e.remedy.name: e for e in report.entries}
    assert by["residual_"].error is None and isinstance(seen["optimizer"], torch.optim.SGD)
    assert "1" in set(gp.Run.open(by["residual_"].run_dir).layers["name"])  # the added Linear
    assert by["standardize_inputs_"].record == "standardised" and seen["x"] == (10, 2)


def test_bad_make_and_failing_training_of_a_remedy(tmp_path):
    with pytest.raises(ConfigError, match=r"make\(\) must return \(model, optimizer\), got Sequential"):
        doctor(lambda: nn.Sequential(nn.Linear(2, 1)), train, out=tmp_path, diagnose=_vanishing)

    def train_breaks_on_remedy(model, optimizer, probe):
        if isinstance(model[0], nn.Linear) and model[0].weight.std() > 1:
            raise RuntimeError("diverged")
        return train(model, optimizer, probe, steps=3)

    report = doctor(make_sigmoid, train_breaks_on_remedy, out=tmp_path, diagnose=_vanishing)
    failed = [e for e in report.entries if e.error]
    assert [e.error for e in failed if e.label.startswith("init_(scheme='normal'")] == [
        "train: RuntimeError: diverged"]


@pytest.mark.slow  # two spawned processes import torch: most of the ~15 s
def test_workers_give_the_same_entries_as_one_process(tmp_path):
    serial = doctor(make_sigmoid, train, out=tmp_path / "a", diagnose=_vanishing, max_remedies=2)
    parallel = doctor(make_sigmoid, train, out=tmp_path / "b", diagnose=_vanishing, max_remedies=2,
                      workers=2)
    assert [(e.label, e.final_loss, e.pathologies) for e in serial.entries] == [
        (e.label, e.final_loss, e.pathologies) for e in parallel.entries]


def test_real_diagnosis_run(tmp_path):
    report = doctor(make_sigmoid, train, out=tmp_path, max_remedies=3)
    assert not report.healthy  # a deep sigmoid network at N(0, 0.1²) does not learn
    assert report.baseline.pathologies
    assert all(e.error is None or e.label for e in report.entries)


# ---------------------------------------------------------------------------------------- CLI
SCRIPT = '''
import torch
from torch import nn
from test_doctor import make_sigmoid as make, train, _vanishing as diagnose
'''


def _cli(capsys, *args):
    from gradprobe.cli import main as cli_main

    with pytest.raises(SystemExit) as info:
        cli_main.main(["doctor", *map(str, args)])
        raise SystemExit(0)
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


def test_cli_runs_a_script_and_writes_the_report(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    script = tmp_path / "sick.py"
    script.write_text(SCRIPT)
    code, out, err = _cli(capsys, script, "--out", tmp_path / "o", "--max-remedies", 2)
    assert code == 0, err
    assert "best: init_(scheme='normal', std=2.0)" in out
    assert (tmp_path / "o" / "report.html").is_file() and (tmp_path / "o" / "doctor.json").is_file()


@pytest.mark.parametrize("name,text,message", [
    ("missing.py", None, "does not exist"),
    ("notes.txt", "make = 1", "is not a Python file"),
    ("broken.py", "def make(:\n", "is not valid Python: line 1"),
    ("raises.py", "import no_such_module_xyz\n", "raised ModuleNotFoundError"),
    ("nomake.py", "def train(m, o, p): pass\n", "defines no make()"),
    ("notrain.py", "def make(): pass\n", "defines no train()"),
    ("wrong.py", textwrap.dedent("""
        import torch
        def make():
            return torch.nn.Linear(2, 1)
        def train(m, o, p):
            return None
        """), "make() must return (model, optimizer), got Linear"),
])
def test_cli_bad_scripts_give_one_line_errors(tmp_path, capsys, name, text, message):
    script = tmp_path / name
    if text is not None:
        script.write_text(text)
    code, out, err = _cli(capsys, script, "--out", tmp_path / "o")
    assert code == 2
    first = err.splitlines()[0]
    assert first.startswith("error: ") and message in first, err


@pytest.mark.parametrize("value", [1.5e19, 2.5e-7, 0.89, 520000.0])
def test_run_directory_names_keep_the_value_of_a_threshold(value):
    from gradprobe.remedies.doctor import _slug

    slug = _slug(1, Remedy("clip_gradients_", {"max_norm": value}))
    assert slug.startswith("01-clip-gradients-max-norm-")
    assert float(slug.rsplit("max-norm-", 1)[1]) == value  # the number read back, sign included
