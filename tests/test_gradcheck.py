"""gp.gradcheck on models: custom autograd.Functions, kinks, BatchNorm, dropout, untouched model.

References: a textbook loop (one coordinate at a time, two forward passes), torch.autograd.gradcheck,
and direct recomputation of pre-activation signs for the kink count.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradprobe as gp
from gradprobe.errors import ConfigError

# --------------------------------------------------------------------- custom autograd.Functions


class Affine(torch.autograd.Function):
    """y = x Wᵀ + b with a hand-written backward; ``bug`` plants one subtle mistake."""

    @staticmethod
    def forward(ctx, x, W, b, bug):
        ctx.save_for_backward(x, W)
        ctx.bug = bug
        return x @ W.T + b

    @staticmethod
    def backward(ctx, g):
        x, W = ctx.saved_tensors
        gx, gW, gb = g @ W, g.T @ x, g.sum(0)
        if ctx.bug == "transposed":
            gW = x.T @ g  # (in, out) instead of (out, in): same shape when square
        elif ctx.bug == "mean_not_sum":
            gb = g.mean(0)  # wrong reduction over the broadcast batch dimension
        return gx, gW, gb, None


class LeakyAct(torch.autograd.Function):
    """max(x, 0.1 x); ``bug="sign"`` flips the sign of the negative branch's slope."""

    @staticmethod
    def forward(ctx, x, bug):
        ctx.save_for_backward(x)
        ctx.bug = bug
        return torch.where(x > 0, x, 0.1 * x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        neg = -0.1 if ctx.bug == "sign" else 0.1
        return g * torch.where(x > 0, torch.ones_like(x), torch.full_like(x, neg)), None


class QuadScale(torch.autograd.Function):
    """y = x·w + w² (w per feature); ``bug="missing"`` drops the 2w term of dy/dw."""

    @staticmethod
    def forward(ctx, x, w, bug):
        ctx.save_for_backward(x, w)
        ctx.bug = bug
        return x * w + w**2

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        gw = (g * x).sum(0)
        if ctx.bug != "missing":
            gw = gw + 2 * w * g.sum(0)
        return g * w, gw, None


class Net(nn.Module):
    """fc1 (custom Affine, square) -> LeakyAct -> QuadScale(scale) -> tanh -> out (nn.Linear)."""

    def __init__(self, bug: str | None = None, width: int = 6) -> None:
        super().__init__()
        self.bug = bug
        self.fc1 = nn.Linear(width, width)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, width))
        self.out = nn.Linear(width, 1)

    def forward(self, x):
        h = Affine.apply(x, self.fc1.weight, self.fc1.bias, self.bug)
        h = LeakyAct.apply(h, self.bug)
        h = torch.tanh(QuadScale.apply(h, self.scale, self.bug))
        return self.out(h)


def _data(n=10, width=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, width, generator=g), torch.randn(n, 1, generator=g)


BUGS = {
    None: [],
    "transposed": ["fc1.weight"],
    "mean_not_sum": ["fc1.bias"],
    "sign": ["fc1.weight", "fc1.bias"],  # the activation's backward feeds fc1 only
    "missing": ["scale"],  # only dy/dw lacks its 2w term; dy/dx = w is right
}


@pytest.mark.parametrize("bug", list(BUGS), ids=[str(b) for b in BUGS])
def test_custom_function_bugs_are_caught_and_localised(bug):
    torch.manual_seed(0)
    model = Net(bug)
    x, y = _data()
    report = gp.gradcheck(model, F.mse_loss, x, y)
    expected = BUGS[bug]
    assert report.failed == expected, str(report)
    assert report.ok is (not expected)
    for row in report.rows:
        if row.name not in expected:
            assert row.verdict in ("ok", "kink"), str(report)


@pytest.mark.parametrize("bug", list(BUGS), ids=[str(b) for b in BUGS])
def test_agrees_with_torch_autograd_gradcheck(bug):
    torch.manual_seed(0)
    model = Net(bug).double()
    x, y = _data()
    x, y = x.double(), y.double()
    names = [n for n, _ in model.named_parameters()]

    def fn(*ps):
        out = torch.func.functional_call(model, dict(zip(names, ps)), (x,))
        return F.mse_loss(out, y)

    params = tuple(p.detach().clone().requires_grad_(True) for p in model.parameters())
    theirs = torch.autograd.gradcheck(fn, params, raise_exception=False)
    ours = gp.gradcheck(model, F.mse_loss, x, y)
    assert ours.ok == theirs


