"""How different a layer's units are: the spread of its weight rows around their mean row.

For a dense layer's weight ``W`` seen as ``u`` rows ``w_i`` (one per output unit of a Linear,
one per output channel of a ConvNd, ``w_i = W[i].reshape(-1)``) with mean row ``w̄``::

    spread_sumsq = Σ_i ‖w_i − w̄‖²  = Σ_i ‖w_i‖² − ‖Σ_i w_i‖² / u
    ref_sumsq    = Σ_i ‖w_i‖²

Both are sums: they merge across flushes, windows and ranks by addition, and the reader
derives ``sqrt(spread_sumsq / ref_sumsq)`` (kind ``spread``, column ``norm`` of
:mod:`gradprobe.stats.schema`). It is 0 when every unit has the same incoming weights (a
constant or zero initialisation that training never breaks: the units compute the same
function and receive the same gradient, Goodfellow et al. 2016, §8.4) and
``sqrt(1 − 1/u)`` in expectation for i.i.d. zero-mean rows. It does not depend on the scale of
``W``. Biases are left out: units with identical weight rows and different biases differ only
by a shift.

The fast path (:class:`RowSpread`) costs a fixed number of kernels per group of tensors of one
device and dtype, whatever their number: the small tensors are concatenated once and their
column sums ``Σ_i w_i`` formed by one ``index_add_`` over a column index laid out when the
probe attaches; ``Σ_i ‖w_i‖²`` comes from one ``_foreach_norm``. Tensors of more than
:data:`gradprobe.stats.batched.SMALL` elements are reduced one at a time (``sum`` over the rows,
then a norm), each one pass over ``W`` where its ``Σ‖w_i‖²`` is handed in from the weight
statistics, two passes otherwise. Sums are accumulated in the weights' precision
(float32 for half precision) and combined in float64; the difference of two float32 sums of
``N`` elements is exact to about ``1e-5·Σ‖w_i‖²`` for ``N`` in the tens of thousands (the CPU's
float32 reductions), so the derived ratio resolves about ``3e-3`` -- far below the 0.05 at
which :mod:`gradprobe.diagnose.symmetry` calls units identical, and far below the
``sqrt(1 − 1/u) ≥ 0.7`` of any random initialisation. :func:`reference` is the slow, obvious
twin the tests compare against.

Example
    >>> import torch
    >>> w = torch.ones(4, 3)                        # four identical units
    >>> sp, ref = reference(w)
    >>> float(sp), float(ref)
    (0.0, 12.0)
    >>> rs = RowSpread([w, torch.eye(3)], torch.device("cpu"))
    >>> [round(float(v), 4) for v in rs([w, torch.eye(3)])[0]]
    [0.0, 2.0]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from gradprobe.stats.batched import SMALL

STAT_DTYPE = torch.float64


def units_of(w: Tensor) -> int:
    """Rows of ``w``: its first dimension (1 for a scalar)."""
    return int(w.shape[0]) if w.dim() >= 1 else 1


def reference(w: Tensor) -> tuple[Tensor, Tensor]:
    """``(Σ_i ‖w_i − w̄‖², Σ_i ‖w_i‖²)`` of ``w``'s rows in float64, by an explicit loop."""
    rows = w.detach().to(STAT_DTYPE).reshape(units_of(w), -1)
    mean = rows.mean(0)
    spread = torch.zeros((), dtype=STAT_DTYPE)
    ref = torch.zeros((), dtype=STAT_DTYPE)
    for i in range(rows.shape[0]):
        spread += (rows[i] - mean).square().sum()
        ref += rows[i].square().sum()
    return spread, ref


