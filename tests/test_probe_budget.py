"""The two tiers (issue 14): the always-on tier every step, the full tier on a schedule within
``budget=``, ``flush_secs``, and the bad values of the new options.

References: the gradient norms against ``torch.linalg.vector_norm`` of the gradients read in the
loop; the planted NaN/Inf and spikes against the step, layer and pass they were planted at; the
fixed schedule against ``range(0, n, every)``; ``budget=None`` against ``every=1``.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import gradprobe as gp
from gradprobe.capture import always as always_mod
from gradprobe.capture import schedule as sched
from gradprobe.errors import ConfigError


class Scale(nn.Module):
    """``x * w + bad``: a layer with a parameter (so the Probe tracks it) whose output is
    poisoned where ``bad`` is set to NaN or Inf."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(n))
        self.register_buffer("bad", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w + self.bad


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict([
        ("inp", nn.Linear(4, 8)), ("act", nn.Tanh()), ("mid", Scale(8)),
        ("hid", nn.Linear(8, 8)), ("relu", nn.ReLU()), ("out", nn.Linear(8, 1)),
    ]))


def _batches(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(16, 4, generator=g) for _ in range(n)]


def _train(run_dir, steps=30, *, lr=0.05, plant=None, loss_scale=None, reference=None, **kw):
    """Train ``steps`` steps; ``plant(step, model)`` may poison a step; ``loss_scale`` maps a
    step to a factor on its loss; ``reference`` collects the per-layer gradient norms."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    with gp.Probe(model, opt, run_dir=run_dir, **kw) as probe:
        for step, x in enumerate(_batches(steps)):
            if plant is not None:
                plant(step, model)
            loss = model(x).pow(2).mean()
            if loss_scale is not None:
                loss = loss * loss_scale.get(step, 1.0)
            probe.observe_loss(loss)
            loss.backward()
            if reference is not None:
                for name, mod in model.named_children():
                    ps = [p.grad.reshape(-1) for p in mod.parameters()]
                    if ps:
                        reference.append((step, name, float(torch.linalg.vector_norm(
                            torch.cat(ps)))))
            opt.step()
            opt.zero_grad()
    return probe.run


def test_always_on_norms_equal_the_reference_every_step(tmp_path):
    ref: list = []
    run = _train(tmp_path / "r", 40, reference=ref, flush_every=7)
    got = run.grad_norms().dropna(subset=["grad_norm"])
    want = pd.DataFrame(ref, columns=["step", "layer", "ref"])
    both = want.merge(got, on=["step", "layer"], how="left")
    assert len(both) == len(want) == 40 * 4 and both["grad_norm"].notna().all()
    assert both["grad_norm"].to_numpy() == pytest.approx(both["ref"].to_numpy(), rel=1e-5)
    tiers = run.steps().set_index("step")["tier"]
    assert list(tiers.index) == list(range(40))
    assert (tiers == "always").any() and (tiers.iloc[: sched.WARMUP] == "full").all()
    # the full steps' grad rows agree with the always-on norms
    full = run.scalars(kinds="grad")[["step", "layer", "norm"]].merge(got, on=["step", "layer"])
    assert full["norm"].to_numpy() == pytest.approx(full["grad_norm"].to_numpy(), rel=1e-5)


@pytest.mark.parametrize("clip", [None, 0.05])
def test_full_steps_take_the_norms_from_the_stage_and_they_equal_the_reference(tmp_path, clip):
    """Every step full: the always-on norms come from the stage's row (one C call over the
    staged gradients). Against the norms of the gradients the optimizer step got (clipped in
    the loop where ``clip``), with batch sizes that change the stage's layout and buffer."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(3)
    sizes = [16] * 5 + [40] * 4 + [3000] * 2 + [7] * 5  # 3000: a buffer of a new size
    ref: list = []
    with gp.Probe(model, opt, run_dir=tmp_path / "r", budget=None, every=1,
                  flush_every=6) as probe:
        always = probe._loop.always
        served = []
        take = always._staged.grad_norms_into
        always._staged.grad_norms_into = lambda out, order: served.append(take(out, order)) \
            or served[-1]
        for step, n in enumerate(sizes):
            loss = model(torch.randn(n, 4, generator=g)).pow(2).mean()
            probe.observe_loss(loss)
            loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            for name, mod in model.named_children():
                ps = [p.grad.reshape(-1) for p in mod.parameters()]
                if ps:
                    ref.append((step, name, float(torch.linalg.vector_norm(torch.cat(ps)))))
            opt.step()
            opt.zero_grad()
    assert served == [True] * len(sizes)
    got = probe.run.grad_norms().dropna(subset=["grad_norm"])
    want = pd.DataFrame(ref, columns=["step", "layer", "ref"])
    both = want.merge(got, on=["step", "layer"], how="left")
    assert len(both) == len(sizes) * 4 and both["grad_norm"].notna().all()
    assert both["grad_norm"].to_numpy() == pytest.approx(both["ref"].to_numpy(), rel=1e-5)


