"""TensorBoard export and live follower, read back with TensorBoard's own EventAccumulator and
compared with ``gp.Run``'s frames (a real run with a NaN planted in one activation)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

import gradprobe as gp
from _export_reference import NAN_STEP, check_tensorboard, read_tensorboard, train
from gradprobe.errors import ConfigError, RunDirError
from gradprobe.integrations import tensorboard

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train(tmp_path_factory.mktemp("tb") / "run")


def test_add_histogram_mishandles_nan_so_the_export_does_not_use_it(tmp_path):
    """The premise: SummaryWriter.add_histogram raises on NaN with bins="auto" and, with its
    default bins, writes a histogram whose ``num`` counts the NaN its buckets dropped and whose
    min and sum are NaN."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tmp_path)) as w:
        with pytest.raises(ValueError, match="not finite"):
            w.add_histogram("auto", np.array([0.0, 1.0, np.nan]), 0, bins="auto")
        w.add_histogram("default", np.array([0.0, 1.0, np.nan]), 0)
    (e,) = read_tensorboard(tmp_path).Histograms("default")
    h = e.histogram_value
    assert h.num == 3 and sum(h.bucket) == 2 and np.isnan(h.min) and np.isnan(h.sum)


def test_export_equals_the_run(run, tmp_path):
    assert tensorboard.export(run.path, tmp_path / "tb") == len(run.losses())
    check_tensorboard(tmp_path / "tb", run)


def test_the_nan_is_counted_and_the_finite_part_logged(run, tmp_path):
    tensorboard.export(run, tmp_path)
    acc = read_tensorboard(tmp_path)
    act = run.scalars(kinds="act", layers="1")
    assert act["nonfinite"].tolist() == [1.0 if s == NAN_STEP else 0.0 for s in act["step"]]
    counts = {e.step: e.value for e in acc.Scalars("nonfinite/act/1")}
    assert counts == dict(zip(act["step"], act["nonfinite"]))
    assert NAN_STEP not in {e.step for e in acc.Scalars("act/mean/1")}  # NaN mean left out
    (h,) = [e.histogram_value for e in acc.Histograms("act/hist/1") if e.step == NAN_STEP]
    stored = run.histograms().query(f"step == {NAN_STEP} and layer == '1' and kind == 'act'")
    assert int(stored["nonfinite"].iloc[0]) == 1
    n = int(act.loc[act["step"] == NAN_STEP, "count"].iloc[0])
    assert h.num == n - 1 and np.isfinite(h.sum) and np.isfinite(h.sum_squares)
    # exact sums where the record is finite: the run's raw sums
    raw = run.raw_scalars().query("step == 0 and layer == '1' and kind == 'act'")
    (h0,) = [e.histogram_value for e in acc.Histograms("act/hist/1") if e.step == 0]
    assert h0.sum == pytest.approx(float(raw["sum"].iloc[0]), rel=1e-12)
    assert h0.sum_squares == pytest.approx(float(raw["sumsq"].iloc[0]), rel=1e-12)


def test_live_follower_polled_while_training(tmp_path):
    written: list[tuple[int, int]] = []
    follower: list[gp.integrations.export.Follower] = []

    def on_step(probe, s):
        if not follower:
            follower.append(tensorboard.live(probe, tmp_path / "tb", start=False))
        _ = probe.run  # waits until the flushes handed to the writer thread are on disk
        written.append((s, follower[0].poll()))

    run = train(tmp_path / "run", steps=5, on_step=on_step)
    # a flush (2 steps) is read once it is committed: after steps 1 and 3, none after 0, 2, 4
    assert written == [(0, 0), (1, 2), (2, 0), (3, 2), (4, 0)]
    follower[0].close()  # the last step, written at detach
    assert follower[0].last_step == 4
    check_tensorboard(tmp_path / "tb", run)


def test_live_follower_thread_from_before_the_run_exists(tmp_path):
    follower = tensorboard.live(tmp_path / "run", tmp_path / "tb", every_secs=0.02)
    polls: list[int] = []
    seen = threading.Event()

    def on_step(probe, s):
        if s == 1:  # the first flush is committed: wait until the thread has read it
            deadline = time.monotonic() + 5
            while follower.last_step < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            polls.append(follower.last_step)
            seen.set()

    run = train(tmp_path / "run", steps=5, on_step=on_step)
    follower.close()
    assert seen.is_set() and polls == [1]
    check_tensorboard(tmp_path / "tb", run)


def test_close_without_a_run_says_so(tmp_path):
    follower = tensorboard.live(tmp_path / "never", tmp_path / "tb", start=False)
    with pytest.raises(RunDirError, match="no run appeared"):
        follower.close()


def test_all_columns(run, tmp_path):
    tensorboard.export(run, tmp_path, columns="all")
    tags = set(read_tensorboard(tmp_path).Tags()["scalars"])
    assert {"grad/mean/0", "grad/std/0", "act/dead_frac/1"} - tags == {"act/dead_frac/1"}
    assert "update/ratio/0" in tags and "update/mean/0" not in tags  # no moments of a ratio


@pytest.mark.parametrize("bad, match", [
    (dict(columns="some"), "columns must be"),
    (dict(columns={"gradient": ["norm"]}), "unknown kind 'gradient'"),
    (dict(columns={"grad": ["nrm"]}), "unknown columns"),
])
def test_bad_columns(run, tmp_path, bad, match):
    with pytest.raises(ConfigError, match=match):
        tensorboard.export(run, tmp_path / "tb", **bad)
    assert not (tmp_path / "tb").exists()


@pytest.mark.parametrize("source, every, match", [
    (3, 1.0, "expected a run directory"), ("runs/x", 0, "every_secs must be"),
])
def test_bad_live_arguments(tmp_path, source, every, match):
    with pytest.raises(ConfigError, match=match):
        tensorboard.live(source, tmp_path / "tb", every_secs=every)
    assert not (tmp_path / "tb").exists()


def test_not_a_run(tmp_path):
    with pytest.raises(RunDirError):
        tensorboard.export(tmp_path, tmp_path / "tb")
    assert not (tmp_path / "tb").exists()


def test_a_damaged_part_is_skipped_with_a_warning(tmp_path):
    import shutil

    from gradprobe.errors import RunDataWarning

    src = train(tmp_path / "run")
    shutil.copytree(src.path, tmp_path / "copy")
    (tmp_path / "copy" / "hist" / "part-00001.parquet").write_bytes(b"")  # steps 2-3
    with pytest.warns(RunDataWarning, match="hist/part-00001.parquet"):
        tensorboard.export(tmp_path / "copy", tmp_path / "tb")
    acc = read_tensorboard(tmp_path / "tb")
    assert [e.step for e in acc.Histograms("act/hist/1")] == [0, 1, 4]
    assert [e.step for e in acc.Scalars("nonfinite/grad/0")] == [0, 1, 2, 3, 4]
