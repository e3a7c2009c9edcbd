"""Mergeable sufficient statistics of tensors, and the quantities derived from them.

A tensor ``x`` with ``n`` elements is summarised on its own device by a small vector of sums and
extrema that **merge exactly** across micro-batches, ranks and time windows (sums add, maxima take
the maximum); everything a user reads is derived from them when a run is read:

=================  ==============================================================================
stored (raw)       meaning
=================  ==============================================================================
``count``          ``n`` (kept on the host: it is known without looking at the values)
``sum``            ``Σ x_i``
``sumsq``          ``Σ x_i²``
``abs_sum``        ``Σ |x_i|``
``nonzero``        ``#{i : x_i ≠ 0}`` (NaN counts as non-zero)
``nonfinite``      ``#{i : x_i is NaN or ±Inf}``
``saturated``      ``#{i : saturated(x_i)}`` by the activation's rule in :mod:`gradprobe.activations`
``dead``           number of *units* inactive on every example (see below)
``units``          number of units (host side)
``ref_sumsq``      ``Σ w_i²`` of the reference weights, for the ratio kinds ``update``/``drift``
``min``, ``max``   extrema (``min`` is stored negated on the device so both merge by ``max``)
=================  ==============================================================================

Derived (``derive``), with ``n = count``:

* ``mean = sum / n``; ``std = sqrt(max(sumsq/n − mean², 0))`` (population standard deviation;
  computed in float64 from float32 sums, so its relative error grows like ``ε·mean²/var`` when
  the mean dominates);
* ``rms = sqrt(sumsq / n)``; ``abs_mean = abs_sum / n``; ``norm = sqrt(sumsq)`` (Frobenius /
  Euclidean norm over all parameter tensors of the layer);
* ``abs_max = max(|min|, |max|)``; ``zero_frac = (n − nonzero) / n``;
* ``saturated_frac = saturated / n`` (NaN where the module has no saturation rule);
* ``dead_frac = dead / units`` (NaN where the module has no dead-unit rule);
* for kinds ``update`` and ``drift`` the column ``norm`` holds the **ratio**
  ``sqrt(sumsq / ref_sumsq)``: ``‖W_{t+1} − W_t‖ / ‖W_{t+1}‖`` and ``‖W_t − W_0‖ / ‖W_0‖``
  (the update-to-weight ratio whose healthy value is about 1e-3, Karpathy 2019, "A recipe for
  training neural networks"; the drift from initialisation that stays near 0 in layers whose
  gradient vanishes, Glorot & Bengio 2010). Their other moment columns are NaN.

Dead units (Lu et al. 2019, "Dying ReLU and Initialization"): a unit is the channel (dimension 1)
of an output with 4 or more dimensions (``N, C, H, W, …``) and the last dimension otherwise
(``N, F`` or ``N, T, F``); it is dead in a step when the activation's ``inactive`` rule holds for
every element of that unit in every micro-batch of the step.

When ``nonfinite > 0`` the moments include the non-finite values and are themselves non-finite;
``nonfinite`` says how many there were.

Example
    >>> import torch
    >>> raw = reference_stats([torch.tensor([0.0, 3.0, -4.0])])
    >>> d = derive_row(raw)
    >>> d["norm"], d["zero_frac"], d["abs_max"]
    (5.0, 0.3333333333333333, 4.0)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from gradprobe.stats import compiled as _fused

# Device-side layout: first the fields merged by addition, then the fields merged by maximum.
SUM, SUMSQ, ABS_SUM, NONZERO, NONFINITE, SATURATED, DEAD, REF_SUMSQ, NEG_MIN, MAX = range(10)
N_ADD = 8
N_STATS = 10
DEVICE_FIELDS = (
    "sum", "sumsq", "abs_sum", "nonzero", "nonfinite", "saturated", "dead", "ref_sumsq",
    "neg_min", "max",
)
RAW_COLUMNS = (
    "count", "sum", "sumsq", "abs_sum", "nonzero", "nonfinite", "saturated", "dead", "units",
    "ref_sumsq", "min", "max",
)
DERIVED_COLUMNS = (
    "count", "mean", "std", "rms", "abs_mean", "norm", "min", "max", "abs_max", "zero_frac",
    "nonfinite", "saturated_frac", "dead_frac",
)
KINDS = ("grad", "weight", "update", "drift", "act", "act_grad")
PARAM_KINDS = ("grad", "weight", "update", "drift")
ACT_KINDS = ("act", "act_grad")
RATIO_KINDS = ("update", "drift")
STAT_DTYPE = torch.float64


def empty_stats(rows: int, device: torch.device | str = "cpu") -> Tensor:
    """An identity element for :func:`merge_`: zeros for sums, ``-inf`` for the maxima."""
    out = torch.zeros(rows, N_STATS, dtype=STAT_DTYPE, device=device)
    out[:, N_ADD:] = -math.inf
    return out


def merge_(acc: Tensor, other: Tensor) -> Tensor:
    """Merge ``other`` into ``acc`` in place (both ``[..., N_STATS]``) and return ``acc``."""
    acc[..., :N_ADD].add_(other[..., :N_ADD])
    torch.maximum(acc[..., N_ADD:], other[..., N_ADD:], out=acc[..., N_ADD:])
    return acc


def unit_dims(ndim: int) -> tuple[int, ...]:
    """Dimensions reduced to decide whether a unit is dead (all but the unit dimension)."""
    if ndim <= 1:
        return ()
    unit = 1 if ndim >= 4 else ndim - 1
    return tuple(d for d in range(ndim) if d != unit)


def _float(x: Tensor) -> Tensor:
    # Half-precision sums of squares overflow at 65504: reduce in float32 instead.
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _cpu(device: torch.device) -> bool:
    """True where reading a value costs no host-device synchronisation (tests patch this to
    run the accelerator path on CPU)."""
    return device.type == "cpu"


def _fix_nonfinite_(ts: Sequence[Tensor], mat: Tensor) -> Tensor:
    """Fill the ``nonfinite`` column of ``mat`` (``[len(ts), N_STATS]``) and return ``mat``.

    Any NaN or Inf makes the sum non-finite, so a finite sum proves the count is 0. On CPU,
    reading that proof is not a host-device synchronisation (there is no asynchronous device to
    wait for) and skips the costliest pass; on an accelerator the counts are always computed
    (a branch there would synchronise).
    """
    sums = mat[:, SUM]
    if _cpu(sums.device) and bool(torch.isfinite(sums).all()):
        return mat
    mat[:, NONFINITE] = torch.stack(
        [t.numel() - torch.count_nonzero(torch.isfinite(t)) for t in ts]
    ).to(STAT_DTYPE)
    if _cpu(sums.device):  # the sign trick gave NaN counts: count exactly
        mat[:, NONZERO] = torch.stack([torch.count_nonzero(t) for t in ts]).to(STAT_DTYPE)
    return mat


def tensor_stats(
    x: Tensor,
    saturated: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Device-side statistics of one tensor as a ``[N_STATS]`` float64 vector (no host sync).

    A handful of reductions (sum, 2-norm, ``|x|`` and its non-zero count, min/max in one kernel)
    stacked into one vector; ``dead`` and ``ref_sumsq`` are zero here. Large tensors take the
    compiled one-pass kernel of :mod:`gradprobe.stats.compiled` where it is available.
    """
    with torch.no_grad():
        xd = x.detach()
        fused = _fused_rows([xd], saturated)
        if fused is not None:
            return fused[0]
        xf = _float(xd)
        return _fix_nonfinite_([xf], _chunked_stats([xf], saturated))[0]


