"""Module outputs the Probe must find: complex tensors and deeply nested structures."""

from __future__ import annotations

import torch
from torch import nn

import gradprobe as gp
from gradprobe.capture.hooks import MAX_NESTING, first_float_tensor


class ComplexMix(nn.Module):
    """A custom layer with a complex output (as a spectral layer's would be)."""

    def __init__(self) -> None:
        super().__init__()
        self.re = nn.Parameter(torch.randn(6, 8) / 3)
        self.im = nn.Parameter(torch.randn(6, 8) / 3)

    def forward(self, x):
        return torch.complex(x @ self.re, x @ self.im)


class Spectral(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mix = ComplexMix()
        self.head = nn.Linear(16, 1)

    def forward(self, x):
        z = self.mix(x)
        return self.head(torch.view_as_real(z).flatten(1))


def _nest(t, depth):
    for _ in range(depth):
        t = (t,)
    return t


class Nested(nn.Module):
    def __init__(self, depth: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 4) / 3)
        self.depth = depth

    def forward(self, x):
        return _nest(x @ self.w, self.depth)


class Deep(nn.Module):
    def __init__(self, depth: int) -> None:
        super().__init__()
        self.inner = Nested(depth)
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        out = self.inner(x)
        for _ in range(self.inner.depth):
            out = out[0]
        return self.head(out)


def _train(model, run_dir, steps=3):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(0)
    with gp.Probe(model, opt, run_dir=run_dir, budget=None):
        for _ in range(steps):
            model(torch.randn(5, 6, generator=g)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    return gp.Run.open(run_dir)


def test_a_complex_output_has_activation_rows_equal_to_its_parts(tmp_path):
    torch.manual_seed(0)
    model = Spectral()
    captured = []
    model.mix.register_forward_hook(lambda m, a, out: captured.append(out.detach().clone()))
    run = _train(model, tmp_path / "r")
    raw = run.raw_scalars()
    act = raw[(raw.layer == "mix") & (raw.kind == "act")].sort_values("step")
    assert len(act) == 3
    for (_, row), z in zip(act.iterrows(), captured):
        parts = torch.view_as_real(z).double()
        assert row["count"] == parts.numel()
        energy = float((z.abs() ** 2).sum())  # the complex norm squared
        assert abs(row["sumsq"] - energy) <= 1e-4 * energy
        assert abs(row["sum"] - float(parts.sum())) <= 1e-4 * float(parts.abs().sum())
    grads = raw[(raw.layer == "mix") & (raw.kind == "act_grad")]
    assert len(grads) == 3 and (grads["sumsq"] > 0).all()


def test_a_complex_output_and_its_gradient_have_histograms_of_their_parts(tmp_path):
    torch.manual_seed(0)
    model = Spectral()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(0)
    with gp.Probe(model, opt, run_dir=tmp_path / "r", budget=None, every=1, hist_every=1):
        for _ in range(2):
            model(torch.randn(5, 6, generator=g)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    hist = gp.Run.open(tmp_path / "r").histograms()
    mix = hist[hist.layer == "mix"]
    for kind in ("act", "act_grad"):
        rows = mix[mix.kind == kind]
        assert len(rows) == 2, mix
        for counts in rows["counts"]:  # 5 samples x 8 complex values: 80 real parts
            assert int(sum(counts)) == 5 * 8 * 2


def test_an_output_nested_deeper_than_five_levels_has_activation_rows(tmp_path):
    torch.manual_seed(0)
    run = _train(Deep(12), tmp_path / "r")
    raw = run.raw_scalars()
    act = raw[(raw.layer == "inner") & (raw.kind == "act")]
    assert len(act) == 3 and (act["count"] == 5 * 4).all()


def test_the_search_stops_at_its_documented_depth():
    t = torch.ones(2)
    assert first_float_tensor(_nest(t, MAX_NESTING)) is t
    assert first_float_tensor(_nest(t, MAX_NESTING + 1)) is None
    assert first_float_tensor(_nest(torch.ones(2, dtype=torch.long), 3)) is None
