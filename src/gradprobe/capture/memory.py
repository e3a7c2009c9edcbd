"""The memory a Probe holds, by part: an upper bound computed from its options and layers."""

from __future__ import annotations

import math
from typing import Any

from gradprobe.capture import stage as _stage
from gradprobe.capture.select import spread_weight
from gradprobe.stats import schema as S
from gradprobe.stats.batched import SMALL


def memory_bytes(probe: Any) -> dict[str, int]:
    """Upper bound of the memory a :class:`~gradprobe.capture.probe.Probe` holds, by part (bytes): the statistics buffer (full
    tier, always-on rows, histograms), the parameter copies ``update``/``drift`` keep, and the
    stage of small tensors."""
    rows = sum(len(lay.rows) for lay in probe._layers)
    stats = probe.flush_every * rows * S.N_STATS * 8 + probe.flush_every * 8
    loss = probe._ring_steps() * 8
    n_params = sum(len(lay.params) for lay in probe._layers) if "grad" in probe.kinds else 0
    loss += probe._ring_steps() * (len(probe._layers) + n_params + 2) * 4  # always-on rows
    hist = 0
    if probe.hist_every:
        per_flush = math.ceil(probe.flush_every * probe.every / probe.hist_every)
        hist_rows = sum(1 for lay in probe._layers for k in lay.rows
                        if k in ("grad", "weight", "input", "act", "act_grad"))
        hist = min(per_flush, probe.flush_every) * hist_rows * (2 * probe.hist_bins + 2) * 8
    sizes = [p.numel() * p.element_size() for lay in probe._layers for p in lay.params]
    copies = int("update" in probe.kinds or "drift" in probe.kinds) + int("drift" in probe.kinds)
    param_bytes = sum(sizes) * copies + max(sizes, default=0)
    # the row spread's column indices (gradprobe.stats.spread), small dense weights only
    spread_w = [w for lay in probe._layers if "spread" in lay.rows
                for w in [spread_weight(lay)] if w is not None and w.numel() <= SMALL]
    param_bytes += sum(8 * (w.numel() + w.numel() // max(w.shape[0], 1)) for w in spread_w)
    # the stage of small tensors (gradprobe.capture.stage), in the first parameters' precision
    first = next((p for lay in probe._layers for p in lay.params), None)
    stage = _stage.MAX_ELEMS * (first.element_size() if first is not None else 4)
    if probe._recorder is not None and probe._recorder.stage is not None:
        buf = probe._recorder.stage.buf  # allocated at the first step, at most MAX_ELEMS
        if buf is not None:
            stage = buf.numel() * buf.element_size()
    return {"buffer": stats + loss + hist, "param_copies": param_bytes, "stage": stage,
            "total": stats + loss + hist + param_bytes + stage}


__all__ = ["memory_bytes"]
