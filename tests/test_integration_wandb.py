"""W&B export and live follower in offline mode, read back from the ``.wandb`` file W&B wrote
and compared with ``gp.Run``'s frames (a real run with a NaN planted in one activation)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _export_reference import NAN_STEP, check_wandb, read_wandb, train
from gradprobe.errors import ConfigError
from gradprobe.integrations import wandb as gp_wandb

torch.set_num_threads(1)
wandb = pytest.importorskip("wandb")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train(tmp_path_factory.mktemp("wb") / "run")


def _init(root):
    return wandb.init(project="gradprobe-test", dir=str(root), mode="offline",
                      settings=wandb.Settings(console="off", x_disable_stats=True),
                      reinit="create_new")


def test_export_equals_the_run(run, tmp_path):
    assert gp_wandb.export(run, project="gradprobe-test", dir=tmp_path) == len(run.losses())
    rows = read_wandb(tmp_path)
    check_wandb(rows, run)
    (nan_row,) = [r for r in rows if r.get("probe/step") == NAN_STEP]
    assert nan_row["nonfinite/act/1"] == 1 and "act/mean/1" not in nan_row
    assert "layer '1'" in nan_row["events/nonfinite"]
    hist = run.histograms().query(f"step == {NAN_STEP} and layer == '1' and kind == 'act'")
    assert sum(nan_row["act/hist/1"]["values"]) == sum(hist["counts"].iloc[0])  # finite part


def test_live_follower_beside_the_loops_own_logging(tmp_path):
    wb = _init(tmp_path)
    follower = gp_wandb.live(tmp_path / "run", wandb_run=wb, start=False)

    def on_step(probe, s):
        wb.log({"user/loss": float(s)})  # the training loop's own W&B step counter
        _ = probe.run  # waits until the flushes handed to the writer thread are on disk
        follower.poll()

    run = train(tmp_path / "run", steps=5, on_step=on_step)
    follower.close()  # the last step; the W&B run it was given stays open
    wb.log({"user/after": 1.0})
    wb.finish()
    rows = read_wandb(tmp_path)
    check_wandb(rows, run)
    assert [r["user/loss"] for r in rows if "user/loss" in r] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert any("user/after" in r for r in rows)


def test_more_than_512_bins_are_merged_exactly():
    counts = np.arange(1000)
    edges = np.linspace(-1.0, 1.0, 1001)
    c, e = gp_wandb.coarsen(counts, edges)
    assert len(c) <= 512 and len(e) == len(c) + 1 and c.sum() == counts.sum()
    assert e[0] == edges[0] and e[-1] == edges[-1] and set(e) <= set(edges)
    assert c[0] == counts[0] + counts[1]
    wandb.Histogram(np_histogram=(c.tolist(), e.tolist()))  # W&B accepts it


def test_bad_arguments(run, tmp_path):
    with pytest.raises(ConfigError, match="either wandb_run= or project="):
        gp_wandb.export(run, wandb_run=object(), project="p")  # refused before it is used
    with pytest.raises(ConfigError, match="mode must be"):
        gp_wandb.export(run, project="p", mode="sometimes", dir=tmp_path)
