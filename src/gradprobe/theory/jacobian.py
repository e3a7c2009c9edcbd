r"""Singular values of a model's input-output Jacobian, without materialising it.

For one input ``x`` the Jacobian ``J = ∂f(x)/∂x`` (``n_out × n_in``, both flattened) is reached
only through products: ``J v`` and ``Jᵀ u`` by :func:`torch.func.vjp`, computed once and reused (``J v`` as
the vector-Jacobian product of the linear map ``u ↦ Jᵀu``; :func:`torch.func.jvp` as fallback). Golub–Kahan–Lanczos
bidiagonalisation with full reorthogonalisation builds ``J V_k = U_k B_k``; the singular values of
the small bidiagonal ``B_k`` (Ritz values) approximate those of ``J``: the largest converge first,
the smallest Ritz value is an upper bound of ``σ_min``, and with ``k = min(n_in, n_out)`` steps the
whole spectrum is resolved (``exact=True``). Invariant subspaces (an orthogonal ``J`` breaks down
at the first step) are handled by restarting from a fresh random vector orthogonal to the basis.
The Lanczos vectors are kept in float64; ``J v`` runs in the model's dtype.

Why: Pennington et al. (2017) show that trainability tracks the whole singular-value distribution
of ``J`` ("dynamical isometry": all singular values near 1), not only its mean square ``χ₁^L``;
Saxe et al. (2014) that orthogonal deep linear networks keep every singular value at 1 while
Gaussian ones spread exponentially with depth.

Example
    >>> import torch
    >>> lin = torch.nn.Linear(4, 4, bias=False)
    >>> _ = torch.nn.init.orthogonal_(lin.weight)
    >>> s = jacobian_spectrum(lin, torch.randn(1, 4))
    >>> bool(abs(s.largest - 1) < 1e-5 and abs(s.smallest - 1) < 1e-5), s.exact
    (True, True)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import jvp, vjp

from gradprobe import activations
from gradprobe.errors import ConfigError, UnsupportedModelError


@dataclass(frozen=True)
class JacobianSpectrum:
    """Singular values (descending) of one Jacobian, or their Ritz estimates when not ``exact``."""

    name: str
    singular_values: np.ndarray
    n_in: int
    n_out: int
    exact: bool

    @property
    def largest(self) -> float:
        return float(self.singular_values[0])

    @property
    def smallest(self) -> float:
        """Smallest singular value (an upper bound of it when not ``exact``)."""
        return float(self.singular_values[-1])

    @property
    def spread(self) -> float:
        """``σ_max / σ_min`` (the condition number); ``inf`` for a singular Jacobian."""
        return self.largest / self.smallest if self.smallest > 0 else float("inf")

    @property
    def mean(self) -> float:
        return float(self.singular_values.mean())

    @property
    def median(self) -> float:
        return float(np.median(self.singular_values))


def _as_fn(model: nn.Module | Callable[[Tensor], Tensor], shape: torch.Size):
    def f(flat: Tensor) -> Tensor:
        out = model(flat.reshape(shape))
        if not isinstance(out, Tensor):
            raise UnsupportedModelError(
                f"the model returned {type(out).__name__}, not a tensor",
                hint="wrap it so that it returns the output tensor whose Jacobian you want",
            )
        return out.reshape(-1)

    return f


def _orth(vec: np.ndarray, basis: list[np.ndarray]) -> np.ndarray:
    if basis:
        b = np.stack(basis, axis=1)
        for _ in range(2):  # twice is enough (Kahan–Parlett)
            vec = vec - b @ (b.T @ vec)
    return vec


def _fresh(rng: np.random.Generator, n: int, basis: list[np.ndarray]) -> np.ndarray | None:
    if len(basis) >= n:
        return None
    v = _orth(rng.standard_normal(n), basis)
    return v / np.linalg.norm(v)


def jacobian_spectrum(
    model: nn.Module | Callable[[Tensor], Tensor],
    x: Tensor,
    *,
    k: int | None = None,
    seed: int = 0,
    name: str = "model",
) -> JacobianSpectrum:
    """Singular values of ``∂model(x)/∂x`` by Golub–Kahan–Lanczos (``k`` steps).

    ``x`` is one input as the model takes it (normally a batch of one: for a batch of ``B``
    independent examples the Jacobian is block diagonal and its spectrum the union). ``k``
    defaults to ``min(n_in, n_out, 128)``; ``k = min(n_in, n_out)`` resolves every singular value.
    The model is used as it is (training or evaluation mode); nothing in it is changed.
    """
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise ConfigError(
            "x must be a floating-point tensor (one input, batch of one)",
            hint="e.g. torch.randn(1, 784)",
        )
    x = x.detach()
    shape = x.shape
    f = _as_fn(model, shape)
    flat = x.reshape(-1)
    out, vjp_fn = vjp(f, flat)[:2]
    n_in, n_out = flat.numel(), out.numel()
    full = min(n_in, n_out)
    steps = min(full, 128) if k is None else int(k)
    if steps < 1 or steps > full:
        raise ConfigError(
            f"k must be between 1 and min(n_in, n_out) = {full}, got {k}", hint="leave k=None"
        )

    # J v as the vector-Jacobian product of the (linear) map u -> Jᵀu: it reuses the cached
    # backward graph instead of re-running the forward pass for every product (about 10x
    # faster than torch.func.jvp on a 50-layer chain). Plain jvp is the fallback.
    try:
        jvp_fn = vjp(lambda u: vjp_fn(u)[0], torch.zeros_like(out))[1]
        jvp_fn(torch.zeros_like(flat))

        def apply_j(t: Tensor) -> Tensor:
            return jvp_fn(t)[0]
    except RuntimeError:

        def apply_j(t: Tensor) -> Tensor:
            return jvp(f, (flat,), (t,))[1]

    def mv(v: np.ndarray) -> np.ndarray:
        t = torch.as_tensor(v, dtype=x.dtype, device=x.device)
        return apply_j(t).detach().double().cpu().numpy()

    def rmv(u: np.ndarray) -> np.ndarray:
        t = torch.as_tensor(u, dtype=out.dtype, device=out.device)
        return vjp_fn(t)[0].detach().double().cpu().numpy()

    rng = np.random.default_rng(seed)
    v = _fresh(rng, n_in, [])
    assert v is not None
    vs: list[np.ndarray] = []
    us: list[np.ndarray] = []
    alphas: list[float] = []
    betas: list[float] = []  # betas[j] couples v_{j+1} to u_j (super-diagonal)
    u_prev: np.ndarray | None = None
    beta = 0.0
    for _ in range(steps):
        vs.append(v)
        u = mv(v)
        if u_prev is not None:
            u = u - beta * u_prev
        u = _orth(u, us)
        alpha = float(np.linalg.norm(u))
        scale = max([1.0, *alphas, *betas])
        if alpha <= 1e-13 * scale:
            alpha = 0.0
            fresh = _fresh(rng, n_out, us)
            if fresh is None:
                alphas.append(alpha)
                break
            u = fresh
        else:
            u = u / alpha
        us.append(u)
        alphas.append(alpha)
        w = rmv(u) - alpha * v
        w = _orth(w, vs)
        beta = float(np.linalg.norm(w))
        if beta <= 1e-13 * max(scale, alpha):
            beta = 0.0
            nxt = _fresh(rng, n_in, vs)
            if nxt is None:
                break
            v = nxt
        else:
            v = w / beta
        betas.append(beta)
        u_prev = u
    # U_mᵀ J V_{m+1} = [B_m | β_m e_m]: keeping the trailing β makes the result exact once U
    # spans the whole output space (n_out < n_in).
    m = len(alphas)
    bmat = np.zeros((m, m + 1 if len(betas) >= m else m))
    bmat[np.arange(m), np.arange(m)] = alphas
    for j in range(min(len(betas), bmat.shape[1] - 1)):
        bmat[j, j + 1] = betas[j]
    sv = np.sort(np.linalg.svd(bmat, compute_uv=False))[::-1]
    return JacobianSpectrum(name, sv.copy(), n_in, n_out, exact=m >= full)


def largest_singular_value(
    model: nn.Module | Callable[[Tensor], Tensor], x: Tensor, *, iters: int = 50, seed: int = 0
) -> float:
    """``σ_max`` of ``∂model(x)/∂x`` by power iteration on ``JᵀJ`` (cheaper than Lanczos)."""
    x = x.detach()
    f = _as_fn(model, x.shape)
    flat = x.reshape(-1)
    vjp_fn = vjp(f, flat)[1]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(flat.numel(), generator=gen, dtype=torch.float64).to(flat)
    v = v / v.norm()
    sigma = 0.0
    for _ in range(iters):
        jv = jvp(f, (flat,), (v,))[1].detach()
        sigma = float(jv.norm())  # host sync once per iteration, outside any hook
        w = vjp_fn(jv)[0].detach()
        norm = w.norm()
        if float(norm) == 0.0:
            return 0.0
        v = w / norm
    return sigma


def _sequential_blocks(model: nn.Sequential) -> list[tuple[str, nn.Sequential]]:
    """Children grouped into blocks that each end with an activation from the table."""
    blocks: list[tuple[str, nn.Sequential]] = []
    names: list[str] = []
    mods: list[nn.Module] = []
    for child_name, child in model.named_children():
        names.append(child_name)
        mods.append(child)
        if activations.spec_for_module(child) is not None:
            blocks.append(("+".join(names), nn.Sequential(*mods)))
            names, mods = [], []
    if mods:
        blocks.append(("+".join(names), nn.Sequential(*mods)))
    return blocks


def block_spectra(
    model: nn.Module, x: Tensor, *, k: int | None = None, seed: int = 0
) -> list[JacobianSpectrum]:
    """Jacobian spectra of each block of an ``nn.Sequential`` (a block ends at each activation,
    e.g. ``fc1+act1``), each at the input that block receives from ``x``, then of the whole
    model (named ``"model"``).

    >>> from gradprobe.lab.zoo import mlp
    >>> [s.name for s in block_spectra(mlp([3, 3, 2], "tanh"), torch.randn(1, 3))]
    ['fc1+act1', 'out', 'model']
    """
    if not isinstance(model, nn.Sequential):
        raise UnsupportedModelError(
            f"block_spectra needs an nn.Sequential, got {type(model).__name__}",
            hint="use jacobian_spectrum(module, input) on each block you care about",
        )
    out = []
    h = x.detach()
    for name, block in _sequential_blocks(model):
        out.append(jacobian_spectrum(block, h, k=k, seed=seed, name=name))
        with torch.no_grad():
            h = block(h)
    out.append(jacobian_spectrum(model, x, k=k, seed=seed, name="model"))
    return out


__all__ = ["JacobianSpectrum", "block_spectra", "jacobian_spectrum", "largest_singular_value"]
