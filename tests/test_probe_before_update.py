"""``probe.before_update()``: a probe without an optimizer records the gradients where it is
called (before clipping) and the weights at ``probe.step()`` (after the update)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import gradprobe as gp


def train(run_dir, mode: str, steps: int = 3, clip: float = 0.05) -> nn.Module:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    hooked = mode == "hooked"
    with gp.Probe(model, opt if hooked else None, run_dir=run_dir) as probe:
        for _ in range(steps):
            x = torch.randn(16, 3, generator=g)
            model(x).pow(2).mean().backward()
            if mode == "split":
                probe.before_update()
                probe.before_update()  # a second call in the step does nothing
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            if not hooked:
                probe.step()
            opt.zero_grad()
    return model


def frame(run_dir, kind):
    raw = gp.Run.open(run_dir).raw_scalars()
    return raw[raw.kind == kind].set_index(["step", "layer"]).sort_index()


def test_grads_before_clipping_weights_after_the_update(tmp_path):
    clip = 0.05
    for mode in ("split", "hooked", "step"):
        train(tmp_path / mode, mode, clip=clip)
    split, hooked, step = (frame(tmp_path / m, "grad") for m in ("split", "hooked", "step"))
    # the hooked probe and probe.step() alone see the clipped gradients
    np.testing.assert_allclose(np.sqrt(hooked["sumsq"].groupby("step").sum()), clip, rtol=1e-4)
    np.testing.assert_allclose(step["sumsq"], hooked["sumsq"], rtol=1e-6)
    # before_update() saw them before clipping: clipping scaled each by clip / ‖g‖
    total = np.sqrt(split["sumsq"].groupby("step").sum())
    assert (total > 2 * clip).all()
    coef = (clip / total).reindex(split.index.get_level_values("step")).to_numpy()
    np.testing.assert_allclose(split["sumsq"] * coef**2, hooked["sumsq"], rtol=1e-4)
    assert (split["count"] == hooked["count"]).all()  # counted once, not twice
    for kind in ("weight", "update", "drift"):
        a, b = frame(tmp_path / "split", kind), frame(tmp_path / "hooked", kind)
        np.testing.assert_allclose(a[["sumsq", "ref_sumsq", "max"]],
                                   b[["sumsq", "ref_sumsq", "max"]], rtol=1e-5, atol=1e-9)


def test_before_update_refused_outside_its_use(tmp_path):
    model = nn.Linear(2, 1)
    probe = gp.Probe(model, run_dir=tmp_path / "a")
    with pytest.raises(gp.ConfigError, match=r"before_update\(\) called while the Probe is not"):
        probe.before_update()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gp.Probe(model, opt, run_dir=tmp_path / "b") as hooked:
        with pytest.raises(gp.ConfigError, match=r"before_update\(\) is for probes without"):
            hooked.before_update()
        model(torch.ones(1, 2)).sum().backward()
        opt.step()
