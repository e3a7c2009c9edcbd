"""Numerical gradient checking of models and functions (``gp.gradcheck``, ``gp.gradcheck_fn``).

Stands alone: it imports torch, :mod:`gradprobe.layers`, :mod:`gradprobe.activations` and
:mod:`gradprobe.errors` only. ``options`` (modes, tolerances), ``report`` (the records),
``evaluator`` (the interface), ``model`` and ``function`` (the two evaluators), ``fast`` (the
rank-1 fast path of the model evaluator), ``differences`` (centred differences and the step
ladder), ``judge`` (the verdict on one tensor and its report row) and ``engine`` (the run of a
check, the public functions).
"""

from gradprobe.check.engine import gradcheck, gradcheck_fn
from gradprobe.check.options import CheckOptions
from gradprobe.check.report import CoordinateCheck, GradCheckReport, TensorCheck

__all__ = ["CheckOptions", "CoordinateCheck", "GradCheckReport", "TensorCheck", "gradcheck", "gradcheck_fn"]
