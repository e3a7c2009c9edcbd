"""The rank-1 fast path of the model evaluator: a coordinate of a Linear weight perturbs
the layer's output by a rank-1 term, so many coordinates are evaluated in one vectorised
forward pass from the layer on (validated against the plain path before use)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from gradprobe import activations
from gradprobe.check.options import (
    _NOISE_SAFETY,
    _unit_roundoff,
)


class _Rank1FastPath:
    """Mixin of :class:`gradprobe.check.model._ModelEvaluator`: the rank-1 fast path."""

    # state of the model evaluator the fast path reads and sets (set in its __init__)
    _fast_state: tuple[nn.Module, str, Tensor, Tensor] | None
    _sparse: list[tuple[nn.Module, Tensor, Tensor, Tensor, Tensor, int]] | None
    _stub: frozenset[nn.Module]
    _consumed: set[nn.Module] | None
    n_evaluations: int

    if TYPE_CHECKING:
        def __getattr__(self, name: str) -> Any: ...

    def _find_linear_params(self, clone: nn.Module) -> dict[int, tuple[nn.Module, str]]:
        """Parameters of plain ``nn.Linear`` modules, called once per forward pass.

        Their coordinate perturbations can be applied to the layer's *output*:
        ``x (W + δE_ij)ᵀ = x Wᵀ + δ x_j e_iᵀ`` and ``b + δe_i``, exact in exact arithmetic. The
        change stays in one output column through elementwise activations (``a_i' = φ(z_i')``,
        only that column recomputed) and becomes a rank-1 update at the next ``nn.Linear``
        (``z' = z + Δa_i W[:, i]ᵀ``), so a perturbed forward pass costs a few column updates
        instead of a copy of ``W`` and full matmuls. Whether the parameter is used anywhere else
        (tied weights, a regulariser, a custom Function reading ``module.weight``) is checked
        numerically before this path is used (:meth:`_validate_fast`)."""
        calls: dict[int, int] = {}
        linears = [m for m in clone.modules() if type(m) is nn.Linear]
        handles = [
            m.register_forward_pre_hook(
                lambda mod, _a: calls.__setitem__(id(mod), calls.get(id(mod), 0) + 1)
            )
            for m in linears
        ]
        try:
            self._reseed()
            with torch.no_grad():
                self.obj(self.inputs, self.targets)
        finally:
            for h in handles:
                h.remove()
            self._restore_buffers()
        by_id = {id(p): t for t, p in enumerate(self.params)}
        out: dict[int, tuple[nn.Module, str]] = {}
        for m in linears:
            if m._forward_hooks or m._forward_pre_hooks or "forward" in vars(m):
                continue
            self._patch(m, self._linear_forward(m))
            if calls.get(id(m)) != 1:
                continue
            for kind in ("weight", "bias"):
                p = getattr(m, kind)
                if p is not None and id(p) in by_id:
                    out[by_id[id(p)]] = (m, kind)
        for act in clone.modules():
            spec = activations.spec_for_module(act)
            if (
                spec is None
                or type(act) not in spec.module_types
                or spec.name in ("prelu", "rrelu")  # per-channel parameters; random
                or getattr(act, "inplace", False)
                or act._forward_hooks
                or "forward" in vars(act)
            ):
                continue
            self._patch(act, self._elementwise_forward(act))
        return out

    def _patch(self, m: nn.Module, forward: Callable[..., Tensor]) -> None:
        m.forward = forward  # type: ignore[method-assign]
        self.patched.append(m)

    def _track(self, m: nn.Module, base: Tensor, col: Tensor, delta: Tensor) -> Tensor:
        """The output of ``m``: ``base`` plus ``delta`` (shape ``base[..., :1]``) in column
        ``col``, remembered in that compressed form for the patched modules downstream.

        The dense tensor is materialised unless ``m`` is in ``self._stub``: modules whose
        output, in a validated run, went only to patched modules that read the compressed form.
        Their output is then a NaN placeholder of the right shape, so that a reader which is
        not a patched module turns ``J`` into NaN instead of reading a wrong value (the
        validation and the non-finite re-run in :meth:`eval_coords` rely on that)."""
        assert self._sparse is not None
        if m in self._stub:
            t = torch.full((), math.nan, dtype=base.dtype, device=base.device).expand(base.shape)
        else:
            onehot = (torch.arange(base.shape[-1], device=base.device) == col).to(base.dtype)
            t = torch.addcmul(base, delta, onehot)
        self._sparse.append((m, t, col, delta, base, t._version))
        return t

    def _lookup(self, x: Any) -> tuple[nn.Module, Tensor, Tensor, Tensor] | None:
        if self._sparse is None:
            return None
        for m, t, col, delta, base, version in self._sparse:
            if t is x and t._version == version:  # not modified in place since
                return m, col, delta, base
        return None

    def _tracked(self, x: Any) -> tuple[Tensor, Tensor, Tensor] | None:
        """``(col, delta, base)`` if ``x`` is a tracked output; records that it was read so."""
        found = self._lookup(x)
        if found is None:
            return None
        m, col, delta, base = found
        if self._consumed is not None:
            self._consumed.add(m)
        return col, delta, base

    def _linear_forward(self, m: nn.Module) -> Callable[[Tensor], Tensor]:
        plain = type(m).forward.__get__(m)

        def forward(x: Tensor) -> Tensor:
            st = self._fast_state
            if st is not None and st[0] is m:  # this layer's own parameter is perturbed
                _, kind, col, step = st
                out = plain(x)
                row = col if kind == "bias" else col // x.shape[-1]
                if kind == "bias":
                    delta = step * torch.ones_like(out[..., :1])
                else:
                    delta = step * torch.index_select(x, -1, (col % x.shape[-1]).reshape(1))
                return self._track(m, out, row, delta)
            tracked = self._tracked(x)
            if tracked is None:
                return plain(x)
            col, delta, base = tracked  # x = base + delta in column col: a rank-1 update
            w = m.weight
            assert isinstance(w, Tensor)
            return torch.addcmul(plain(base), delta, torch.index_select(w, 1, col.reshape(1)).T)

        return forward

    def _elementwise_forward(self, m: nn.Module) -> Callable[[Tensor], Tensor]:
        plain = type(m).forward.__get__(m)

        def forward(z: Tensor) -> Tensor:
            tracked = self._tracked(z)
            if tracked is None:
                return plain(z)
            col, delta, zbase = tracked
            abase = plain(zbase)
            zcol = torch.index_select(zbase, -1, col.reshape(1))
            acol = torch.index_select(abase, -1, col.reshape(1))
            da = plain(zcol + delta) - acol
            return self._track(m, abase, col, da)

        return forward

    def _vmapped_fast(
        self, t: int, cols: Tensor, steps: Tensor, stub: frozenset[nn.Module]
    ) -> tuple[Tensor, Tensor]:
        module, kind = self.fast[t]

        def one(col: Tensor, step: Tensor) -> tuple[Tensor, Tensor]:
            self.kink.start("compare")
            self._fast_state = (module, kind, col, step)
            self._sparse = []
            j = self.obj(self.inputs, self.targets)
            self._sparse = None
            return j, self.kink.total(j)

        self._reseed()
        self._stub = stub
        try:
            with torch.no_grad():
                js, ks = torch.func.vmap(one, randomness="same")(cols, steps)
        finally:
            self._fast_state = None
            self._sparse = None
            self._stub = frozenset()
            self.kink.start("off")
            self._restore_buffers()
        self.n_evaluations += cols.shape[0]
        return js.detach().to(torch.float64).cpu(), ks.cpu()

    def _fast_inputs(
        self, t: int, cols: Tensor, eps: float, center: bool = False
    ) -> tuple[Tensor, Tensor]:
        # The steps actually taken by θ_i ± ε in floating point, so that the output update
        # equals the change the textbook perturbation makes; a zero step gives J(θ).
        b = self.base[t][cols]
        extra = [cols[:1], torch.zeros_like(b[:1])] if center else [cols[:0], b[:0]]
        return torch.cat([cols, cols, extra[0]]), torch.cat([(b + eps) - b, (b - eps) - b, extra[1]])

    def _validate_fast(self, t: int, eps: float) -> frozenset[nn.Module] | None:
        """Whether the rank-1 path reproduces full perturbed forward passes (``J`` and kink
        counts) for three coordinates: ``None`` if not (generic path), else the modules whose
        outputs may stay NaN placeholders (empty: materialise every output).

        Tried in turn, the first that agrees is kept: every patched module's output a
        placeholder; only the outputs that patched modules read in compressed form in that run;
        every output materialised. A reader of a placeholder other than a patched module makes
        ``J`` NaN, so a configuration that agrees has none on this path."""
        n = self.base[t].numel()
        cols = torch.unique(torch.tensor([0, n // 2, n - 1], device=self.base[t].device))
        steps = self._fast_inputs(t, cols, eps)
        # The reference: plain forward passes with the parameter itself moved by ±ε.
        slow, slow_ks = self._looped(t, self._coord_values(t, cols, eps))
        tol = 100.0 * _NOISE_SAFETY * _unit_roundoff(self.base[t].dtype) * max(abs(self.j0), 1e-300)

        def agrees(stub: frozenset[nn.Module]) -> bool:
            try:
                fast, fast_ks = self._vmapped_fast(t, *steps, stub)
            except Exception:  # any failure (e.g. an in-place write into a placeholder)
                return False
            same_kinks = slow_ks is None or bool((fast_ks == slow_ks).all())
            return same_kinks and bool(((fast - slow).abs() <= tol).all())

        every = frozenset(self.patched)
        self._consumed = set()
        try:
            if agrees(every):
                return every
        finally:
            consumed, self._consumed = frozenset(self._consumed), None
        if consumed and consumed != every and agrees(consumed):
            return consumed
        return frozenset() if agrees(frozenset()) else None
