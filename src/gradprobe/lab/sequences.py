"""Sequence tasks and recurrent models for the lab: the adding problem, the temporal-order task,
one-layer RNN/LSTM/GRU classifiers, and the hidden states through time.

Tasks (Hochreiter & Schmidhuber 1997, as used by Le, Jaitly & Hinton 2015):

* **adding problem**: inputs ``(value ~ U(0, 1), marker)``; two markers, one in each half of the
  sequence; target the sum of the two marked values. Predicting the constant 1 gives
  ``MSE = Var(u₁ + u₂) = 2/12 ≈ 0.167`` (:data:`ADDING_BASELINE`), the baseline a network must beat.
* **temporal order**: a distractor ``U(-1, 1)`` on channel 0 at every step; on channel 1 a symbol
  ``X = +1`` or ``Y = -1`` at one step in ``[0.1T, 0.2T)`` and one in ``[0.5T, 0.6T)``; four
  classes (XX, XY, YX, YY), chance accuracy 0.25.

Models (:data:`KINDS`; hidden size ``hidden``, read-out from the last step): ``tanh``
(``nn.RNN``, PyTorch's default init), ``relu`` (random ``W_hh ~ N(0, g²/H)``, spectral radius
``≈ g``), ``irnn`` (ReLU RNN with ``W_hh = I``, Le et al. 2015, via
``gp.remedies.init_(rnn, "identity")``), ``lstm`` and ``gru`` (PyTorch's defaults).
:func:`unroll` steps a cell that shares the layer's weights, so that every hidden state ``h_t``
can keep its gradient; :func:`gradient_through_time` measures ``‖∂L/∂h_t‖``.

Example
    >>> import torch
    >>> from gradprobe.lab import sequences
    >>> x, y = sequences.adding_problem(4, 10, torch.Generator().manual_seed(0))
    >>> model = sequences.build("irnn", 2, 8, 1, relu_gain=1.5, seed=0)
    >>> out, states = sequences.unroll(model, x)
    >>> tuple(out.shape), len(states)
    ((4, 1), 10)
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

from gradprobe.lab import train
from gradprobe.remedies.init import init_

KINDS = ("tanh", "relu", "irnn", "lstm", "gru")
"""The recurrent models :func:`build` makes."""
ADDING_BASELINE = 2.0 / 12.0
"""MSE of predicting the constant 1 on the adding problem: Var(u₁ + u₂), u ~ U(0, 1)."""


# ----------------------------------------------------------------------------------- tasks
def adding_problem(n: int, length: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """``(x, y)``: x of shape ``(n, T, 2)`` (value, marker), y ``(n, 1)`` the marked values' sum."""
    values = torch.rand(n, length, generator=gen)
    half = length // 2
    first = torch.randint(0, half, (n,), generator=gen)
    second = torch.randint(half, length, (n,), generator=gen)
    marks = torch.zeros(n, length)
    rows = torch.arange(n)
    marks[rows, first] = 1.0
    marks[rows, second] = 1.0
    return torch.stack([values, marks], dim=-1), (values * marks).sum(1, keepdim=True)