def test_the_stage_serves_the_norms_only_when_it_holds_every_gradient(tmp_path):
    """A parameter too large for the stage: the norms are read from the gradients."""
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3000))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gp.Probe(model, opt, run_dir=tmp_path / "r", budget=None, every=1) as probe:
        assert probe._loop.always._staged is None
        for _ in range(3):
            loss = model(torch.randn(5, 4)).pow(2).mean()
            probe.observe_loss(loss)
            loss.backward()
            want = [float(torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1) for p in m.parameters()])))
                    for m in (model[0], model[2])]
            opt.step()
            opt.zero_grad()
    got = probe.run.grad_norms().dropna(subset=["grad_norm"])
    assert got[got.step == 2]["grad_norm"].to_numpy() == pytest.approx(want, rel=1e-5)


def _poison_output(k, value):
    def plant(step, model):
        model.mid.bad.fill_(value if step == k else 0.0)
    return plant


def _poison_grad(k):
    def plant(step, model):
        if step == 0:
            model.mid.w.register_hook(lambda g: g * math.nan if plant.step == k else g)
        plant.step = step
    return plant


def _poison_output_grad(k):
    """NaN into the gradient flowing into ``hid``'s output at step ``k`` (a tensor hook
    registered before the Probe's own, so a full step's statistics see it too)."""
    def plant(step, model):
        if step == 0:
            def forward_hook(module, args, out):
                if plant.step == k:
                    out.register_hook(lambda g: g * math.nan)
            model.hid.register_forward_hook(forward_hook, prepend=True)
        plant.step = step
    return plant


@pytest.fixture(params=["short", "numpy"])
def row_check(request, monkeypatch):
    """The always-on row's host check on both of its paths: Python floats for short rows,
    numpy for wide ones (:data:`gradprobe.capture.always.SHORT_ROW`)."""
    if request.param == "numpy":
        monkeypatch.setattr(always_mod, "SHORT_ROW", 0)
    return request.param


@pytest.mark.parametrize(("where", "layer", "pass_"), [
    ("activation", "mid", "forward"), ("activation-inf", "mid", "forward"),
    ("gradient", "mid", "grad"), ("output-gradient", "hid", "act_grad"),
    ("loss", None, "loss")])
@pytest.mark.parametrize("kw", [{"every": 7}, {}, {"budget": None, "every": 1}],
                         ids=["every7", "budget", "everything"])
