"""Statistics rows of many small tensors at once (the batched path of the Probe).

Tensors are flattened and reduced as the zero-padded rows of a few matrices (one per dtype and
size bucket), so a step of dozens of small tensors costs a fixed number of kernels instead of a
handful per tensor; rows are laid out by :func:`gradprobe.stats.schema.ordered` and tested
against :func:`gradprobe.stats.reference.reference_stats`. Index tensors and layouts are cached
in the caller's :class:`gradprobe.stats.eager.Workspace`.

Example
    >>> import torch
    >>> batched_stats([torch.ones(3), torch.zeros(2)])[:, 0].tolist()   # the sums
    [3.0, 0.0]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from gradprobe.stats.eager import (
    STAT_DTYPE,
    Workspace,
    as_float,
    fix_nonfinite_,
    large_stats,
    on_host,
)
from gradprobe.stats.schema import N_STATS, ordered

SMALL = 8192
"""Tensors with at most this many elements are summarised together (:func:`batched_stats`)."""

PAD_SLACK = 1 << 16
"""Zero elements a padded matrix of :func:`batched_stats` may hold beyond its real elements."""

def _layout(numels: tuple[int, ...], dtypes: tuple[Any, ...], ws: Workspace
            ) -> list[tuple[list[int], int]]:
    """Buckets ``(indices, width)`` of tensors reduced together as the rows of one zero-padded
    ``[len(indices), width]`` matrix: one dtype per bucket, and at most twice as many elements
    (plus :data:`PAD_SLACK`) as the bucket's tensors hold. Cached per step shape."""
    key = (numels, dtypes)
    out = ws.layouts.get(key)
    if out is None:
        if len(ws.layouts) > 256:
            ws.layouts.clear()
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
        ws.layouts[key] = out
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
    return torch.stack(ordered(zero, zero, sum=s, sumsq=ss, abs_sum=l1, nonzero=nnz,
                               nonfinite=nonfinite, neg_min=-mn, max=mx), 1).to(STAT_DTYPE)


TINY_TOTAL = 16384
"""Below this many elements in all, :func:`batched_stats` gathers one padded matrix from a
single concatenation (a fixed number of kernels, whatever the sizes), as long as the padded
matrix holds at most ``4 · TINY_TOTAL`` elements (:func:`_tiny`)."""


def _tiny(tensors: Sequence[Tensor]) -> bool:
    numels = [t.numel() for t in tensors]
    return sum(numels) <= TINY_TOTAL and len(numels) * max(numels) <= 4 * TINY_TOTAL


