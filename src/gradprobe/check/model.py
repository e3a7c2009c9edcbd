"""The model evaluator: the loss of a copy of the model as a function of one parameter
tensor's coordinates, split into named set-up steps."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from gradprobe import activations
from gradprobe.check.evaluator import (
    _convert,
    _Evaluator,
    _first_line,
    _KinkState,
    _Objective,
    _region,
)
from gradprobe.check.fast import _Rank1FastPath
from gradprobe.check.options import (
    _RANDOM_LAYER_TYPES,
    RandomLayers,
    _unit_roundoff,
)
from gradprobe.errors import ConfigError, NonFiniteError, UnsupportedModelError


class _ModelEvaluator(_Rank1FastPath, _Evaluator):
    """J(θ) of a float64 (``dtype``) copy of the model, one parameter tensor at a time.

    Set up in named steps: copy the model, collect the parameters, prepare random and
    batch-norm layers, attach the kink hooks, find the rank-1 fast path's candidates, compute
    the analytic gradient, record the kink patterns at θ, and find out whether the loss draws
    random numbers."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[..., Any],
        inputs: Any,
        targets: Any,
        *,
        dtype: torch.dtype,
        regularization: Callable[[nn.Module], Any] | None,
        random_layers: RandomLayers,
        seed: int,
        vectorize: bool | Literal["auto"],
        notes: list[str],
        warnings: list[str],
    ) -> None:
        self.seed = seed
        self.random = True  # reseed until the loss is known not to draw random numbers
        clone = self._copy_model(model, dtype)
        self.inputs = _convert(inputs, dtype)
        self.targets = _convert(targets, dtype)
        self.obj = _Objective(clone, loss_fn, regularization)
        self._collect_parameters(clone)
        self._setup_modules(clone, random_layers, notes)
        self.buffers = [(b, b.detach().clone()) for b in clone.buffers()]
        self.kink = _KinkState()
        self._hook_handles = self._add_kink_hooks(clone)
        self.has_hooks = bool(self._hook_handles)
        self._setup_fast_path(clone)
        self.want_vmap = vectorize is not False
        self.force_vmap = vectorize is True
        self.subject = "the model"
        self._analytic_gradient(dtype)
        j_again = self._record_reference(clone)
        self._detect_randomness(dtype, j_again, notes, warnings)
        self.n_evaluations = 4

    # -- set-up ---------------------------------------------------------------------------------
    def _copy_model(self, model: nn.Module, dtype: torch.dtype) -> nn.Module:
        """A deep copy of the model in the check's dtype (the user's model is never touched)."""
        try:
            clone = copy.deepcopy(model)
        except Exception as e:  # deepcopy of arbitrary user objects can fail in many ways
            raise UnsupportedModelError(
                f"cannot deep-copy the model for checking ({_first_line(e)})",
                hint="make the model copyable (no open files or locks as attributes)",
            ) from e
        clone = clone.to(dtype)
        self.cuda = any(p.device.type == "cuda" for p in clone.parameters())
        return clone

    def _collect_parameters(self, clone: nn.Module) -> None:
        """The tensors to check: every parameter that requires grad, tied ones once."""
        named = [(n, p) for n, p in clone.named_parameters() if p.requires_grad]
        if not named:
            raise ConfigError(
                "the model has no parameters that require grad, nothing to check",
                hint="unfreeze the parameters to check (p.requires_grad_(True))",
            )
        self.names = [n for n, _ in named]
        self.full_names = ["model." + n for n in self.names]
        self.params = [p for _, p in named]
        self.shapes = [tuple(p.shape) for p in self.params]
        self.base = [p.detach().clone().reshape(-1) for p in self.params]

    def _setup_fast_path(self, clone: nn.Module) -> None:
        """State of the rank-1 fast path (:class:`_Rank1FastPath`), and its candidates."""
        self._fast_state: tuple[nn.Module, str, Tensor, Tensor] | None = None
        self._sparse: list[tuple[nn.Module, Tensor, Tensor, Tensor, Tensor, int]] | None = None
        # Modules whose column-tracked outputs are left as NaN placeholders in this call, and
        # (while validating) the modules whose tracked outputs a patched module picked up.
        self._stub: frozenset[nn.Module] = frozenset()
        self._consumed: set[nn.Module] | None = None
        self.patched: list[nn.Module] = []
        self.fast = self._find_linear_params(clone)  # tensor index -> (module, "weight"/"bias")
        self.fast_ok: dict[int, frozenset[nn.Module] | None] = {}  # None: generic path

    def _analytic_gradient(self, dtype: torch.dtype) -> None:
        """The analytic gradient (the code under test) and the loss J(θ)."""
        self._reseed()
        with torch.enable_grad():
            j = self.obj(self.inputs, self.targets)
        if not j.requires_grad:
            raise ConfigError(
                "the loss does not depend on any parameter that requires grad",
                hint="check that loss_fn uses the model output (and does not .detach() it)",
            )
        grads = torch.autograd.grad(j, self.params, allow_unused=True)
        self._restore_buffers()  # after backward, which may need the buffers as they were
        self.grads = [
            (torch.zeros_like(p) if g is None else g.detach()).reshape(-1).to(dtype)
            for p, g in zip(self.params, grads)
        ]
        for name, g in zip(self.names, self.grads):
            if not torch.isfinite(g).all():
                raise NonFiniteError(
                    f"the analytic gradient of {name} has non-finite values",
                    hint="check the backward pass of the layers that use it",
                )
        self.j0 = float(j.detach())
        if not math.isfinite(self.j0):
            raise NonFiniteError(
                f"the loss at the given parameters is {self.j0}", hint="check inputs and model"
            )

    def _record_reference(self, clone: nn.Module) -> float:
        """Kink patterns at θ and the size of the activations (for chunking); returns J(θ)
        evaluated again, with torch's RNG reseeded."""
        sizes: list[int] = []
        size_hooks = [
            m.register_forward_hook(
                lambda _m, _a, out: sizes.append(out.numel()) if isinstance(out, Tensor) else None
            )
            for m in clone.modules()
            if not list(m.children())
        ]
        self.kink.start("record")
        j_again = self._plain({})
        self.kink.start("off")
        for h in size_hooks:
            h.remove()
        self.act_numel = int(sum(sizes))
        return j_again

    def _detect_randomness(
        self, dtype: torch.dtype, j_again: float, notes: list[str], warnings: list[str]
    ) -> None:
        """Does the loss draw random numbers at all? (torch.manual_seed costs milliseconds, so
        reseed before every evaluation only if it does.) And is it deterministic once reseeded?"""
        self.random = False
        j_unseeded = self._plain({})
        same = 64.0 * _unit_roundoff(dtype) * abs(self.j0)  # GPU reductions may reorder sums
        self.random = abs(j_unseeded - self.j0) > same or self.random_layers_present
        if self.random and not self.random_layers_present:
            notes.append(
                f"the loss draws random numbers (functional dropout?); torch's RNG is reseeded "
                f"with seed={self.seed} before every evaluation so it draws the same ones"
            )
        if abs(j_again - self.j0) > same:
            warnings.append(
                f"the loss is not a deterministic function of the parameters: two evaluations at "
                f"the same point gave {self.j0!r} and {j_again!r} although torch's RNG was "
                f"reseeded; numeric gradients of a random function are meaningless (random "
                f"numbers from numpy or Python's random module?)"
            )

    def _setup_modules(self, clone: nn.Module, random_layers: RandomLayers, notes: list[str]) -> None:
        randoms = [
            n for n, m in clone.named_modules() if isinstance(m, _RANDOM_LAYER_TYPES) and m.training
        ]
        self.random_layers_present = bool(randoms) and random_layers == "reseed"
        if randoms:
            if random_layers == "eval":
                for n, m in clone.named_modules():
                    if n in randoms:
                        m.eval()
                notes.append(f"random layers put in eval mode: {', '.join(randoms)}")
            else:
                notes.append(
                    f"random layers ({', '.join(randoms)}) kept in training mode; torch's RNG is "
                    f"reseeded with seed={self.seed} before every evaluation so they draw the "
                    f"same numbers each time"
                )
        bns = []
        for n, m in clone.named_modules():
            if (
                isinstance(m, nn.modules.batchnorm._BatchNorm)
                and m.training
                and m.track_running_stats
            ):
                # Train mode normalises with the batch's statistics whatever the running ones
                # are; not tracking them leaves the function unchanged and removes the in-place
                # update that would leak between evaluations (and that vmap cannot batch).
                m.track_running_stats = False
                m.running_mean = None
                m.running_var = None
                m.num_batches_tracked = None
                bns.append(n)
        if bns:
            notes.append(
                f"batch-norm layers in training mode ({', '.join(bns)}) normalise with the "
                f"statistics of the whole batch, which are part of the function checked; their "
                f"running statistics are not updated by the check"
            )

    def _add_kink_hooks(self, clone: nn.Module) -> list[Any]:
        handles = []
        for m in clone.modules():
            spec = activations.spec_for_module(m)
            points = tuple(spec.kinks) if spec is not None else ()
            if not points:
                continue
            handles.append(m.register_forward_pre_hook(self._make_hook(points)))
        return handles

    def eval_coords(
        self, t: int, cols: Tensor, eps: float, center: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        vmap = self.vmap_ready(t, self._coord_values(t, cols[:1], eps, center=True))
        if vmap and t in self.fast:
            if t not in self.fast_ok:
                self.fast_ok[t] = self._validate_fast(t, eps)
            stub = self.fast_ok[t]
            if stub is not None:
                if self.names[t] not in self.fast_used:
                    self.fast_used = (*self.fast_used, self.names[t])
                    if stub:
                        self.fast_lean = (*self.fast_lean, self.names[t])
                steps = self._fast_inputs(t, cols, eps, center)
                js, ks = self._vmapped_fast(t, *steps, stub)
                if stub and not bool(torch.isfinite(js).all()):
                    # A placeholder reached J on a path the validation did not take: redo
                    # this chunk with every output materialised (a real non-finite J stays).
                    js, ks = self._vmapped_fast(t, *steps, frozenset())
                return js, ks
        return super().eval_coords(t, cols, eps, center)

    def _make_hook(self, points: tuple[float, ...]) -> Callable[..., None]:
        state = self.kink

        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            if state.mode == "off" or not args or not isinstance(args[0], Tensor):
                return
            if state.mode == "record":
                state.base.append(_region(args[0].detach(), points))
                return
            i = state.i
            state.i += 1
            if i >= len(state.base) or state.base[i].shape != args[0].shape:
                return
            ref = state.base[i]
            found = self._lookup(args[0])
            if found is None:
                state.counts.append((_region(args[0].detach(), points) != ref).sum())
                return
            # The input is base + delta in column col (perhaps a placeholder): count the
            # changed regions of base outside that column and of base + delta inside it.
            _, col, delta, base = found
            c = col.reshape(1)
            ref_c = torch.index_select(ref, -1, c)
            base_c = torch.index_select(base, -1, c)
            state.counts.append(
                (_region(base, points) != ref).sum()
                - (_region(base_c, points) != ref_c).sum()
                + (_region(base_c + delta, points) != ref_c).sum()
            )

        return hook

    # -- evaluation -----------------------------------------------------------------------------
    def _reseed(self) -> None:
        if self.random:
            torch.default_generator.manual_seed(self.seed)
            if self.cuda:
                torch.cuda.manual_seed_all(self.seed)

    def _restore_buffers(self) -> None:
        if not self.buffers:
            return
        with torch.no_grad():
            for b, saved in self.buffers:
                b.copy_(saved)

    def _plain(self, override: dict[str, Tensor]) -> float:
        self._reseed()
        with torch.no_grad():
            if override:
                j = torch.func.functional_call(self.obj, override, (self.inputs, self.targets))
            else:
                j = self.obj(self.inputs, self.targets)
        self._restore_buffers()
        return float(j)  # one host sync per evaluation: the loop path is the slow path

    def _looped(self, t: int, values: Tensor) -> tuple[Tensor, Tensor | None]:
        # Write each perturbed value into the copy's parameter (tied uses follow) and restore
        # it exactly afterwards: cheaper than functional_call's re-parametrisation per call.
        p = self.params[t]
        saved = p.detach().clone()
        js = torch.empty(values.shape[0], dtype=torch.float64)
        ks = torch.zeros(values.shape[0], dtype=torch.int64)
        try:
            for r in range(values.shape[0]):
                with torch.no_grad():
                    p.copy_(values[r].view(p.shape))
                self.kink.start("compare")
                js[r] = self._plain({})
                ks[r] = int(self.kink.total(values))
                self.kink.start("off")
        finally:
            with torch.no_grad():
                p.copy_(saved)
        self.n_evaluations += values.shape[0]
        return js, (ks if self.has_hooks else None)

    def _batched(self, t: int, values: Tensor) -> tuple[Tensor, Tensor | None]:
        name, shape = self.full_names[t], self.shapes[t]

        def one(v: Tensor) -> tuple[Tensor, Tensor]:
            self.kink.start("compare")
            j = torch.func.functional_call(
                self.obj, {name: v.view(shape)}, (self.inputs, self.targets)
            )
            return j, self.kink.total(j)

        self._reseed()
        try:
            with torch.no_grad():
                js, ks = torch.func.vmap(one, randomness="same")(values)
        finally:
            self.kink.start("off")
            self._restore_buffers()
        self.n_evaluations += values.shape[0]
        return js.detach().to(torch.float64).cpu(), ks.cpu()

    def close(self) -> None:
        for h in self._hook_handles:
            h.remove()
        for m in self.patched:
            vars(m).pop("forward", None)

