"""The Probe's statistics for diagnosis: unit spread, the first layer's input, per-time-step
gradients of recurrent layers; each against a slow, obvious reference (explicit loops,
torch.autograd)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import gradprobe as gp
from gradprobe.capture.forward import ForwardHooks
from gradprobe.capture.params import ParamStats
from gradprobe.stats import spread as SP
from gradprobe.stats.batched import SMALL

# ------------------------------------------------------------------------------ unit spread


def _shapes():
    return [(4, 3), (7,), (16, 2, 3, 3), (1, 5), (SMALL // 8 + 3, 8), (300, 50)]


@pytest.mark.parametrize("kind", ["random", "constant", "equal_rows", "zero"])
def test_row_spread_equals_the_explicit_loop(kind):
    g = torch.Generator().manual_seed(0)
    ts = []
    for shape in _shapes():
        if kind == "random":
            t = torch.randn(*shape, generator=g)
        elif kind == "constant":
            t = torch.full(shape, 0.3)
        elif kind == "equal_rows":
            t = torch.randn(1, *shape[1:], generator=g).expand(*shape).clone()
        else:
            t = torch.zeros(shape)
        ts.append(t)
    sp, ref = SP.RowSpread(ts, torch.device("cpu"))(ts)
    for i, t in enumerate(ts):
        want_sp, want_ref = SP.reference(t)
        # float32 reductions of up to 15,000 elements: relative rounding up to ~3e-5
        assert float(ref[i]) == pytest.approx(float(want_ref), rel=1e-4, abs=1e-12)
        # Σ‖w_i‖² − ‖Σ w_i‖²/u from float32 sums: absolute error ~ 1e-4·Σ‖w_i‖²
        assert float(sp[i]) == pytest.approx(float(want_sp), rel=1e-4,
                                             abs=1e-4 * float(want_ref) + 1e-12), (i, t.shape)


def test_row_spread_half_precision_and_ratio_scale_free():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 32, generator=g)
    rs = SP.RowSpread([w], torch.device("cpu"))
    sp, ref = rs([w])
    sp2, ref2 = rs([w * 1e-3])
    assert math.sqrt(float(sp / ref)) == pytest.approx(math.sqrt(float(sp2 / ref2)), rel=1e-4)
    assert math.sqrt(float(sp / ref)) == pytest.approx(math.sqrt(1 - 1 / 64), abs=0.05)
    h = w.half()
    sph, refh = SP.RowSpread([h], torch.device("cpu"))([h])
    want_sp, want_ref = SP.reference(h)
    assert float(sph[0]) == pytest.approx(float(want_sp), rel=1e-3)


def _train_mlp(run_dir, steps=4, const=False, **kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(),
                          nn.Linear(12, 2))
    if const:
        with torch.no_grad():
            for m in model:
                if isinstance(m, nn.Linear):
                    m.weight.fill_(0.1)
                    m.bias.zero_()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(16, 6, generator=g) * 3 + 1 for _ in range(steps)]
    weights = []
    with gp.Probe(model, opt, run_dir=run_dir, **kw) as probe:
        for x in xs:
            loss = model(x).pow(2).mean()
            probe.observe_loss(loss)
            loss.backward()
            opt.step()
            opt.zero_grad()
            weights.append({n: m.weight.detach().clone() for n, m in model.named_children()
                            if isinstance(m, nn.Linear)})
    return probe.run, xs, weights


@pytest.mark.parametrize("const", [False, True])
def test_probe_spread_matches_the_weights_after_each_step(tmp_path, const):
    run, _, weights = _train_mlp(tmp_path / "r", const=const)
    df = run.scalars(kinds="spread")
    assert set(df.layer) == {"0", "2", "4"}  # dense layers only
    raw = run.raw_scalars()
    raw = raw[raw.kind == "spread"]
    for step, ws in enumerate(weights):
        for name, w in ws.items():
            sp, ref = SP.reference(w)
            got = df[(df.step == step) & (df.layer == name)]["norm"].iloc[0]
            assert got == pytest.approx(math.sqrt(float(sp / ref)), abs=1e-3), (step, name)
            r = raw[(raw.step == step) & (raw.layer == name)].iloc[0]
            assert r["ref_sumsq"] == pytest.approx(float(ref), rel=1e-5)
            assert r["count"] == w.numel()
    if const:  # identical rows stay identical: the symmetry the statistic is for
        assert (df[df.layer == "0"]["norm"] < 1e-2).all()
    else:
        assert (df[df.layer == "0"]["norm"] > 0.5).all()


def test_spread_rows_merge_by_addition(tmp_path):
    """The stored sums merge: the ratio of summed sums is the ratio over the pooled steps."""
    run, _, weights = _train_mlp(tmp_path / "r")
    raw = run.raw_scalars()
    raw = raw[(raw.kind == "spread") & (raw.layer == "2")]
    sp = sum(float(SP.reference(ws["2"])[0]) for ws in weights)
    ref = sum(float(SP.reference(ws["2"])[1]) for ws in weights)
    assert raw["sumsq"].sum() / raw["ref_sumsq"].sum() == pytest.approx(sp / ref, rel=1e-4)


# ------------------------------------------------------------------------------ input


def test_input_of_the_first_dense_layer_equals_the_batch(tmp_path):
    run, xs, _ = _train_mlp(tmp_path / "r", hist_every=2)
    df = run.scalars(kinds="input")
    assert set(df.layer) == {"0"}  # only the first dense layer to run
    for step, x in enumerate(xs):
        row = df[df.step == step].iloc[0]
        xd = x.double()
        assert row["count"] == x.numel()
        assert row["mean"] == pytest.approx(float(xd.mean()), rel=1e-5)
        assert row["rms"] == pytest.approx(float(xd.pow(2).mean().sqrt()), rel=1e-5)
        assert row["abs_max"] == pytest.approx(float(xd.abs().max()), rel=1e-6)
    hist = run.histograms()
    assert set(hist[hist.kind == "input"].step) == {0, 2}


def test_input_after_an_embedding_is_the_first_dense_layer(tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 2)  # registered first, runs last
            self.emb = nn.Embedding(10, 4)
            self.conv = nn.Conv1d(4, 4, 3, padding=1)

        def forward(self, idx):
            h = self.conv(self.emb(idx).transpose(1, 2))
            return self.head(h.mean(2))

    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    idx = torch.randint(0, 10, (3, 5))
    with gp.Probe(model, opt, run_dir=tmp_path / "r") as probe:
        for _ in range(2):
            model(idx).sum().backward()
            opt.step()
            opt.zero_grad()
    df = probe.run.scalars(kinds="input")
    assert set(df.layer) == {"conv"}
    assert len(probe._hooks._input_handles) == 1  # the other dense layers' pre-hooks are gone


# ------------------------------------------------------------------------------ through time


class _Seq(nn.Module):
    def __init__(self, cell, batch_first, embed):
        super().__init__()
        self.embed = nn.Linear(3, 3) if embed else None
        self.rnn = cell(3, 6, batch_first=batch_first)
        self.head = nn.Linear(6, 2)
        self.batch_first = batch_first

    def forward(self, x):
        if self.embed is not None:
            x = self.embed(x)
        out, _ = self.rnn(x)
        last = out[:, -1] if self.batch_first else out[-1]
        return self.head(last) + 0.1 * self.head(out.mean(1 if self.batch_first else 0))


def _reference_time(model, x, batch_first):
    """Per-time-step ‖∂L/∂x_t‖ and ‖∂L/∂h_t‖ by torch.autograd on the same step."""
    seen = {}

    def pre(m, args):
        xin = args[0].detach().requires_grad_()
        seen["x"] = xin
        return (xin,)

    def post(m, args, out):
        seen["h"] = out[0]
        out[0].retain_grad()

    h1 = model.rnn.register_forward_pre_hook(pre)
    h2 = model.rnn.register_forward_hook(post)
    loss = model(x).pow(2).mean()
    gx, gh = torch.autograd.grad(loss, [seen["x"], seen["h"]])
    h1.remove()
    h2.remove()
    tdim = 1 if batch_first else 0
    norms = []
    for g in (gx, gh):
        norms.append([float(g.select(tdim, t).double().norm()) for t in range(g.shape[tdim])])
    return norms


@pytest.mark.parametrize("cell", [nn.RNN, nn.LSTM, nn.GRU])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("embed", [False, True])
def test_time_gradients_equal_autograd(tmp_path, cell, batch_first, embed):
    torch.manual_seed(0)
    model = _Seq(cell, batch_first, embed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(2)
    shape = (4, 9, 3) if batch_first else (9, 4, 3)
    xs = [torch.randn(*shape, generator=g) for _ in range(4)]
    want = {}
    with gp.Probe(model, opt, run_dir=tmp_path / "r", hist_every=2) as probe:
        for step, x in enumerate(xs):
            if step % 2 == 0:  # on a hook-free twin with the same weights
                twin = _Seq(cell, batch_first, embed)
                twin.load_state_dict(model.state_dict())
                want[step] = _reference_time(twin, x, batch_first)
            loss = model(x).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
    run = probe.run
    for wrt, k in (("input", 0), ("output", 1)):
        tg = run.time_gradients(wrt)
        assert list(tg.columns[:4]) == ["step", "layer", "t", "grad_norm"]
        assert set(tg.step) == {0, 2} and set(tg.layer) == {"rnn"}
        for step, ref in want.items():
            got = tg[tg.step == step].sort_values("t")["grad_norm"].to_numpy()
            np.testing.assert_allclose(got, ref[k], rtol=1e-5, atol=1e-12)
    if not embed:  # the data tensor was handed a copy requiring grad: no .grad left behind
        assert xs[0].grad is None and not xs[0].requires_grad


def test_time_gradients_sum_micro_batches_and_skip_packed_and_bidirectional(tmp_path):
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(3, 4, batch_first=True)
            self.bi = nn.GRU(3, 4, batch_first=True, bidirectional=True)
            self.head = nn.Linear(12, 1)

        def forward(self, x, packed=False):
            if packed:
                p = nn.utils.rnn.pack_padded_sequence(x, [x.shape[1]] * x.shape[0],
                                                      batch_first=True)
                out, _ = self.rnn(p)
                out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True)
            else:
                out, _ = self.rnn(x)
            b, _ = self.bi(x)
            return self.head(torch.cat([out, b], -1)[:, -1])

    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(3)
    xa, xb = torch.randn(2, 5, 3, generator=g), torch.randn(2, 5, 3, generator=g)
    ref_a = _reference_time(_Wrap(model), xa, True)[0]  # before the Probe: no hooks yet
    ref_b = _reference_time(_Wrap(model), xb, True)[0]
    with gp.Probe(model, opt, run_dir=tmp_path / "r", hist_every=1) as probe:
        for x in (xa, xb):  # two micro-batches, one optimizer step
            model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        model(xa, packed=True).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    tg = probe.run.time_gradients()
    assert set(tg.layer) == {"rnn"}  # bidirectional: not recorded
    assert set(tg.step) == {0}  # packed: not recorded
    want = np.sqrt(np.square(ref_a) + np.square(ref_b))
    np.testing.assert_allclose(tg.sort_values("t")["grad_norm"], want, rtol=1e-5)


class _Wrap(nn.Module):
    """The net of the test above seen as `rnn` + rest, for _reference_time."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.rnn = net.rnn

    def forward(self, x):
        return self.net(x)


