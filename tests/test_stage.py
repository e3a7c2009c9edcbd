"""The stage (gradprobe.capture.stage): small tensors of many steps summarised at once must give the
statistics of summarising each step alone, through layout changes and in-place activations."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from tests.test_probe import train_and_compare
from torch import nn

import gradprobe as gp
import gradprobe.capture.stage as stage_mod
from gradprobe.stats.native import NATIVE


@pytest.fixture(autouse=True, params=["auto", "off"])
def _native(request):
    """Every test with the stage's runs summarised by the C kernels (where they build) and by
    the eager kernels."""
    old = NATIVE.mode
    NATIVE.set_mode(request.param)
    yield request.param
    NATIVE.set_mode(old)


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 12), nn.Tanh(), nn.Linear(12, 12), nn.ReLU(),
                         nn.Linear(12, 12), nn.Sigmoid(), nn.Linear(12, 2))


def _train(tmp, steps: int, batch_sizes: list[int], **kw) -> pd.DataFrame:
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(3)
    kw = {"budget": None, **kw}  # every step full: the stage's rows of every step
    with gp.Probe(model, opt, run_dir=tmp, **kw) as probe:
        for i in range(steps):
            n = batch_sizes[i % len(batch_sizes)]
            x = torch.randn(n, 4, generator=g)
            y = torch.randint(0, 2, (n,), generator=g)
            loss = nn.functional.cross_entropy(model(x), y)
            probe.observe_loss(loss)
            loss.backward()
            opt.step()
            opt.zero_grad()
    return gp.Run.open(tmp).scalars().sort_values(["step", "layer_id", "kind"]).reset_index(
        drop=True)


def test_many_steps_at_once_equal_one_step_at_a_time(tmp_path):
    batched = _train(tmp_path / "a", 12, [8], flush_every=50)
    single = _train(tmp_path / "b", 12, [8], flush_every=1)  # each step summarised alone
    assert len(batched) == len(single) == 12 * len(batched[batched.step == 0])
    num = batched.select_dtypes("number").columns
    pd.testing.assert_frame_equal(batched[num], single[num], rtol=1e-6, atol=1e-7)


def test_layout_changes_between_steps(tmp_path):
    """Batch sizes alternate, so consecutive steps have different layouts: each layout is
    summarised apart, and every statistic still matches the slow reference."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g))
               for n in [8, 8, 5, 8, 3, 3, 8] * 3]
    train_and_compare(model, batches, nn.functional.cross_entropy, tmp_path=tmp_path, steps=7)


