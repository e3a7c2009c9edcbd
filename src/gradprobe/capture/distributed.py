"""torch.distributed awareness of the Probe.

Under DistributedDataParallel the gradients a Probe reads at the optimizer step are already
all-reduced, so every rank would record the same parameter statistics: only rank 0 records
(and writes the run directory); on the other ranks the Probe attaches no hook and writes
nothing, so the same training script runs unchanged on every rank. Activation statistics are
therefore those of rank 0's share of the batch. Cross-rank reduction of activation statistics
(sums add, extrema take the maximum, dead-unit masks AND) is not implemented yet.

Example
    >>> rank()   # not distributed
    0
"""

from __future__ import annotations


def rank() -> int:
    """This process's rank in the default process group, or 0 when not distributed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return int(dist.get_rank())
    return 0


__all__ = ["rank"]
