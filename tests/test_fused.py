"""The compiled one-pass statistics kernels (gradprobe.stats.compiled) against the float64 reference loop,
their fallback to the eager path, and a Probe run with and without them.

Each kernel variant compiles once per process (the process-wide kernels, gradprobe.stats.compiled.KERNELS), so this file's compile cost
is a handful of variants: float32/float64/float16/bfloat16 statistics, two saturation rules, the
float32 weight kernel."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import gradprobe as gp
from gradprobe.activations import get
from gradprobe.capture.recorder import Summariser
from gradprobe.errors import ConfigError
from gradprobe.stats import compiled as F
from gradprobe.stats import eager, reference, schema
from gradprobe.stats.native import NATIVE

HAS_COMPILER = any(shutil.which(c) for c in ("g++", "c++", "clang++"))
"""torch.compile on CPU builds C++: without a compiler the tests that compile are skipped (the
fallback tests, which fake the compiler's failure, still run)."""


@pytest.fixture(autouse=True)
def _native_off():
    """The Summariser prefers the C kernels (tests/test_native.py) where they build: these tests
    are of the compiled and eager paths, so the C kernels stay off here."""
    old = NATIVE.mode
    NATIVE.set_mode("off")
    yield
    NATIVE.set_mode(old)


@pytest.fixture
def fused_on():
    """Mode "on": the compiled path for every tensor of 3·CHUNK elements or more, errors raised."""
    if not HAS_COMPILER:
        pytest.skip("no C++ compiler for torch.compile on CPU")
    old = F.KERNELS.mode
    F.KERNELS.set_mode("on")
    yield
    F.KERNELS.set_mode(old)


def _eager(x: torch.Tensor, sat=None) -> torch.Tensor:
    xf = eager.as_float(x)
    return eager.fix_nonfinite_([xf], eager.chunked_stats([xf], sat))[0]


def _assert_matches_reference(vec: torch.Tensor, x: torch.Tensor, sat=None):
    ref = reference.reference_stats([x], sat)
    v = vec.tolist()
    # counts and extrema exact; sums to float32 accumulation accuracy
    assert v[schema.NONZERO] == ref["nonzero"]
    assert v[schema.NONFINITE] == ref["nonfinite"]
    if sat is not None:
        assert v[schema.SATURATED] == ref["saturated"]
    assert v[schema.DEAD] == 0 and v[schema.REF_SUMSQ] == 0
    has_nan = bool(x.isnan().any())  # min/max propagate NaN, as torch.aminmax does
    for col, field in (("min", -v[schema.NEG_MIN]), ("max", v[schema.MAX])):
        assert math.isnan(field) if has_nan else field == ref[col], col
    scale = {"sum": ref["abs_sum"], "sumsq": ref["sumsq"], "abs_sum": ref["abs_sum"]}
    for col, i in (("sum", schema.SUM), ("sumsq", schema.SUMSQ), ("abs_sum", schema.ABS_SUM)):
        if ref["nonfinite"]:
            assert not math.isfinite(v[i]), col
        else:
            # relative to Σ|x| for the sum: cancellation makes a relative bound on Σx meaningless
            assert v[i] == pytest.approx(ref[col], rel=1e-5, abs=1e-6 * scale[col]), col


def _normal(n, dtype=torch.float32):
    return torch.randn(n, dtype=dtype)


CASES = {
    "3chunks": lambda: _normal(3 * F.CHUNK),  # the smallest: two rows and a tail of one row
    "tail_1": lambda: _normal(8 * F.CHUNK + 1),
    "tail_1023": lambda: _normal(9 * F.CHUNK - 1),
    "odd_2d": lambda: torch.randn(333, 301),
    "relu_zeros": lambda: torch.relu(torch.randn(70_001)),
    "all_zero": lambda: torch.zeros(50_000),
    "mean_dominated": lambda: torch.randn(200_003) * 0.1 + 30.0,
    "nan_inf": lambda: _with_nonfinite(torch.randn(100_003)),
    "neg_inf": lambda: _with_nonfinite(torch.randn(100_003), -math.inf),
    "only_nan": lambda: torch.full((9000,), math.nan),
    "million": lambda: _normal(1_000_003),
    "2million": lambda: torch.randn(2, 1000, 1000) * 5,
    "float64": lambda: _normal(100_003, torch.float64),
    "float16": lambda: (torch.randn(90_001) * 300).half(),  # Σx² overflows float16
    "bfloat16": lambda: (torch.randn(90_001) * 1e4).bfloat16(),
    "float16_nan": lambda: _with_nonfinite(torch.randn(30_000)).half(),
    "noncontiguous": lambda: torch.randn(400, 600).t(),
}


def _with_nonfinite(x, inf=math.inf):
    # one sign of infinity per tensor: the reference's fsum refuses -inf + inf
    x[3] = math.nan
    x[-2] = inf
    x[x.numel() // 2] = inf
    return x


@pytest.mark.parametrize("case", sorted(CASES))
def test_rows_match_reference(case, fused_on):
    torch.manual_seed(0)
    x = CASES[case]()
    vec = F.KERNELS.rows([x])
    assert vec is not None and vec.shape == (1, schema.N_STATS) and vec.dtype == torch.float64
    _assert_matches_reference(vec[0], x)
    # the public entry points take the compiled path and agree with it
    torch.testing.assert_close(Summariser().tensor(x), vec[0], rtol=0, atol=0, equal_nan=True)


def test_several_tensors_and_eager_counts_agree(fused_on):
    torch.manual_seed(1)
    ts = [torch.relu(torch.randn(n)) for n in (9000, 20_480, 123_457)]
    ts[1][7] = math.nan
    mat = F.KERNELS.rows(ts)
    assert mat is not None
    want = torch.stack([_eager(t) for t in ts])
    for col in (schema.NONZERO, schema.NONFINITE, schema.NEG_MIN, schema.MAX):
        assert torch.equal(mat[:, col].nan_to_num(), want[:, col].nan_to_num()), col
    torch.testing.assert_close(Summariser().large(ts), mat, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("name", ["sigmoid", "tanh"])
def test_saturation_rule_fused(name, fused_on):
    torch.manual_seed(2)
    spec = get(name)
    a = spec.fn(torch.randn(64, 1601) * 4)
    vec = Summariser().tensor(a, spec.saturated)
    _assert_matches_reference(vec, a, spec.saturated)
    assert vec[schema.SATURATED] > 0


def _slow_diff_sumsq(a, b):
    return math.fsum((x - y) ** 2 for x, y in zip(a.double().flatten().tolist(),
                                                   b.double().flatten().tolist()))


def test_weight_kernel_update_and_drift(fused_on):
    torch.manual_seed(3)
    w = torch.randn(512, 301)
    prev = w + 1e-3 * torch.randn_like(w)
    init = torch.randn_like(w)
    out = Summariser().weight(w, prev, init)
    assert out is not None and out.shape == (schema.N_STATS + 2,)
    _assert_matches_reference(out[: schema.N_STATS], w)
    assert out[schema.N_STATS].item() == pytest.approx(_slow_diff_sumsq(w, prev), rel=1e-5)
    assert out[schema.N_STATS + 1].item() == pytest.approx(_slow_diff_sumsq(w, init), rel=1e-5)
    # absent references give 0, the statistics unchanged
    only = Summariser().weight(w, None, None)
    assert only is not None
    assert only[schema.N_STATS:].tolist() == [0.0, 0.0]
    assert torch.equal(only[: schema.N_STATS], out[: schema.N_STATS])


def test_usable_rules(fused_on, monkeypatch):
    x = torch.randn(F.MIN_NUMEL)
    assert F.KERNELS.usable(x)
    assert not F.KERNELS.usable(torch.randn(3 * F.CHUNK - 1))  # needs two rows and a tail
    assert not F.KERNELS.usable(x.requires_grad_())
    assert not F.KERNELS.usable(torch.arange(F.MIN_NUMEL))  # integers
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not F.KERNELS.usable(torch.randn(F.MIN_NUMEL))
    monkeypatch.undo()
    F.KERNELS.set_mode("auto")
    assert not F.KERNELS.usable(torch.randn(F.MIN_NUMEL - 1)) and F.KERNELS.usable(torch.randn(F.MIN_NUMEL))
    F.KERNELS.set_mode("off")
    assert not F.KERNELS.usable(torch.randn(F.MIN_NUMEL))
    with pytest.raises(ConfigError, match="fused mode"):
        F.KERNELS.set_mode("yes")  # type: ignore[arg-type]


@pytest.fixture
def fresh_auto(monkeypatch):
    """Mode "auto" with no compiled kernels yet (restored afterwards)."""
    old = F.KERNELS.mode
    monkeypatch.setattr(F.KERNELS, "kernels", {})
    F.KERNELS.set_mode("auto")
    yield
    F.KERNELS.set_mode(old)


def _boom(fn):
    raise RuntimeError("no C++ compiler here")


def test_compile_failure_warns_once_and_falls_back(fresh_auto, monkeypatch):
    monkeypatch.setattr(F.KERNELS, "compile", _boom)
    torch.manual_seed(4)
    xs = [torch.randn(F.MIN_NUMEL + 5), torch.randn(300, 400)]
    with pytest.warns(RuntimeWarning, match="GRADPROBE_FUSED=0") as rec:
        got = [Summariser().tensor(x) for x in xs]
    assert len([w for w in rec if "compiled statistics" in str(w.message)]) == 1
    assert "no C++ compiler here" in str(rec[0].message)
    for x, v in zip(xs, got):
        assert torch.equal(v, _eager(x))
    assert not F.KERNELS.usable(xs[0])  # the process stays on eager
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Summariser().tensor(xs[0])
        assert Summariser().weight(xs[1], None, None) is None


def test_mismatch_falls_back(fresh_auto, monkeypatch):
    def wrong(fn):
        return lambda *a: torch.zeros(schema.N_STATS, dtype=torch.float64)

    monkeypatch.setattr(F.KERNELS, "compile", wrong)
    x = torch.randn(F.MIN_NUMEL)
    with pytest.warns(RuntimeWarning, match="disagrees with the eager path"):
        v = Summariser().tensor(x)
    assert torch.equal(v, _eager(x))


def test_mode_on_raises(fused_on, monkeypatch):
    monkeypatch.setattr(F.KERNELS, "kernels", {})
    monkeypatch.setattr(F.KERNELS, "compile", _boom)
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        Summariser().tensor(torch.randn(F.MIN_NUMEL))


def test_off_never_compiles(monkeypatch):
    old = F.KERNELS.mode
    monkeypatch.setattr(F.KERNELS, "compile", _boom)
    F.KERNELS.set_mode("off")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            x = torch.randn(F.MIN_NUMEL * 2)
            assert torch.equal(Summariser().tensor(x), _eager(x))
    finally:
        F.KERNELS.set_mode(old)


@pytest.mark.parametrize(("value", "want"), [("0", "off"), ("off", "off"), ("1", "on"),
                                             ("", "off"), ("auto", "auto")])
def test_environment_variable(value, want, monkeypatch):
    monkeypatch.setenv("GRADPROBE_FUSED", value)
    assert F.mode_from_env() == want


def test_unknown_environment_value_warns_and_stays_off(monkeypatch):
    monkeypatch.setenv("GRADPROBE_FUSED", "maybe")
    with pytest.warns(RuntimeWarning, match="GRADPROBE_FUSED='maybe' is not a known value"):
        assert F.mode_from_env() == "off"


def test_environment_variable_read_at_import():
    code = "from gradprobe.stats import compiled; print(compiled.KERNELS.mode)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "GRADPROBE_FUSED": "0"}, check=True)
    assert out.stdout.strip() == "off"


def _probe_run(tmp_path, tag: str, fused: str):
    """Three SGD steps of an MLP whose weights (784 x 512, 512 x 512) and activations
    (128 x 512, sigmoid and tanh) are large, from a fixed seed."""
    if fused != "off" and not HAS_COMPILER:
        pytest.skip("no C++ compiler for torch.compile on CPU")
    old = F.KERNELS.mode
    F.KERNELS.set_mode(fused)  # type: ignore[arg-type]
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(784, 512), nn.Sigmoid(), nn.Linear(512, 512), nn.Tanh(),
                              nn.Linear(512, 10))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        g = torch.Generator().manual_seed(1)
        with gp.Probe(model, opt, run_dir=tmp_path / tag) as probe:
            for _ in range(3):
                x = torch.randn(128, 784, generator=g)
                y = torch.randint(0, 10, (128,), generator=g)
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                opt.zero_grad()
        return probe.run.scalars().sort_values(["step", "layer", "kind"]).reset_index(drop=True)
    finally:
        F.KERNELS.set_mode(old)


def test_probe_same_statistics_fused_on_and_off(tmp_path, monkeypatch):
    calls: list[tuple[str, object]] = []

    def spy(name, fn):
        def wrapped(*args):
            out = fn(*args)
            calls.append((name, args[1] if name == "rows" and len(args) > 1 else None))
            assert out is not None
            return out
        return wrapped

    off = _probe_run(tmp_path, "off", "off")
    assert not calls
    monkeypatch.setattr(F.KERNELS, "rows", spy("rows", F.KERNELS.rows))
    monkeypatch.setattr(F.KERNELS, "weight_stats", spy("weight", F.KERNELS.weight_stats))
    on = _probe_run(tmp_path, "on", "on")
    # the compiled kernels did the work: weights, gradients, activations with their rules
    assert ("weight", None) in calls and ("rows", None) in calls
    assert ("rows", get("sigmoid").saturated) in calls and ("rows", get("tanh").saturated) in calls
    assert list(on.columns) == list(off.columns) and len(on) == len(off) > 0
    for col in on.columns:
        a, b = on[col], off[col]
        if a.dtype.kind == "f":
            assert a.to_numpy() == pytest.approx(b.to_numpy(), rel=1e-4, abs=1e-7, nan_ok=True), col
        else:
            assert (a == b).all(), col
