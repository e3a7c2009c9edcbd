"""`gp.lab.sweep` / `gradprobe lab sweep` on the local process pool: every run present, the table
equal to what each run reads back (gp.Run, gp.diagnose) and to training without the probe,
resumable, failures reported, every bad grid one clear error."""

from __future__ import annotations

import importlib
import json
import math
import sys

import numpy as np
import pandas as pd
import pytest
import torch

import gradprobe as gp
from gradprobe.errors import ConfigError
from gradprobe.lab import common, data, train
from gradprobe.lab.sweep_task import RECORD, TaskConfig
from test_cli_lab import _cli

sweep_mod = importlib.import_module("gradprobe.lab.sweep")  # gp.lab.sweep is the function
task_mod = importlib.import_module("gradprobe.lab.sweep_task")

GRID = {"activation": ["relu", "sigmoid"], "depth": [1, 4], "epochs": [2], "width": [6],
        "n_samples": [96], "batch_size": [32]}
NAMES = [f"activation={a},depth={d},epochs=2,width=6,n_samples=96,batch_size=32"
         for a in ("relu", "sigmoid") for d in (1, 4)]


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    lines: list[str] = []
    result = gp.lab.sweep(GRID, out=out, workers=2, notify=lines.append)
    return out, result, lines


def read_back(run_dir) -> dict:
    """The table's run-derived columns, recomputed from the run directory alone."""
    run = gp.Run.open(run_dir)
    grads = run.scalars(kinds="grad")
    last = grads[grads["step"] == grads["step"].max()].set_index("layer")["rms"]
    first_step = grads[grads["step"] == grads["step"].min()].set_index("layer")["rms"]
    depth_order = run.layers.sort_values("depth")["name"].tolist()
    weight_layers = [n for n in depth_order if n in set(grads["layer"])]
    return {
        "last_step_loss": float(run.losses()["loss"].iloc[-1]),
        "first_layer": weight_layers[0], "last_layer": weight_layers[-1],
        "first_grad_rms_last_step": float(last[weight_layers[0]]),
        "last_grad_rms_last_step": float(last[weight_layers[-1]]),
        "grad_ratio_first_step": float(first_step[weight_layers[0]] / first_step[weight_layers[-1]]),
        "rules": ", ".join(dict.fromkeys(gp.diagnose(run).rules)) or "none",
        "findings": len(gp.diagnose(run)),
    }


def test_every_run_present_and_table_equals_runs_read_back(swept):
    out, result, lines = swept
    table = result.table
    assert table["run"].tolist() == NAMES  # grid order, deterministic names
    assert (table["status"] == "ran").all() and table["error"].isna().all()
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(
        NAMES + ["sweep.csv", "sweep.md", "sweep.png", "sweep.svg"])
    assert len(lines) == 4 and all(line.startswith("done ") for line in lines)
    for row in table.to_dict("records"):
        run = gp.Run.open(out / row["run"])
        assert run.status == "closed"
        assert json.loads((out / row["run"] / RECORD).read_text())["config"]["depth"] == row["depth"]
        expected = read_back(out / row["run"])
        for col, value in expected.items():
            if isinstance(value, float):
                assert row[col] == pytest.approx(value, rel=1e-12), (row["run"], col)
            else:
                assert row[col] == value, (row["run"], col)
        # the depth profile spans the whole network: fc1 ... out
        assert (expected["first_layer"], expected["last_layer"]) == ("fc1", "out")
        assert len(run.layers[run.layers["type"] == "Linear"]) == row["depth"] + 1
    # the CSV on disk is the table returned
    on_disk = pd.read_csv(out / "sweep.csv")
    pd.testing.assert_frame_equal(on_disk[["run", "final_loss", "grad_ratio_last_step"]],
                                  table[["run", "final_loss", "grad_ratio_last_step"]])
    assert (out / "sweep.png").stat().st_size > 10_000