def test_activation_that_turns_in_place_is_never_recorded_wrong(tmp_path):
    """A ReLU that becomes in-place after two steps overwrites the Linear output the stage holds
    by reference: that step's Linear activation is dropped, later ones are copied in the hook."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    want: dict[int, float] = {}
    with gp.Probe(model, opt, run_dir=tmp_path / "r", kinds=("act",)) as probe:
        for step in range(6):
            model[1].inplace = step >= 2
            x = torch.randn(16, 5, generator=g)
            with torch.no_grad():
                want[step] = float(model[0](x).double().pow(2).sum().sqrt())
            loss = model(x).pow(2).mean()
            probe.observe_loss(loss)
            loss.backward()
            opt.step()
            opt.zero_grad()
    df = gp.Run.open(tmp_path / "r").scalars(kinds="act")
    lin = df[df.layer == "0"].set_index("step")["norm"]
    assert 2 not in lin.index  # overwritten before it was copied: not recorded
    for step in (0, 1, 3, 4, 5):
        assert math.isclose(lin[step], want[step], rel_tol=1e-5), step


def test_row_beyond_the_bound_goes_to_the_per_step_path(tmp_path, monkeypatch):
    """With a bound smaller than one step's small tensors, those past it are summarised at the
    step; the statistics are the same."""
    monkeypatch.setattr(stage_mod, "MAX_ELEMS", 600)
    small = _train(tmp_path / "a", 6, [8], flush_every=4)
    monkeypatch.undo()
    full = _train(tmp_path / "b", 6, [8], flush_every=4)
    num = [c for c in full.select_dtypes("number").columns if c != "std"]
    pd.testing.assert_frame_equal(small[num], full[num], rtol=1e-6, atol=1e-7)
    # std = sqrt(sumsq/n - mean²) from float32 sums: relative error ~ ε·mean²/var (see
    # gradprobe.stats.schema), 1e-5 for a sigmoid's output (mean 0.5, std 0.05)
    pd.testing.assert_series_equal(small["std"], full["std"], rtol=1e-4, atol=1e-7)


def test_stage_memory_is_bounded_and_stated(tmp_path):
    model = _mlp()
    probe = gp.Probe(model, torch.optim.SGD(model.parameters(), lr=0.1), run_dir=tmp_path / "r")
    with probe:
        mem = probe.memory_bytes()
        assert mem["stage"] == stage_mod.MAX_ELEMS * 4
        assert mem["total"] >= mem["stage"] + mem["buffer"]
        loss = model(torch.randn(4, 4)).sum()
        loss.backward()
        probe.optimizer.step()
        stage = probe._recorder.stage
        assert stage.buf.numel() <= stage_mod.MAX_ELEMS


@pytest.mark.parametrize("kinds", [("grad",), ("weight", "drift"), ("update",), ("act_grad",)])
def test_kind_subsets_match_reference(tmp_path, kinds):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3))
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g))
               for _ in range(8)]
    full = train_and_compare(model, batches, nn.functional.cross_entropy,
                             tmp_path=tmp_path / "all", steps=5)[0].scalars()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with gp.Probe(model, opt, run_dir=tmp_path / "sub", kinds=kinds, flush_every=3) as probe:
        for x, y in batches[:5]:
            loss = nn.functional.cross_entropy(model(x), y)
            probe.observe_loss(loss)
            loss.backward()
            opt.step()
            opt.zero_grad()
    sub = gp.Run.open(tmp_path / "sub").scalars()
    assert set(sub.kind) == set(kinds)
    key = ["step", "layer", "kind"]
    merged = sub.merge(full, on=key, suffixes=("", "_full"))
    assert len(merged) == len(sub)
    for col in ("norm", "mean", "max", "zero_frac", "dead_frac", "saturated_frac"):
        np.testing.assert_allclose(merged[col].to_numpy(float),
                                   merged[col + "_full"].to_numpy(float),
                                   rtol=1e-6, atol=1e-9, equal_nan=True, err_msg=col)


def _nan_run(tmp) -> tuple[pd.DataFrame, list]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    with gp.Probe(model, opt, run_dir=tmp, flush_every=4) as probe:
        for step in range(7):
            x = torch.randn(6, 4, generator=g)
            if step == 3:
                x[0, 0] = float("nan")  # one NaN input: NaN activations from layer 0 on
            loss = model(x).pow(2).mean()
            probe.observe_loss(loss)
            loss.backward()
            opt.step()
            opt.zero_grad()
    run = gp.Run.open(tmp)
    return run.scalars().sort_values(["step", "layer_id", "kind"]).reset_index(drop=True), \
        run.events().to_dict("records")


def test_accelerator_path_counts_exactly_and_finds_the_event(tmp_path, monkeypatch):
    """With the accelerator code path (no per-step read of values), a staged step holding
    NaN is counted exactly and its event is found at the flush: the same run as on CPU."""
    from gradprobe.stats import batched, eager

    cpu, cpu_events = _nan_run(tmp_path / "cpu")
    for mod in (eager, batched):
        monkeypatch.setattr(mod, "on_host", lambda device: False)
    acc, acc_events = _nan_run(tmp_path / "acc")
    num = cpu.select_dtypes("number").columns
    pd.testing.assert_frame_equal(acc[num], cpu[num], rtol=1e-6, atol=1e-7)
    assert cpu[(cpu.step == 3) & (cpu.kind == "act")].nonfinite.sum() > 0
    assert [(e["step"], e["layer"], e["pass"]) for e in acc_events] == \
        [(e["step"], e["layer"], e["pass"]) for e in cpu_events]
    assert cpu_events and cpu_events[0]["step"] == 3 and cpu_events[0]["layer"] == "0"


def test_sparse_gradient_of_a_staged_parameter_is_recorded(tmp_path):
    """A small embedding with sparse gradients is staged for its weights; its gradient (the
    values of the coalesced sparse tensor) is summarised at the step instead."""
    torch.manual_seed(0)
    emb = nn.Embedding(30, 4, sparse=True)
    head = nn.Linear(4, 2)
    model = nn.Sequential(emb, head)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    want = []
    with gp.Probe(model, opt, run_dir=tmp_path / "r", kinds=("grad", "weight")) as probe:
        for step in range(3):
            ids = torch.tensor([[1, 5, 5, 7], [2, 2, 9, 1]]) + step
            loss = model(ids).pow(2).mean()
            probe.observe_loss(loss)
            loss.backward()
            want.append(emb.weight.grad.coalesce().values().double())
            opt.step()
            opt.zero_grad()
    df = gp.Run.open(tmp_path / "r").scalars(kinds="grad")
    got = df[df.layer == "0"].set_index("step")
    for step, v in enumerate(want):
        assert math.isclose(got.loc[step, "norm"], float(v.norm()), rel_tol=1e-6)
        assert got.loc[step, "count"] == v.numel()
