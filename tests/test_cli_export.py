"""``gradprobe export tensorboard|wandb RUN``: the exported files read back, and every wrong
argument one error line and a hint, exit status 2 (the real ``main`` and installed typer)."""

from __future__ import annotations

import sys

import pytest
import torch

from _export_reference import check_tensorboard, check_wandb, read_wandb, train
from gradprobe.cli.main import main

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train(tmp_path_factory.mktemp("cli") / "run", steps=4)


def _main(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(list(args))
        raise SystemExit(0)
    out = capsys.readouterr()
    return int(info.value.code or 0), out.out, out.err


def test_export_tensorboard(run, tmp_path, capsys):
    code, out, err = _main(capsys, "export", "tensorboard", str(run.path), "--out",
                           str(tmp_path / "tb"))
    assert code == 0 and err == "" and out.startswith("4 steps written to ")
    check_tensorboard(tmp_path / "tb", run)


def test_export_tensorboard_default_folder(run, capsys):
    code, out, err = _main(capsys, "export", "tensorboard", str(run.path))
    assert code == 0 and err == "" and str(run.path / "tensorboard") in out
    check_tensorboard(run.path / "tensorboard", run)


def test_overwrite_replaces_the_event_files_only(run, tmp_path, capsys):
    out = tmp_path / "tb"
    out.mkdir()
    (out / "events.out.tfevents.1.host").write_bytes(b"stale")
    (out / "notes.txt").write_text("mine")
    code, _, err = _main(capsys, "export", "tensorboard", str(run.path), "--out", str(out),
                         "--overwrite")
    assert code == 0, err
    assert not (out / "events.out.tfevents.1.host").exists() and (out / "notes.txt").exists()
    check_tensorboard(out, run)


def test_export_wandb_offline(run, tmp_path, capsys, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    code, out, err = _main(capsys, "export", "wandb", str(run.path), "--project", "gp-test",
                           "--mode", "offline", "--dir", str(tmp_path))
    assert code == 0 and "4 steps logged to W&B project gp-test" in out, err
    check_wandb(read_wandb(tmp_path), run)


def _missing(monkeypatch, *modules: str) -> None:
    for m in modules:  # an import of a module set to None raises ImportError
        monkeypatch.setitem(sys.modules, m, None)


CASES = {
    "missing-run": (["export", "tensorboard", "{tmp}/nope"], "nope' does not exist",
                    "gradprobe runs ls"),
    "not-a-run": (["export", "tensorboard", "{tmp}"], "is not a gradprobe run (no meta.json)",
                  "gp.Probe"),
    "unknown-target": (["export", "mlflow", "{run}"], "No such command 'mlflow'",
                       "choose one of: tensorboard, wandb"),
    "no-target": (["export"], "Missing command", "choose one of: tensorboard, wandb"),
    "no-run": (["export", "tensorboard"], "Missing argument", "gradprobe export tensorboard"),
    "no-project": (["export", "wandb", "{run}"], "Missing option '--project'", "--help"),
    "bad-columns": (["export", "tensorboard", "{run}", "--columns", "most"],
                    "--columns must be 'default' or 'all'", "--columns all"),
    "out-is-a-file": (["export", "tensorboard", "{run}", "--out", "{run}/meta.json"],
                      "is a file, not a folder", "folder"),
    "bad-mode": (["export", "wandb", "{run}", "--project", "p", "--mode", "sometimes"],
                 "mode must be", "offline"),
    "out-holds-event-files": (["export", "tensorboard", "{run}", "--out", "{tmp}/old"],
                              "already holds TensorBoard event files", "--overwrite"),
    "bad-project": (["export", "wandb", "{run}", "--project", "a/b", "--dir", "{tmp}/w"],
                    "W&B could not start a run: Invalid project name 'a/b'", "--project"),
    "wandb-not-installed": (["export", "wandb", "{run}", "--project", "p"],
                            "Weights & Biases is not installed", "gradprobe[wandb]"),
    "tensorboard-not-installed": (["export", "tensorboard", "{run}", "--out", "{tmp}/tb"],
                                  "TensorBoard is not installed", "gradprobe[tensorboard]"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_wrong_arguments_one_line_and_a_hint(case, run, tmp_path, capsys, monkeypatch):
    args, message, hint = CASES[case]
    if case == "wandb-not-installed":
        _missing(monkeypatch, "wandb")
    if case == "tensorboard-not-installed":
        _missing(monkeypatch, "tensorboard", "torch.utils.tensorboard")
    if case == "out-holds-event-files":
        (tmp_path / "old").mkdir()
        (tmp_path / "old" / "events.out.tfevents.1.host").write_bytes(b"")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.chdir(tmp_path)
    argv = [a.format(tmp=tmp_path, run=run.path) for a in args]
    code, out, err = _main(capsys, *argv)
    lines = err.splitlines()
    assert code == 2 and out == "" and len(lines) == 2, err
    assert lines[0].startswith("error: ") and message in lines[0], lines[0]
    assert lines[1].startswith("hint: ") and hint in lines[1], err
    assert not (tmp_path / "tb").exists() and not (tmp_path / "wandb").exists()