def temporal_order(n: int, length: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """``(x, y)``: x ``(n, T, 2)`` (distractor, symbol ±1 at two steps), y the class 0..3."""
    x = torch.zeros(n, length, 2)
    x[..., 0] = torch.rand(n, length, generator=gen) * 2 - 1
    lo1, hi1 = int(0.1 * length), max(int(0.2 * length), int(0.1 * length) + 1)
    lo2, hi2 = int(0.5 * length), max(int(0.6 * length), int(0.5 * length) + 1)
    t1 = torch.randint(lo1, hi1, (n,), generator=gen)
    t2 = torch.randint(lo2, hi2, (n,), generator=gen)
    s1 = torch.randint(0, 2, (n,), generator=gen)
    s2 = torch.randint(0, 2, (n,), generator=gen)
    rows = torch.arange(n)
    x[rows, t1, 1] = s1.float() * 2 - 1
    x[rows, t2, 1] = s2.float() * 2 - 1
    return x, s1 * 2 + s2


TASKS = {"adding": (adding_problem, 1), "temporal order": (temporal_order, 4)}


# ---------------------------------------------------------------------------------- models
class SequenceModel(nn.Module):
    """A one-layer recurrent network and a Linear read-out of its last hidden state."""

    def __init__(self, kind: str, n_in: int, hidden: int, n_out: int) -> None:
        super().__init__()
        self.kind = kind
        self.rnn: nn.RNNBase
        if kind in ("tanh", "relu", "irnn"):
            self.rnn = nn.RNN(n_in, hidden, batch_first=True,
                              nonlinearity="tanh" if kind == "tanh" else "relu")
        elif kind == "lstm":
            self.rnn = nn.LSTM(n_in, hidden, batch_first=True)
        else:
            self.rnn = nn.GRU(n_in, hidden, batch_first=True)
        self.head = nn.Linear(hidden, n_out)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def build(kind: str, n_in: int, hidden: int, n_out: int, *, relu_gain: float, seed: int
          ) -> SequenceModel:
    """The model of ``kind`` (see the module docstring), initialised from ``seed``."""
    with train.seeded(seed):
        model = SequenceModel(kind, n_in, hidden, n_out)
    gen = torch.Generator().manual_seed(seed + 1)
    if kind == "irnn":
        init_(model.rnn, "identity", generator=gen)  # W_hh = I, W_ih ~ N(0, 0.001²), bias 0
    elif kind == "relu":
        with torch.no_grad():
            w_hh = model.rnn.weight_hh_l0
            assert isinstance(w_hh, Tensor)
            w_hh.normal_(0.0, relu_gain / math.sqrt(hidden), generator=gen)
    return model


def _cell(model: SequenceModel) -> nn.RNNCellBase:
    """A cell sharing the layer's parameters (the same tensors), to step through time by hand."""
    rnn = model.rnn
    cell: nn.RNNCellBase
    if isinstance(rnn, nn.LSTM):
        cell = nn.LSTMCell(rnn.input_size, rnn.hidden_size)
    elif isinstance(rnn, nn.GRU):
        cell = nn.GRUCell(rnn.input_size, rnn.hidden_size)
    else:
        assert isinstance(rnn, nn.RNN)
        cell = nn.RNNCell(rnn.input_size, rnn.hidden_size, nonlinearity=str(rnn.nonlinearity))
    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        setattr(cell, name, getattr(rnn, f"{name}_l0"))
    return cell


def unroll(model: SequenceModel, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    """The model's output and every hidden state ``h_1..h_T`` (each with ``retain_grad``), by
    stepping a cell that shares the layer's weights (the fused layer hides its steps)."""
    cell = _cell(model)
    n = x.shape[0]
    h = torch.zeros(n, model.rnn.hidden_size, dtype=x.dtype)
    c = torch.zeros_like(h)
    states: list[Tensor] = []
    for t in range(x.shape[1]):
        if isinstance(cell, nn.LSTMCell):
            h, c = cell(x[:, t], (h, c))
        else:
            h = cell(x[:, t], h)
        h.retain_grad()
        states.append(h)
    return model.head(h), states


def gradient_through_time(model: SequenceModel, x: Tensor, y: Tensor, task: str) -> np.ndarray:
    """``‖∂L/∂h_t‖`` for ``t = 1..T`` (Frobenius norm over the batch), by autograd."""
    out, states = unroll(model, x)
    loss = task_loss(task, out, y)
    model.zero_grad(set_to_none=True)
    loss.backward()
    norms = torch.stack([s.grad.norm() if s.grad is not None else torch.zeros(()) for s in states])
    model.zero_grad(set_to_none=True)
    return norms.detach().numpy().astype(float)


def task_loss(task: str, out: Tensor, y: Tensor) -> Tensor:
    """The task's loss: MSE for the adding problem, cross-entropy for the temporal order."""
    if task == "adding":
        return nn.functional.mse_loss(out, y)
    return nn.functional.cross_entropy(out, y)