def test_final_loss_equals_training_without_the_probe(swept):
    """A worker's numbers are those of the same training done here, without any probe."""
    out, result, _ = swept
    row = result.table.iloc[3]  # sigmoid, depth 4
    cfg = TaskConfig(activation="sigmoid", depth=4, epochs=2, width=6, n_samples=96, batch_size=32)
    xtr, ytr, xte, yte = data.circles(96, seed=0)
    model, _ = common.initialised_mlp([2, 6, 6, 6, 6], "sigmoid", cfg.scheme, seed=0, bias=True,
                                      head=1)
    with train.seeded(0):
        fit = train.fit(model, xtr, ytr, loss="bce", optimizer="adam", lr=1e-3, epochs=2,
                        batch_size=32, seed=0, x_test=xte, y_test=yte)
    assert row["final_loss"] == pytest.approx(fit.loss_after, rel=1e-6)
    assert row["test_acc"] == pytest.approx(fit.test_accuracy_after)
    # sigmoid at depth 4 passes less gradient to its first layer than at depth 1
    sig = result.table[result.table["activation"] == "sigmoid"].set_index("depth")
    assert sig.loc[4, "grad_ratio_first_step"] < sig.loc[1, "grad_ratio_first_step"]


def test_rerun_skips_complete_runs_and_runs_only_new_ones(swept, tmp_path):
    out, _, _ = swept
    before = {n: (out / n / RECORD).stat().st_mtime_ns for n in NAMES}
    first = pd.read_csv(out / "sweep.csv").set_index("run")
    lines: list[str] = []
    grid = {**GRID, "depth": [1, 4, 2]}
    result = gp.lab.sweep(grid, out=out, workers=1, notify=lines.append, figure=False)
    assert sorted(result.skipped) == sorted(NAMES)
    assert sum(line.startswith("skipped ") and "already complete" in line for line in lines) == 4
    assert {n: (out / n / RECORD).stat().st_mtime_ns for n in NAMES} == before
    status = result.table.set_index("run")["status"]
    assert status[NAMES].eq("skipped").all()
    assert (status.drop(NAMES) == "ran").all() and len(status) == 6
    # the skipped rows carry the numbers of the first sweep
    assert np.allclose(result.table.set_index("run").loc[NAMES, "final_loss"],
                       first.loc[NAMES, "final_loss"])


def test_a_run_of_another_configuration_is_not_skipped(swept, tmp_path):
    out, _, _ = swept
    record = json.loads((out / NAMES[0] / RECORD).read_text())
    target = tmp_path / NAMES[0]
    target.mkdir()
    record["config"]["lr"] = 0.5
    (target / RECORD).write_text(json.dumps(record))
    with pytest.raises(ConfigError, match="another configuration") as err:
        gp.lab.sweep(GRID, out=tmp_path)
    assert "new --out" in (err.value.hint or "")
    # a folder of the same name that the sweep did not complete is never replaced
    (target / RECORD).unlink()
    (target / "mine.txt").write_text("keep")
    with pytest.raises(ConfigError, match="is not a complete run of this sweep") as err:
        gp.lab.sweep(GRID, out=tmp_path)
    assert "move or delete it" in (err.value.hint or "")
    assert (target / "mine.txt").read_text() == "keep"


def test_a_failing_configuration_is_a_row_and_the_sweep_goes_on(tmp_path, monkeypatch):
    real = task_mod.train_and_record

    def flaky(config, run_dir):
        if config.depth == 2:
            raise RuntimeError("boom at\ndepth 2")
        return real(config, run_dir)

    monkeypatch.setattr(task_mod, "train_and_record", flaky)
    grid = {"depth": [1, 2], "epochs": [1], "width": [3], "n_samples": [32]}
    lines: list[str] = []
    result = gp.lab.sweep(grid, out=tmp_path, workers=1, notify=lines.append)
    table = result.table.set_index("depth")
    assert table.loc[2, "status"] == "failed"
    assert table.loc[2, "error"] == "RuntimeError: boom at depth 2"
    assert math.isnan(table.loc[2, "final_loss"])
    assert table.loc[1, "status"] == "ran" and table.loc[1, "final_loss"] > 0
    assert result.failed == ["depth=2,epochs=1,width=3,n_samples=32"]
    assert not (tmp_path / result.failed[0]).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    assert any(line.startswith("failed depth=2") for line in lines)
    # rerun without the fault: the failed configuration runs, the other is skipped
    monkeypatch.setattr(task_mod, "train_and_record", real)
    again = gp.lab.sweep(grid, out=tmp_path, workers=1, figure=False)
    assert again.table["status"].tolist() == ["skipped", "ran"]


