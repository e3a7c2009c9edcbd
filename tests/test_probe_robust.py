"""AMP GradScaler, non-finite events, SIGKILL, transformers models, torch.compile."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from torch import nn

import gradprobe as gp
from gradprobe.errors import NonFiniteError, UnsupportedModelError


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))


def _data(n, bad_step=None):
    g = torch.Generator().manual_seed(5)
    out = [(torch.randn(6, 4, generator=g), torch.randint(0, 2, (6,), generator=g))
           for _ in range(n)]
    if bad_step is not None:
        out[bad_step][0][2, 1] = math.inf
    return out


def _train(run_dir, data, scaler=None, **kw):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gp.Probe(model, opt, run_dir=run_dir, scaler=scaler, **kw) as probe:
        for x, y in data:
            loss = nn.functional.cross_entropy(model(x), y)
            probe.observe_loss(loss)
            if scaler is None:
                loss.backward()
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            opt.zero_grad()
    return probe.run


def test_grad_scaler_statistics_are_unscaled(tmp_path):
    data = _data(4)
    plain = _train(tmp_path / "plain", data).scalars()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14)
    scaled = _train(tmp_path / "amp", data, scaler=scaler).scalars()
    assert len(plain) == len(scaled)
    for kind in ("grad", "act_grad", "weight", "update"):
        a = plain[plain.kind == kind].reset_index(drop=True)
        b = scaled[scaled.kind == kind].reset_index(drop=True)
        for col in ("norm", "mean", "min", "max", "abs_max"):
            assert a[col].to_numpy() == pytest.approx(b[col].to_numpy(), rel=1e-5, nan_ok=True), (
                kind, col)
    assert not scaled.skipped.any()


def test_grad_scaler_skipped_step_marked_not_raised(tmp_path):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    run = _train(tmp_path / "amp", _data(5, bad_step=2), scaler=scaler, on_nonfinite="raise")
    df = run.scalars()
    assert sorted(df.step.unique()) == [0, 1, 2, 3, 4]
    assert set(df[df.skipped].step) == {2}
    upd = df[(df.kind == "update") & (df.step == 2)]
    assert (upd["norm"] == 0).all()  # the scaler skipped optimizer.step(): weights unchanged
    ev = run.events()
    assert list(ev.step) == [2] and bool(ev.amp_skipped.iloc[0])
    assert ev["pass"].iloc[0] == "forward" and ev.layer.iloc[0] == "0"


def test_nonfinite_forward_event_and_raise_after_data_on_disk(tmp_path):
    with pytest.raises(NonFiniteError, match=r"step 3 in layer '0' \(forward pass") as err:
        _train(tmp_path / "r", _data(6, bad_step=3), on_nonfinite="raise", flush_every=100)
    assert "lower the learning rate" in err.value.hint
    run = gp.Run.open(tmp_path / "r")
    assert sorted(run.scalars().step.unique()) == [0, 1, 2, 3]  # flushed before raising
    ev = run.events()
    # the first non-finite value of the step is the bad input itself (one element), recorded
    # before layer 0's output (one row of 8 units)
    assert ev.iloc[0]["pass"] == "forward" and ev.iloc[0]["kind"] == "input"
    assert ev.iloc[0]["nonfinite"] == 1
    out = run.scalars(kinds="act")
    assert float(out[(out.step == 3) & (out.layer == "0")]["nonfinite"].iloc[0]) == 8


class _NaNGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * math.nan


class _NaNBackward(nn.Module):
    def forward(self, x):
        return _NaNGrad.apply(x)


def test_nonfinite_backward_event_names_first_layer_in_backward_order(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), _NaNBackward(), nn.Linear(8, 8),
                          nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gp.Probe(model, opt, run_dir=tmp_path / "r") as probe:
        for _ in range(2):
            model(torch.randn(3, 4)).sum().backward()
            opt.step()
            opt.zero_grad()
    ev = probe.run.events()
    assert list(ev.step) == [0, 1]
    first = ev.iloc[0]
    assert first["pass"] == "act_grad" and first["layer"] == "1"  # Tanh's output grad, not "0"
    assert first["n_layers"] >= 3


_CHILD = textwrap.dedent("""
    import sys, torch, gradprobe as gp
    from torch import nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    probe = gp.Probe(model, opt, run_dir=sys.argv[1], flush_every=3, hist_every=2,
                     budget=None)  # every step full: whole flushes of 3 full steps
    probe.attach()
    step = 0
    while True:
        loss = model(torch.randn(8, 4)).pow(2).mean()
        probe.observe_loss(loss)
        loss.backward(); opt.step(); opt.zero_grad()
        step += 1
        if step == 7:
            print("ready", flush=True)
