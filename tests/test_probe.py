"""The Probe against a slow reference: per-tensor Python loops in float64 (stats.reference_stats)
fed by independent hooks that clone every tensor, on several architectures."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import gradprobe as gp
from gradprobe.activations import spec_for_module
from gradprobe.stats.reference import reference_stats
from gradprobe.stats.schema import derive_row


class Reference:
    """Clones outputs, output gradients, parameter gradients and weights of named modules."""

    def __init__(self, model: nn.Module, names: list[str], every: int = 1):
        self.mods = dict(model.named_modules())
        self.names = names
        self.every = every
        self.step = 0
        self.act: dict[tuple[int, str], list[torch.Tensor]] = {}
        self.act_grad: dict[tuple[int, str], list[torch.Tensor]] = {}
        self.grad: dict[tuple[int, str], list[torch.Tensor]] = {}
        self.weight: dict[tuple[int, str], list[torch.Tensor]] = {}
        self.update: dict[tuple[int, str], float] = {}
        self.drift: dict[tuple[int, str], float] = {}
        self.params = self._owned(model)
        self.w0 = {n: [p.detach().clone() for p in ps] for n, ps in self.params.items()}
        self.handles = [self.mods[n].register_forward_hook(self._fwd(n)) for n in names]

    def _owned(self, model):
        owned: dict[str, list[nn.Parameter]] = {n: [] for n in self.names}
        for pname, p in model.named_parameters():
            parts = pname.split(".")
            for k in range(len(parts) - 1, -1, -1):
                owner = ".".join(parts[:k])
                if owner in owned:
                    owned[owner].append(p)
                    break
        return {n: ps for n, ps in owned.items() if ps}

    def _fwd(self, name):
        def hook(mod, args, out):
            if not torch.is_grad_enabled() or self.step % self.every:
                return
            t = out if isinstance(out, torch.Tensor) else out[0]
            key = (self.step, name)
            self.act.setdefault(key, []).append(t.detach().clone())
            if t.requires_grad:
                t.register_hook(lambda g: self.act_grad.setdefault(key, []).append(g.clone()))

        return hook

    def before_step(self):
        self._before = {n: [p.detach().clone() for p in ps] for n, ps in self.params.items()}
        if self.step % self.every == 0:
            for n, ps in self.params.items():
                gs = [p.grad.detach().clone() for p in ps if p.grad is not None]
                if gs:
                    self.grad[(self.step, n)] = gs

    def after_step(self):
        if self.step % self.every == 0:
            for n, ps in self.params.items():
                w = [p.detach().clone() for p in ps]
                self.weight[(self.step, n)] = w
                dw = sum(float((a.double() - b.double()).pow(2).sum())
                         for a, b in zip(w, self._before[n]))
                wn = sum(float(a.double().pow(2).sum()) for a in w)
                self.update[(self.step, n)] = math.sqrt(dw / wn)
                dd = sum(float((a.double() - b.double()).pow(2).sum())
                         for a, b in zip(w, self.w0[n]))
                d0 = sum(float(b.double().pow(2).sum()) for b in self.w0[n])
                self.drift[(self.step, n)] = math.sqrt(dd / d0)
        self.step += 1

    def remove(self):
        for h in self.handles:
            h.remove()


COLS = ["count", "mean", "std", "rms", "abs_mean", "norm", "min", "max", "abs_max", "zero_frac",
        "nonfinite", "saturated_frac", "dead_frac"]


def _assert_close(got: dict, want: dict, where: str):
    for c in COLS:
        g, w = float(got[c]), float(want[c])
        if math.isnan(w):
            assert math.isnan(g), f"{where} {c}: got {g}, want NaN"
        else:
            assert g == pytest.approx(w, rel=2e-4, abs=1e-6 * max(1.0, abs(w))), f"{where} {c}"


def train_and_compare(model, batches, loss_fn, *, tmp_path, accum=1, every=1, opt=None,
                      steps=4, **probe_kw):
    torch.manual_seed(0)
    opt = opt or torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05,
                                 momentum=0.9)
    probe = gp.Probe(model, opt, run_dir=tmp_path / "run", every=every, flush_every=3, **probe_kw)
    names = [n for n, m in model.named_modules() if n in
             {lay.name for lay in probe._layers}]
    ref = Reference(model, names, every=every)
    with probe:
        it = iter(batches)
        for _ in range(steps):
            for _ in range(accum):
                x, y = next(it)
                loss = loss_fn(model(x), y) / accum
                probe.observe_loss(loss)
                loss.backward()
            ref.before_step()
            opt.step()
            ref.after_step()
            opt.zero_grad()
    ref.remove()
    run = probe.run
    df = run.scalars()
    layers = run.layers.set_index("name")
    n_checked = 0
    for (step, name), ts in ref.act.items():
        mod = ref.mods[name]
        spec = spec_for_module(mod)
        want = derive_row(reference_stats(
            ts, spec.saturated if spec else None, spec.inactive if spec else None))
        got = df[(df.step == step) & (df.layer == name) & (df.kind == "act")]
        assert len(got) == 1, (step, name)
        _assert_close(got.iloc[0], want, f"act {name} step {step}")
        n_checked += 1
        if (step, name) in ref.act_grad:
            want = derive_row(reference_stats(ref.act_grad[(step, name)]))
            got = df[(df.step == step) & (df.layer == name) & (df.kind == "act_grad")]
            _assert_close(got.iloc[0], want, f"act_grad {name} step {step}")
    for kind, store in (("grad", ref.grad), ("weight", ref.weight)):
        for (step, name), ts in store.items():
            want = derive_row(reference_stats(ts))
            got = df[(df.step == step) & (df.layer == name) & (df.kind == kind)]
            assert len(got) == 1, (kind, step, name)
            _assert_close(got.iloc[0], want, f"{kind} {name} step {step}")
            n_checked += 1
    for kind, store in (("update", ref.update), ("drift", ref.drift)):
        for (step, name), value in store.items():
            got = df[(df.step == step) & (df.layer == name) & (df.kind == kind)]
            assert float(got["norm"].iloc[0]) == pytest.approx(value, rel=1e-4, abs=1e-9)
    recorded = sorted(df.step.unique())
    assert recorded == [s for s in range(steps) if s % every == 0]
    assert n_checked > 0
    losses = run.losses()
    assert len(losses) == steps
    return run, ref, layers


def _batches(shape, n_classes, count=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*shape, generator=g), torch.randint(0, n_classes, (shape[0],), generator=g))
            for _ in range(count)]


def test_mlp_all_statistics_match_reference(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Sigmoid(), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    # make some ReLU units dead and some sigmoid units saturated
    with torch.no_grad():
        model[2].bias[:5] = -50.0
        model[0].weight[:4] *= 20.0
    run, _, layers = train_and_compare(model, _batches((8, 6), 3), nn.functional.cross_entropy,
                                       tmp_path=tmp_path)
    df = run.scalars(kinds="act")
    relu = df[df.layer == "3"]
    assert (relu.dead_frac >= 5 / 16).all()
    sig = df[df.layer == "1"]
    assert (sig.saturated_frac > 0).all()
    assert list(layers.loc[["0", "1", "2", "3"], "depth"]) == [0, 1, 2, 3]
    assert layers.loc["1", "activation"] == "sigmoid"


def test_large_and_small_outputs_match_reference(tmp_path):
    """Outputs above the stage's size (summarised in the hook) beside small ones (staged),
    with two micro-batches a step: every statistic against the reference."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 256), nn.Tanh(), nn.Linear(256, 4), nn.ReLU(),
                          nn.Linear(4, 3))
    run, _, _ = train_and_compare(model, _batches((40, 6), 3), nn.functional.cross_entropy,
                                  tmp_path=tmp_path, accum=2)
    grads = run.raw_scalars()
    grads = grads[grads.kind == "act_grad"]
    assert set(grads.layer) == {"0", "1", "2", "3", "4"}
    assert (grads[grads.layer == "0"]["count"] == 2 * 40 * 256).all()  # 10,240 > 8,192


