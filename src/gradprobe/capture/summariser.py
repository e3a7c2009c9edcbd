"""How each tensor is summarised: the one owner of "the C kernels where they serve the tensor,
else compiled where that serves it, else eager, small tensors batched" (:class:`Summariser`).
The Probe's recorder and parameter statistics ask it, never the kernels directly."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from gradprobe.stats import batched as B
from gradprobe.stats import eager as E
from gradprobe.stats.compiled import KERNELS, CompiledKernels
from gradprobe.stats.native import NATIVE, NativeKernels
from gradprobe.stats.schema import N_STATS, SATURATED

Rule = Callable[[Tensor], Tensor]


class Summariser:
    """How each tensor is summarised, decided in one place: the one-pass C kernels
    (:mod:`gradprobe.stats.native`: CPU, float32/64) where they serve every tensor of a call,
    else the compiled one-pass kernels (:mod:`gradprobe.stats.compiled`) where those do, else
    the eager kernels, small tensors together (:mod:`gradprobe.stats.batched`). Owns the
    kernels' workspace."""

    def __init__(self, kernels: CompiledKernels = KERNELS, native: NativeKernels = NATIVE
                 ) -> None:
        self.kernels = kernels
        self.native = native
        self.ws = E.Workspace()

    def describe(self, device: torch.device) -> str:
        """Which kernels summarise tensors on ``device`` (``meta.json``'s ``stats_kernels``);
        on a CPU this builds the C kernels, so that it happens before the first step."""
        native = (self.native.describe() if device.type == "cpu" else f"eager on {device.type}")
        return f"{native}; compiled kernels {self.kernels.mode} (GRADPROBE_FUSED)"

    def _native(self, ts: Sequence[Tensor]) -> Tensor | None:
        """The C kernels' rows (exact counts) where they serve every tensor of ``ts``."""
        if self.native.serves(ts):
            return self.native.rows(ts)
        return None

    def _one_pass(self, ts: Sequence[Tensor], saturated: Rule | None = None) -> Tensor | None:
        """The one-pass rows (exact counts) where the C or the compiled kernels serve every
        tensor."""
        out = self._native(ts)
        if out is not None:
            if saturated is not None:
                out[:, SATURATED] = torch.stack([saturated(t).sum() for t in ts]).to(E.STAT_DTYPE)
            return out
        if ts and all(self.kernels.usable(t) for t in ts):
            return self.kernels.rows(ts, saturated)
        return None

    def tensor(self, x: Tensor, saturated: Rule | None = None) -> Tensor:
        """``[N_STATS]`` of one tensor with exact counts (:func:`gradprobe.stats.eager.tensor_stats`)."""
        with torch.no_grad():
            xd = x.detach()
            fused = self._one_pass([xd], saturated)
            if fused is not None:
                return fused[0]
            return E.tensor_stats(xd, saturated, self.ws)

    def large(self, tensors: Sequence[Tensor]) -> Tensor:
        """``[k, N_STATS]`` of large tensors, exact counts."""
        with torch.no_grad():
            ds = [t.detach() for t in tensors]
            fused = self._one_pass(ds)
            return fused if fused is not None else E.large_stats(ds, self.ws)

    def group(self, tensors: Sequence[Tensor]) -> Tensor:
        """:func:`gradprobe.stats.batched.param_group_stats` with this choice for large ones
        (one call of the C kernels for all where they serve every tensor)."""
        out = self._native(tensors)
        return out if out is not None else B.param_group_stats(tensors, self.ws, large=self.large)

    def batched(self, tensors: Sequence[Tensor]) -> Tensor:
        """``[k, N_STATS]`` of small tensors, exact counts: one call of the C kernels, else
        :func:`gradprobe.stats.batched.batched_stats`."""
        out = self._native(tensors)
        return out if out is not None else B.batched_stats(tensors, self.ws)

    def sumsq_group(self, tensors: Sequence[Tensor]) -> Tensor:
        return B.sumsq_group(tensors, self.ws)

    def large_weight(self, x: Tensor) -> Tensor:
        """``[N_STATS]`` of a large tensor, where the eager path leaves the non-finite count 0
        (fill it with :func:`gradprobe.stats.eager.fix_nonfinite_` over a stack of such
        vectors, one check for all; the compiled path's exact count passes unchanged)."""
        with torch.no_grad():
            xd = x.detach()
            fused = self._one_pass([xd])
            if fused is not None:
                return fused[0]
            return E.chunked_stats([E.as_float(xd)], None, self.ws)[0]

    def weight(self, w: Tensor, prev: Tensor | None, init: Tensor | None, cols: int = 0
               ) -> Tensor | None:
        """``[N_STATS + 2]``: the statistics of a large weight ``w`` (exact counts), then
        ``Σ (w − prev)²`` and ``Σ (w − init)²`` from one pass (C, else compiled); from the C
        kernels, where ``cols > 0``, a third value: ``Σ_j (Σ_i w[i, j])²`` of ``w`` seen as rows
        of ``cols`` elements (:mod:`gradprobe.stats.spread`'s column sums). ``None`` where
        neither serves ``w`` (the caller takes the eager path)."""
        with torch.no_grad():
            wd = w.detach()
            out = self.native.weight_stats(wd, prev, init, cols)
            if out is not None:
                return out if cols else out[: N_STATS + 2]
            if not self.kernels.usable(wd):
                return None
            return self.kernels.weight_stats(wd, prev, init)


__all__ = ["Rule", "Summariser"]
