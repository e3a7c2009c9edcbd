"""gradprobe: find, explain and fix unstable gradients in PyTorch networks.

>>> import gradprobe as gp
>>> sorted(n for n in gp.__all__ if n[0].isupper())[:2]
['ConfigError', 'GradprobeError']

Heavy or optional parts (the lab, figures, integrations) are imported on first use, so
``import gradprobe`` imports torch and numpy and nothing of the plotting stack.
"""

from __future__ import annotations

import importlib
from typing import Any

from gradprobe._version import __version__

# `gradprobe.diagnose` and `gradprobe.report` are both subpackages and the functions
# `gp.diagnose` and `gp.report`. Importing them here, once, binds the package attributes to the
# functions for good (a lazy export would be overwritten by the first `import
# gradprobe.diagnose`). Both subpackages import light: records only, no pandas or matplotlib;
# the rules and the figures load when the functions are called.
from gradprobe.diagnose import Diagnosis, Finding, diagnose
from gradprobe.errors import (
    ConfigError,
    GradprobeError,
    NonFiniteError,
    RunDirError,
    UnsupportedModelError,
)
from gradprobe.report import report

# name -> (module, attribute or None for the module itself)
_LAZY: dict[str, tuple[str, str | None]] = {
    "GradCheckReport": ("gradprobe.check", "GradCheckReport"),
    "gradcheck": ("gradprobe.check", "gradcheck"),
    "gradcheck_fn": ("gradprobe.check", "gradcheck_fn"),
    "Probe": ("gradprobe.capture.probe", "Probe"),
    "Run": ("gradprobe.store.run", "Run"),
    "preflight": ("gradprobe.theory.preflight", "preflight"),
    "theory": ("gradprobe.theory", None),
    "lab": ("gradprobe.lab", None),
    "integrations": ("gradprobe.integrations", None),
    "remedies": ("gradprobe.remedies", None),
    "activations": ("gradprobe.activations", None),
    "doctor": ("gradprobe.remedies.doctor", "doctor"),
    "DoctorReport": ("gradprobe.remedies.doctor_report", "DoctorReport"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module_name, attr = _LAZY[name]
        module = importlib.import_module(module_name)
        value = module if attr is None else getattr(module, attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gradprobe' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "ConfigError",
    "Diagnosis",
    "DoctorReport",
    "Finding",
    "GradCheckReport",
    "GradprobeError",
    "NonFiniteError",
    "Probe",
    "Run",
    "RunDirError",
    "UnsupportedModelError",
    "__version__",
    "activations",
    "diagnose",
    "doctor",
    "gradcheck",
    "gradcheck_fn",
    "integrations",
    "lab",
    "preflight",
    "remedies",
    "report",
    "theory",
]
