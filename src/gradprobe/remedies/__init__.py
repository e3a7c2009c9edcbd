"""Remedies: in-place transforms of a model, names ending in ``_``, each returning a record of
what it changed.

>>> import torch, gradprobe as gp
>>> net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
>>> record = gp.remedies.init_(net, "he_normal")
>>> [e.layer for e in record]
['0', '2']
"""

from typing import Literal

from gradprobe.remedies.init import SCHEMES, InitRecord, LayerInit, init_
from gradprobe.remedies.norm import NormRecord, add_norm_
from gradprobe.remedies.optim import (
    ClipRecord,
    LrRecord,
    PenaltyRecord,
    clip_gradients_,
    regularize_,
    set_lr_,
)
from gradprobe.remedies.pretrain import PretrainRecord, pretrain_
from gradprobe.remedies.residual import Residual, ResidualRecord, residual_
from gradprobe.remedies.standardize import Standardize, StandardizeRecord, standardize_inputs_
from gradprobe.remedies.swap import SwapRecord, swap_activations_

TARGETS: dict[str, Literal["model", "optimizer"]] = {
    "init_": "model",
    "swap_activations_": "model",
    "add_norm_": "model",
    "residual_": "model",
    "pretrain_": "model",
    "standardize_inputs_": "model",
    "clip_gradients_": "optimizer",
    "regularize_": "optimizer",
    "set_lr_": "optimizer",
}
"""Which object each remedy takes first: the model or the optimizer (read by the doctor)."""


__all__ = [
    "SCHEMES", "TARGETS", "ClipRecord", "InitRecord", "LayerInit", "LrRecord", "NormRecord",
    "PenaltyRecord", "PretrainRecord", "Residual", "ResidualRecord", "Standardize",
    "StandardizeRecord", "SwapRecord", "add_norm_", "clip_gradients_", "init_", "pretrain_",
    "regularize_", "residual_", "set_lr_", "standardize_inputs_", "swap_activations_",
]
