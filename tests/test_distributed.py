"""DistributedDataParallel for real: 2 processes on gloo (CPU) against one process on the global
batch. Every statistic of every kind must agree, dead-unit counts included."""

from __future__ import annotations

import json
import math
import socket
import time
import warnings
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import gradprobe as gp
import gradprobe.capture.schedule as sched
from gradprobe.capture import distributed as D
from gradprobe.stats import schema as S

WORLD = 2
STEPS = 25  # past the budget's warm-up: the ranks' fixed schedule is exercised
LOCAL = 6  # examples per rank
RAW = ["count", "sum", "sumsq", "abs_sum", "nonzero", "nonfinite", "saturated", "dead", "units",
       "ref_sumsq", "min", "max"]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8), nn.Tanh(),
                         nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of a step: rank 0's half positive, rank 1's negative inputs, so that many
    first-layer ReLU units are inactive on one half only (dead on a rank, alive globally)."""
    g = torch.Generator().manual_seed(step)
    x = torch.randn(WORLD * LOCAL, 4, generator=g).abs()
    x[LOCAL:] *= -1
    y = torch.randn(WORLD * LOCAL, 1, generator=g)
    return x, y


def _train(model: nn.Module, run_dir: str, part: slice, *,
           opt: torch.optim.Optimizer | None = None, **probe_options) -> None:
    if opt is None:
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gp.Probe(model, opt, run_dir=run_dir, flush_every=3, **probe_options) as probe:
        for step in range(STEPS):
            x, y = _batch(step)
            loss = (model(x[part]) - y[part]).pow(2).mean()
            probe.observe_loss(loss)
            loss.backward()
            opt.step()
            opt.zero_grad()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, run_dir: str, port: int) -> None:
    import torch.distributed as tdist

    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                             world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        model = nn.parallel.DistributedDataParallel(_model())
        _train(model, run_dir, slice(rank * LOCAL, (rank + 1) * LOCAL))
    finally:
        tdist.barrier()
        tdist.destroy_process_group()


def _frame(run_dir: str, prefix: str = "") -> pd.DataFrame:
    df = gp.Run.open(run_dir).raw_scalars()
    df["layer"] = df["layer"].str.removeprefix(prefix)
    return df.set_index(["step", "layer", "kind"]).sort_index()[RAW]


def equality_table(ddp: pd.DataFrame, one: pd.DataFrame) -> pd.DataFrame:
    """Per kind and column: the largest relative difference between DDP and one process
    (``n``: finite values compared; columns a kind does not have are NaN in both)."""
    rows = []
    for kind in sorted(set(one.index.get_level_values("kind"))):
        a = ddp.xs(kind, level="kind")
        b = one.xs(kind, level="kind")
        for col in RAW:
            x, y = a[col].to_numpy(float), b[col].to_numpy(float)
            both = np.isfinite(x) & np.isfinite(y)
            same_nan = np.array_equal(np.isnan(x), np.isnan(y))
            # a sum may cancel to near 0: its error is relative to the sum of magnitudes
            ref = b["abs_sum"].to_numpy(float) if col == "sum" else np.abs(y)
            with np.errstate(invalid="ignore"):
                rel = (np.abs(x - y) / np.maximum(ref, 1e-12))[both]
            rows.append({"kind": kind, "column": col, "n": int(both.sum()),
                         "max_rel_diff": float(rel.max()) if rel.size else 0.0,
                         "nan_pattern_equal": same_nan})
    return pd.DataFrame(rows)


def assert_equal_at_its_steps(got: pd.DataFrame, one: pd.DataFrame) -> pd.DataFrame:
    """``got`` (the ranks' run) equals the single-process run ``one`` (every step in full) at
    the steps ``got`` recorded in full, every kind and column; returns ``one`` at those steps."""
    one = one[one.index.get_level_values("step").isin(got.index.get_level_values("step"))]
    assert got.index.equals(one.index)
    table = equality_table(got, one)
    print("\n" + table.to_string())
    assert table["nan_pattern_equal"].all()
    assert (table["max_rel_diff"] < 1e-5).all(), table[table["max_rel_diff"] >= 1e-5]
    return one


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import torch.multiprocessing as mp

    base = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(str(base / "ddp"), _free_port()), nprocs=WORLD, join=True)
    _train(_model(), str(base / "one"), slice(None), budget=None)  # every step: the reference
    return str(base / "ddp"), str(base / "one")


def test_a_budgeted_probe_takes_one_fixed_schedule_across_ranks(runs):
    run = gp.Run.open(runs[0])
    full = run.steps().query("tier == 'full'")["step"].tolist()
    assert full == [*range(sched.WARMUP), *range(sched.WARMUP, STEPS, sched.RANKS_EVERY)]
    assert run.schedule["mode"] == "every" and "budget_replaced" in run.schedule
    assert sorted(run.grad_norms()["step"].unique()) == list(range(STEPS))  # always-on: all


def test_every_statistic_equals_one_process_on_the_global_batch(runs):
    ddp_dir, one_dir = runs
    ddp, one = _frame(ddp_dir, "module."), _frame(one_dir)
    one = assert_equal_at_its_steps(ddp, one)
    # exact integers: counts, dead units and units
    for col in ("count", "nonzero", "saturated", "dead", "units"):
        assert np.array_equal(ddp[col].fillna(-1).to_numpy(), one[col].fillna(-1).to_numpy()), col


def test_dead_units_are_anded_across_ranks_not_summed(runs):
    ddp_dir, one_dir = runs
    one = _frame(one_dir).xs("act", level="kind").loc[(slice(None), "1"), :]
    # the comparison can fail: on a rank's half alone many more first-layer units are inactive
    model = _model()
    x, _ = _batch(0)
    with torch.no_grad():
        h = torch.relu(model[0](x))
    local_dead = sum(int((h[r * LOCAL:(r + 1) * LOCAL] <= 0).all(0).sum()) for r in range(WORLD))
    global_dead = int((h <= 0).all(0).sum())
    assert local_dead > global_dead
    assert one.loc[(0, "1"), "dead"] == global_dead
    ddp = _frame(ddp_dir, "module.").xs("act", level="kind")
    assert ddp.loc[(0, "1"), "dead"] == global_dead


def test_losses_are_the_global_batch_loss(runs):
    ddp_dir, one_dir = runs
    a = gp.Run.open(ddp_dir).losses().set_index("step")["loss"]
    b = gp.Run.open(one_dir).losses().set_index("step")["loss"]
    np.testing.assert_allclose(a.to_numpy(), b.to_numpy(), rtol=1e-6)


# ---------------------------------------------------------------- the merge on its own


def _local(steps, stats, counts, masks):
    n, r = counts.shape
    return D.Local(np.asarray(steps), np.asarray(steps), stats, counts,
                   np.ones((n, r), dtype=bool), np.ones(n), np.ones(n), masks)


def test_dead_counts_and_masks_of_different_lengths_count_alone():
    a = [(0, 0, np.array([True, True, False]))]
    b = [(0, 0, np.array([True, False, False]))]
    dead, units = D.dead_counts([a, b], 1, 1)
    assert dead[0, 0] == 1 and units[0, 0] == 3
    c = [(0, 0, np.array([True, True]))]
    dead, units = D.dead_counts([a, c], 1, 1)
    assert dead[0, 0] == 4 and units[0, 0] == 5


def test_pack_roundtrip():
    stats = np.arange(2 * 3 * S.N_STATS, dtype=float).reshape(2, 3, S.N_STATS)
    loc = _local([4, 5], stats, np.ones((2, 3)), [(1, 2, np.array([True, False]))])
    back = D.unpack(np.concatenate([D.pack(loc), np.zeros(7)]))  # padded as gathered
    assert np.array_equal(back.stats, stats) and back.steps.tolist() == [4, 5]
    assert back.masks[0][:2] == (1, 2) and back.masks[0][2].tolist() == [True, False]


def test_ranks_out_of_step_fall_back_to_local_statistics(tmp_path):
    """A rank that skipped a step is detected, not mixed in: ValueError from the merge."""
    from gradprobe.store.frames import HostFlush

    stats = np.zeros((1, 1, S.N_STATS))
    data = HostFlush(index=0, steps=np.array([3]), skipped=np.array([False]),
                     counts=np.ones((1, 1)), units=np.zeros((1, 1)),
                     touched=np.ones((1, 1), dtype=bool), stats=stats, scale=np.ones(1),
                     loss_steps=np.array([3]), losses=np.ones(1), loss_count=np.ones(1),
                     hist_keys=[], hist=np.zeros((0, 4)), events=[], nonfinite=False)
    other = _local([4], stats.copy(), np.ones((1, 1)), [])
    with pytest.raises(ValueError, match="rank 1 recorded steps"):
        D.merge_flushes(data, [_local([3], stats, np.ones((1, 1)), []), other], ["act"],
                        np.array([False]))


def _timeout_worker(rank: int, run_dir: str, port: int) -> None:
    import torch.distributed as tdist

    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                             world_size=WORLD, timeout=timedelta(seconds=60))
    old = D.TIMEOUT
    D.TIMEOUT = 3.0
    try:
        model = _model()  # no DDP: each rank trains on its own, only the Probe talks
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with gp.Probe(model, opt, run_dir=run_dir, flush_every=2) as probe:
                # rank 1 stops after one step and stalls: rank 0's flush at step 1 finds no
                # peer in time; rank 1's final flush (at detach) finds rank 0 gone on
                for step in range(3 if rank == 0 else 1):
                    x, y = _batch(step)
                    loss = (model(x) - y).pow(2).mean()
                    probe.observe_loss(loss)
                    loss.backward()
                    opt.step()
                    opt.zero_grad()
                if rank == 1:
                    time.sleep(2 * D.TIMEOUT)
        assert any("not merged" in str(w.message) for w in caught), rank
        if rank == 0:
            run = gp.Run.open(run_dir)
            assert sorted(run.raw_scalars()["step"].unique()) == [0, 1, 2]
            lines = (Path(run_dir) / "events.jsonl").read_text().splitlines()
            assert any(json.loads(line)["type"] == "distributed" for line in lines)
    finally:
        D.TIMEOUT = old
        tdist.barrier()
        tdist.destroy_process_group()


def test_a_rank_that_leaves_early_does_not_hang_the_others(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_timeout_worker, args=(str(tmp_path / "r"), _free_port()), nprocs=WORLD, join=True)


def test_math_of_act_grad_scaling():
    stats = np.zeros((1, 1, S.N_STATS))
    stats[0, 0, [S.SUM, S.SUMSQ, S.NEG_MIN, S.MAX]] = [2.0, 8.0, 4.0, 6.0]
    D._scale_act_grad(stats, np.array([0]), 2)
    assert stats[0, 0, S.SUM] == 1.0 and stats[0, 0, S.SUMSQ] == 2.0
    assert stats[0, 0, S.MAX] == 3.0 and math.isclose(stats[0, 0, S.NEG_MIN], 2.0)


# ---------------------------------------------------------------- FSDP2 (fully_shard)

ACT_KINDS = ("input", "act", "act_grad")


def _fsdp_worker(rank: int, run_dir: str, port: int) -> None:
    import torch.distributed as tdist
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                             world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        model = _model()
        for i in (0, 2, 4, 6):
            fully_shard(model[i])
        fully_shard(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with pytest.raises(gp.errors.UnsupportedModelError, match="sharded"):
            gp.Probe(model, opt, run_dir=run_dir + "-refused")
        _train(model, run_dir, slice(rank * LOCAL, (rank + 1) * LOCAL), opt=opt, kinds=ACT_KINDS)
    finally:
        tdist.barrier()
        tdist.destroy_process_group()


def test_fsdp_activation_statistics_equal_one_process(tmp_path):
    import torch.multiprocessing as mp

    pytest.importorskip("torch.distributed.fsdp", reason="torch without FSDP")
    mp.spawn(_fsdp_worker, args=(str(tmp_path / "fsdp"), _free_port()), nprocs=WORLD, join=True)
    _train(_model(), str(tmp_path / "one"), slice(None), kinds=ACT_KINDS, budget=None)
    fsdp, one = _frame(str(tmp_path / "fsdp")), _frame(str(tmp_path / "one"))
    assert_equal_at_its_steps(fsdp, one)
    assert (fsdp["dead"].fillna(0) > 0).any()


def test_shard_statistics_merge_to_the_full_parameter():
    """The design for sharded parameters: Σx² adds across shards (the norm of the full
    parameter), never a combination of per-shard norms."""
    from gradprobe.stats import eager as E

    torch.manual_seed(1)
    w = torch.randn(9, 5)
    full = E.tensor_stats(w).double().numpy()
    shards = [E.tensor_stats(s).double().numpy() for s in w.chunk(WORLD, dim=0)]
    acc = shards[0].copy()
    for other in shards[1:]:
        S.merge(acc, other)
    np.testing.assert_allclose(acc, full, rtol=1e-6)
    per_shard_norms = sum(math.sqrt(s[S.SUMSQ]) for s in shards)
    assert not math.isclose(per_shard_norms, math.sqrt(full[S.SUMSQ]), rel_tol=1e-3)