""")


def test_sigkill_leaves_a_readable_run(tmp_path):
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(run_dir)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.3)  # let it train (and flush) some more, then kill it mid-step
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    run = gp.Run.open(run_dir)
    assert run.meta["status"] == "running"
    df = run.scalars()
    steps = sorted(df.step.unique())
    assert len(steps) >= 6 and len(steps) % 3 == 0  # only whole flushes of 3 steps
    assert steps == list(range(len(steps)))
    per_step = df.groupby("step").size()
    assert (per_step == per_step.iloc[0]).all()  # every flushed step is complete
    assert len(run.losses()) == len(steps)
    assert not run.histograms().empty
    assert not any(p.name.endswith(".tmp") and not p.name.startswith(".")
                   for p in run_dir.rglob("*"))


def test_reading_while_being_written(tmp_path):
    # Flushes are written by a background thread: a reader sees whole flushes, in order, each
    # shortly after it was handed over.
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gp.Probe(model, opt, run_dir=tmp_path / "r", flush_every=2):
        for i in range(5):
            model(torch.randn(3, 4)).sum().backward()
            opt.step()
            opt.zero_grad()
            flushed = list(range(2 * ((i + 1) // 2)))
            deadline = time.monotonic() + 30
            while True:
                seen = sorted(gp.Run.open(tmp_path / "r").scalars(kinds="grad").step.unique())
                assert seen == flushed[: len(seen)] and len(seen) % 2 == 0
                if seen == flushed or time.monotonic() > deadline:
                    break
                time.sleep(0.005)
            assert seen == flushed


# ----------------------------------------------------------------------------------- transformers


def _tiny_models():
    transformers = pytest.importorskip("transformers")
    common = {"vocab_size": 50}
    return {
        "bert": lambda: transformers.BertForSequenceClassification(transformers.BertConfig(
            hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
            max_position_embeddings=32, **common)),
        "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_embd=16, n_layer=2, n_head=2, n_positions=32, **common)),
        "t5": lambda: transformers.T5ForConditionalGeneration(transformers.T5Config(
            d_model=16, d_ff=24, d_kv=8, num_layers=1, num_heads=2, decoder_start_token_id=0,
            pad_token_id=0, **common)),
        "vit": lambda: transformers.ViTForImageClassification(transformers.ViTConfig(
            image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1,
            num_attention_heads=2, intermediate_size=24, num_labels=3)),
    }


def _batch(name):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (2, 6), generator=g)
    if name == "bert":
        return {"input_ids": ids, "labels": torch.tensor([0, 1])}
    if name == "gpt2":
        return {"input_ids": ids, "labels": ids}
    if name == "t5":
        return {"input_ids": ids, "labels": ids[:, :4].clone()}
    return {"pixel_values": torch.randn(2, 3, 8, 8, generator=g), "labels": torch.tensor([0, 2])}


@pytest.mark.parametrize("name", ["bert", "gpt2", "t5", "vit"])
def test_transformers_models_from_config(name, tmp_path):
    torch.manual_seed(0)
    model = _tiny_models()[name]()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    unique = {id(p): p for p in model.parameters()}
    with gp.Probe(model, opt, run_dir=tmp_path / "r") as probe:
        for _ in range(2):
            out = model(**_batch(name))
            probe.observe_loss(out.loss)
            out.loss.backward()
            grads = {id(p): p.grad.detach().clone() for p in unique.values()
                     if p.grad is not None}
            opt.step()
            opt.zero_grad()
    run = probe.run
    df = run.scalars()
    w = df[(df.kind == "weight") & (df.step == 1)]
    assert w["count"].sum() == sum(p.numel() for p in unique.values())  # tied params once
    # the total gradient norm over layers equals the one computed from .grad at the last step
    g = df[(df.kind == "grad") & (df.step == 1)]
    want = math.sqrt(sum(float(t.double().pow(2).sum()) for t in grads.values()))
    assert math.sqrt((g["norm"] ** 2).sum()) == pytest.approx(want, rel=1e-4)
    acts = df[df.kind == "act_grad"]
    assert len(acts) > 0 and acts["norm"].notna().all()
    assert run.layers["depth"].notna().sum() > 0


def test_compiled_model_param_kinds_or_clear_error(tmp_path):
    model = _mlp()
    compiled = torch.compile(model, backend="eager")
    with pytest.raises(UnsupportedModelError, match="torch.compile") as err:
        gp.Probe(compiled, run_dir=tmp_path / "a")
    assert "kinds=" in err.value.hint
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kinds = ("grad", "weight", "update", "drift")
    with gp.Probe(compiled, opt, run_dir=tmp_path / "b", kinds=kinds) as probe:
        for x, y in _data(3):
            nn.functional.cross_entropy(compiled(x), y).backward()
            opt.step()
            opt.zero_grad()
    df = probe.run.scalars()
    assert set(df.kind) == set(kinds) and sorted(df.step.unique()) == [0, 1, 2]
    assert set(df.layer) == {"0", "2", "4"}  # names of the original module
