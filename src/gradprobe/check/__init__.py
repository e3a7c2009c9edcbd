"""Numerical gradient checking of models and functions (``gp.gradcheck``, ``gp.gradcheck_fn``).

Stands alone: it imports torch, :mod:`gradprobe.layers`, :mod:`gradprobe.activations` and
:mod:`gradprobe.errors` only.
"""

from gradprobe.check.engine import (
    CoordinateCheck,
    GradCheckReport,
    TensorCheck,
    gradcheck,
    gradcheck_fn,
)

__all__ = ["CoordinateCheck", "GradCheckReport", "TensorCheck", "gradcheck", "gradcheck_fn"]