# ------------------------------------------------------------------------ textbook reference


def _textbook(model, loss_fn, x, y, eps=1e-7):
    """One parameter at a time, two forward passes each, restoring every buffer."""
    model = model.double()
    buffers = [b.clone() for b in model.buffers()]
    out = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.view(-1)
            g = torch.empty(flat.numel(), dtype=torch.float64)
            for i in range(flat.numel()):
                old = float(flat[i])
                flat[i] = old + eps
                torch.manual_seed(0)
                jp = float(loss_fn(model(x.double()), y.double()))
                flat[i] = old - eps
                torch.manual_seed(0)
                jm = float(loss_fn(model(x.double()), y.double()))
                flat[i] = old
                for b, s in zip(model.buffers(), buffers):
                    b.copy_(s)
                g[i] = (jp - jm) / (2 * eps)
            out[name] = g
    return out


def _numeric_from_worst(row):
    return {c.index: c.numeric for c in row.worst}


def test_full_mode_numbers_match_textbook_loop_vectorised_and_not():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    x, y = torch.randn(7, 3), torch.randn(7, 2)
    ref = _textbook(copy.deepcopy(model), F.mse_loss, x, y)
    for vectorize in (True, False):
        rep = gp.gradcheck(model, F.mse_loss, x, y, n_worst=100, vectorize=vectorize)
        assert rep.vectorized is vectorize and rep.ok
        # The vectorised check uses the rank-1 path for every nn.Linear tensor.
        assert any("rank-1" in n and "2.weight" in n for n in rep.notes) is vectorize
        for row in rep.rows:
            got = _numeric_from_worst(row)
            assert len(got) == row.n_checked == ref[row.name].numel()
            for index, value in got.items():
                flat = int(np.ravel_multi_index(index, row.shape))
                assert value == pytest.approx(float(ref[row.name][flat]), rel=1e-6, abs=1e-9)


def test_batchnorm_train_mode_uses_batch_statistics_and_leaks_nothing():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1))
    model.train()
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rep = gp.gradcheck(model, F.mse_loss, x, y, n_worst=100)
    assert rep.ok and rep.vectorized, str(rep)
    assert any("batch-norm" in n for n in rep.notes)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # running stats of the user's model untouched
    ref = _textbook(copy.deepcopy(model), F.mse_loss, x, y)
    w = rep["1.weight"]
    for c in w.worst:
        assert c.numeric == pytest.approx(float(ref["1.weight"][c.index[0]]), rel=1e-6, abs=1e-9)
    # fc bias before a train-mode BatchNorm has zero gradient: the batch mean removes it.
    assert rep["0.bias"].analytic_norm < 1e-12 and rep["0.bias"].numeric_norm < 1e-6


def test_batchnorm_eval_mode_keeps_running_statistics():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    model.eval()
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    rep = gp.gradcheck(model, F.mse_loss, x, y)
    assert rep.ok and not any("batch-norm" in n for n in rep.notes)
    # In eval mode the fc bias does get a gradient (no batch mean subtracted).
    assert rep["0.bias"].analytic_norm > 1e-3


@pytest.mark.parametrize("random_layers", ["reseed", "eval"])
def test_dropout_made_reproducible(random_layers):
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 1))
    x, y = torch.randn(6, 5), torch.randn(6, 1)
    rep = gp.gradcheck(model, F.mse_loss, x, y, random_layers=random_layers)
    assert rep.ok and rep.vectorized, str(rep)
    assert any(random_layers in n for n in rep.notes)
    assert not rep.warnings


def test_rrelu_falls_back_to_loop_and_says_why():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 4), nn.RReLU(), nn.Linear(4, 1))
    x, y = torch.randn(6, 3), torch.randn(6, 1)
    rep = gp.gradcheck(model, F.mse_loss, x, y)
    assert rep.ok and not rep.vectorized
    assert rep.fallback_reason is not None and "rrelu" in rep.fallback_reason
    assert "not vectorised" in str(rep)


# ----------------------------------------------------------------------------------------- kinks