CHUNK = 1 << 18
"""On CPU, large tensors are reduced in chunks of this many elements (1 MiB of float32): the
first reduction of a chunk reads it from memory, the other five find it in cache."""

_CHUNK_SCRATCH: dict[tuple[Any, Any], Tensor] = {}


def _chunk_scratch(f: Tensor) -> Tensor:
    scratch = _CHUNK_SCRATCH.get((f.device, f.dtype))
    if scratch is None:
        scratch = torch.empty(CHUNK, dtype=f.dtype, device=f.device)
        _CHUNK_SCRATCH[(f.device, f.dtype)] = scratch
    return scratch


def _chunk_vec(c: Tensor, scratch: Tensor | None,
               saturated: Callable[[Tensor], Tensor] | None) -> Tensor:
    """The ``[N_STATS]`` vector of one flat chunk (``nonfinite`` left 0)."""
    mn, mx = torch.aminmax(c)
    if scratch is not None:  # CPU: |x| into the scratch, count from sign(|x|) (exact < 2^24)
        a = torch.abs(c, out=scratch[: c.numel()])
        l1 = a.sum()
        nnz = a.sign_().sum()
    else:
        l1 = torch.linalg.vector_norm(c, 1)
        nnz = torch.count_nonzero(c).to(c.dtype)
    zero = l1.new_zeros(())
    sat = saturated(c).sum().to(c.dtype) if saturated is not None else zero
    return torch.stack([
        c.sum(), torch.linalg.vector_norm(c, 2).square(), l1, nnz, zero, sat, zero, zero, -mn, mx,
    ]).to(STAT_DTYPE)


