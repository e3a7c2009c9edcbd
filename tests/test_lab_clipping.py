"""clipping: the exploding MLP and its cures, L1 vs L2; claims at a small size and a failing one."""

import math

import numpy as np
import pytest
import torch

from gradprobe.errors import ConfigError
from gradprobe.lab import train
from gradprobe.lab.experiments import clipping as C

SMALL = C.ClippingConfig(steps=60, reg_steps=400)


@pytest.fixture(scope="module")
def result():
    with train.threads(1):
        return C.run(SMALL)


def test_claims_at_small_size(result):
    assert len(result.claims) == 6
    for prefix in ("without a cure", "clipping by norm", "clipping by value", "L1 makes",
                   "L2 shrinks"):
        claim = result.claim(prefix)
        assert claim.holds, (claim.text, claim.evidence)
    # measured, not assumed: weight decay does not bound the first steps, so it does not cure
    assert not result.claim("L2 regularisation").holds


def test_healthy_weights_do_not_explode():
    # gain 1 (He init): nothing to cure, so the "diverges" claim fails
    with train.threads(1):
        r = C.run(C.ClippingConfig(gain=1.0, lr=0.01, steps=30, reg_steps=5))
    assert not r.claim("without a cure").holds
    assert math.isfinite(r.table.set_index("cure").loc["none", "final_train_loss"])


def test_clip_by_norm_bounds_the_update(result):
    # first step of clip-by-norm from the same init: the update is lr * max_norm / ‖g‖ * g
    xtr, ytr, _, _ = C.standardized_digits(0)
    model = C.build(SMALL.depth, SMALL.width, SMALL.gain, SMALL.seed)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    idx = C._batches(xtr.shape[0], SMALL.batch, 1, SMALL.seed)[0]
    torch.nn.functional.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
    g = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert float(g.norm()) == pytest.approx(result.table.loc[1, "grad_norm_first"], rel=1e-4)
    torch.nn.utils.clip_grad_norm_(model.parameters(), SMALL.max_norm)
    opt = torch.optim.SGD(model.parameters(), lr=SMALL.lr, momentum=SMALL.momentum)
    opt.step()
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert float((after - before).norm()) == pytest.approx(SMALL.lr * SMALL.max_norm, rel=1e-4)


def test_near_zero_fraction_matches_weights(result):
    reg = result.tables["l1_vs_l2"].set_index("penalty")
    for penalty, w in result.data["weights"].items():
        assert reg.loc[penalty, "near_zero_fraction"] == pytest.approx(np.mean(np.abs(w) < 1e-3))
        assert reg.loc[penalty, "weight_l2_norm"] == pytest.approx(np.linalg.norm(w), rel=1e-5)


def test_bad_config():
    with pytest.raises(ConfigError, match="gain"):
        C.ClippingConfig(gain=0).validate()
    with pytest.raises(ConfigError, match="momentum"):
        C.ClippingConfig(momentum=1.0).validate()


def test_figures(result):
    figs = C.plot(result)
    assert set(figs) == {"exploding", "l1_vs_l2"}
    ax = figs["exploding"].axes[0]
    assert ax.get_yscale() == "log" and ax.get_xscale() == "log" and ax.get_title()
