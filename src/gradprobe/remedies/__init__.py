"""Remedies: in-place transforms of a model, names ending in ``_``, each returning a record of
what it changed.

>>> import torch, gradprobe as gp
>>> net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
>>> record = gp.remedies.init_(net, "he_normal")
>>> [e.layer for e in record]
['0', '2']
"""

from gradprobe.remedies.init import SCHEMES, InitRecord, LayerInit, init_

__all__ = ["SCHEMES", "InitRecord", "LayerInit", "init_"]