# ------------------------------------------------------------------------------ no host sync


class _NoSync(TorchDispatchMode):
    """Records every op that reads a tensor's value on the host."""

    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default):
            self.syncs.append(str(func))
        return func(*args, **(kwargs or {}))


def test_new_hooks_and_spread_do_not_sync_the_host(tmp_path, monkeypatch):
    mode = _NoSync()

    def watched(fn):
        def wrapper(*a, **k):
            with mode:
                return fn(*a, **k)
        return wrapper

    for name in ("input", "rnn_input", "rnn_output", "time", "output", "act_grad"):
        monkeypatch.setattr(ForwardHooks, name, watched(getattr(ForwardHooks, name)))
    monkeypatch.setattr(ParamStats, "spread", watched(ParamStats.spread))
    torch.manual_seed(0)
    model = _Seq(nn.LSTM, True, True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gp.Probe(model, opt, run_dir=tmp_path / "r", hist_every=1) as probe:
        for _ in range(3):
            model(torch.randn(2, 6, 3)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    assert not mode.syncs
    assert len(probe.run.time_gradients()) == 3 * 6
    assert len(probe.run.scalars(kinds="spread")) == 3 * 2


def test_bit_identical_training_with_time_hooks(tmp_path):
    """Raw sequences handed to the layer as a copy requiring grad change no parameter bit."""

    def train(run_dir=None):
        torch.manual_seed(0)
        model = _Seq(nn.RNN, False, False)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(4)
        xs = [torch.randn(7, 3, 3, generator=g) for _ in range(12)]

        def loop():
            for x in xs:
                model(x).pow(2).mean().backward()
                opt.step()
                opt.zero_grad()

        if run_dir is None:
            loop()
        else:
            with gp.Probe(model, opt, run_dir=run_dir, hist_every=1):
                loop()
        return model

    plain, probed = train(), train(tmp_path / "r")
    for (n, a), b in zip(plain.named_parameters(), probed.parameters()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("kinds", [None, ("spread",), ("update", "spread")])
def test_spread_of_large_weights_with_and_without_the_weight_statistics(tmp_path, kinds):
    """Σ‖w_i‖² of a large weight is taken from its weight statistics when they are computed, and
    computed by the spread otherwise; both equal the explicit loop."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(200, 64), nn.ReLU(), nn.Linear(64, 3))
    assert model[0].weight.numel() > SMALL
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kw = {} if kinds is None else {"kinds": kinds}
    weights = []
    with gp.Probe(model, opt, run_dir=tmp_path / "r", **kw) as probe:
        for _ in range(3):
            model(torch.randn(8, 200)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            weights.append(model[0].weight.detach().clone())
    raw = probe.run.raw_scalars()
    raw = raw[(raw.kind == "spread") & (raw.layer == "0")].sort_values("step")
    for (_, r), w in zip(raw.iterrows(), weights):
        sp, ref = SP.reference(w)
        assert r["ref_sumsq"] == pytest.approx(float(ref), rel=1e-5)
        assert r["sumsq"] == pytest.approx(float(sp), rel=1e-4)
