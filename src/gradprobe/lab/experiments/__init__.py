"""Importing this package registers every experiment (one module each, in display order)."""

import importlib

_MODULES: list[str] = [
    # module names under gradprobe.lab.experiments, in the order `gradprobe lab list` shows them
    "linear_chain",
    "sigmoid_bound",
    "circles",
    "depth_histograms",
    "init_study",
    "activation_study",
    "deep_relu",
    "rnn",
    "normalization",
    "residual",
    "clipping",
    "pretraining",
    "outliers",
    "drift",
]

for _name in _MODULES:
    importlib.import_module(f"gradprobe.lab.experiments.{_name}")