def _chunked_stats(ts: Sequence[Tensor], saturated: Callable[[Tensor], Tensor] | None = None
                   ) -> Tensor:
    """``[len(ts), N_STATS]`` statistics of large tensors: the compiled one-pass kernel of
    :mod:`gradprobe.stats.compiled` where it is available (``nonfinite`` then already exact), else
    :func:`_chunked_eager`."""
    fused = _fused_rows(ts, saturated)
    return fused if fused is not None else _chunked_eager(ts, saturated)


def _fused_rows(ts: Sequence[Tensor], saturated: Callable[[Tensor], Tensor] | None = None
                ) -> Tensor | None:
    """:func:`gradprobe.stats.compiled.rows` where the compiled path serves every tensor of ``ts``
    (exact counts), else ``None`` and the caller takes the eager path."""
    if ts and all(_fused.usable(t) for t in ts):
        return _fused.rows(ts, saturated)
    return None


def _chunked_eager(ts: Sequence[Tensor], saturated: Callable[[Tensor], Tensor] | None = None
                   ) -> Tensor:
    """``[len(ts), N_STATS]`` (``nonfinite`` left 0 for :func:`_fix_nonfinite_`): sum, 2-norm,
    min/max, and ``|x|`` in a scratch buffer for its sum and non-zero count, chunk by chunk on
    CPU (one pass over memory instead of six; a fresh ``|x|`` of a large activation also costs
    page faults), whole tensors on accelerators (where each kernel streams anyway)."""
    out = []
    for t in ts:
        f = t.reshape(-1)
        n = f.numel()
        if not _cpu(f.device):
            out.append(_chunk_vec(f, None, saturated))
            continue
        scratch = _chunk_scratch(f)
        if n <= CHUNK:
            out.append(_chunk_vec(f, scratch, saturated))
            continue
        p = torch.stack([_chunk_vec(f[i : i + CHUNK], scratch, saturated)
                         for i in range(0, n, CHUNK)])
        out.append(torch.cat([p[:, :N_ADD].sum(0), p[:, N_ADD:].amax(0)]))
    return torch.stack(out)


def large_param_stats(x: Tensor) -> Tensor:
    """:func:`tensor_stats` of a large tensor, where the eager path leaves the non-finite count
    0 (fill it with :func:`fix_nonfinite_` over a stack of such vectors, one check for all; the
    compiled path's exact count passes through it unchanged)."""
    with torch.no_grad():
        xd = x.detach()
        fused = _fused_rows([xd])
        return fused[0] if fused is not None else _chunked_eager([_float(xd)])[0]


fix_nonfinite_ = _fix_nonfinite_


def fused_weight_stats(w: Tensor, prev: Tensor | None, init: Tensor | None) -> Tensor | None:
    """``[N_STATS + 2]``: :func:`tensor_stats` of a large weight ``w`` (exact counts), then
    ``Σ (w − prev)²`` and ``Σ (w − init)²`` (0 where ``None``), from one compiled pass over ``w``
    (:func:`gradprobe.stats.compiled.weight_stats`); ``None`` where the compiled path is not available
    for ``w``, and the caller takes the eager path."""
    with torch.no_grad():
        wd = w.detach()
        if not _fused.usable(wd):
            return None
        return _fused.weight_stats(wd, prev, init)


def inactive_units(x: Tensor, inactive: Callable[[Tensor], Tensor]) -> Tensor:
    """Boolean vector over units: True where ``inactive`` holds for every element of the unit.

    Computed as ``inactive(max over the unit)``: the table's ``inactive`` rules are thresholds
    ``a ≤ c``, for which "every element inactive" is "the largest element inactive", and a max
    over the batch dimensions costs a tenth of a reduction of a boolean mask.
    """
    xf = _float(x.detach())
    if xf.ndim == 0:
        return inactive(xf.reshape(1))
    dims = unit_dims(xf.ndim)
    return inactive(xf.amax(dim=dims) if dims else xf)