def test_cnn_batchnorm_matches_reference(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2),
    )
    train_and_compare(model, _batches((4, 3, 6, 6), 2), nn.functional.cross_entropy,
                      tmp_path=tmp_path)


class _LSTMNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(5, 8, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def test_lstm_matches_reference(tmp_path):
    torch.manual_seed(0)
    run, _, _ = train_and_compare(_LSTMNet(), _batches((4, 7, 5), 2), nn.functional.cross_entropy,
                                  tmp_path=tmp_path)
    act = run.scalars(kinds="act", layers="lstm")
    assert (act["count"] == 4 * 7 * 8).all()  # the primary output of (output, (h, c))


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.mid = nn.Linear(6, 6)
        self.out = nn.Linear(6, 11, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, idx):
        return self.out(torch.tanh(self.mid(self.emb(idx))))


def test_tied_weights_counted_once(tmp_path):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randint(0, 11, (5,), generator=g), torch.randint(0, 11, (5,), generator=g))
               for _ in range(10)]
    model = _Tied()
    run, _, layers = train_and_compare(model, batches, nn.functional.cross_entropy,
                                       tmp_path=tmp_path)
    assert layers.loc["emb", "param_shapes"] == [[11, 6]]
    df = run.scalars(kinds="weight")
    assert "out" not in set(df.layer)  # its only parameter is the embedding's
    assert (df[df.layer == "emb"]["count"] == 66).all()
    grad = run.scalars(kinds="grad", layers="emb")
    # the tied gradient includes the output projection's contribution
    assert (grad["count"] == 66).all()


