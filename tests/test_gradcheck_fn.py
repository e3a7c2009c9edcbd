"""gp.gradcheck_fn against hand computations: the 1-D classic and a hand-written NumPy network."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import gradprobe as gp
from gradprobe.errors import ConfigError, NonFiniteError

# ------------------------------------------------------------------------------ the 1-D classic


def test_one_dimensional_classic_matches_hand_computation():
    x, theta, eps = 2.0, 4.0, 1e-7
    # The slow obvious reference, in plain Python floats.
    gradapprox = (x * (theta + eps) - x * (theta - eps)) / (2 * eps)
    grad = x
    expected = abs(grad - gradapprox) / (abs(grad) + abs(gradapprox))
    assert 1e-10 < expected < 1e-9  # "about 3e-10"

    report = gp.gradcheck_fn(lambda p: p[0] * x, [np.array(theta)], [np.array(x)], eps=eps)
    assert report.rel_error == pytest.approx(expected, rel=1e-6)
    assert report.ok and report.rows[0].verdict == "ok"
    assert report.rows[0].worst[0].numeric == pytest.approx(gradapprox, rel=1e-15)

    wrong = gp.gradcheck_fn(lambda p: p[0] * x, [np.array(theta)], [np.array(2.5 * x)], eps=eps)
    assert wrong.failed == ["params[0]"]
    assert wrong.rel_error == pytest.approx(abs(2.5 * x - x) / (2.5 * x + x), rel=1e-6)


# ------------------------------------------------------------- a hand-written NumPy network


def _relu(z: np.ndarray) -> np.ndarray:
    return np.maximum(0.0, z)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _cost(p: dict[str, np.ndarray], X: np.ndarray, Y: np.ndarray) -> float:
    """LINEAR -> RELU -> LINEAR -> RELU -> LINEAR -> SIGMOID, mean cross-entropy."""
    a1 = _relu(p["W1"] @ X + p["b1"])
    a2 = _relu(p["W2"] @ a1 + p["b2"])
    a3 = _sigmoid(p["W3"] @ a2 + p["b3"])
    m = X.shape[1]
    return float(-np.sum(Y * np.log(a3) + (1 - Y) * np.log(1 - a3)) / m)


def _backprop(
    p: dict[str, np.ndarray], X: np.ndarray, Y: np.ndarray, *, planted: bool = False
) -> dict[str, np.ndarray]:
    m = X.shape[1]
    z1 = p["W1"] @ X + p["b1"]
    a1 = _relu(z1)
    z2 = p["W2"] @ a1 + p["b2"]
    a2 = _relu(z2)
    a3 = _sigmoid(p["W3"] @ a2 + p["b3"])
    dz3 = (a3 - Y) / m
    dW3 = dz3 @ a2.T
    db3 = dz3.sum(axis=1, keepdims=True)
    dz2 = (p["W3"].T @ dz3) * (z2 > 0)
    dW2 = dz2 @ a1.T
    db2 = dz2.sum(axis=1, keepdims=True)
    dz1 = (p["W2"].T @ dz2) * (z1 > 0)
    dW1 = dz1 @ X.T
    db1 = dz1.sum(axis=1, keepdims=True)
    if planted:  # the two classic bugs
        dW2 = 2 * dW2
        db1 = 4 * db1
    return {"W1": dW1, "b1": db1, "W2": dW2, "b2": db2, "W3": dW3, "b3": db3}


@pytest.fixture(scope="module")
def numpy_net() -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    X = rng.standard_normal((4, 6))
    Y = np.array([[1.0, 0.0, 1.0, 1.0, 0.0, 0.0]])
    sizes = [4, 5, 3, 1]
    p = {}
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
        p[f"W{i}"] = rng.standard_normal((n_out, n_in))
        p[f"b{i}"] = rng.standard_normal((n_out, 1)) * 0.5
    return p, X, Y


def test_handwritten_backprop_matches_autograd(numpy_net):
    # Make sure the reference network itself is right before judging the checker with it.
    p, X, Y = numpy_net
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in p.items()}
    a1 = torch.relu(tp["W1"] @ torch.tensor(X) + tp["b1"])
    a2 = torch.relu(tp["W2"] @ a1 + tp["b2"])
    a3 = torch.sigmoid(tp["W3"] @ a2 + tp["b3"])
    y = torch.tensor(Y)
    cost = -(y * a3.log() + (1 - y) * (1 - a3).log()).sum() / X.shape[1]
    cost.backward()
    assert float(cost.detach()) == pytest.approx(_cost(p, X, Y), rel=1e-12)
    grads = _backprop(p, X, Y)
    for k, v in tp.items():
        assert v.grad is not None
        np.testing.assert_allclose(grads[k], v.grad.numpy(), rtol=1e-10, atol=1e-14)


def test_numpy_network_correct_backprop_passes(numpy_net):
    p, X, Y = numpy_net
    report = gp.gradcheck_fn(lambda q: _cost(q, X, Y), p, _backprop(p, X, Y))
    assert report.ok, str(report)
    assert report.failed == []
    assert report.rel_error < 1e-7
    assert [r.name for r in report.rows] == list(p)
    assert not report.vectorized and report.fallback_reason is None  # NumPy: a loop
    assert report.n_evaluations == 1 + sum(2 * v.size + 1 for v in p.values())


def test_numpy_network_planted_bugs_are_named(numpy_net):
    p, X, Y = numpy_net
    report = gp.gradcheck_fn(lambda q: _cost(q, X, Y), p, _backprop(p, X, Y, planted=True))
    assert not report.ok
    assert report.failed == ["b1", "W2"]
    assert report.rel_error > 1e-3
    # Doubling a gradient gives ‖g̃ − 2g̃‖ / (‖g̃‖ + 2‖g̃‖) = 1/3; times four gives 3/5.
    assert report["W2"].rel_error == pytest.approx(1 / 3, rel=1e-4)
    assert report["b1"].rel_error == pytest.approx(3 / 5, rel=1e-4)
    worst = report["b1"].worst[0]
    assert worst.analytic == pytest.approx(4 * worst.numeric, rel=1e-5)
    text = str(report)
    assert "bug in W2" in text and "bug in b1" in text


def test_sample_and_directional_modes_find_the_same_bugs(numpy_net):
    p, X, Y = numpy_net
    bad = _backprop(p, X, Y, planted=True)
    sample = gp.gradcheck_fn(lambda q: _cost(q, X, Y), p, bad, mode="sample", k=3)
    assert sample.failed == ["b1", "W2"]
    assert all(r.n_checked == min(3, p[r.name].size) for r in sample.rows)
    directional = gp.gradcheck_fn(lambda q: _cost(q, X, Y), p, bad, mode="directional",
                                  n_directions=4)
    assert directional.failed == ["b1", "W2"]
    assert all(r.n_checked == 4 for r in directional.rows)
    good = gp.gradcheck_fn(lambda q: _cost(q, X, Y), p, _backprop(p, X, Y),
                           mode="directional", n_directions=4)
    assert good.ok


# ------------------------------------------------------------------------ torch tensors, kinks


def test_torch_function_is_vectorised_and_agrees_with_loop():
    torch.manual_seed(0)
    A = torch.randn(5, 5, dtype=torch.float64)
    w = torch.randn(5, dtype=torch.float64)

    def f(ps):
        return torch.tanh(A @ ps[0]).pow(2).sum() + ps[1].exp().sum()

    v = torch.randn(3, dtype=torch.float64)
    wg = torch.func.grad(lambda x: torch.tanh(A @ x).pow(2).sum())(w)
    fast = gp.gradcheck_fn(f, [w, v], [wg, v.exp()])
    slow = gp.gradcheck_fn(f, [w, v], [wg, v.exp()], vectorize=False)
    assert fast.vectorized and not slow.vectorized
    assert fast.ok and slow.ok
    for a, b in zip(fast.rows, slow.rows):
        assert a.rel_error == pytest.approx(b.rel_error, rel=0.2, abs=1e-9)


def test_function_that_vmap_cannot_run_falls_back_with_reason():
    w = torch.tensor([0.3, -1.2], dtype=torch.float64)

    def f(ps):
        return float((ps[0] ** 3).sum().item())  # .item() cannot be batched

    report = gp.gradcheck_fn(f, [w], [3 * w**2])
    assert report.ok and not report.vectorized
    assert report.fallback_reason is not None and "vmap" in report.fallback_reason


def test_abs_kink_reported_as_kink_not_bug():
    # |w - c| with w within eps/2 of c: the centred difference averages slopes -1 and +1.
    c = 0.7
    w = np.array([c + 3e-8, 2.0])
    claimed = [np.sign(w - c)]
    report = gp.gradcheck_fn(lambda ps: float(np.abs(ps[0] - c).sum()), [w], claimed)
    row = report.rows[0]
    assert row.rel_error > 1e-3  # a false failure without kink handling
    assert row.verdict == "kink" and report.ok
    assert row.kinks_crossed == 1 and row.worst[0].kink and row.worst[0].index == (0,)
    # A real bug on top of the kink is still a bug.
    bad = gp.gradcheck_fn(lambda ps: float(np.abs(ps[0] - c).sum()), [w], [np.array([1.0, 3.0])])
    assert bad.failed == ["params[0]"]


def test_regularisation_term_must_be_in_the_claimed_gradient():
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((10, 3)), rng.standard_normal(10)
    w, lam = rng.standard_normal(3), 0.1

    def f(p):
        return float(np.mean((X @ p["w"] - y) ** 2) + lam * np.sum(p["w"] ** 2))

    data_grad = 2 * X.T @ (X @ w - y) / len(y)
    assert gp.gradcheck_fn(f, {"w": w}, {"w": data_grad + 2 * lam * w}).ok
    assert gp.gradcheck_fn(f, {"w": w}, {"w": data_grad}).failed == ["w"]


def test_float32_gives_warning_with_reason():
    torch.manual_seed(0)
    w = torch.randn(50, dtype=torch.float64)

    def f(ps):
        return (ps[0] ** 2).sum() + 10.0

    r32 = gp.gradcheck_fn(f, [w], [2 * w], dtype=torch.float32)
    assert r32.rel_error > 1e-3  # large errors on a correct gradient...
    assert r32.failed == []  # ...that are not blamed on the code
    assert any("float32" in m and "float64" in m and "eps" in m for m in r32.warnings)
    r64 = gp.gradcheck_fn(f, [w], [2 * w])
    assert r64.ok and not r64.warnings


# ---------------------------------------------------------------------------------- bad inputs


def _f(ps):
    return float(np.sum(ps[0] ** 2))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"eps": 0.0}, "eps"),
        ({"eps": -1e-7}, "eps"),
        ({"eps": math.nan}, "eps"),
        ({"mode": "every"}, "mode"),
        ({"k": 0, "mode": "sample"}, "k must"),
        ({"n_directions": 0}, "n_directions"),
        ({"ok_tol": 1e-2, "bug_tol": 1e-3}, "ok_tol"),
        ({"dtype": torch.int64}, "dtype"),
        ({"vectorize": "yes"}, "vectorize"),
    ],
)
def test_bad_options_raise_config_error(kwargs, match):
    w = np.array([1.0, 2.0])
    with pytest.raises(ConfigError, match=match) as info:
        gp.gradcheck_fn(_f, [w], [2 * w], **kwargs)
    assert info.value.hint


def test_bad_claimed_gradients_are_named():
    w, b = np.ones((2, 3)), np.ones(3)
    with pytest.raises(ConfigError, match=r"claimed gradient of W has shape \(3, 2\)"):
        gp.gradcheck_fn(lambda p: 0.0, {"W": w, "b": b}, {"W": w.T, "b": b})
    with pytest.raises(ConfigError, match="missing"):
        gp.gradcheck_fn(lambda p: 0.0, {"W": w, "b": b}, {"W": w})
    with pytest.raises(ConfigError, match="2 params but 1"):
        gp.gradcheck_fn(lambda p: 0.0, [w, b], [w])
    with pytest.raises(ConfigError, match="not"):
        gp.gradcheck_fn(lambda p: 0.0, {"W": w}, [w])
    with pytest.raises(ConfigError, match="empty"):
        gp.gradcheck_fn(lambda p: 0.0, [], [])
    with pytest.raises(NonFiniteError, match="b"):
        gp.gradcheck_fn(lambda p: 0.0, {"b": b}, {"b": b * np.nan})


def test_non_scalar_function_is_refused():
    w = np.array([1.0, 2.0])
    with pytest.raises(ConfigError, match="scalar") as info:
        gp.gradcheck_fn(lambda p: p[0] ** 2, [w], [2 * w])
    assert "sum" in (info.value.hint or "")
    with pytest.raises(ConfigError, match="scalar"):
        gp.gradcheck_fn(lambda p: "one", [w], [2 * w])


def test_non_finite_perturbed_loss_names_the_coordinate():
    w = np.array([1.0, 5e-8])  # log(w - eps) is nan
    with np.errstate(invalid="ignore"), pytest.raises(
        NonFiniteError, match=r"params\[0\] \[1\]"
    ) as info:
        gp.gradcheck_fn(lambda p: float(np.sum(np.log(p[0]))), [w], [1 / w])
    assert "eps" in (info.value.hint or "")


# ------------------------------------------------------------------------------ options record

_OPTION_DEFAULTS = {
    "eps": 1e-7, "dtype": torch.float64, "mode": "full", "k": 32, "n_directions": 8, "seed": 0,
    "ok_tol": 1e-7, "bug_tol": 1e-3, "vectorize": "auto", "chunk_size": None,
    "max_memory_mb": 256.0, "n_worst": 5,
}


def test_options_are_one_frozen_validated_record_behind_both_signatures():
    import dataclasses
    import inspect

    from gradprobe.check import CheckOptions

    opts = CheckOptions()
    assert {f.name: getattr(opts, f.name) for f in dataclasses.fields(opts)} == _OPTION_DEFAULTS
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.eps = 1e-6  # type: ignore[misc]
    with pytest.raises(ConfigError, match="eps"):
        CheckOptions(eps=-1.0)
    model_only = {"regularization": None, "random_layers": "reseed"}
    for fn, extra in ((gp.gradcheck, model_only), (gp.gradcheck_fn, {})):
        kw = {
            p.name: p.default
            for p in inspect.signature(fn).parameters.values()
            if p.kind is p.KEYWORD_ONLY
        }
        assert kw == {**_OPTION_DEFAULTS, **extra}
    with pytest.raises(TypeError, match="gradcheck_fn.*'epsilon'"):
        gp.gradcheck_fn(_f, [np.ones(2)], [2 * np.ones(2)], epsilon=1e-6)