def _gather_index(numels: tuple[int, ...], device: torch.device, ws: Workspace
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """Flat indices ``[k · max(numels)]`` into ``cat(flats) ++ [0, -inf, +inf]`` laying tensor ``i``
    out as row ``i``, padded with 0, -inf and +inf respectively (cached per step shape)."""
    key = (numels, device)
    out = ws.gathers.get(key)
    if out is None:
        if len(ws.gathers) >= 8:  # at most 8 x 3 x 4 * TINY_TOTAL int32 indices (6 MiB)
            ws.gathers.clear()
        total, width = sum(numels), max(numels)
        start = torch.tensor([0, *numels[:-1]]).cumsum(0)[:, None]
        col = torch.arange(width)[None, :]
        real = col < torch.tensor(numels)[:, None]
        pos = start + col
        out = tuple(torch.where(real, pos, total + j).reshape(-1).to(device, torch.int32)
                    for j in range(3))  # type: ignore[assignment]
        ws.gathers[key] = out  # type: ignore[assignment]
    return out  # type: ignore[return-value]


def _tiny_stats(flats: Sequence[Tensor], exact: bool, ws: Workspace) -> Tensor:
    """:func:`batched_stats` of few elements in all: one concatenation (float64), three gathers
    into padded matrices (padding 0 for the sums, -inf/+inf for the extrema), row reductions."""
    device = flats[0].device
    dtype = flats[0].dtype  # mixed dtypes make cat promote, on a slower path
    pad = ws.pad(device, dtype)
    # one C++ call flattening and concatenating (a Python reshape per tensor costs more)
    ext = torch._C._nn.flatten_dense_tensors([*flats, pad]).to(STAT_DTYPE)
    i0, i_lo, i_hi = _gather_index(tuple(f.numel() for f in flats), device, ws)
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
    return torch.stack(ordered(zero, zero, sum=s, sumsq=ss, abs_sum=l1, nonzero=nnz,
                               nonfinite=nonfinite, neg_min=-mn, max=mx), 1)


def batched_stats(tensors: Sequence[Tensor], ws: Workspace | None = None) -> Tensor:
    """Statistics of many small tensors at once: ``[len(tensors), N_STATS]``.

    The tensors are flattened and reduced as the zero-padded rows of a few matrices (one per
    dtype and size bucket, see :func:`_layout`): about a dozen kernels per bucket however many
    tensors there are, where per-tensor reductions would cost a handful each (tiny tensors are
    dominated by per-kernel overhead).
    """
    with torch.no_grad():
        return _batched_stats(tensors, ws if ws is not None else Workspace())


def _batched_stats(tensors: Sequence[Tensor], ws: Workspace) -> Tensor:
    device = tensors[0].device
    exact = not on_host(device)
    if _tiny(tensors):
        mat = _tiny_stats(tensors, exact, ws)
        return mat if exact else fix_nonfinite_(tensors, mat)
    flats = [as_float(t).reshape(-1) for t in tensors]
    layout = _layout(tuple(f.numel() for f in flats), tuple(f.dtype for f in flats), ws)
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
    return fix_nonfinite_(flats, mat)


def param_group_stats(tensors: Sequence[Tensor], ws: Workspace | None = None,
                      large: Callable[[Sequence[Tensor]], Tensor] | None = None) -> Tensor:
    """Statistics of many tensors of one device and dtype: ``[len(tensors), N_STATS]``.

    Tensors of at most :data:`SMALL` elements go through :func:`batched_stats`; the large ones
    through ``large`` (default :func:`gradprobe.stats.eager.large_stats`: cache-sized chunks;
    the recorder passes its choice of compiled or eager kernels), all without host
    synchronisation.
    """
    ws = ws if ws is not None else Workspace()
    small = [i for i, t in enumerate(tensors) if t.numel() <= SMALL]
    if len(small) == len(tensors):
        return batched_stats(tensors, ws)
    large_idx = [i for i, t in enumerate(tensors) if t.numel() > SMALL]
    big_ts = [tensors[i] for i in large_idx]
    big = large(big_ts) if large is not None else large_stats(big_ts, ws)
    if not small:
        return big
    out = torch.empty(len(tensors), N_STATS, dtype=STAT_DTYPE, device=big.device)
    out[large_idx] = big
    out[small] = batched_stats([tensors[i] for i in small], ws)
    return out


def sumsq_group(tensors: Sequence[Tensor], ws: Workspace | None = None) -> Tensor:
    """``Σ x²`` of each tensor as a float64 vector: one ``_foreach_norm`` call, or for few
    elements in all (where ``_foreach_norm`` costs a kernel per tensor) one concatenation
    gathered into a zero-padded matrix whose rows are summed."""
    with torch.no_grad():
        ws = ws if ws is not None else Workspace()
        if _tiny(tensors):
            pad = ws.pad(tensors[0].device, tensors[0].dtype)
            ext = torch._C._nn.flatten_dense_tensors([*tensors, pad]).to(STAT_DTYPE)
            i0 = _gather_index(tuple(t.numel() for t in tensors), ext.device, ws)[0]
            m = ext.index_select(0, i0).view(len(tensors), -1)
            return (m * m).sum(1)
        ts = [as_float(t) for t in tensors]
        return torch.stack(torch._foreach_norm(ts, 2)).to(STAT_DTYPE).square()


__all__ = ["PAD_SLACK", "SMALL", "TINY_TOTAL", "batched_stats", "param_group_stats", "sumsq_group"]