@pytest.mark.parametrize("grid, message, hint", [
    ({}, "grid is empty", "activation"),
    ([], "empty list", "activation"),
    ({"colour": ["red"]}, "unknown grid field 'colour'", "activation, init, depth"),
    ({"depth": 4}, "'depth' must be a list", "depth: [4]"),
    ({"depth": []}, "'depth' has no values", "at least one value"),
    ({"depth": ["four"]}, "grid field 'depth' got 'four', which is not a valid int", "depth"),
    ({"depth": [2.5]}, "'depth' got 2.5 of type float, expected int", "depth"),
    ({"depth": [0]}, "depth=0 must be an integer >= 1", "depth="),
    ({"activation": ["swish!"]}, "unknown activation 'swish!'", "relu"),
    ({"init": ["glorot"]}, "unknown init 'glorot'", "he_normal"),
    ({"dataset": ["mnist"]}, "'dataset' got 'mnist', which is not a valid one of", "circles"),
    ({"dataset": [3]}, "'dataset' got 3 of type int, expected str", "circles"),
    ({"lr": [-1]}, "lr=-1.0 must be a positive number", "lr="),
    ({"depth": [2, 2]}, "more than once", "once"),
    ([{"depth": [2]}], "gives a list for 'depth'", "dict of lists"),
    (["depth"], "grid entry 0 is 'depth'", "dicts"),
    ("depth=2", "must be a dict of lists or a list of dicts, got str", "activation"),
])
def test_bad_grids_give_one_clear_error(tmp_path, grid, message, hint):
    with pytest.raises(ConfigError) as err:
        gp.lab.sweep(grid, out=tmp_path / "never")
    assert message in err.value.message
    assert hint in (err.value.hint or "")
    assert not (tmp_path / "never").exists()  # nothing written before the grid is valid


@pytest.mark.parametrize("options, message, hint", [
    ({"backend": "spark"}, "unknown backend 'spark'", "'ray'"),
    ({"workers": 0}, "workers=0 must be a positive integer", "workers=2"),
    ({"address": "auto"}, "address is for the Ray backend", "backend='ray'"),
])
def test_bad_options_give_one_clear_error(tmp_path, options, message, hint):
    with pytest.raises(ConfigError) as err:
        gp.lab.sweep({"depth": [1]}, out=tmp_path / "never", **options)
    assert message in err.value.message and hint in (err.value.hint or "")
    assert not (tmp_path / "never").exists()


def test_out_must_be_a_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder") as err:
        gp.lab.sweep({"depth": [1]}, out=tmp_path / "file")
    assert "out=" in (err.value.hint or "")


def test_ray_missing_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(ConfigError, match="needs Ray Tune") as err:
        gp.lab.sweep({"depth": [1], "epochs": [1]}, out=tmp_path, backend="ray")
    assert "pip install gradprobe[ray]" in (err.value.hint or "")


def test_cli_sweep_with_set_and_grid_files(capsys, tmp_path):
    (tmp_path / "grid.yaml").write_text("activation: [tanh]\ndepth: [1, 2]\nepochs: [1]\n"
                                        "width: [3]\nn_samples: [32]\n")
    code, out, err = _cli(capsys, "lab", "sweep", "--grid", str(tmp_path / "grid.yaml"),
                          "--set", "depth=2", "--out", str(tmp_path / "a"))
    assert code == 0, err
    assert "activation=tanh,depth=2,epochs=1" in out and "1 ran, 0 skipped" in out
    table = pd.read_csv(tmp_path / "a" / "sweep.csv")
    assert table["depth"].tolist() == [2]  # --set replaced the file's depths
    # a JSON list of configurations
    (tmp_path / "grid.json").write_text(json.dumps([{"depth": 1, "epochs": 1, "n_samples": 32}]))
    code, out, err = _cli(capsys, "lab", "sweep", "--grid", str(tmp_path / "grid.json"),
                          "--out", str(tmp_path / "b"), "--workers", "1")
    assert code == 0, err
    assert (tmp_path / "b" / "depth=1,epochs=1,n_samples=32" / RECORD).is_file()