def test_nonfinite_is_recorded_at_its_step_layer_and_pass(tmp_path, where, layer, pass_, kw,
                                                          row_check):
    k = 17  # not a multiple of 7, after the warm-up
    plant = {"activation": _poison_output(k, math.nan),
             "activation-inf": _poison_output(k, math.inf),
             "gradient": _poison_grad(k), "output-gradient": _poison_output_grad(k),
             "loss": None}[where]
    scale = {k: math.nan} if where == "loss" else None
    run = _train(tmp_path / "r", 24, plant=plant, loss_scale=scale, lr=0.0, **kw)
    ev = run.events()
    first = ev[ev.step == ev.step.min()].iloc[0]
    assert int(first["step"]) == k, ev
    assert first["pass"] == pass_ and (first["layer"] == layer or
                                       (layer is None and pd.isna(first["layer"]))), first
    steps = run.steps().set_index("step")
    if kw.get("every", 1) > 1:  # the fixed schedule: step k has only the always-on tier
        assert steps.loc[k, "tier"] == "always"
    if kw.get("every") == 1:  # every step full: the full tier found the outputs' values
        assert steps.loc[k, "tier"] == "full"
    norms = run.grad_norms()
    at_k = norms[norms.step == k].set_index("layer")
    if where.startswith("activation"):
        assert bool(at_k.loc["mid", "act_nonfinite"]) and not at_k.loc["inp", "act_nonfinite"]
    if where == "gradient":  # born in mid's weight gradient: the layers below stay finite
        assert bool(at_k.loc["mid", "grad_nonfinite"]) and not at_k.loc["hid", "grad_nonfinite"]
        assert not at_k.loc["inp", "grad_nonfinite"]
    if where == "output-gradient":  # hid's output gradient: hid and every layer below it
        assert at_k.loc[["inp", "mid", "hid"], "grad_nonfinite"].all()
        assert not at_k.loc["out", "grad_nonfinite"]
        if steps.loc[k, "tier"] == "always":
            assert first.get("inferred") is True, first
    if where == "loss":
        assert bool(steps.loc[k, "loss_nonfinite"]) and not steps.loc[k - 1, "loss_nonfinite"]
    assert norms[norms.step < k][["act_nonfinite", "grad_nonfinite"]].sum().sum() == 0
    if not kw:  # the budget schedule: the steps after it are full
        assert (steps.loc[k + 1 : k + sched.AFTER, "tier"] == "full").all()


