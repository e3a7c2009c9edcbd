"""Remedies: in-place transforms of a model, names ending in ``_``, each returning a record of
what it changed.

>>> import torch, gradprobe as gp
>>> net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
>>> record = gp.remedies.init_(net, "he_normal")
>>> [e.layer for e in record]
['0', '2']
"""

from gradprobe.remedies.init import SCHEMES, InitRecord, LayerInit, init_
from gradprobe.remedies.norm import NormRecord, add_norm_
from gradprobe.remedies.pretrain import PretrainRecord, pretrain_
from gradprobe.remedies.residual import Residual, ResidualRecord, residual_
from gradprobe.remedies.standardize import Standardize, StandardizeRecord, standardize_inputs_
from gradprobe.remedies.swap import SwapRecord, swap_activations_

__all__ = [
    "SCHEMES", "InitRecord", "LayerInit", "init_",
    "NormRecord", "PretrainRecord", "Residual", "ResidualRecord", "Standardize",
    "StandardizeRecord", "SwapRecord", "add_norm_", "pretrain_", "residual_",
    "standardize_inputs_", "swap_activations_",
]