def _kink_model(functional: bool):
    torch.manual_seed(6)
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
    fc1, out = nn.Linear(3, 4).double(), nn.Linear(4, 1).double()
    with torch.no_grad():  # put unit 0's pre-activation on example 0 at 3e-8 above the kink
        z = x @ fc1.weight.T + fc1.bias
        fc1.bias[0] -= z[0, 0] - 3e-8
        out.weight.fill_(1.0)

    class FunctionalReLU(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.out = fc1, out

        def forward(self, x):
            return self.out(torch.relu(self.fc1(x)))

    model = FunctionalReLU() if functional else nn.Sequential(fc1, nn.ReLU(), out)
    return model, x, y


def _reference_crossings(fc1, x, eps=1e-7):
    """For each coordinate of fc1.weight / fc1.bias: does θ ± ε change any sign of z > 0?"""
    counts = {}
    with torch.no_grad():
        base = (x @ fc1.weight.T + fc1.bias) > 0
        for name, p in (("weight", fc1.weight), ("bias", fc1.bias)):
            flat, n = p.view(-1), 0
            for i in range(flat.numel()):
                old = float(flat[i])
                hit = False
                for step in (eps, -eps):
                    flat[i] = old + step
                    hit |= bool((((x @ fc1.weight.T + fc1.bias) > 0) != base).any())
                flat[i] = old
                n += hit
            counts[name] = n
    return counts


@pytest.mark.parametrize("functional", [False, True], ids=["module", "functional"])
def test_kink_reported_instead_of_false_failure(functional):
    model, x, y = _kink_model(functional)
    prefix = "fc1." if functional else "0."
    rep = gp.gradcheck(model, F.mse_loss, x, y)
    bias = rep[prefix + "bias"]
    assert bias.rel_error > 1e-3  # would be a false failure
    assert bias.verdict == "kink" and bias.rel_error_smooth < 1e-6
    assert bias.worst[0].kink and bias.worst[0].index == (0,)
    assert rep.ok and rep.failed == [], str(rep)
    ref = _reference_crossings(model.fc1 if functional else model[0], x)
    if not functional:  # the hooks see every crossing, harmless ones included
        assert rep["0.weight"].kinks_crossed == ref["weight"]
        assert bias.kinks_crossed == ref["bias"] == 1
    else:  # one-sided differences see the crossings that change the slope visibly
        assert 1 <= bias.kinks_crossed <= ref["bias"]
        assert rep["fc1.weight"].kinks_crossed <= ref["weight"]
    assert rep[prefix.replace("fc1", "out").replace("0.", "2.") + "weight"].kinks_crossed == 0


def test_bug_on_top_of_kink_is_still_a_bug():
    class DoubleGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, z):
            return z.clone()

        @staticmethod
        def backward(ctx, g):
            return 2 * g

    model, x, y = _kink_model(False)

    class Buggy(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x):
            return self.net[2](self.net[1](DoubleGrad.apply(self.net[0](x))))

    rep = gp.gradcheck(Buggy(), F.mse_loss, x, y)
    assert rep.failed == ["net.0.weight", "net.0.bias"]


# ------------------------------------------------------------------ modes, regularisation, etc.


def test_sample_and_directional_modes_localise_bug():
    torch.manual_seed(0)
    x, y = _data()
    for mode in ("sample", "directional"):
        rep = gp.gradcheck(Net("transposed"), F.mse_loss, x, y, mode=mode, k=5, n_directions=3)
        assert rep.failed == ["fc1.weight"], str(rep)
        sizes = {"sample": 5, "directional": 3}
        assert rep["fc1.weight"].n_checked == sizes[mode]
        assert gp.gradcheck(Net(), F.mse_loss, x, y, mode=mode).ok


def test_directional_analytic_values_are_projections():
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    x, y = torch.randn(5, 4), torch.randn(5, 1)
    rep = gp.gradcheck(model, F.mse_loss, x, y, mode="directional", n_directions=6, n_worst=6)
    g = torch.autograd.grad(F.mse_loss(model.double()(x.double()), y.double()),
                            model.weight)[0]
    for c in rep["weight"].worst:
        assert c.direction is not None and c.index is None
        assert abs(c.analytic) <= float(g.norm()) * (1 + 1e-12)  # |g·u| ≤ ‖g‖ for unit u


def test_regularisation_sees_perturbed_parameters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    x, y = torch.randn(6, 3), torch.randn(6, 1)

    def l2(m):
        return 0.5 * sum((p**2).sum() for p in m.parameters())

    rep = gp.gradcheck(model, F.mse_loss, x, y, regularization=l2)
    assert rep.ok
    # The regulariser also reads the weights: the rank-1 output shortcut must have been refused.
    assert not any("rank-1" in n for n in rep.notes)
    plain = gp.gradcheck(model, F.mse_loss, x, y)
    # The regulariser changes the gradient a lot, so agreement means the numeric side saw it.
    assert rep.rows[0].analytic_norm > 1.5 * plain.rows[0].analytic_norm


