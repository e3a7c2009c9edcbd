"""Failure paths of the capture side (issue 16): the step that produced a NaN, runs without
an optimizer step, bad losses, sampled steps, closure optimizers."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import gradprobe as gp
from gradprobe.errors import NonFiniteError


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))


def _data(n, bad_step):
    g = torch.Generator().manual_seed(5)
    out = [(torch.randn(6, 4, generator=g), torch.randint(0, 2, (6,), generator=g))
           for _ in range(n)]
    out[bad_step][0][2, 1] = math.nan
    return out


class Guard(Exception):
    pass


def _guarded(run_dir, how, **kw):
    """The usual loop guard: stop before backward/optimizer.step() on a non-finite loss."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = gp.Probe(model, opt, run_dir=run_dir, **kw)
    try:
        with probe:
            for x, y in _data(5, bad_step=2):
                loss = nn.functional.cross_entropy(model(x), y)
                probe.observe_loss(loss)
                if not torch.isfinite(loss):
                    if how == "raise":
                        raise Guard("non-finite loss")
                    break
                loss.backward()
                opt.step()
                opt.zero_grad()
    except Guard:
        pass
    return gp.Run.open(run_dir)


@pytest.mark.parametrize("how", ["raise", "break"])
@pytest.mark.parametrize("on_nonfinite", ["record", "raise"])
def test_open_nan_step_reaches_disk(tmp_path, how, on_nonfinite):
    run = _guarded(tmp_path / "r", how, on_nonfinite=on_nonfinite)
    ev = run.events()
    assert list(ev.step) == [2]
    assert ev["pass"].iloc[0] == "forward" and ev.layer.iloc[0] == "0"
    assert bool(ev["incomplete"].iloc[0])
    df = run.scalars()
    assert sorted(df.step.unique()) == [0, 1, 2]
    act = df[(df.step == 2) & (df.kind == "act") & (df.layer == "0")]
    assert len(act) == 1 and act.nonfinite.iloc[0] > 0
    meta = json.loads((tmp_path / "r" / "meta.json").read_text())
    assert meta["status"] == "closed" and meta["incomplete_step"] == 2 and meta["steps"] == 2
    assert run.losses().step.max() == 2


def test_clean_run_has_no_incomplete_step(tmp_path):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gp.Probe(model, opt, run_dir=tmp_path / "r") as probe:
        for x, y in _data(4, bad_step=0)[1:]:
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
    run = probe.run
    assert sorted(run.scalars().step.unique()) == [0, 1, 2]
    assert run.events().empty
    assert "incomplete_step" not in run.meta


def test_nonfinite_raise_path_still_complete(tmp_path):
    """With on_nonfinite="raise" and no guard, the NaN step is complete (not incomplete)."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(NonFiniteError), \
            gp.Probe(model, opt, run_dir=tmp_path / "r", on_nonfinite="raise"):
        for x, y in _data(4, bad_step=1):
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    ev = gp.Run.open(tmp_path / "r").events()
    assert list(ev.step) == [1]
    assert "incomplete" not in ev or not ev["incomplete"].fillna(False).any()


# ---------------------------------------------------------------- item 7 (capture parts)


def test_no_optimizer_step_warns(tmp_path):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    other = torch.optim.SGD(model.parameters(), lr=0.1)  # the loop steps another optimizer
    with pytest.warns(RuntimeWarning, match=r"optimizer\.step\(\) was never called"), \
            gp.Probe(model, opt, run_dir=tmp_path / "a"):
        for x, y in _data(3, bad_step=0)[1:]:
            nn.functional.cross_entropy(model(x), y).backward()
            other.step()
            other.zero_grad()


def test_no_probe_step_warns_how_to_call_it(tmp_path):
    model = _mlp()
    with pytest.warns(RuntimeWarning, match=r"call probe\.step\(\) after each weight update"), \
            gp.Probe(model, run_dir=tmp_path / "a"):
        model(torch.randn(3, 4)).sum().backward()


def test_stepped_run_does_not_warn(tmp_path, recwarn):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gp.Probe(model, opt, run_dir=tmp_path / "a"):
        model(torch.randn(3, 4)).sum().backward()
        opt.step()
    assert not [w for w in recwarn if "no completed step" in str(w.message)]


@pytest.mark.parametrize("loss", [torch.tensor(3), torch.tensor(True), torch.tensor(1 + 2j)])
def test_observe_loss_refuses_non_float(tmp_path, loss):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gp.Probe(model, opt, run_dir=tmp_path / "a") as probe:
        with pytest.raises(gp.errors.ConfigError, match="floating-point") as info:
            probe.observe_loss(loss)
        assert "float" in info.value.hint
        model(torch.randn(3, 4)).sum().backward()
        opt.step()


def test_nonfinite_between_sampled_steps_is_at_its_step(tmp_path):
    # was (issue 16): with every=2 the NaN was reported at the first sampled step (4), marked
    # sampled_every=2. Now the always-on tier checks every step: it is at step 3, its layer
    # and pass, and the sampled step 4 has the full tier's event.
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    data = _data(6, bad_step=0)
    for x, _ in data[4:]:  # loop steps are data[1:]: NaN from step 3 on, first sampled at 4
        x[0, 0] = math.nan
    with gp.Probe(model, opt, run_dir=tmp_path / "a", every=2) as probe:
        for x, y in data[1:]:
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    ev = probe.run.events()
    assert list(ev.step) == [3, 4] and "sampled_every" not in ev
    first = ev.iloc[0]
    assert first["layer"] == "0" and first["pass"] == "forward" and first["tier"] == "always"


# ---------------------------------------------------------------- item 4: closure optimizers


def _closure(model, opt, x, y):
    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return closure


def test_lbfgs_refused_at_attach(tmp_path):
    model = _mlp()
    opt = torch.optim.LBFGS(model.parameters(), max_iter=3)
    with pytest.raises(gp.errors.UnsupportedModelError, match="LBFGS") as info:
        gp.Probe(model, opt, run_dir=tmp_path / "a")
    assert "probe.step()" in info.value.hint
    assert not (tmp_path / "a").exists()


def test_closure_step_refused_at_first_closure_step(tmp_path):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _data(2, bad_step=0)[1]
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(gp.errors.UnsupportedModelError, match=r"SGD steps with a closure"), \
            gp.Probe(model, opt, run_dir=tmp_path / "a"):
        opt.step(_closure(model, opt, x, y))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_lbfgs_works_with_probe_step(tmp_path):
    """What the refusal recommends: optimizer=None and probe.step() after each closure step."""
    model = _mlp()
    opt = torch.optim.LBFGS(model.parameters(), max_iter=4)
    with gp.Probe(model, run_dir=tmp_path / "a") as probe:
        for x, y in _data(4, bad_step=0)[1:]:
            opt.step(_closure(model, opt, x, y))
            probe.step()
    df = probe.run.scalars()
    assert sorted(df.step.unique()) == [0, 1, 2]
    grad = df[df.kind == "grad"]
    assert len(grad) > 0
    assert grad.groupby("step").size().min() == grad.groupby("step").size().max()
    act = df[(df.kind == "act") & (df.step == 0)]
    assert (act["count"] > 6 * 8).any()  # several closure forwards merged into step 0
    assert (df[df.kind == "update"]["norm"] > 0).all()
