"""Flushes written by the run's writer thread: same data as a synchronous flush, in order, bounded,
errors surfaced once on the training thread, nothing left running after detach."""

from __future__ import annotations

import errno
import math
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

import gradprobe as gp
from gradprobe.capture.recorder import Recorder, RowInfo
from gradprobe.errors import NonFiniteError, RunDirError
from gradprobe.stats import eager
from gradprobe.store.writer import MAX_PENDING, PART_DIRS, RunWriter, part_files, read_events


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))


def _train(run_dir, steps, *, bad_step=None, probe=None, **kw):
    """Train a small MLP for ``steps`` steps under a Probe (histograms, losses, all kinds)."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(3)
    # every step full: a fixed schedule, the same in every run (the budget's depends on timing)
    kw = {"flush_every": 3, "hist_every": 2, "budget": None, **kw}
    with gp.Probe(model, opt, run_dir=run_dir, **kw) as probe:
        for step in range(steps):
            x = torch.randn(6, 4, generator=g)
            if step == bad_step:
                x[1, 2] = math.inf
            loss = model(x).pow(2).mean()
            probe.observe_loss(loss)
            loss.backward()
            opt.step()
            opt.zero_grad()
    return probe


def _synchronous(monkeypatch):
    """The reference: every job runs at once on the training thread (no writer thread)."""
    monkeypatch.setattr(RunWriter, "submit", lambda self, job, *, what: job())


def _parts(run_dir):
    return {(kind, p.name): pq.read_table(p) for kind in PART_DIRS
            for p in part_files(run_dir, kind)}


def _writer_threads(run_dir=None):
    name = "gradprobe-writer:" + (run_dir.name if run_dir is not None else "")
    return [t for t in threading.enumerate() if t.name.startswith(name)]


@pytest.mark.parametrize("slow", [False, True], ids=["fast-disk", "slow-disk"])
def test_parts_equal_a_synchronous_flush(tmp_path, monkeypatch, slow):
    with monkeypatch.context() as m:
        _synchronous(m)
        _train(tmp_path / "sync", 11, bad_step=4)
    if slow:  # the training thread runs ahead and waits for the writer
        write_part = RunWriter.write_part

        def slow_write(self, kind, frame, index):
            time.sleep(0.02)
            return write_part(self, kind, frame, index)

        monkeypatch.setattr(RunWriter, "write_part", slow_write)
    _train(tmp_path / "async", 11, bad_step=4)
    sync, done = _parts(tmp_path / "sync"), _parts(tmp_path / "async")
    assert sorted(sync) == sorted(done)
    assert len(sync) == 5 * 4  # 11 steps in flushes of 3: four flushes of five part kinds
    for key, table in sync.items():
        assert done[key].equals(table), key
    a, b = gp.Run.open(tmp_path / "sync"), gp.Run.open(tmp_path / "async")
    assert a.scalars().equals(b.scalars())
    assert a.losses().equals(b.losses())
    assert a.histograms().equals(b.histograms())
    assert read_events(a.path) == read_events(b.path)
    assert read_events(a.path)[0]["step"] == 4  # the inf input, and the NaN weights after it
    timed = ("probe_fraction", "full_cost_s", "always_cost_s")  # the Probe's measured cost

    def fixed(meta):
        out = {k: v for k, v in meta.items() if k != "environment"}
        out["schedule"] = {k: v for k, v in out["schedule"].items() if k not in timed}
        return out

    assert fixed(a.meta) == fixed(b.meta)
    assert b.meta["status"] == "closed" and b.meta["steps"] == 11


def test_parts_are_written_in_order_by_the_writer_thread(tmp_path, monkeypatch):
    calls = []
    write_part = RunWriter.write_part

    def spy(self, kind, frame, index):
        calls.append((index, kind, threading.current_thread().name))
        return write_part(self, kind, frame, index)

    monkeypatch.setattr(RunWriter, "write_part", spy)
    _train(tmp_path / "r", 8)
    assert [(i, k) for i, k, _ in calls] == [
        (i, k) for i in range(3) for k in ("losses", "hist", "norms", "steps", "scalars")]
    assert {t for _, _, t in calls} == {"gradprobe-writer:r"}
    assert not _writer_threads(tmp_path / "r")


def test_training_runs_ahead_of_the_writer_and_waits_when_it_is_full(tmp_path, monkeypatch):
    gate = threading.Event()
    write_part = RunWriter.write_part

    def gated(self, kind, frame, index):
        assert gate.wait(30)
        return write_part(self, kind, frame, index)

    monkeypatch.setattr(RunWriter, "write_part", gated)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run_dir = tmp_path / "r"

    def step():
        model(torch.randn(3, 4)).sum().backward()
        opt.step()
        opt.zero_grad()

    with gp.Probe(model, opt, run_dir=run_dir, flush_every=1):
        for _ in range(MAX_PENDING):  # one flush being written, the others waiting
            t0 = time.perf_counter()
            step()
            assert time.perf_counter() - t0 < 5
        assert not part_files(run_dir, "scalars")  # nothing written: the writer is held
        assert all(t.daemon for t in _writer_threads(run_dir))
        timer = threading.Timer(0.3, gate.set)
        timer.start()
        t0 = time.perf_counter()
        step()  # a third flush: the training thread waits until the writer takes one
        waited = time.perf_counter() - t0
        timer.join()
    assert waited > 0.2
    assert [p.name for p in part_files(run_dir, "scalars")] == [
        f"part-{i:05d}.parquet" for i in range(MAX_PENDING + 1)]


def test_detach_waits_for_the_writer_and_leaves_no_thread(tmp_path, monkeypatch):
    write_part = RunWriter.write_part

    def slow_write(self, kind, frame, index):
        time.sleep(0.05)
        return write_part(self, kind, frame, index)

    monkeypatch.setattr(RunWriter, "write_part", slow_write)
    probe = _train(tmp_path / "r", 7)
    run = probe.run  # opened right after detach returned
    assert sorted(run.scalars().step.unique()) == list(range(7))
    assert sorted(run.losses().step) == list(range(7))
    assert run.meta["status"] == "closed" and run.meta["steps"] == 7
    assert probe._writer._thread is None and not _writer_threads(tmp_path / "r")
    assert not [p for p in (tmp_path / "r").rglob(".*.tmp")]


@pytest.mark.parametrize("flush_every", [2, 100])
def test_raise_mode_raises_once_the_data_is_on_disk(tmp_path, monkeypatch, flush_every):
    write_part = RunWriter.write_part

    def slow_write(self, kind, frame, index):
        time.sleep(0.1)
        return write_part(self, kind, frame, index)

    monkeypatch.setattr(RunWriter, "write_part", slow_write)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run_dir = tmp_path / "r"
    probe = gp.Probe(model, opt, run_dir=run_dir, flush_every=flush_every,
                     on_nonfinite="raise").attach()
    seen = None
    try:
        for step in range(6):
            x = torch.randn(3, 4)
            if step == 3:
                x[0, 0] = math.nan
            model(x).sum().backward()
            opt.step()
            opt.zero_grad()
    except NonFiniteError:
        seen = sorted(gp.Run.open(run_dir).scalars().step.unique())  # before detach
    finally:
        probe.detach()
    assert seen == [0, 1, 2, 3]


def _failing_write(monkeypatch, fail_index):
    write_part = RunWriter.write_part

    def write(self, kind, frame, index):
        if index == fail_index and kind == "scalars":
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_part(self, kind, frame, index)

    monkeypatch.setattr(RunWriter, "write_part", write)


def test_a_failed_write_is_raised_once_on_the_training_thread(tmp_path, monkeypatch):
    _failing_write(monkeypatch, 1)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run_dir = tmp_path / "r"
    errors = []
    probe = gp.Probe(model, opt, run_dir=run_dir, flush_every=2, budget=None).attach()
    try:
        for _ in range(40):
            model(torch.randn(3, 4)).sum().backward()
            try:
                opt.step()
            except RunDirError as exc:
                errors.append(exc)
            opt.zero_grad()
            time.sleep(0.002)
    finally:
        probe.detach()
    assert len(errors) == 1
    err = errors[0]
    assert "flush 1 (steps 2-3)" in err.message and "No space left on device" in err.message
    assert "disk has space" in err.hint
    assert isinstance(err.__cause__, OSError)
    run = gp.Run.open(run_dir)
    with pytest.warns(gp.errors.RunDataWarning, match="part-00001.parquet: missing; steps 2-3"):
        steps = set(run.scalars().step)
    # that flush only is missing: the loop caught the error and went on without losing a step
    assert steps == set(range(40)) - {2, 3}
    assert run.meta["status"] == "failed" and run.truncated  # meta.json says steps are lost
    assert not _writer_threads(run_dir)


def test_a_failed_last_write_is_raised_by_detach(tmp_path, monkeypatch):
    _failing_write(monkeypatch, 2)
    with pytest.raises(RunDirError, match=r"flush 2 \(steps 6-6\)"):
        _train(tmp_path / "r", 7)
    run = gp.Run.open(tmp_path / "r")
    # the last flush is lost: no gap in the part numbers tells it, meta.json does
    assert run.meta["status"] == "failed" and run.meta["committed_step"] == 5 and run.truncated
    assert sorted(run.scalars().step.unique()) == list(range(6))
    assert not _writer_threads(tmp_path / "r")


def test_run_dir_deleted_while_training_is_a_run_dir_error(tmp_path):
    import shutil

    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RunDirError, match="cannot write"):
        with gp.Probe(model, opt, run_dir=tmp_path / "r", flush_every=2):
            for step in range(6):
                if step == 3:
                    shutil.rmtree(tmp_path / "r")
                model(torch.randn(3, 4)).sum().backward()
                opt.step()
                opt.zero_grad()
    assert not _writer_threads(tmp_path / "r")


# ------------------------------------------------------------------ Recorder.take / write


def _recorder(tmp_path, name):
    rows = [RowInfo(0, "a", "act", False, False), RowInfo(0, "a", "act_grad", False, False),
            RowInfo(1, "b", "grad", False, False)]
    writer = RunWriter.create(tmp_path / name, config={}, overwrite=False)
    return Recorder(rows, capacity=4, loss_capacity=4, device=torch.device("cpu"), writer=writer,
                    hist_bins=5)


def _record(rec, step, values, scale=1.0):
    slot = rec.begin(step)
    for row, v in enumerate(values):
        x = torch.tensor(v, dtype=torch.float64)
        rec.add(slot, row, eager.tensor_stats(x), x.numel())
    rec.add_hist(slot, 1, torch.tensor(values[1]))
    rec.losses.add(step, torch.tensor(float(step)))
    rec.end(slot, skipped=False, scale=torch.tensor(scale))


STEPS = [
    [[1.0, -2.0], [0.5, 0.25], [3.0]],
    [[0.0, 4.0], [math.nan, 1.0], [1.0, 2.0]],  # not checked per step: found by the flush
    [[2.0], [-1.0, 1.0, 8.0], [math.inf]],
]


def test_take_then_write_equals_flush_even_if_the_recorder_moves_on(tmp_path):
    a, b = _recorder(tmp_path, "a"), _recorder(tmp_path, "b")
    for rec in (a, b):
        for step, values in enumerate(STEPS):
            _record(rec, 10 * step, values, scale=2.0 ** step)
    events = a.flush()
    data = b.take()
    assert data is not None and data.events == events and data.nonfinite
    assert [e["step"] for e in events] == [10, 20]
    assert [e["kind"] for e in events] == ["act_grad", "grad"]
    assert read_events(b.writer.path) == events  # written by take(), before any part
    assert not part_files(b.writer.path, "scalars")
    # the recorder reuses its slots before the taken flush is written
    _record(b, 30, [[9.0, 9.0, 9.0], [9.0], [9.0, 9.0]], scale=64.0)
    b.counts[:] = -1.0
    b.units[:] = -1.0
    b.touched[:] = True
    b.write(data)
    pa, pb = _parts(a.writer.path), _parts(b.writer.path)
    assert sorted(pa) == sorted(pb) and len(pa) == 3
    for key, table in pa.items():
        assert pb[key].equals(table), key
    scal = pb[("scalars", "part-00000.parquet")].to_pandas()
    assert sorted(scal.step.unique()) == [0, 10, 20]
    assert np.array_equal(scal["count"], [2, 2, 1, 2, 2, 2, 1, 3, 1])
    assert b.take() is not None and b.take() is None  # step 30, then nothing