def test_tied_parameters_checked_once():
    torch.manual_seed(0)
    a, b = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)
    b.weight = a.weight
    model = nn.Sequential(a, nn.Tanh(), b)
    x = torch.randn(5, 4)
    rep = gp.gradcheck(model, lambda out: out.pow(2).mean(), x)
    assert [r.name for r in rep.rows] == ["0.weight"] and rep.ok
    assert not any("rank-1" in n for n in rep.notes)  # used by two layers


def test_model_dtype_inputs_and_dict_inputs():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 1)

        def forward(self, a, b):
            return self.lin(a) * b

    torch.manual_seed(0)
    a, b = torch.randn(4, 3), torch.randn(4, 1)
    assert gp.gradcheck(TwoInputs(), lambda o: o.sum(), (a, b)).ok
    assert gp.gradcheck(TwoInputs(), lambda o: o.sum(), {"a": a, "b": b}).ok
    labels = torch.tensor([0, 2, 1, 2])  # integer targets stay integers
    rep = gp.gradcheck(nn.Linear(3, 3), F.cross_entropy, a, labels)
    assert rep.ok and rep.dtype == "float64"


def test_user_model_and_rng_untouched():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Dropout(0.2),
                          nn.Linear(4, 1))
    model[4].weight.requires_grad_(False)
    x, y = torch.randn(6, 3), torch.randn(6, 1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    rep = gp.gradcheck(model, F.mse_loss, x, y)
    assert "4.weight" not in [r.name for r in rep.rows]  # frozen: not checked
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())
    assert model.training and model[1].track_running_stats
    assert not model[4].weight.requires_grad
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]) and v.dtype == state[k].dtype, k
    assert not model[0]._forward_pre_hooks and not model[2]._forward_pre_hooks


def test_float32_model_check_warns():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    x, y = torch.randn(16, 8), torch.randn(16, 1)
    r32 = gp.gradcheck(model, F.mse_loss, x, y, dtype=torch.float32)
    assert r32.rel_error > 1e-3 and not r32.ok and r32.failed == []
    assert any("float32 with eps=1e-07" in w and "float64" in w for w in r32.warnings)
    r64 = gp.gradcheck(model, F.mse_loss, x, y)
    assert r64.ok and not r64.warnings


def test_report_table_and_text():
    torch.manual_seed(0)
    x, y = _data()
    rep = gp.gradcheck(Net("mean_not_sum"), F.mse_loss, x, y)
    df = rep.table()
    assert list(df["name"]) == [r.name for r in rep.rows]
    assert set(df.columns) >= {"name", "shape", "rel_error", "verdict", "kinks_crossed", "worst"}
    assert df.set_index("name").loc["fc1.bias", "verdict"] == "bug"
    text = str(rep)
    assert "BUG" in text and "bug in fc1.bias" in text and "fc1.weight" in text
    with pytest.raises(KeyError):
        rep["nope"]


# ---------------------------------------------------------------------------------- bad inputs


def test_bad_inputs_raise_clear_errors():
    model = nn.Linear(3, 1)
    x, y = torch.randn(4, 3), torch.randn(4, 1)
    with pytest.raises(ConfigError, match="scalar") as info:
        gp.gradcheck(model, lambda o, t: F.mse_loss(o, t, reduction="none"), x, y)
    assert info.value.hint
    frozen = nn.Linear(3, 1).requires_grad_(False)
    with pytest.raises(ConfigError, match="no parameters that require grad"):
        gp.gradcheck(frozen, F.mse_loss, x, y)
    with pytest.raises(ConfigError, match="eps"):
        gp.gradcheck(model, F.mse_loss, x, y, eps=0)
    with pytest.raises(ConfigError, match="unknown mode"):
        gp.gradcheck(model, F.mse_loss, x, y, mode="fast")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="nn.Module"):
        gp.gradcheck(lambda t: t, F.mse_loss, x, y)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="loss_fn"):
        gp.gradcheck(model, "mse", x, y)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="random_layers"):
        gp.gradcheck(model, F.mse_loss, x, y, random_layers="off")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="does not depend"):
        gp.gradcheck(model, lambda o, t: (o.detach() - t).pow(2).mean(), x, y)


def test_data_dependent_control_flow_falls_back_to_loop():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            h = self.lin(x)
            return h * 2 if h.sum() > 0 else h * 3  # Python branch on a tensor value

    torch.manual_seed(0)
    x = torch.randn(5, 3)
    rep = gp.gradcheck(Branchy(), lambda o: o.pow(2).mean(), x)
    assert rep.ok and not rep.vectorized and "vmap" in (rep.fallback_reason or "")
    with pytest.raises(gp.UnsupportedModelError, match="vmap"):
        gp.gradcheck(Branchy(), lambda o: o.pow(2).mean(), x, vectorize=True)