def test_gradient_accumulation_gives_one_record_per_step(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    run, ref, _ = train_and_compare(model, _batches((6, 4), 2), nn.functional.cross_entropy,
                                    tmp_path=tmp_path, accum=3, steps=3)
    df = run.scalars(kinds="act", layers="0")
    assert list(df.step) == [0, 1, 2]
    assert (df["count"] == 3 * 6 * 8).all()
    assert len(ref.act[(0, "1")]) == 3  # three micro-batches merged into one record
    assert len(run.losses()) == 3


def test_frozen_layers_and_every(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    for p in model[2].parameters():
        p.requires_grad_(False)
    run, _, _ = train_and_compare(model, _batches((6, 4), 2), nn.functional.cross_entropy,
                                  tmp_path=tmp_path, every=2, steps=5)
    df = run.scalars()
    frozen = df[df.layer == "2"]
    assert "grad" not in set(frozen.kind)
    assert (frozen[frozen.kind == "update"]["norm"] == 0).all()
    assert (frozen[frozen.kind == "drift"]["norm"] == 0).all()
    assert sorted(df.step.unique()) == [0, 2, 4]


def test_no_optimizer_uses_probe_step(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 1))
    before = [p.detach().clone() for p in model.parameters()]
    with gp.Probe(model, run_dir=tmp_path / "r") as probe:
        for _ in range(3):
            model(torch.randn(4, 3)).sum().backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.1 * p.grad
                    p.grad = None
            probe.step()
    df = probe.run.scalars(kinds="drift", layers="0")
    after = list(model[0].parameters())
    want = math.sqrt(sum(float((a - b).detach().double().pow(2).sum()) for a, b in zip(after, before[:2]))
                     / sum(float(b.double().pow(2).sum()) for b in before[:2]))
    assert list(df.step) == [0, 1, 2]
    assert float(df["norm"].iloc[-1]) == pytest.approx(want, rel=1e-5)


def test_histograms_match_numpy(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # weights stay put: a fixed reference
    x = torch.randn(7, 3)
    with gp.Probe(model, opt, run_dir=tmp_path / "r", hist_every=2, hist_bins=8) as probe:
        for _ in range(3):
            model(x).sum().backward()
            opt.step()
            opt.zero_grad()
    h = probe.run.histograms()
    assert sorted(h.step.unique()) == [0, 2]
    with torch.no_grad():
        values = {
            "act": (x @ model[0].weight.T + model[0].bias).numpy().ravel(),
            "weight": torch.cat([p.reshape(-1) for p in model[0].parameters()]).numpy(),
        }
    for kind, v in values.items():
        row = h[(h.step == 2) & (h.layer == "0") & (h.kind == kind)].iloc[0]
        assert row.bin_edges[0] == pytest.approx(v.min(), rel=1e-6)
        assert row.bin_edges[-1] == pytest.approx(v.max(), rel=1e-6)
        want, _ = np.histogram(v, bins=np.asarray(row.bin_edges))
        assert list(want) == row.counts, kind
        assert row.nonfinite == 0


class _Unused(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Linear(3, 4)
        self.unused = nn.Linear(3, 4)  # gets no gradient, never runs

    def forward(self, x):
        return self.used(x)


def test_parameters_without_gradient(tmp_path):
    torch.manual_seed(0)
    model = _Unused()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gp.Probe(model, opt, run_dir=tmp_path / "r") as probe:
        for _ in range(2):
            model(torch.randn(2, 3)).sum().backward()
            opt.step()
            opt.zero_grad()
    df = probe.run.scalars()
    unused = df[df.layer == "unused"]
    assert set(unused.kind) == {"weight", "update", "drift", "spread"}
    assert (unused[unused.kind == "update"]["norm"] == 0).all()
    layers = probe.run.layers.set_index("name")
    assert pd.isna(layers.loc["unused", "depth"]) and layers.loc["used", "depth"] == 0