class Clean(nn.Module):
    """``nan_to_num`` of its input, no parameters (not tracked): a non-finite value above it
    reaches neither the loss nor any gradient (the gradient of ``nan_to_num`` is 0 there)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)


@pytest.mark.parametrize("kw", [{"every": 7}, {}, {"budget": None, "every": 1}],
                         ids=["every7", "budget", "everything"])
@pytest.mark.parametrize("k", [3, 17])  # in the budget's warm-up (a full step), and after it
def test_an_output_nonfinite_alone_is_found_on_every_tier(tmp_path, kw, k):
    """Only ``mid``'s output is non-finite at step ``k``: loss and gradients stay finite. The
    always-on flag, the event and the budget's trigger come from the always-on sum where the
    step is not full, and from the full tier's count where it is (the hooks leave the sum of
    an output the full tier records to it)."""
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict([
        ("inp", nn.Linear(4, 8)), ("act", nn.Tanh()), ("mid", Scale(8)), ("clean", Clean()),
        ("hid", nn.Linear(8, 8)), ("relu", nn.ReLU()), ("out", nn.Linear(8, 1)),
    ]))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gp.Probe(model, opt, run_dir=tmp_path / "r", **kw) as probe:
        for step, x in enumerate(_batches(24)):
            model.mid.bad.fill_(math.nan if step == k else 0.0)
            loss = model(x).pow(2).mean()
            assert torch.isfinite(loss)
            probe.observe_loss(loss)
            loss.backward()
            assert all(torch.isfinite(p.grad).all() for p in model.parameters())
            opt.step()
            opt.zero_grad()
    run = probe.run
    ev = run.events()
    assert list(ev["step"]) == [k], ev
    assert ev.iloc[0]["layer"] == "mid" and ev.iloc[0]["pass"] == "forward"
    norms = run.grad_norms()
    bad = norms[norms.act_nonfinite]
    assert list(zip(bad.step, bad.layer)) == [(k, "mid")], bad
    assert not norms["grad_nonfinite"].any()
    tier = run.steps().set_index("step").loc[k, "tier"]
    assert tier == ("always" if kw.get("every") == 7 else "full" if kw else tier)
    if not kw:  # the budget schedule: step k triggered full steps after it
        trig = [t for t in run.schedule["triggers"] if t["why"] == "nonfinite"]
        assert [(t["step"], t["layer"]) for t in trig] == [(k, "mid")], trig
        steps = run.steps().set_index("step")["tier"]
        assert (steps.loc[k + 1 : k + sched.AFTER] == "full").all()


def test_spike_is_at_its_step_and_the_next_steps_are_full(tmp_path, row_check):
    k = 30
    ref: list = []
    run = _train(tmp_path / "r", 45, lr=0.0, loss_scale={k: 1e4}, reference=ref)
    norms = run.grad_norms().pivot(index="step", columns="layer", values="grad_norm")
    want = pd.DataFrame(ref, columns=["step", "layer", "v"]).pivot(index="step",
                                                                   columns="layer", values="v")
    assert norms.loc[k, want.columns].to_numpy() == pytest.approx(want.loc[k].to_numpy(),
                                                                  rel=1e-5)
    others = norms.drop(index=k)[want.columns].median()
    assert (norms.loc[k, want.columns] > 1000 * others).all()  # the spike is at its step
    steps = run.steps().set_index("step")["tier"]
    assert (steps.loc[k + 1 : k + sched.AFTER] == "full").all()
    trig = run.schedule["triggers"]
    assert {"step": k, "why": "spike"}.items() <= trig[-1].items(), trig
    assert run.events().empty  # a spike is not a non-finite event


def test_frequent_spikes_over_budget_are_followed_in_full_once_per_gap(tmp_path):
    spikes = list(range(20, 50, 3))
    # a budget no step can meet: the account is always overdrawn after the warm-up
    run = _train(tmp_path / "r", 60, lr=0.0, loss_scale={k: 1e4 for k in spikes}, budget=1e-9)
    trig = [t for t in run.schedule["triggers"] if t["why"] == "spike"]
    assert [t["step"] for t in trig] == spikes  # every spike seen at its step
    assert [t["full"] for t in trig] == [True] + [False] * (len(spikes) - 1)
    tier = run.steps().set_index("step")["tier"]
    assert (tier.loc[21 : 20 + sched.AFTER] == "full").all()
    assert (tier.loc[20 + sched.AFTER + 1 :] == "always").all()
    norms = run.grad_norms().dropna(subset=["grad_norm"]).pivot(
        index="step", columns="layer", values="grad_norm")
    quiet = norms.drop(index=spikes).median()
    assert (norms.loc[spikes] > 1000 * quiet).all().all()  # each spike is in the rows


def test_a_spike_in_one_small_parameter_is_not_a_trigger(tmp_path):
    k = 30

    def plant(step, model):  # the first layer's bias gradient x 30 at step k only
        if step == k:
            handles.append(model.inp.bias.register_hook(lambda g: g * 30))
        elif handles:
            handles.pop().remove()

    handles: list = []
    run = _train(tmp_path / "r", 45, lr=0.0, plant=plant)
    norms = run.grad_norms().pivot(index="step", columns="layer", values="grad_norm")
    total = np.sqrt((norms**2).sum(axis=1))
    assert total.loc[k] < 3 * total.drop(index=k).median()  # the whole gradient barely moved
    assert norms.loc[k, "inp"] > 1.5 * norms.drop(index=k)["inp"].max()  # ... one part did
    assert not [t for t in run.schedule["triggers"] if t["why"] == "spike"]


def test_every_gives_the_fixed_schedule(tmp_path):
    run = _train(tmp_path / "r", 20, every=3, flush_every=2)
    assert sorted(run.scalars().step.unique()) == list(range(0, 20, 3))
    steps = run.steps()
    assert list(steps.step) == list(range(20))
    assert list(steps.step[steps.tier == "full"]) == list(range(0, 20, 3))
    assert run.schedule["mode"] == "every" and run.schedule["every"] == 3
    assert run.schedule["full_steps"] == 7 and run.schedule["steps"] == 20
    assert len(run.grad_norms().step.unique()) == 20


def test_budget_none_records_everything_as_every_1(tmp_path):
    a = _train(tmp_path / "a", 25, budget=None, hist_every=4)
    b = _train(tmp_path / "b", 25, every=1, hist_every=4)
    sa, sb = a.scalars(), b.scalars()
    assert sorted(sa.step.unique()) == list(range(25))
    pd.testing.assert_frame_equal(sa, sb)
    pd.testing.assert_frame_equal(a.histograms(), b.histograms())
    assert a.schedule["mode"] == "every" and a.schedule["full_steps"] == 25
    assert (a.steps().tier == "full").all()


def test_schedule_in_meta_json(tmp_path):
    run = _train(tmp_path / "r", 30)
    meta = run.meta
    s = meta["schedule"]
    assert s["mode"] == "budget" and s["budget"] == 0.05 and s["warmup"] == sched.WARMUP
    assert s["steps"] == 30 and s["full_steps"] == int((run.steps().tier == "full").sum())
    assert meta["config"]["budget"] == 0.05 and meta["config"]["flush_secs"] == 30.0
    assert s["probe_fraction"] is not None and s["probe_fraction"] > 0


def test_a_run_without_the_tiers_still_reads(tmp_path):
    run = _train(tmp_path / "r", 6, every=1)
    for d in ("steps", "norms"):
        for f in (run.path / d).iterdir():
            f.unlink()
        (run.path / d).rmdir()
    meta = json_load(run.path / "meta.json")
    del meta["schedule"]
    meta["config"]["every"] = 1
    (run.path / "meta.json").write_text(__import__("json").dumps(meta))
    old = gp.Run.open(run.path)
    assert old.schedule == {"mode": "every", "every": 1}
    assert list(old.steps().step) == list(range(6)) and (old.steps().tier == "full").all()
    g = old.grad_norms()
    assert len(g) == 6 * 4 and g.grad_norm.notna().all()


def json_load(path):
    import json

    return json.loads(path.read_text())


@pytest.mark.parametrize(("kw", "match"), [
    ({"budget": 0}, "budget must be a fraction"),
    ({"budget": 1.0}, "budget must be a fraction"),
    ({"budget": -0.1}, "budget must be a fraction"),
    ({"budget": math.nan}, "budget must be a fraction"),
    ({"budget": "5%"}, "budget must be a fraction"),
    ({"budget": True}, "budget must be a fraction"),
    ({"flush_secs": 0}, "flush_secs must be a positive number"),
    ({"flush_secs": -3.0}, "flush_secs must be a positive number"),
    ({"flush_secs": "30"}, "flush_secs must be a positive number"),
    ({"flush_secs": math.inf}, "flush_secs must be a positive number"),
    ({"every": 0, "budget": None}, "every must be a positive integer"),
    ({"every": 3, "budget": 5.0}, "budget must be a fraction"),
])
def test_bad_budget_and_flush_values(tmp_path, kw, match):
    with pytest.raises(ConfigError, match=match) as err:
        gp.Probe(_model(), run_dir=tmp_path / "r", **kw)
    assert err.value.hint and str(err.value).count("\n") == 1  # one line, and its hint
    assert not (tmp_path / "r").exists()


def test_every_with_budget_uses_every(tmp_path):
    run = _train(tmp_path / "r", 12, every=4, budget=0.2)  # documented: every wins
    assert run.schedule["mode"] == "every"
    assert sorted(run.scalars().step.unique()) == [0, 4, 8]


def test_raise_mode_raises_at_a_step_without_the_full_tier(tmp_path):
    from gradprobe.errors import NonFiniteError

    with pytest.raises(NonFiniteError, match=r"step 10 in layer 'mid' \(forward pass\)"):
        _train(tmp_path / "r", 14, plant=_poison_output(10, math.inf), every=7,
               on_nonfinite="raise")
    run = gp.Run.open(tmp_path / "r")
    assert list(run.events().step) == [10] and run.steps().step.max() == 10  # on disk


class _SparseAndIdle(nn.Module):
    """An embedding with sparse gradients, a dense head, and a layer that never runs (its
    parameters get no gradient): the always-on norms' fallbacks from the one foreach call."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 6, sparse=True)
        self.head = nn.Linear(6, 1)
        self.idle = nn.Linear(6, 6)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(idx).mean(1))


def test_always_on_norms_of_sparse_and_missing_gradients(tmp_path):
    torch.manual_seed(0)
    model = _SparseAndIdle()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(2)
    want = []
    with gp.Probe(model, opt, run_dir=tmp_path / "r") as probe:
        for _ in range(15):
            loss = model(torch.randint(0, 20, (8, 5), generator=g)).pow(2).mean()
            probe.observe_loss(loss)
            loss.backward()
            dense = model.emb.weight.grad.to_dense()  # the reference reads the sparse one dense
            head = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.head.parameters()))
            want.append((float(dense.norm()), float(head)))
            opt.step()
            opt.zero_grad()
    got = probe.run.grad_norms()
    for layer, col in (("emb", 0), ("head", 1)):
        norms = got[got["layer"] == layer].sort_values("step")["grad_norm"].to_numpy()
        np.testing.assert_allclose(norms, [w[col] for w in want], rtol=1e-5)
    idle = got[got["layer"] == "idle"]["grad_norm"].to_numpy()
    assert len(idle) == 15 and np.all(idle == 0), idle  # no gradient: norm 0, every step