@pytest.mark.parametrize("args, message", [
    (["--set", "depth"], "--set 'depth' is not FIELD=VALUE"),
    (["--set", "depth=1", "--set", "depth=2"], "--set gives 'depth' twice"),
    ([], "no grid given"),
    (["--grid", "missing.json"], "grid file 'missing.json' does not exist"),
    (["--set", "depth=1", "--backend", "spark"], "unknown backend 'spark'"),
    (["--set", "colour=red"], "unknown grid field 'colour'"),
])
def test_cli_errors_are_one_line_with_a_hint(capsys, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    code, out, err = _cli(capsys, "lab", "sweep", *args, "--out", str(tmp_path / "o"))
    assert code == 2
    lines = err.strip().splitlines()
    assert lines[0].startswith("error: ") and message in lines[0]
    assert len(lines) == 2 and lines[1].startswith("hint: ")


def test_cli_bad_grid_file(capsys, tmp_path):
    (tmp_path / "bad.json").write_text("{depth: [1]")
    code, _, err = _cli(capsys, "lab", "sweep", "--grid", str(tmp_path / "bad.json"))
    assert code == 2 and "cannot read grid file" in err
    (tmp_path / "bad.yaml").write_text("depth: [1, 2\nwidth: 3\n")
    code, _, err = _cli(capsys, "lab", "sweep", "--grid", str(tmp_path / "bad.yaml"))
    assert code == 2 and "cannot read grid file" in err and "line" in err
    (tmp_path / "list.json").write_text('[{"depth": 1}]')
    code, _, err = _cli(capsys, "lab", "sweep", "--grid", str(tmp_path / "list.json"),
                        "--set", "depth=2")
    assert code == 2 and "--set needs a grid file holding a mapping" in err


def test_torch_threads_untouched_in_process(tmp_path):
    before = torch.get_num_threads()
    gp.lab.sweep({"depth": [1], "epochs": [1], "n_samples": [16]}, out=tmp_path, figure=False)
    assert torch.get_num_threads() == before
    assert sweep_mod.COLUMNS[0] == "status"


def test_seed_means_against_a_loop():
    rng = np.random.default_rng(0)
    rows = [{"run": f"r{i}", "activation": a, "depth": d, "seed": s, "status": st,
             "final_loss": rng.uniform(0.1, 1), "grad_ratio_last_step": 10.0 ** rng.uniform(-6, 1)}
            for i, (a, d, s, st) in enumerate(
                (a, d, s, "failed" if (a, d, s) == ("tanh", 2, 1) else "ran")
                for a in ("relu", "tanh") for d in (1, 2) for s in (0, 1, 2))]
    table = pd.DataFrame(rows)
    means = sweep_mod.seed_means(table, ["activation", "depth", "seed"]).set_index(
        ["activation", "depth"])
    for (a, d), got in means.iterrows():
        runs = [r for r in rows if (r["activation"], r["depth"]) == (a, d) and r["status"] == "ran"]
        assert got["runs"] == len(runs) == (2 if (a, d) == ("tanh", 2) else 3)
        assert got["final_loss"] == pytest.approx(sum(r["final_loss"] for r in runs) / len(runs))
        geo = math.prod(r["grad_ratio_last_step"] for r in runs) ** (1 / len(runs))
        assert got["grad_ratio_last_step"] == pytest.approx(geo, rel=1e-12)
    only_seed = sweep_mod.seed_means(table[table["activation"] == "relu"], ["seed"])
    assert only_seed["runs"].tolist() == [6]


def test_ray_results_that_cannot_be_collected_are_errors(tmp_path):
    """A failed trial, and a run written where this machine cannot see it (a cluster without a
    shared --out), become error rows naming the cause (no Ray needed: Tune's Result faked)."""
    from types import SimpleNamespace

    backends = importlib.import_module("gradprobe.lab.sweep_backends")
    config = TaskConfig(depth=1)
    crashed = SimpleNamespace(metrics={}, error=RuntimeError("actor died\nunexpectedly"))
    record = backends._collect(crashed, config, "depth=1", tmp_path)
    assert record["error"] == "Ray trial failed: actor died unexpectedly"
    elsewhere = SimpleNamespace(error=None, metrics={"record": json.dumps(
        {"name": "depth=1", "config": {}, "error": None, "final_loss": 0.5})})
    record = backends._collect(elsewhere, config, "depth=1", tmp_path)
    assert "every node shares" in record["error"] and record["config"]["depth"] == 1
    table = sweep_mod.make_table([record], ["depth"])
    assert table["status"].tolist() == ["failed"] and math.isnan(table["final_loss"].iloc[0])
