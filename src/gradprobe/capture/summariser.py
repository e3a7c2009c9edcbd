"""How each tensor is summarised: the one owner of "compiled where it serves the tensor, eager
otherwise, small tensors batched" (:class:`Summariser`). The Probe's recorder and parameter
statistics ask it, never the kernels directly."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from gradprobe.stats import batched as B
from gradprobe.stats import eager as E
from gradprobe.stats.compiled import KERNELS, CompiledKernels

Rule = Callable[[Tensor], Tensor]


class Summariser:
    """How each tensor is summarised, decided in one place: the compiled one-pass kernels
    (:mod:`gradprobe.stats.compiled`) where they serve the tensor, the eager kernels otherwise;
    small tensors together (:mod:`gradprobe.stats.batched`). Owns the kernels' workspace."""

    def __init__(self, kernels: CompiledKernels = KERNELS) -> None:
        self.kernels = kernels
        self.ws = E.Workspace()

    def _compiled(self, ts: Sequence[Tensor], saturated: Rule | None = None) -> Tensor | None:
        """The compiled rows (exact counts) where the compiled path serves every tensor."""
        if ts and all(self.kernels.usable(t) for t in ts):
            return self.kernels.rows(ts, saturated)
        return None

    def tensor(self, x: Tensor, saturated: Rule | None = None) -> Tensor:
        """``[N_STATS]`` of one tensor with exact counts (:func:`gradprobe.stats.eager.tensor_stats`)."""
        with torch.no_grad():
            xd = x.detach()
            fused = self._compiled([xd], saturated)
            if fused is not None:
                return fused[0]
            return E.tensor_stats(xd, saturated, self.ws)

    def large(self, tensors: Sequence[Tensor]) -> Tensor:
        """``[k, N_STATS]`` of large tensors, exact counts."""
        with torch.no_grad():
            ds = [t.detach() for t in tensors]
            fused = self._compiled(ds)
            return fused if fused is not None else E.large_stats(ds, self.ws)

    def group(self, tensors: Sequence[Tensor]) -> Tensor:
        """:func:`gradprobe.stats.batched.param_group_stats` with this choice for large ones."""
        return B.param_group_stats(tensors, self.ws, large=self.large)

    def batched(self, tensors: Sequence[Tensor]) -> Tensor:
        return B.batched_stats(tensors, self.ws)

    def sumsq_group(self, tensors: Sequence[Tensor]) -> Tensor:
        return B.sumsq_group(tensors, self.ws)

    def large_weight(self, x: Tensor) -> Tensor:
        """``[N_STATS]`` of a large tensor, where the eager path leaves the non-finite count 0
        (fill it with :func:`gradprobe.stats.eager.fix_nonfinite_` over a stack of such
        vectors, one check for all; the compiled path's exact count passes unchanged)."""
        with torch.no_grad():
            xd = x.detach()
            fused = self._compiled([xd])
            if fused is not None:
                return fused[0]
            return E.chunked_stats([E.as_float(xd)], None, self.ws)[0]

    def weight(self, w: Tensor, prev: Tensor | None, init: Tensor | None) -> Tensor | None:
        """``[N_STATS + 2]``: the statistics of a large weight ``w`` (exact counts), then
        ``Σ (w − prev)²`` and ``Σ (w − init)²`` from one compiled pass; ``None`` where the
        compiled path does not serve ``w`` (the caller takes the eager path)."""
        with torch.no_grad():
            wd = w.detach()
            if not self.kernels.usable(wd):
                return None
            return self.kernels.weight_stats(wd, prev, init)


__all__ = ["Rule", "Summariser"]