def inactive_units_batched(xs: Tensor, inactive: Callable[[Tensor], Tensor]) -> Tensor:
    """:func:`inactive_units` of each ``xs[i]`` (a stack of equally shaped outputs): ``[k, units]``."""
    xf = _float(xs.detach())
    if xf.ndim == 1:
        return inactive(xf.reshape(-1, 1))
    dims = tuple(d + 1 for d in unit_dims(xf.ndim - 1))
    return inactive(xf.amax(dim=dims) if dims else xf)


SMALL = 8192
"""Tensors with at most this many elements are summarised together (:func:`batched_stats`)."""

PAD_SLACK = 1 << 16
"""Zero elements a padded matrix of :func:`batched_stats` may hold beyond its real elements."""

_LAYOUTS: dict[tuple[tuple[int, ...], Any], list[tuple[list[int], int]]] = {}


def _layout(numels: tuple[int, ...], dtypes: tuple[Any, ...]) -> list[tuple[list[int], int]]:
    """Buckets ``(indices, width)`` of tensors reduced together as the rows of one zero-padded
    ``[len(indices), width]`` matrix: one dtype per bucket, and at most twice as many elements
    (plus :data:`PAD_SLACK`) as the bucket's tensors hold. Cached per step shape."""
    key = (numels, dtypes)
    out = _LAYOUTS.get(key)
    if out is None:
        if len(_LAYOUTS) > 256:
            _LAYOUTS.clear()
        out = []
        for dt in dict.fromkeys(dtypes):
            order = sorted((i for i, d in enumerate(dtypes) if d == dt), key=lambda i: -numels[i])
            # decreasing size: the rows of full width come first
            idx: list[int] = []
            width = total = 0
            for i in order:
                if idx and (len(idx) + 1) * width > 2 * (total + numels[i]) + PAD_SLACK:
                    out.append((idx, width))
                    idx, total = [], 0
                if not idx:
                    width = numels[i]
                idx.append(i)
                total += numels[i]
            out.append((idx, width))
        _LAYOUTS[key] = out
    return out


def _padded_stats(flats: list[Tensor], width: int, exact: bool) -> Tensor:
    """``[k, N_STATS]`` statistics of ``k`` flat tensors of at most ``width`` elements, sorted by
    decreasing size, as the rows of one zero-padded matrix (zeros change no sum and no non-zero
    count). Tensors of equal size are stacked into one block; the extrema are row reductions of
    each block, so the padding never enters them.

    Row reductions of a matrix are vectorised; ``aminmax`` and ``count_nonzero`` along a
    dimension are not on CPU (10-30x slower), hence ``amin``/``amax`` and the ``sign(|x|)``
    count. ``exact``: count non-zero and non-finite values exactly (accelerators, where no
    branch on values may be taken).
    """
    k = len(flats)
    runs: list[tuple[int, int]] = []
    for i in range(k):
        if i == 0 or flats[i].numel() != flats[i - 1].numel():
            runs.append((i, i + 1))
        else:
            runs[-1] = (runs[-1][0], i + 1)
    blocks = [torch.stack(flats[a:b]) if b - a > 1 else flats[a].unsqueeze(0) for a, b in runs]
    if len(blocks) == 1:
        m = blocks[0]
    else:
        m = torch.zeros(k, width, dtype=flats[0].dtype, device=flats[0].device)
        for (a, b), blk in zip(runs, blocks):
            m[a:b, : blk.shape[1]].copy_(blk)
    mx = torch.cat([blk.amax(1) for blk in blocks]) if len(blocks) > 1 else m.amax(1)
    mn = torch.cat([blk.amin(1) for blk in blocks]) if len(blocks) > 1 else m.amin(1)
    s = m.sum(1)
    ss = torch.linalg.vector_norm(m, 2, dim=1).square()
    if exact:
        nnz = torch.count_nonzero(m, dim=1).to(m.dtype)
        nonfinite = (~torch.isfinite(m)).sum(1).to(m.dtype)
    else:
        nonfinite = torch.zeros_like(s)
    owned = k > 1  # m is a new matrix, not a view of the caller's tensor: |x| in place
    a_ = m.abs_() if owned else m.abs()
    l1 = a_.sum(1)
    if not exact:
        nnz = a_.sign_().sum(1)
    zero = torch.zeros_like(s)
    return torch.stack([s, ss, l1, nnz, nonfinite, zero, zero, zero, -mn, mx], 1).to(STAT_DTYPE)


