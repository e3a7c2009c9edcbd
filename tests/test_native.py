"""The C statistics kernels (gradprobe.stats.native) against the float64 reference loop and
torch, their fallback where no compiler works, and a Probe run with and without them."""

from __future__ import annotations

import ctypes
import json
import math
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import gradprobe as gp
from gradprobe.capture.summariser import Summariser
from gradprobe.errors import ConfigError
from gradprobe.stats import eager, reference, schema
from gradprobe.stats import native as N

HAS_CC = N.compiler() is not None
needs_cc = pytest.mark.skipif(not HAS_CC, reason="no C compiler (cc, gcc, clang) on PATH")


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    """Fresh kernels built into this file's own cache directory."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRADPROBE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        k = N.NativeKernels("on")
        assert k.available(), k.broken
    return k


def _case(name: str, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(len(name))
    if name == "one":
        return torch.tensor([-2.5], dtype=dtype)
    if name == "zeros":
        return torch.zeros(3000, dtype=dtype)
    if name == "negative":
        return -torch.rand(4099, generator=g, dtype=dtype) - 1
    if name == "sparse":  # a ReLU output: most elements exactly 0
        return torch.relu(torch.randn(128, 512, generator=g, dtype=dtype) - 1)
    if name == "large":  # not a multiple of a block, a mean far from 0
        return torch.randn(262_144 + 13, generator=g, dtype=dtype) * 3 + 10
    if name == "tiny":  # a vanished gradient (squares still normal float32 numbers: as on the
        # eager path, Σx² of float32 accumulates in float32, which ends near 1e-38)
        return torch.randn(5, 5, generator=g, dtype=dtype) * 1e-15
    if name in ("inf", "-inf"):
        x = torch.randn(2048 + 7, generator=g, dtype=dtype)
        x[17] = x[2050] = math.inf if name == "inf" else -math.inf
        return x
    if name == "nan":
        x = torch.randn(1024 * 5, generator=g, dtype=dtype)
        x[1500] = math.nan
        return x
    raise KeyError(name)


CASES = ("one", "zeros", "negative", "sparse", "large", "tiny", "inf", "-inf", "nan")


def _assert_row(row: torch.Tensor, x: torch.Tensor) -> None:
    """``row`` against the float64 reference loop: counts and extrema exact, sums to the
    accuracy of blocked float32 sums."""
    ref = reference.reference_stats([x])
    got = dict(zip(schema.DEVICE_FIELDS, row.tolist()))
    assert got["nonzero"] == ref["nonzero"] and got["nonfinite"] == ref["nonfinite"]
    assert got["saturated"] == 0 and got["dead"] == 0 and got["ref_sumsq"] == 0
    if ref["nonfinite"]:
        want = x.double()
        # the moments are non-finite as the sums are; NaN propagates into the extrema
        for f in ("sum", "sumsq", "abs_sum"):
            assert not math.isfinite(got[f])
        assert math.isnan(got["max"]) == bool(want.isnan().any())
        if not want.isnan().any():
            assert -got["neg_min"] == want.min().item() and got["max"] == want.max().item()
        return
    assert -got["neg_min"] == ref["min"] and got["max"] == ref["max"]
    tol = 1e-12 if x.dtype == torch.float64 else 2e-6
    scale = {"sum": ref["abs_sum"], "sumsq": ref["sumsq"], "abs_sum": ref["abs_sum"]}
    for f, s in scale.items():
        assert abs(got[f] - ref[f]) <= tol * s + 1e-300, (f, got[f], ref[f])


@needs_cc
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES)
def test_rows_match_reference(kernels, case, dtype):
    x = _case(case, dtype)
    rows = kernels.rows([x])
    assert rows is not None and rows.shape == (1, schema.N_STATS) and rows.dtype == torch.float64
    _assert_row(rows[0], x)


@needs_cc
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_portable_build_agrees_too(tmp_path, monkeypatch, dtype):
    """The build without x86 intrinsics (``-DGP_PORTABLE``: what an ARM machine compiles):
    min and max through a select that keeps the accumulator where an element is NaN."""
    monkeypatch.setenv("GRADPROBE_CACHE_DIR", str(tmp_path))
    k = N.NativeKernels("on")
    k.defines = ("-DGP_PORTABLE",)
    assert k.available(), k.broken
    for case in CASES:
        x = _case(case, dtype)
        _assert_row(k.rows([x])[0], x)


@needs_cc
def test_many_tensors_of_two_dtypes_in_one_call(kernels):
    ts = [_case(c, dt) for c in CASES for dt in (torch.float32, torch.float64)]
    together = kernels.rows(ts)
    assert together is not None
    for i, t in enumerate(ts):
        torch.testing.assert_close(together[i], kernels.rows([t])[0], rtol=0, atol=0,
                                   equal_nan=True)
        _assert_row(together[i], t)


@needs_cc
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_weight_row_and_differences(kernels, dtype):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(512, 515, generator=g, dtype=dtype)
    prev = w - 1e-3 * torch.randn(w.shape, generator=g, dtype=dtype)
    init = torch.randn(w.shape, generator=g, dtype=dtype)
    out = kernels.weight_stats(w, prev, init, cols=515)
    assert out is not None and out.shape == (schema.N_STATS + 3,)
    _assert_row(out[: schema.N_STATS], w)
    wd = w.double()
    rel = 1e-12 if dtype == torch.float64 else 2e-6
    for got, other in ((out[-3], prev), (out[-2], init)):
        want = ((wd - other.double()) ** 2).sum().item()
        assert got.item() == pytest.approx(want, rel=rel)
    # the column sums of the spread (gradprobe.stats.spread): ‖Σ_i w_i‖² of the 512 rows
    # (64 rows summed in the tensor's precision at a time)
    assert out[-1].item() == pytest.approx(wd.sum(0).square().sum().item(),
                                           rel=1e-12 if dtype == torch.float64 else 1e-6)
    only = kernels.weight_stats(w, None, init)
    assert only is not None and only[-3].item() == 0.0 and only[-2] == out[-2]
    assert only[-1].item() == 0.0  # no cols: no column sums
    # a reference of another dtype is not served (the caller takes the eager path)
    assert kernels.weight_stats(w, prev.half(), None) is None


@needs_cc
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_blocks_of_a_strided_buffer(kernels, dtype):
    """The stage's runs: ``[S, m, n]`` views of a ``[capacity, width]`` buffer (each step's
    ``[m, n]`` block contiguous, steps a buffer row apart)."""
    g = torch.Generator().manual_seed(7)
    buf = torch.randn(7, 1000, generator=g, dtype=dtype)
    buf[2, 100 + 64 + 5] = math.nan
    buf[3, 100:164] = 0.0
    v = buf[:5, 100 : 100 + 3 * 64].view(5, 3, 64)
    assert not v.is_contiguous()
    rows = kernels.blocks(v)
    assert rows is not None and rows.shape == (5, 3, schema.N_STATS)
    for s_ in range(5):
        for r in range(3):
            _assert_row(rows[s_, r], v[s_, r])
    assert kernels.blocks(v.transpose(1, 2)) is None  # rows not contiguous
    assert kernels.blocks(v.half()) is None


@needs_cc
def test_norms_into_a_row_and_where_they_are_refused(kernels):
    g = torch.Generator().manual_seed(11)
    grads = [torch.randn(7, 5, generator=g), torch.randn(3, generator=g) * 1e3,
             torch.zeros(4)]
    out = torch.full((3,), -1.0)
    sizes = (ctypes.c_int64 * 3)(*[t.numel() for t in grads])
    assert kernels.norms_into(grads, out, sizes)
    want = torch.stack([torch.linalg.vector_norm(t.double()) for t in grads]).float()
    torch.testing.assert_close(out, want, rtol=1e-6, atol=0)
    for bad in ([grads[0].t(), *grads[1:]], [grads[0].to_sparse(), *grads[1:]],
                [grads[0].half(), *grads[1:]]):
        out.fill_(-1.0)
        assert not kernels.norms_into(bad, out) and (out == -1).all()  # nothing written
    assert not kernels.norms_into(grads, torch.empty(2))  # the wrong number of columns
    # norms_at, over pointers the caller made (the stage's rows): the same norms; refused for
    # a dtype or an output the kernels do not serve, writing nothing
    ptrs = (ctypes.c_int64 * 3)(*[t.data_ptr() for t in grads])
    out.fill_(-1.0)
    assert kernels.norms_at(torch.float32, ptrs, sizes, out)
    torch.testing.assert_close(out, want, rtol=1e-6, atol=0)
    out.fill_(-1.0)
    assert not kernels.norms_at(torch.float16, ptrs, sizes, out) and (out == -1).all()
    assert not kernels.norms_at(torch.float32, ptrs, sizes, out.double())
    assert not kernels.norms_at(torch.float32, ptrs, sizes, torch.empty(6)[::2])  # strided


@needs_cc
def test_usable_only_where_the_kernels_read_the_memory_right(kernels):
    x = torch.randn(64, 32)
    assert kernels.usable(x)
    assert not kernels.usable(x.t())  # strided view
    assert not kernels.usable(x.half())
    assert not kernels.usable(torch.empty(0))
    assert not kernels.usable(x.to_sparse())
    assert not kernels.usable(torch._neg_view(x))  # memory holds -x: the eager path reads it
    sub = type("Sub", (torch.Tensor,), {})
    assert not kernels.usable(x.as_subclass(sub))  # a subclass: its memory may not be its values
    assert kernels.usable(nn.Parameter(x))
    # the Summariser gives a strided view the eager row: the reference's numbers still
    s = Summariser(native=kernels)
    _assert_row(s.tensor(x.t()), x)
    torch.testing.assert_close(s.tensor(x.t()), eager.tensor_stats(x.t()), rtol=0, atol=0)


@needs_cc
def test_summariser_takes_the_c_kernels_and_adds_the_saturation_rule(kernels):
    from gradprobe.activations import get

    spec = get("sigmoid")
    g = torch.Generator().manual_seed(5)
    a = torch.sigmoid(torch.randn(256, 300, generator=g) * 4)
    s = Summariser(native=kernels)
    row = s.tensor(a, spec.saturated)
    # the rule is applied in the tensor's precision, as on the eager path (the float64
    # reference can differ by an element that lies on the threshold in float32)
    eager_sat = eager.tensor_stats(a, spec.saturated)[schema.SATURATED].item()
    ref = reference.reference_stats([a], saturated=spec.saturated)
    assert row[schema.SATURATED].item() == eager_sat > 0
    assert abs(eager_sat - ref["saturated"]) <= 2
    _assert_row(torch.cat([row[: schema.SATURATED], torch.zeros(3, dtype=row.dtype),
                           row[schema.NEG_MIN:]]), a)
    small = [torch.randn(3, 4), torch.randn(7, dtype=torch.float64)]
    torch.testing.assert_close(s.batched(small), kernels.rows(small), rtol=0, atol=0)
    torch.testing.assert_close(s.group(small), kernels.rows(small), rtol=0, atol=0)


def test_no_compiler_falls_back_to_eager(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADPROBE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    k = N.NativeKernels("auto")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # auto: silent
        assert not k.available()
    assert "could not run" in (k.broken or "")
    assert k.describe().startswith("eager (C kernels unavailable")
    x = torch.randn(1000)
    assert not k.usable(x) and k.rows([x]) is None
    s = Summariser(native=k)
    want = eager.tensor_stats(x)
    torch.testing.assert_close(s.tensor(x), want, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="C kernels|native") as e:
        N.NativeKernels("on").available()
    assert "GRADPROBE_NATIVE=auto" in str(e.value.hint)
    assert not list((tmp_path / "cache").glob("stats-*"))  # nothing half-written left


def test_a_compiler_that_fails_is_named_with_its_flags(tmp_path, monkeypatch):
    fails = tmp_path / "cc"
    fails.write_text("#!/bin/sh\necho 'cc: error: unknown option' >&2\nexit 1\n")
    fails.chmod(0o755)
    monkeypatch.setenv("GRADPROBE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", str(fails))
    k = N.NativeKernels("auto")
    assert not k.available()
    assert "could not compile _native.c" in (k.broken or "")
    assert "-O3 -march=native: cc: error: unknown option" in (k.broken or "")
    assert not [p for p in (tmp_path / "cache").iterdir()]  # no half-written file left


@needs_cc
def test_a_library_that_disagrees_with_eager_is_not_used(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADPROBE_CACHE_DIR", str(tmp_path / "cache"))
    k = N.NativeKernels("auto")
    real = N.NativeKernels._rows

    def off_by_one(self, ts):
        out = real(self, ts)
        out[:, schema.NONZERO] += 1
        return out

    monkeypatch.setattr(N.NativeKernels, "_rows", off_by_one)
    with pytest.warns(RuntimeWarning, match="disagrees with the eager statistics"):
        assert not k.available()
    assert k.rows([torch.ones(3)]) is None


@needs_cc
@pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX permissions")
def test_a_cache_directory_others_can_write_is_refused(tmp_path, monkeypatch):
    # a directory of ours that the group may write (a umask of 002) is made private
    ours = tmp_path / "ours"
    ours.mkdir()
    ours.chmod(0o775)
    assert N.build(ours).exists() and ours.stat().st_mode & 0o777 == 0o755
    # one owned by another user is refused (a directory of root's, where the test runs as a
    # user; as root, a directory of another uid)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    other = 0 if os.getuid() != 0 else 65534
    try:
        os.chown(shared, other, -1)
    except PermissionError:
        shared = Path(tempfile.gettempdir())  # root's (mode 1777), and not ours
    with pytest.raises(RuntimeError, match="not private to this user"):
        N.build(shared)
    monkeypatch.setenv("GRADPROBE_CACHE_DIR", str(shared))
    k = N.NativeKernels("auto")
    assert not k.available() and "GRADPROBE_CACHE_DIR" in (k.broken or "")
    assert not list(shared.glob("stats-*"))


@needs_cc
def test_a_second_build_loads_the_cached_library(tmp_path):
    first = N.build(tmp_path)
    stamp = first.stat().st_mtime_ns
    assert N.build(tmp_path) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]


@needs_cc
def test_a_damaged_library_is_built_again(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADPROBE_CACHE_DIR", str(tmp_path))
    lib = N.build(tmp_path)
    lib.write_bytes(b"not a shared library")
    k = N.NativeKernels("on")
    assert k.available() and k.path == lib and lib.stat().st_size > 1000
    x = torch.randn(100)
    _assert_row(k.rows([x])[0], x)


def test_mode_from_the_environment(monkeypatch):
    for value, mode in (("", "auto"), ("auto", "auto"), ("1", "on"), ("0", "off"), ("off", "off")):
        monkeypatch.setenv("GRADPROBE_NATIVE", value)
        assert N.mode_from_env() == mode
    monkeypatch.setenv("GRADPROBE_NATIVE", "fast")
    with pytest.warns(RuntimeWarning, match="GRADPROBE_NATIVE='fast'"):
        assert N.mode_from_env() == "auto"
    with pytest.raises(ConfigError, match="'auto', 'on' or 'off'"):
        N.NativeKernels("fast")  # type: ignore[arg-type]
    off = N.NativeKernels("off")
    assert not off.available() and off.describe() == "eager (C kernels off: GRADPROBE_NATIVE=0)"


def _train(run_dir, native: bool) -> gp.Run:
    old = N.NATIVE.mode
    N.NATIVE.set_mode("auto" if native else "off")
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(20, 300), nn.Tanh(), nn.Linear(300, 300), nn.ReLU(),
                              nn.Linear(300, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        x, y = torch.randn(64, 20), torch.randint(0, 3, (64,))
        with gp.Probe(model, opt, run_dir=run_dir, budget=None, every=1) as probe:
            for _ in range(6):
                loss = nn.functional.cross_entropy(model(x), y)
                probe.observe_loss(loss)
                loss.backward()
                opt.step()
                opt.zero_grad()
    finally:
        N.NATIVE.set_mode(old)
    return gp.Run.open(run_dir)


@needs_cc
def test_a_probe_run_records_the_same_rows_with_and_without_the_c_kernels(tmp_path):
    with_c = _train(tmp_path / "c", native=True)
    without = _train(tmp_path / "eager", native=False)
    assert json.loads((tmp_path / "c" / "meta.json").read_text())["stats_kernels"].startswith(
        "C kernels")
    assert "GRADPROBE_NATIVE=0" in json.loads(
        (tmp_path / "eager" / "meta.json").read_text())["stats_kernels"]
    a, b = with_c.raw_scalars(), without.raw_scalars()
    assert len(a) == len(b) > 0 and set(a["kind"]) >= {"act", "act_grad", "grad", "weight",
                                                       "update", "drift", "spread"}
    # the always-on tier's gradient norms: one C call per step against _foreach_norm
    na, nb = with_c.grad_norms(), without.grad_norms()
    assert len(na) == len(nb) == 6 * 5 and na["grad_norm"].notna().sum() == 6 * 3  # 3 Linear
    np.testing.assert_allclose(na["grad_norm"].to_numpy(), nb["grad_norm"].to_numpy(), rtol=1e-6)
    assert (na["act_nonfinite"] == nb["act_nonfinite"]).all()
    num = [c for c in a.columns if a[c].dtype.kind == "f"]
    assert {"sum", "sumsq", "abs_sum", "nonzero", "min", "max"} <= set(num)
    for c in num:
        x, y = a[c].to_numpy(), b[c].to_numpy()
        assert (np.isnan(x) == np.isnan(y)).all(), c
        # a sum near 0 is compared at the scale of the sum of magnitudes
        scale = np.abs(a["abs_sum"].to_numpy()) if c == "sum" else np.abs(y)
        with np.errstate(invalid="ignore"):  # inf - inf where a kind has no extrema
            ok = (x == y) | np.isnan(x) | (np.abs(x - y) <= 1e-5 * scale + 1e-12)
        assert ok.all(), (c, x[~ok], y[~ok])


if os.environ.get("GRADPROBE_NATIVE") == "0":  # the whole file is about the C kernels
    pytestmark = pytest.mark.skip(reason="GRADPROBE_NATIVE=0")
