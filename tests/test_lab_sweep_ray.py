"""`gp.lab.sweep(..., backend="ray")` on a real local Ray instance gives the table of the local
pool: same seeds, same numbers (one test: Ray starts once, in about 10 s)."""

from __future__ import annotations

import importlib.util
import time

import numpy as np
import pytest

import gradprobe as gp

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None,
    reason="Ray is not installed (optional extra: pip install gradprobe[ray])")

GRID = {"activation": ["relu", "tanh"], "depth": [1, 3], "epochs": [2], "width": [5],
        "n_samples": [64], "batch_size": [32]}
SAME = ["final_loss", "train_acc", "test_acc", "last_step_loss", "first_grad_rms_first_step",
        "last_grad_rms_first_step", "first_grad_rms_last_step", "last_grad_rms_last_step",
        "grad_ratio_first_step", "grad_ratio_last_step", "findings"]


def test_ray_backend_gives_the_local_table(tmp_path):
    import ray

    assert not ray.is_initialized()
    local = gp.lab.sweep(GRID, out=tmp_path / "local", workers=1, figure=False)
    start = time.perf_counter()
    lines: list[str] = []
    remote = gp.lab.sweep(GRID, out=tmp_path / "ray", workers=1, backend="ray",
                          notify=lines.append)
    seconds = time.perf_counter() - start
    print(f"ray sweep of {len(remote.table)} configurations: {seconds:.1f} s; {lines[0]}")
    assert lines[0].startswith("ray: started a local instance in ")
    said = sorted(line.split(" ")[1] for line in lines[1:] if line.startswith("done "))
    assert said == sorted(remote.table["run"]) and len(lines) == 5  # one line per trial
    assert not ray.is_initialized()  # the sweep shut down the instance it started
    a, b = local.table, remote.table
    assert b["run"].tolist() == a["run"].tolist()
    assert (b["status"] == "ran").all() and b["error"].isna().all()
    np.testing.assert_allclose(b[SAME].to_numpy(float), a[SAME].to_numpy(float), rtol=1e-6)
    assert b["rules"].fillna("").tolist() == a["rules"].fillna("").tolist()
    for name in b["run"]:  # every run collected under one folder, readable
        run = gp.Run.open(tmp_path / "ray" / name)
        assert run.status == "closed" and len(run.losses()) > 0
    assert (tmp_path / "ray" / "sweep.png").is_file()
    # a rerun skips every configuration without starting Ray
    again = gp.lab.sweep(GRID, out=tmp_path / "ray", backend="ray", figure=False)
    assert sorted(again.skipped) == sorted(b["run"]) and not ray.is_initialized()