def test_chunking_does_not_change_the_numbers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1))
    x, y = torch.randn(5, 4), torch.randn(5, 1)
    a = gp.gradcheck(model, F.mse_loss, x, y, n_worst=24)
    b = gp.gradcheck(model, F.mse_loss, x, y, n_worst=24, chunk_size=7)
    for ra, rb in zip(a.rows, b.rows):
        assert {c.index: c.numeric for c in ra.worst} == pytest.approx(
            {c.index: c.numeric for c in rb.worst}, rel=1e-7, abs=1e-12
        )


def test_functional_dropout_detected_and_reseeded():
    class FunctionalDropout(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 1)

        def forward(self, x):
            return self.b(F.dropout(torch.tanh(self.a(x)), 0.5, training=True))

    torch.manual_seed(0)
    x, y = torch.randn(6, 4), torch.randn(6, 1)
    for vectorize in (True, False):
        rep = gp.gradcheck(FunctionalDropout(), F.mse_loss, x, y, vectorize=vectorize)
        assert rep.ok and rep.vectorized is vectorize, str(rep)
        assert any("draws random numbers" in n for n in rep.notes)
    plain = gp.gradcheck(nn.Linear(4, 1), F.mse_loss, x, y)
    assert not any("random" in n for n in plain.notes)


def test_rank1_path_with_inplace_activation_matches_loop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(inplace=True), nn.Linear(8, 8), nn.SiLU(),
                          nn.Linear(8, 1))
    x, y = torch.randn(6, 5), torch.randn(6, 1)
    fast = gp.gradcheck(model, F.mse_loss, x, y, n_worst=100)
    slow = gp.gradcheck(model, F.mse_loss, x, y, n_worst=100, vectorize=False)
    assert fast.ok and slow.ok and fast.vectorized
    for rf, rs in zip(fast.rows, slow.rows):
        nf = {c.index: c.numeric for c in rf.worst}
        ns = {c.index: c.numeric for c in rs.worst}
        assert nf == pytest.approx(ns, rel=1e-6, abs=1e-8), rf.name


def test_randomness_outside_torch_is_warned():
    rng = np.random.default_rng(0)

    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 1)

        def forward(self, x):
            return self.lin(x) * float(1.0 + 0.1 * rng.standard_normal())

    rep = gp.gradcheck(Noisy(), lambda o: o.sum(), torch.randn(4, 3), vectorize=False)
    assert any("not a deterministic function" in w for w in rep.warnings)


class _Residual(nn.Module):
    """The first activation's output is read by the next Linear *and* by an addition."""

    def __init__(self):
        super().__init__()
        self.l1, self.act, self.l2, self.l3 = nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 1)

    def forward(self, x):
        h = self.act(self.l1(x))
        return self.l3(torch.tanh(self.l2(h)) + h)


@pytest.mark.parametrize("residual", [False, True], ids=["sequential", "residual"])
def test_unmaterialised_outputs_match_loop_numbers_and_kinks(residual):
    # A large eps makes the ReLU kinks crossed often: the hooks count them from the compressed
    # (column) form of the perturbed pre-activations, the loop from the dense ones.
    torch.manual_seed(3)
    if residual:
        model = _Residual()
    else:
        model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    x, y = torch.randn(6, 5), torch.randn(6, 1)
    fast = gp.gradcheck(model, F.mse_loss, x, y, eps=0.1, n_worst=100)
    slow = gp.gradcheck(model, F.mse_loss, x, y, eps=0.1, n_worst=100, vectorize=False)
    assert fast.vectorized and not slow.vectorized
    lean = [n for n in fast.notes if "unmaterialised" in n]
    first = "l1.weight" if residual else "0.weight"
    # The residual addition reads the first ReLU's output: it must have been materialised.
    assert bool(lean and first in lean[0]) is (not residual), fast.notes
    assert sum(r.kinks_crossed for r in slow.rows) > 0
    for rf, rs in zip(fast.rows, slow.rows):
        assert rf.kinks_crossed == rs.kinks_crossed and rf.verdict == rs.verdict, rf.name
        nf = {c.index: c.numeric for c in rf.worst}
        ns = {c.index: c.numeric for c in rs.worst}
        assert nf == pytest.approx(ns, rel=1e-6, abs=1e-8), rf.name
