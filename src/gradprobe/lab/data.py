"""Data sets for the lab: generated, or shipped inside scikit-learn. Nothing is downloaded.

Every loader returns float32 tensors ``(x_train, y_train, x_test, y_test)`` from a fixed seed, so
reruns give identical numbers.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int) -> tuple[Tensor, ...]:
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    n_test = int(round(len(x) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    as_t = lambda a, dt: torch.as_tensor(a, dtype=dt)  # noqa: E731
    ydt = torch.float32 if y.dtype.kind == "f" else torch.long
    return as_t(x[train], torch.float32), as_t(y[train], ydt), as_t(x[test], torch.float32), as_t(y[test], ydt)


def circles(
    n_samples: int = 1000, *, factor: float = 0.5, noise: float = 0.1, seed: int = 0,
    test_fraction: float = 0.5,
) -> tuple[Tensor, ...]:
    """Two concentric circles (``sklearn.datasets.make_circles``); labels 0/1 as float, shape (n, 1).

    The tutorial this follows uses 1000 points, factor 0.5, noise 0.1 and a 50/50 split.
    """
    from sklearn.datasets import make_circles

    x, y = make_circles(n_samples=n_samples, factor=factor, noise=noise, random_state=seed)
    return _split(x, y.astype(np.float32)[:, None], test_fraction, seed)


def moons(
    n_samples: int = 1000, *, noise: float = 0.1, seed: int = 0, test_fraction: float = 0.5
) -> tuple[Tensor, ...]:
    """Two interleaving half-moons (``sklearn.datasets.make_moons``); labels float, shape (n, 1)."""
    from sklearn.datasets import make_moons

    x, y = make_moons(n_samples=n_samples, noise=noise, random_state=seed)
    return _split(x, y.astype(np.float32)[:, None], test_fraction, seed)


def digits(*, seed: int = 0, test_fraction: float = 0.3) -> tuple[Tensor, ...]:
    """scikit-learn's 8x8 digits (1797 images shipped with the package), scaled to [0, 1] and
    flattened to 64 features; integer labels 0-9."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    return _split(x, bunch.target.astype(np.int64), test_fraction, seed)


def gaussian(n: int, dim: int, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> Tensor:
    """``n`` inputs of dimension ``dim`` drawn from N(0, 1) with a fixed seed."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=gen, dtype=dtype)