TINY_TOTAL = 16384
"""Below this many elements in all, :func:`batched_stats` gathers one padded matrix from a
single concatenation (a fixed number of kernels, whatever the sizes), as long as the padded
matrix holds at most ``4 · TINY_TOTAL`` elements (:func:`_tiny`)."""


def _tiny(tensors: Sequence[Tensor]) -> bool:
    numels = [t.numel() for t in tensors]
    return sum(numels) <= TINY_TOTAL and len(numels) * max(numels) <= 4 * TINY_TOTAL

_GATHERS: dict[tuple[tuple[int, ...], Any], tuple[Tensor, Tensor, Tensor]] = {}
_PAD_VALUES: dict[tuple[Any, Any], Tensor] = {}


def _gather_index(numels: tuple[int, ...], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Flat indices ``[k · max(numels)]`` into ``cat(flats) ++ [0, -inf, +inf]`` laying tensor ``i``
    out as row ``i``, padded with 0, -inf and +inf respectively (cached per step shape)."""
    key = (numels, device)
    out = _GATHERS.get(key)
    if out is None:
        if len(_GATHERS) >= 8:  # at most 8 x 3 x 4 * TINY_TOTAL int32 indices (6 MiB)
            _GATHERS.clear()
        total, width = sum(numels), max(numels)
        start = torch.tensor([0, *numels[:-1]]).cumsum(0)[:, None]
        col = torch.arange(width)[None, :]
        real = col < torch.tensor(numels)[:, None]
        pos = start + col
        out = tuple(torch.where(real, pos, total + j).reshape(-1).to(device, torch.int32)
                    for j in range(3))  # type: ignore[assignment]
        _GATHERS[key] = out  # type: ignore[assignment]
    return out  # type: ignore[return-value]


def _tiny_stats(flats: Sequence[Tensor], exact: bool) -> Tensor:
    """:func:`batched_stats` of few elements in all: one concatenation (float64), three gathers
    into padded matrices (padding 0 for the sums, -inf/+inf for the extrema), row reductions."""
    device = flats[0].device
    dtype = flats[0].dtype  # mixed dtypes make cat promote, on a slower path
    pad = _PAD_VALUES.get((device, dtype))
    if pad is None:
        pad = torch.tensor([0.0, -math.inf, math.inf], dtype=dtype, device=device)
        _PAD_VALUES[(device, dtype)] = pad
    # one C++ call flattening and concatenating (a Python reshape per tensor costs more)
    ext = torch._C._nn.flatten_dense_tensors([*flats, pad]).to(STAT_DTYPE)
    i0, i_lo, i_hi = _gather_index(tuple(f.numel() for f in flats), device)
    k = len(flats)
    m = ext.index_select(0, i0).view(k, -1)  # index_select: advanced indexing is ~5x slower
    s = m.sum(1)
    ss = (m * m).sum(1)
    if exact:
        nnz = torch.count_nonzero(m, dim=1).to(STAT_DTYPE)
        nonfinite = (~torch.isfinite(m)).sum(1).to(STAT_DTYPE)
    else:
        nonfinite = torch.zeros_like(s)
    a = m.abs_()
    l1 = a.sum(1)
    if not exact:
        nnz = a.sign_().sum(1)
    mx = ext.index_select(0, i_lo).view(k, -1).amax(1)
    mn = ext.index_select(0, i_hi).view(k, -1).amin(1)
    zero = torch.zeros_like(s)
    return torch.stack([s, ss, l1, nnz, nonfinite, zero, zero, zero, -mn, mx], 1)


def batched_stats(tensors: Sequence[Tensor]) -> Tensor:
    """Statistics of many small tensors at once: ``[len(tensors), N_STATS]``.

    The tensors are flattened and reduced as the zero-padded rows of a few matrices (one per
    dtype and size bucket, see :func:`_layout`): about a dozen kernels per bucket however many
    tensors there are, where per-tensor reductions would cost a handful each (tiny tensors are
    dominated by per-kernel overhead).
    """
    with torch.no_grad():
        return _batched_stats(tensors)


def _batched_stats(tensors: Sequence[Tensor]) -> Tensor:
    device = tensors[0].device
    exact = not _cpu(device)
    if _tiny(tensors):
        mat = _tiny_stats(tensors, exact)
        return mat if exact else _fix_nonfinite_(tensors, mat)
    flats = [_float(t).reshape(-1) for t in tensors]
    layout = _layout(tuple(f.numel() for f in flats), tuple(f.dtype for f in flats))
    if len(layout) == 1:
        idx, width = layout[0]
        mat = _padded_stats([flats[i] for i in idx], width, exact)
        if idx != sorted(idx):
            mat = torch.empty_like(mat).index_copy_(
                0, torch.tensor(idx, device=device), mat)
    else:
        mat = torch.empty(len(flats), N_STATS, dtype=STAT_DTYPE, device=device)
        for idx, width in layout:
            mat[idx] = _padded_stats([flats[i] for i in idx], width, exact)
    if exact:
        return mat
    return _fix_nonfinite_(flats, mat)


def param_group_stats(tensors: Sequence[Tensor], scratch: Tensor | None = None) -> Tensor:
    """Statistics of many tensors of one device and dtype: ``[len(tensors), N_STATS]``.

    Tensors of at most :data:`SMALL` elements go through :func:`batched_stats`; the large ones
    are reduced one at a time in cache-sized chunks (:func:`_chunked_stats`: sum, 2-norm,
    min/max, ``|x|`` in a fixed scratch for its sum and non-zero count), all without host
    synchronisation. ``scratch`` is accepted for compatibility and unused.
    """
    small = [i for i, t in enumerate(tensors) if t.numel() <= SMALL]
    if len(small) == len(tensors):
        return batched_stats(tensors)
    large = [i for i, t in enumerate(tensors) if t.numel() > SMALL]
    big = _large_stats([tensors[i] for i in large], scratch)
    if not small:
        return big
    out = torch.empty(len(tensors), N_STATS, dtype=STAT_DTYPE, device=big.device)
    out[large] = big
    out[small] = batched_stats([tensors[i] for i in small])
    return out


def _large_stats(tensors: Sequence[Tensor], scratch: Tensor | None) -> Tensor:
    with torch.no_grad():
        ds = [t.detach() for t in tensors]
        fused = _fused_rows(ds)  # exact counts: no _fix_nonfinite_
        if fused is not None:
            return fused
        ts = [_float(t) for t in ds]
        return _fix_nonfinite_(ts, _chunked_eager(ts))


def sumsq_group(tensors: Sequence[Tensor]) -> Tensor:
    """``Σ x²`` of each tensor as a float64 vector: one ``_foreach_norm`` call, or for few
    elements in all (where ``_foreach_norm`` costs a kernel per tensor) one concatenation
    gathered into a zero-padded matrix whose rows are summed."""
    with torch.no_grad():
        if _tiny(tensors):
            dtype = tensors[0].dtype
            pad = _PAD_VALUES.get((tensors[0].device, dtype))
            if pad is None:
                pad = torch.tensor([0.0, -math.inf, math.inf], dtype=dtype,
                                   device=tensors[0].device)
                _PAD_VALUES[(tensors[0].device, dtype)] = pad
            ext = torch._C._nn.flatten_dense_tensors([*tensors, pad]).to(STAT_DTYPE)
            i0 = _gather_index(tuple(t.numel() for t in tensors), ext.device)[0]
            m = ext.index_select(0, i0).view(len(tensors), -1)
            return (m * m).sum(1)
        ts = [_float(t) for t in tensors]
        return torch.stack(torch._foreach_norm(ts, 2)).to(STAT_DTYPE).square()


# ----------------------------------------------------------------------------------- reference


def reference_stats(
    tensors: Sequence[Tensor],
    saturated: Callable[[Tensor], Tensor] | None = None,
    inactive: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, float]:
    """The slow, obvious definition (a Python loop in float64), for tests and documentation.

    ``tensors`` are merged as one population (micro-batches of one activation, or the
    parameter tensors of one layer). ``inactive`` masks of the micro-batches are AND-ed per unit.
    """
    out: dict[str, float] = dict.fromkeys(RAW_COLUMNS, 0.0)
    out["min"], out["max"] = math.inf, -math.inf
    unit_mask: np.ndarray | None = None
    for t in tensors:
        a = t.detach().double().cpu()
        v = a.flatten().tolist()
        out["count"] += len(v)
        out["sum"] += math.fsum(v)
        out["sumsq"] += math.fsum(e * e for e in v)
        out["abs_sum"] += math.fsum(abs(e) for e in v)
        out["nonzero"] += sum(1 for e in v if e != 0)
        out["nonfinite"] += sum(1 for e in v if not math.isfinite(e))
        if v:
            out["min"] = min(out["min"], min(v))
            out["max"] = max(out["max"], max(v))
        if saturated is not None:
            out["saturated"] += float(saturated(a).sum())
        if inactive is not None:
            m = inactive(a).numpy()
            m = m.reshape(1) if m.ndim == 0 else m
            if m.ndim >= 4:
                m = np.moveaxis(m, 1, -1)
            per_unit = np.asarray(m.reshape(-1, m.shape[-1]).all(axis=0) if m.ndim >= 2 else m)
            unit_mask = per_unit if unit_mask is None else np.logical_and(unit_mask, per_unit)
    if unit_mask is not None:
        out["dead"] = float(unit_mask.sum())
        out["units"] = float(unit_mask.size)
    if saturated is None:
        out["saturated"] = math.nan
    if inactive is None:
        out["dead"] = math.nan
    return out


# ----------------------------------------------------------------------------------- derived


def derive(raw: pd.DataFrame) -> pd.DataFrame:
    """Derived columns (see the module docstring) from a frame of raw columns, vectorised."""
    n = raw["count"].to_numpy(dtype=float)
    s = raw["sum"].to_numpy(dtype=float)
    ss = raw["sumsq"].to_numpy(dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = s / n
        var = np.maximum(ss / n - mean * mean, 0.0)  # NaN stays NaN
        out = pd.DataFrame(index=raw.index)
        out["count"] = raw["count"].astype("int64")
        out["mean"] = mean
        out["std"] = np.sqrt(var)
        out["rms"] = np.sqrt(ss / n)
        out["abs_mean"] = raw["abs_sum"].to_numpy(dtype=float) / n
        norm = np.sqrt(ss)
        mn = raw["min"].to_numpy(dtype=float)
        mx = raw["max"].to_numpy(dtype=float)
        out["min"] = mn
        out["max"] = mx
        out["abs_max"] = np.fmax(np.abs(mn), np.abs(mx))
        out["zero_frac"] = (n - raw["nonzero"].to_numpy(dtype=float)) / n
        out["nonfinite"] = raw["nonfinite"].to_numpy(dtype=float)
        out["saturated_frac"] = raw["saturated"].to_numpy(dtype=float) / n
        units = raw["units"].to_numpy(dtype=float)
        out["dead_frac"] = np.where(units > 0, raw["dead"].to_numpy(dtype=float) / units, np.nan)
        if "kind" in raw:
            ratio = raw["kind"].isin(RATIO_KINDS).to_numpy()
            ref = raw["ref_sumsq"].to_numpy(dtype=float)
            norm = np.where(ratio, np.sqrt(ss / ref), norm)
            for col in ("mean", "std", "rms", "abs_mean", "min", "max", "abs_max", "zero_frac"):
                out.loc[ratio, col] = np.nan
        out["norm"] = norm
    return out[list(DERIVED_COLUMNS)]


def derive_row(raw: dict[str, Any]) -> dict[str, float]:
    """:func:`derive` for one record given as a dict of raw columns."""
    row = {c: raw.get(c, math.nan) for c in RAW_COLUMNS}
    frame = derive(pd.DataFrame([row]))
    return {k: float(v) for k, v in frame.iloc[0].items()}


__all__ = [
    "ACT_KINDS",
    "DERIVED_COLUMNS",
    "KINDS",
    "PARAM_KINDS",
    "RATIO_KINDS",
    "RAW_COLUMNS",
    "derive",
    "derive_row",
    "empty_stats",
    "inactive_units",
    "merge_",
    "param_group_stats",
    "reference_stats",
    "tensor_stats",
]
