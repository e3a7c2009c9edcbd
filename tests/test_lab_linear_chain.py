"""linear-chain: measured norms equal a^k, checked against an independent numpy computation."""

from __future__ import annotations

import numpy as np
import pytest

import gradprobe as gp
from gradprobe.errors import ConfigError


def _numpy_reference(depth, width, a, x, u):
    """Forward and backward through the chain with explicit matrices (no torch)."""
    weights = [a * np.eye(width)] * (depth - 1) + [np.eye(width)]
    hs = [x]
    for w in weights:
        hs.append(hs[-1] @ w.T)
    grads = [u]  # ∂ℓ/∂h_L
    for w in reversed(weights):
        grads.append(grads[-1] @ w)
    grads = grads[::-1]  # grads[k] = ∂ℓ/∂h_k
    act = [np.linalg.norm(hs[k]) / np.linalg.norm(x) for k in range(1, depth + 1)]
    grad_in = [np.linalg.norm(grads[k - 1]) / np.linalg.norm(u) for k in range(1, depth + 1)]
    dw = [np.linalg.norm(grads[k].T @ hs[k - 1]) for k in range(1, depth + 1)]
    return np.array(act), np.array(grad_in), np.array(dw)


@pytest.mark.parametrize("depth", [3, 17])
def test_measured_equals_formula_and_numpy(depth):
    import torch

    cfg_scales = (1.5, 1.0, 0.5, 1.1)
    result = gp.lab.run("linear-chain", depth=depth, width=3, batch=5, scales=cfg_scales, seed=4)
    layers = result.tables["layers"]
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(5, 3, generator=gen, dtype=torch.float64).numpy()
    u = torch.randn(5, 3, generator=gen, dtype=torch.float64).numpy()
    for a in cfg_scales:
        frame = layers[layers.a == a].sort_values("layer")
        act, grad_in, dw = _numpy_reference(depth, 3, a, x, u)
        np.testing.assert_allclose(frame["activation_ratio"], act, rtol=1e-12)
        np.testing.assert_allclose(frame["gradient_ratio"], grad_in, rtol=1e-12)
        np.testing.assert_allclose(frame["weight_grad_norm"], dw, rtol=1e-12)
        # the closed forms of the docstring
        ls = np.arange(1, depth + 1)
        np.testing.assert_allclose(frame["activation_ratio"], a ** np.minimum(ls, depth - 1), rtol=1e-9)
        np.testing.assert_allclose(frame["gradient_ratio"], a ** (depth - ls), rtol=1e-9)
    main = result.table.set_index("a")
    for a in cfg_scales:
        assert main.loc[a, "output_ratio"] == pytest.approx(a ** (depth - 1), rel=1e-9)
        assert main.loc[a, "input_grad_ratio"] == pytest.approx(a ** (depth - 1), rel=1e-9)
        assert main.loc[a, "max_rel_err"] < 1e-9
    assert all(c.holds for c in result.claims), [c for c in result.claims if not c.holds]


def test_explodes_and_vanishes_claim_and_figure(tmp_path):
    result = gp.lab.run("linear-chain", depth=30)
    gp.lab.write(result, tmp_path, formats=("png",))
    claim = result.claim("a > 1 explodes")
    assert claim.holds
    main = result.table.set_index("a")
    assert main.loc[1.5, "input_grad_ratio"] > 1e5 and main.loc[0.5, "input_grad_ratio"] < 1e-8
    assert (tmp_path / "linear_chain.png").stat().st_size > 10_000


def test_rerun_gives_identical_numbers():
    a = gp.lab.run("linear-chain", depth=9, seed=2).tables["layers"]
    b = gp.lab.run("linear-chain", depth=9, seed=2).tables["layers"]
    assert a.equals(b)


@pytest.mark.parametrize(
    "options, match",
    [({"depth": 1}, "depth=1"), ({"scales": (1.5, -1.0)}, "scales"), ({"width": 0}, "width=0"),
     ({"depth": 2000, "scales": (1.5,)}, "beyond float64")],
)
def test_bad_configs(options, match):
    with pytest.raises(ConfigError, match=match) as err:
        gp.lab.run("linear-chain", **options)
    assert err.value.hint
