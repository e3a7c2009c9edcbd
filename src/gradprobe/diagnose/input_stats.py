"""Inputs far from standardised, measured on the input of the first dense layer (kind ``input``).

The Probe records the ordinary statistics of the tensor the first dense layer (Linear, ConvNd)
receives. Where that layer is the first layer with parameters in depth order (no embedding or
normaliser before it), this is the model's input, and three scale-free numbers are judged, each
the median over the recorded steps (inputs are data: one batch does not decide):

* **scale** ``ρ = RMS(x)``, the root mean square per input value (the quantity every
  initialiser assumes to be about 1: Glorot & Bengio 2010; He et al. 2015; LeCun et al. 1998,
  "Efficient BackProp", §4.3). Fires when ``ρ ≥ SCALE`` (10) or when the RMS of the non-zero
  values ``ρ/sqrt(1 − zero_frac)`` is ``≤ 1/SCALE``: the first layer's pre-activations and its
  weight gradient are ten times too large (saturating a tanh, blowing up the first updates) or
  too small. The non-zero RMS keeps sparse inputs (one-hot, bag of words: RMS ``1/sqrt(K)``)
  from looking too small.
* **offset** ``|mean| / std ≥ OFFSET`` (3): inputs that sit far from zero compared with their
  spread make every unit's first-layer gradient share one sign, the zig-zag LeCun et al. (1998,
  §4.3) remove by centring. Pixels in [0, 1] have about 0.4.
* **outliers** ``abs_max / RMS_nz ≥ OUTLIER`` (50): one value fifty times the typical size
  dominates the first layer and the loss of its batch (the study notes' "outliers blow up the
  loss"). Gaussian inputs of a million values stay below ~5.5, images below ~4, heavy-tailed
  features below ~15.

All three are ratios of the input to itself: free of the width, batch size, dtype and loss
scale. Where the first dense layer is not the first layer with parameters, what it sees was
made by the model (an embedding, a normaliser): no finding. Runs recorded without kind
``input`` fall back to the estimate from the first layer's output
(:func:`gradprobe.diagnose.inputs.input_scale`).
"""

from __future__ import annotations

import numpy as np

from gradprobe.diagnose import cures
from gradprobe.diagnose.finding import Evidence, Finding
from gradprobe.diagnose.frames import Frames, step_range

SCALE = 10.0
OFFSET = 3.0
OUTLIER = 50.0


def _first_with_params(frames: Frames) -> str | None:
    order = [n for n in frames.depth_order() if frames.layer_row(n).get("param_shapes")]
    return order[0] if order else None


def measured_input_scale(frames: Frames) -> list[Finding] | None:
    """The ``input-scale`` findings from the recorded input, or None where no input was
    recorded (the caller falls back to its estimate)."""
    rows = frames.kind("input")
    if rows.empty:
        return None
    name = str(rows["layer"].iloc[0])
    if _first_with_params(frames) != name:
        return []
    rows = rows[np.isfinite(rows["rms"]) & (rows["nonfinite"].fillna(0) == 0)]
    if rows.empty:
        return []
    rms = rows["rms"].to_numpy(dtype="float64")
    dense = np.clip(1.0 - rows["zero_frac"].to_numpy(dtype="float64"), 1e-300, 1.0)
    rms_nz = rms / np.sqrt(dense)
    evidence = []
    rho = float(np.median(rms))
    rho_nz = float(np.median(rms_nz))
    if rho >= SCALE:
        evidence.append(Evidence("input RMS per value", rho, SCALE, ">=",
                                 f"input of {name}, median over steps; standardised ≈ 1"))
    elif 0 < rho_nz <= 1.0 / SCALE:
        evidence.append(Evidence("input RMS per non-zero value", rho_nz, 1.0 / SCALE, "<=",
                                 f"input of {name}, median over steps; standardised ≈ 1"))
    std = rows["std"].to_numpy(dtype="float64")
    with np.errstate(divide="ignore", invalid="ignore"):
        offset = float(np.median(np.abs(rows["mean"].to_numpy(dtype="float64")) / std))
        peak = float(np.median(rows["abs_max"].to_numpy(dtype="float64") / rms_nz))
    if np.isfinite(offset) and offset >= OFFSET:
        evidence.append(Evidence("input |mean| / std", offset, OFFSET, ">=",
                                 "not centred; median over steps"))
    if np.isfinite(peak) and peak >= OUTLIER:
        evidence.append(Evidence("input abs_max / RMS", peak, OUTLIER, ">=",
                                 "outliers dominate the first layer; median over steps"))
    if not evidence:
        return []
    return [Finding(
        rule="input-scale", severity="warning", layers=(name,),
        steps=step_range(rows["step"]), evidence=tuple(evidence),
        explanation=("The inputs are far from zero mean and unit variance, which every "
                     "initialiser assumes: the first layer's pre-activations and its weight "
                     "gradient scale with them, and outliers dominate their batches "
                     "(LeCun et al. 1998, 'Efficient BackProp', §4.3)."),
        remedies=(cures.standardize("standardising inputs (robustly, for outliers) puts the "
                                    "first layer where its initialisation expects"),
                  cures.norm("batch", "normalisation after the first layer absorbs the scale")),
    )]


__all__ = ["OFFSET", "OUTLIER", "SCALE", "measured_input_scale"]