class RowSpread:
    """The row spread of a fixed list of tensors of one device and dtype (see the module doc).

    Memory: two int64 index tensors, one element per element of the small tensors and one per
    column (8 bytes each), laid out once.
    """

    def __init__(self, tensors: Sequence[Tensor], device: torch.device) -> None:
        self.device = device
        self.n = len(tensors)
        self.units = [units_of(t) for t in tensors]
        numels = [t.numel() for t in tensors]
        self.small = [i for i, n in enumerate(numels) if n <= SMALL]
        self.large = [i for i, n in enumerate(numels) if n > SMALL]
        cols = [numels[i] // max(self.units[i], 1) for i in self.small]
        col_idx: list[Tensor] = []
        off = 0
        for i, c in zip(self.small, cols):
            col_idx.append(torch.arange(numels[i], device=device) % max(c, 1) + off)
            off += c
        self.n_cols = off
        self.col_idx = torch.cat(col_idx) if col_idx else None
        self.col_owner = torch.repeat_interleave(
            torch.arange(len(self.small), device=device),
            torch.tensor(cols, dtype=torch.long, device=device)) if self.small else None
        units = torch.tensor(self.units, dtype=STAT_DTYPE, device=device)
        self.units_small = units[self.small]
        self.units_large = units[self.large]
        order = self.small + self.large
        self.perm = torch.tensor(sorted(range(self.n), key=order.__getitem__),
                                 dtype=torch.long, device=device)  # back to the given order

    @property
    def nbytes(self) -> int:
        return 8 * ((self.col_idx.numel() if self.col_idx is not None else 0) + self.n_cols)

    def __call__(self, tensors: Sequence[Tensor],
                 sumsq: Sequence[Tensor | None] | None = None,
                 colsq: Sequence[Tensor | None] | None = None) -> tuple[Tensor, Tensor]:
        """``(spread_sumsq[n], ref_sumsq[n])`` (float64) of ``tensors`` (the same shapes, device
        and dtype as at construction), in their order. ``sumsq[i]``, where given, is
        ``Σ tensors[i]²`` already computed (the weight statistics of the step): a large tensor
        then costs one pass (its column sums) instead of two; ``colsq[i]``, where given too,
        is ``‖Σ_i w_i‖²`` of its rows already computed (the C weight kernel forms it while
        ``W`` is in cache): no pass at all. No host synchronisation."""
        with torch.no_grad():
            sp: list[Tensor] = []
            ref: list[Tensor] = []
            if self.small:
                assert self.col_idx is not None and self.col_owner is not None
                ws = [tensors[i].detach() for i in self.small]
                wsq = torch.stack(torch._foreach_norm(ws)).to(STAT_DTYPE).square()
                flat = torch._C._nn.flatten_dense_tensors(ws)
                if flat.dtype in (torch.float16, torch.bfloat16):
                    flat = flat.float()
                colsum = torch.zeros(self.n_cols, dtype=flat.dtype, device=flat.device)
                colsum.index_add_(0, self.col_idx, flat)
                csq = torch.zeros(len(self.small), dtype=STAT_DTYPE, device=flat.device)
                csq.index_add_(0, self.col_owner, colsum.to(STAT_DTYPE).square())
                sp.append(wsq - csq / self.units_small)
                ref.append(wsq)
            if self.large:
                wsq_l: list[Tensor] = []
                csq_l: list[Tensor] = []
                for i in self.large:
                    w = tensors[i].detach()
                    acc = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else None
                    given = sumsq[i] if sumsq is not None else None
                    if given is not None:
                        wsq_l.append(given.to(STAT_DTYPE).reshape(()))
                    else:
                        wsq_l.append(torch.linalg.vector_norm(w, dtype=acc).to(STAT_DTYPE).square())
                    cs = colsq[i] if colsq is not None and given is not None else None
                    if cs is None:
                        colsum = w.reshape(self.units[i], -1).sum(0, dtype=acc)
                        cs = torch.linalg.vector_norm(colsum).to(STAT_DTYPE).square()
                    csq_l.append(cs.to(STAT_DTYPE).reshape(()))
                wsq = torch.stack(wsq_l)
                csq = torch.stack(csq_l)
                sp.append(wsq - csq / self.units_large)
                ref.append(wsq)
            spread = torch.cat(sp).clamp_min_(0.0)[self.perm]
            return spread, torch.cat(ref)[self.perm]


__all__ = ["RowSpread", "reference", "units_of"]
