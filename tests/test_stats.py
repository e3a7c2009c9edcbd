"""The statistics kernels against the float64 reference loop, merging, derivation, histograms."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from gradprobe.activations import get
from gradprobe.capture.hooks import first_float_tensor
from gradprobe.stats import batched, eager, reference, schema
from gradprobe.stats.hist import histogram


def _raw_from_vec(vec: torch.Tensor, count: int, units: float = 0.0) -> dict:
    v = vec.tolist()
    return {
        "count": count, "sum": v[schema.SUM], "sumsq": v[schema.SUMSQ], "abs_sum": v[schema.ABS_SUM],
        "nonzero": v[schema.NONZERO], "nonfinite": v[schema.NONFINITE], "saturated": v[schema.SATURATED],
        "dead": v[schema.DEAD], "units": units, "ref_sumsq": math.nan, "min": -v[schema.NEG_MIN],
        "max": v[schema.MAX],
    }


CASES = {
    "normal": lambda: torch.randn(7, 13),
    "with_zeros": lambda: torch.relu(torch.randn(64, 9)),
    "constant": lambda: torch.full((5, 4), 3.0),
    "scalar": lambda: torch.tensor(-2.5),
    "conv": lambda: torch.randn(2, 3, 4, 5),
    "half": lambda: (torch.randn(33, 17) * 300).half(),  # sum of squares overflows fp16
    "double": lambda: torch.randn(10, dtype=torch.float64),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_tensor_stats_match_reference(case):
    torch.manual_seed(0)
    x = CASES[case]()
    vec = eager.tensor_stats(x)
    got = schema.derive_row(_raw_from_vec(vec, x.numel()))
    want = schema.derive_row(reference.reference_stats([x]))
    for k, w in want.items():
        if math.isnan(w):
            assert math.isnan(got[k]) or k in ("saturated_frac", "dead_frac"), k
        else:
            assert got[k] == pytest.approx(w, rel=1e-5, abs=1e-6), k


def test_nonfinite_counted_and_moments_poisoned():
    x = torch.tensor([1.0, float("nan"), float("inf"), -2.0, 0.0])
    raw = _raw_from_vec(eager.tensor_stats(x), 5)
    assert raw["nonfinite"] == 2
    assert raw["nonzero"] == 4  # NaN and Inf are non-zero
    assert math.isnan(raw["sum"])
    ref = reference.reference_stats([x])
    assert ref["nonfinite"] == 2 and ref["nonzero"] == 4


def test_saturation_and_dead_units_follow_activation_table():
    torch.manual_seed(0)
    sig = get("sigmoid")
    a = torch.sigmoid(torch.randn(50, 8) * 6)
    vec = eager.tensor_stats(a, sig.saturated)
    want = float(((a < 0.0127) | (a > 1 - 0.0127)).sum())  # band a(1-a) < 0.0125, by hand
    assert vec[schema.SATURATED].item() == pytest.approx(want, abs=1)
    assert vec[schema.SATURATED].item() == reference.reference_stats([a], sig.saturated)["saturated"]

    relu = get("relu")
    h = torch.relu(torch.randn(6, 10, 3, 3))
    h[:, 2] = 0.0  # channel 2 dead for the whole batch
    h[:, 7] = 0.0
    mask = eager.inactive_units(h, relu.inactive)
    assert mask.shape == (10,)
    assert sorted(torch.nonzero(mask).flatten().tolist()) == [2, 7]
    # 2-D and 3-D outputs: the unit is the last dimension
    h2 = torch.relu(torch.randn(5, 4, 6))
    h2[..., 1] = 0
    assert eager.inactive_units(h2, relu.inactive).nonzero().flatten().tolist() == [1]
    ref = reference.reference_stats([h], inactive=relu.inactive)
    assert ref["dead"] == 2 and ref["units"] == 10


def test_merge_equals_stats_of_concatenation():
    torch.manual_seed(0)
    parts = [torch.randn(4, 6), torch.randn(9, 6) * 3, torch.zeros(2, 6)]
    acc = eager.empty_stats(1)[0]
    for p in parts:
        eager.merge_(acc, eager.tensor_stats(p))
    whole = eager.tensor_stats(torch.cat(parts))
    assert torch.allclose(acc, whole, rtol=1e-6)


def test_param_group_stats_equal_per_tensor_stats():
    torch.manual_seed(0)
    ts = [torch.randn(8, 3), torch.zeros(4), torch.randn(2, 2, 2)]
    ts[0][0, 0] = float("inf")
    mat = batched.param_group_stats(ts)
    for i, t in enumerate(ts):
        want = eager.tensor_stats(t)
        assert torch.allclose(mat[i], want, equal_nan=True), i


def test_derive_definitions_closed_form():
    raw = pd.DataFrame([{
        "kind": "grad", "count": 4, "sum": 2.0, "sumsq": 10.0, "abs_sum": 6.0, "nonzero": 3,
        "nonfinite": 0, "saturated": math.nan, "dead": math.nan, "units": 0, "ref_sumsq": math.nan,
        "min": -3.0, "max": 1.0,
    }, {
        "kind": "update", "count": 4, "sum": 0.0, "sumsq": 1e-6, "abs_sum": 0, "nonzero": 0,
        "nonfinite": 0, "saturated": math.nan, "dead": math.nan, "units": 0, "ref_sumsq": 1.0,
        "min": math.inf, "max": -math.inf,
    }])
    d = schema.derive(raw)
    g = d.iloc[0]
    assert g["mean"] == 0.5
    assert g["std"] == pytest.approx(math.sqrt(10 / 4 - 0.25))
    assert g["rms"] == pytest.approx(math.sqrt(2.5))
    assert g["norm"] == pytest.approx(math.sqrt(10))
    assert g["abs_mean"] == 1.5 and g["abs_max"] == 3.0 and g["zero_frac"] == 0.25
    u = d.iloc[1]
    assert u["norm"] == pytest.approx(1e-3)
    assert math.isnan(u["mean"]) and math.isnan(u["abs_max"])


def test_histogram_matches_numpy_and_counts_nonfinite():
    torch.manual_seed(0)
    x = torch.randn(1000)
    x[:3] = float("nan")
    x[3] = float("inf")
    edges, counts, nonfinite = histogram(x, 20)
    finite = x[torch.isfinite(x)].numpy()
    want, want_edges = np.histogram(finite, bins=20)
    np.testing.assert_allclose(edges.numpy(), want_edges, rtol=1e-6, atol=1e-6)
    assert counts.sum().item() == 996 and nonfinite.item() == 4
    assert np.abs(counts.numpy() - want).max() <= 1  # float edge rounding may move one value
    # a second micro-batch reuses the edges; values beyond them land in the end bins
    _, c2, _ = histogram(torch.tensor([-100.0, 100.0, 0.0]), 20, edges)
    assert c2[0] == 1 and c2[-1] == 1 and c2.sum() == 3


def test_first_float_tensor_of_structured_outputs():
    from dataclasses import dataclass

    a = torch.randn(2)

    @dataclass
    class Out:
        ids: torch.Tensor
        hidden: torch.Tensor

    assert first_float_tensor((torch.tensor([1, 2]), {"h": a})) is a
    assert first_float_tensor(Out(torch.tensor([1]), a)) is a
    assert first_float_tensor([None, "x"]) is None


@pytest.mark.parametrize("accelerator_path", [False, True])
def test_both_device_paths_agree_with_reference(accelerator_path, monkeypatch):
    """The branch-free path used on accelerators (exact counts always) and the CPU path."""
    if accelerator_path:
        for mod in (eager, batched):
            monkeypatch.setattr(mod, "on_host", lambda device: False)
    torch.manual_seed(0)
    ts = [torch.relu(torch.randn(40, 30)), torch.randn(9000), torch.zeros(3),
          torch.tensor([0.0, math.nan, math.inf, 2.0])]
    mat = batched.param_group_stats(ts)
    for i, t in enumerate(ts):
        ref = reference.reference_stats([t])
        raw = _raw_from_vec(mat[i], t.numel())
        for k in ("nonzero", "nonfinite"):
            assert raw[k] == ref[k], (i, k)
        if ref["nonfinite"] == 0:
            for k in ("sum", "sumsq", "abs_sum", "min", "max"):
                assert raw[k] == pytest.approx(ref[k], rel=1e-5, abs=1e-6), (i, k)
        vec = eager.tensor_stats(t)
        assert vec[schema.NONFINITE].item() == ref["nonfinite"]
        assert vec[schema.NONZERO].item() == ref["nonzero"]


@pytest.mark.parametrize("path", ["segments", "size_groups", "mixed_large"])
def test_batched_paths_equal_per_tensor_stats(path):
    torch.manual_seed(1)
    if path == "segments":  # tiny tensors of many sizes
        ts = [torch.randn(n) for n in (1, 2, 3, 5, 8, 13)]
    elif path == "size_groups":  # many tensors of two sizes, zero-padded rows of one matrix
        ts = [torch.relu(torch.randn(64, 64)) for _ in range(6)] + [torch.randn(64)] * 3
    else:  # large tensors (per-tensor path) and small ones in one call
        ts = [torch.randn(100, 100), torch.randn(7), torch.randn(batched.SMALL + 1), torch.zeros(9)]
    ts[0].view(-1)[0] = math.nan
    got = batched.param_group_stats(ts)
    for i, t in enumerate(ts):
        want = eager.tensor_stats(t)
        assert torch.allclose(got[i], want, rtol=1e-5, atol=1e-4, equal_nan=True), (path, i)
    assert got[0, schema.NONFINITE] == 1 and got[0, schema.NONZERO] == reference.reference_stats([ts[0]])["nonzero"]


@pytest.mark.parametrize("accelerator_path", [False, True])
def test_padded_buckets_equal_reference(accelerator_path, monkeypatch):
    """Rows of several sizes, dtypes and buckets: the zero padding changes no statistic, in
    particular not the extrema of all-negative or all-positive short rows."""
    if accelerator_path:
        for mod in (eager, batched):
            monkeypatch.setattr(mod, "on_host", lambda device: False)
    torch.manual_seed(2)
    ts = [torch.randn(64, 64), -torch.rand(5) - 1, torch.rand(3) + 2, torch.randn(1),
          torch.randn(batched.SMALL), torch.randn(700, dtype=torch.float64), torch.zeros(4),
          torch.randn(30).half(), torch.randn(2, 3).abs()]
    mat = batched.batched_stats(ts)
    for i, t in enumerate(ts):
        ref = reference.reference_stats([t.float()])
        raw = _raw_from_vec(mat[i], t.numel())
        for k in ("sum", "sumsq", "abs_sum", "nonzero", "nonfinite", "min", "max"):
            assert raw[k] == pytest.approx(ref[k], rel=1e-5, abs=1e-5), (i, k)


def test_tiny_batch_with_one_wide_tensor_is_not_padded_to_its_width():
    """Many tiny tensors next to one of SMALL elements: equal to the reference either way."""
    torch.manual_seed(3)
    ts = [torch.randn(batched.SMALL)] + [torch.randn(5) - 3 for _ in range(1000)]
    mat = batched.batched_stats(ts)
    sq = batched.sumsq_group(ts)
    for i in (0, 1, 1000):
        ref = reference.reference_stats([ts[i]])
        raw = _raw_from_vec(mat[i], ts[i].numel())
        for k in ("sum", "sumsq", "abs_sum", "nonzero", "min", "max"):
            assert raw[k] == pytest.approx(ref[k], rel=1e-5, abs=1e-5), (i, k)
        assert float(sq[i]) == pytest.approx(ref["sumsq"], rel=1e-5)
