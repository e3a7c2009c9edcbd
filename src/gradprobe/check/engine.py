"""Numerical gradient checking that names the parameter tensor whose backward pass is wrong.

The check compares the analytic gradient ``g`` (autograd through the model's own backward,
including any custom ``torch.autograd.Function``, or the gradients a user computed by hand) with
centred differences

.. math::

    \\tilde g_i = \\frac{J(\\theta + \\varepsilon e_i) - J(\\theta - \\varepsilon e_i)}{2\\varepsilon},
    \\qquad
    r = \\frac{\\lVert \\tilde g - g \\rVert_2}{\\lVert \\tilde g \\rVert_2 + \\lVert g \\rVert_2}
    \\quad (0/0 := 0),

overall and per parameter tensor (Ng, *Improving Deep Neural Networks*, "Gradient checking";
CS231n notes, "Gradient checks"). The centred difference has truncation error
``ε² J''' / 6`` and a roundoff error of about ``u·|J| / ε`` per coordinate (``u`` the unit
roundoff of the dtype), so in float64 with ``ε = 1e-7`` a right gradient reads ``r ≈ 1e-7`` or
less and ``r > 1e-3`` almost surely means a bug. In float32 the same ``ε`` gives roundoff of the
order of the gradient itself: the report warns, with the reason, instead of blaming the code.

Three modes:

``"full"``
    every coordinate, two evaluations each;
``"sample"``
    ``k`` random coordinates per tensor;
``"directional"``
    ``n_directions`` random unit directions ``u`` per tensor, comparing
    ``(J(θ + εu) − J(θ − εu)) / 2ε`` with ``g·u``. A wrong gradient ``g + e`` shows the same
    relative error in expectation (``E[(e·u)²] = ‖e‖² / n``), so this scales to models with
    millions of parameters at ``2 · n_directions`` forward passes per tensor.

Kinks. ReLU-like activations, ``max`` and ``abs`` are not differentiable everywhere; when ``±ε``
moves a pre-activation across a kink the centred difference averages two slopes and disagrees
with the (one-sided) analytic gradient. Such coordinates are detected in two independent ways:
forward pre-hooks on the activation modules that :data:`gradprobe.activations.ACTIVATIONS` lists
with kinks compare the region pattern of their inputs at ``θ ± εe_i`` with the one at ``θ``; and
the one-sided differences ``(J(θ+εe_i) − J(θ))/ε`` and ``(J(θ) − J(θ−εe_i))/ε`` disagree. At a
kink crossed on one side the discrepancy is half the one-sided disagreement, so a coordinate whose
error is within that bound is *explained* and the tensor reads ``"kink"`` instead of a false
``"bug"``; a real bug on top of a kink still shows.

Speed. The perturbed forward passes of one tensor are evaluated together with
:func:`torch.func.vmap` over :func:`torch.func.functional_call` (chunked to bound memory). Where
vmap cannot run (an operator without a batching rule such as ``rrelu``, in-place buffer updates,
data-dependent Python control flow) the check falls back to a loop and says why in
:attr:`GradCheckReport.fallback_reason`.

Example
    >>> import torch, gradprobe as gp
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
    >>> report = gp.gradcheck(model, torch.nn.functional.mse_loss, x, y)
    >>> report.ok, report.failed
    (True, [])
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from gradprobe import activations
from gradprobe.errors import ConfigError, NonFiniteError, UnsupportedModelError

if TYPE_CHECKING:
    import pandas as pd

Mode = Literal["full", "sample", "directional"]
RandomLayers = Literal["reseed", "eval"]
Verdict = Literal["ok", "suspicious", "bug", "kink"]

_MODES = ("full", "sample", "directional")
_NOISE_SAFETY = 10.0
"""Roundoff of one loss evaluation is taken as ``_NOISE_SAFETY · u · |J|`` (``u`` the unit
roundoff): sums inside a forward pass lose a few more digits than one rounding."""
_KINK_SHARE = 0.6
"""A kink crossed on one side makes ``|g̃ − g| = |fwd − bwd| / 2``; allow 20 % slack."""
_MAX_CHUNK = 512
"""Most coordinates evaluated by one vectorised call when ``chunk_size`` is not given."""
_RANDOM_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.modules.dropout._DropoutNd, nn.RReLU)


# --------------------------------------------------------------------------------------- report


@dataclass(frozen=True)
class CoordinateCheck:
    """One checked coordinate (``index``) or random direction (``direction``)."""

    index: tuple[int, ...] | None
    direction: int | None
    numeric: float
    analytic: float
    abs_error: float
    kink: bool

    def where(self) -> str:
        return f"direction {self.direction}" if self.index is None else str(list(self.index))


@dataclass(frozen=True)
class TensorCheck:
    """The check of one parameter tensor.

    ``rel_error`` is ``‖g̃ − g‖ / (‖g̃‖ + ‖g‖)`` over the checked coordinates (or directional
    derivatives); ``noise_floor`` the relative error roundoff alone can produce for this tensor;
    ``rel_error_smooth`` the same relative error without the coordinates whose discrepancy a
    crossed kink explains; ``kinks_crossed`` how many checked coordinates crossed a kink.
    """

    name: str
    shape: tuple[int, ...]
    n_checked: int
    rel_error: float
    abs_error: float
    numeric_norm: float
    analytic_norm: float
    noise_floor: float
    rel_error_smooth: float
    kinks_crossed: int
    verdict: Verdict
    worst: tuple[CoordinateCheck, ...]


@dataclass(frozen=True)
class GradCheckReport:
    """What :func:`gradcheck` / :func:`gradcheck_fn` found, one row per parameter tensor.

    ``ok`` is true when every tensor reads ``"ok"`` or ``"kink"``; ``failed`` names the tensors
    that read ``"bug"``; ``suspicious`` those in between. ``table()`` gives a DataFrame.
    """

    rows: tuple[TensorCheck, ...]
    rel_error: float
    mode: str
    eps: float
    dtype: str
    ok_tol: float
    bug_tol: float
    n_evaluations: int
    seconds: float
    vectorized: bool
    fallback_reason: str | None = None
    notes: tuple[str, ...] = ()
    warnings: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return all(r.verdict in ("ok", "kink") for r in self.rows)

    @property
    def failed(self) -> list[str]:
        return [r.name for r in self.rows if r.verdict == "bug"]

    @property
    def suspicious(self) -> list[str]:
        return [r.name for r in self.rows if r.verdict == "suspicious"]

    @property
    def verdict(self) -> Verdict:
        for v in ("bug", "suspicious", "kink"):
            if any(r.verdict == v for r in self.rows):
                return v  # type: ignore[return-value]
        return "ok"

    def __getitem__(self, name: str) -> TensorCheck:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no checked tensor named {name!r}; checked: {[r.name for r in self.rows]}")

    def table(self) -> pd.DataFrame:
        """One row per tensor: name, shape, n_checked, errors, floor, kinks, verdict, worst."""
        import pandas as pd

        return pd.DataFrame(
            [
                {
                    "name": r.name,
                    "shape": r.shape,
                    "n_checked": r.n_checked,
                    "rel_error": r.rel_error,
                    "abs_error": r.abs_error,
                    "numeric_norm": r.numeric_norm,
                    "analytic_norm": r.analytic_norm,
                    "noise_floor": r.noise_floor,
                    "rel_error_smooth": r.rel_error_smooth,
                    "kinks_crossed": r.kinks_crossed,
                    "verdict": r.verdict,
                    "worst": "; ".join(
                        f"{c.where()}: numeric {c.numeric:.6g} analytic {c.analytic:.6g}"
                        for c in r.worst[:3]
                    ),
                }
                for r in self.rows
            ]
        )

    def __str__(self) -> str:
        how = "vectorised" if self.vectorized else "loop"
        lines = [
            f"gradcheck: {self.verdict.upper()}  (mode={self.mode}, eps={self.eps:g}, "
            f"{self.dtype}, {self.n_evaluations} evaluations in {self.seconds:.2f} s, {how})",
            f"overall relative error {self.rel_error:.3e}  (ok <= {self.ok_tol:g}, "
            f"bug > {self.bug_tol:g})",
        ]
        width = max([len(r.name) for r in self.rows] + [6])
        lines.append(
            f"  {'tensor':<{width}}  {'shape':<14} {'checked':>7}  {'rel_error':>9}  "
            f"{'floor':>8}  {'kinks':>5}  verdict"
        )
        for r in self.rows:
            lines.append(
                f"  {r.name:<{width}}  {str(tuple(r.shape)):<14} {r.n_checked:>7}  "
                f"{r.rel_error:>9.2e}  {r.noise_floor:>8.1e}  {r.kinks_crossed:>5}  {r.verdict}"
            )
        for r in self.rows:
            if r.verdict in ("bug", "suspicious"):
                worst = ", ".join(
                    f"{c.where()} numeric {c.numeric:.6g} vs analytic {c.analytic:.6g}"
                    for c in r.worst[:3]
                )
                lines.append(f"{r.verdict} in {r.name}: {worst}")
        if self.fallback_reason:
            lines.append(f"not vectorised: {self.fallback_reason}")
        lines += [f"note: {n}" for n in self.notes]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


# ------------------------------------------------------------------------------ argument checks


def _check_options(
    eps: float,
    dtype: torch.dtype,
    mode: str,
    k: int,
    n_directions: int,
    ok_tol: float,
    bug_tol: float,
    chunk_size: int | None,
    vectorize: object,
) -> None:
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ConfigError(
            f"eps must be a positive finite step, got {eps!r}",
            hint="the usual choice is eps=1e-7 in float64",
        )
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(
            f"dtype must be a floating torch dtype, got {dtype!r}", hint="use torch.float64"
        )
    if mode not in _MODES:
        raise ConfigError(
            f"unknown mode {mode!r}", hint="choose one of: " + ", ".join(repr(m) for m in _MODES)
        )
    if not isinstance(k, int) or k < 1:
        raise ConfigError(f"k must be a positive integer, got {k!r}", hint="e.g. k=32")
    if not isinstance(n_directions, int) or n_directions < 1:
        raise ConfigError(
            f"n_directions must be a positive integer, got {n_directions!r}",
            hint="e.g. n_directions=8",
        )
    if not (0 < ok_tol < bug_tol):
        raise ConfigError(
            f"need 0 < ok_tol < bug_tol, got ok_tol={ok_tol!r}, bug_tol={bug_tol!r}",
            hint="the usual reading is ok_tol=1e-7, bug_tol=1e-3",
        )
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ConfigError(
            f"chunk_size must be a positive integer or None, got {chunk_size!r}",
            hint="leave it None to size chunks from max_memory_mb",
        )
    if vectorize not in ("auto", True, False):
        raise ConfigError(
            f"vectorize must be 'auto', True or False, got {vectorize!r}", hint="use 'auto'"
        )


def _unit_roundoff(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps) / 2.0


def _as_scalar(value: Any, what: str) -> Tensor:
    """A loss value as a 0-d tensor, or a ConfigError saying why it is not a scalar."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ConfigError(
                f"{what} must return a scalar, got a tensor of shape {tuple(value.shape)}",
                hint="reduce it, e.g. with .mean() or .sum()",
            )
        return value.reshape(())
    if isinstance(value, (float, int, np.floating, np.integer)) and not isinstance(value, bool):
        return torch.tensor(float(value), dtype=torch.float64)
    if isinstance(value, np.ndarray):
        if value.size != 1:
            raise ConfigError(
                f"{what} must return a scalar, got an array of shape {value.shape}",
                hint="reduce it, e.g. with .mean() or .sum()",
            )
        return torch.tensor(float(value.reshape(())), dtype=torch.float64)
    raise ConfigError(
        f"{what} must return a scalar number or tensor, got {type(value).__name__}",
        hint="return the loss as a 0-d tensor or a float",
    )


# ----------------------------------------------------------------------------------- evaluators


class _Evaluator:
    """The function under test, seen as J(θ_t + δ) for one tensor t at a time."""

    names: list[str]
    shapes: list[tuple[int, ...]]
    base: list[Tensor]  # flat, in the check dtype
    grads: list[Tensor]  # flat analytic gradients, same dtype
    j0: float
    act_numel: int = 0
    vectorized: bool = False
    fallback_reason: str | None = None
    n_evaluations: int = 0
    has_hooks: bool = False
    fast_used: tuple[str, ...] = ()
    fast_lean: tuple[str, ...] = ()

    def eval_rows(self, t: int, values: Tensor) -> tuple[Tensor, Tensor | None]:
        """J with tensor t set to values[r] (flat) for every row r, and per row the number of
        activation inputs whose kink region differs from the one at θ (or None without hooks)."""
        raise NotImplementedError

    def eval_coords(
        self, t: int, cols: Tensor, eps: float, center: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """J at θ_t + ε e_i (rows 0..c-1) and θ_t − ε e_i (rows c..2c-1) for i in ``cols``: the
        textbook perturbation, every other coordinate bit-identical to θ; with ``center`` a last
        row J(θ), evaluated the same way."""
        return self.eval_rows(t, self._coord_values(t, cols, eps, center))

    def _coord_values(self, t: int, cols: Tensor, eps: float, center: bool = False) -> Tensor:
        base = self.base[t]
        c = cols.numel()
        values = base.repeat(2 * c + int(center), 1)
        ar = torch.arange(c, device=base.device)
        values[ar, cols] = base[cols] + eps
        values[ar + c, cols] = base[cols] - eps
        return values


class _KinkState:
    def __init__(self) -> None:
        self.mode: Literal["off", "record", "compare"] = "off"
        self.base: list[Tensor] = []
        self.counts: list[Tensor] = []
        self.i = 0

    def start(self, mode: Literal["off", "record", "compare"]) -> None:
        self.mode = mode
        self.counts = []
        self.i = 0
        if mode == "record":
            self.base = []

    def total(self, like: Tensor) -> Tensor:
        if not self.counts:
            return torch.zeros((), dtype=torch.int64, device=like.device)
        return torch.stack([c.to(torch.int64) for c in self.counts]).sum()


def _region(x: Tensor, points: Sequence[float]) -> Tensor:
    r = torch.zeros_like(x, dtype=torch.int8)
    for p in points:
        r = r + (x > p).to(torch.int8)
    return r


class _Objective(nn.Module):
    """J(θ) = loss_fn(model(inputs), targets) + regularization(model), as one module so that
    :func:`torch.func.functional_call` swaps the parameters for the regulariser too."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[..., Any],
        regularization: Callable[[nn.Module], Any] | None,
    ) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        self.regularization = regularization

    def forward(self, inputs: Any, targets: Any) -> Tensor:
        if isinstance(inputs, Mapping):
            out = self.model(**inputs)
        elif isinstance(inputs, (tuple, list)):
            out = self.model(*inputs)
        else:
            out = self.model(inputs)
        loss = self.loss_fn(out) if targets is None else self.loss_fn(out, targets)
        j = _as_scalar(loss, "loss_fn")
        if self.regularization is not None:
            j = j + _as_scalar(self.regularization(self.model), "regularization")
        return j


def _convert(obj: Any, dtype: torch.dtype) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().to(dtype) if obj.is_floating_point() else obj.detach()
    if isinstance(obj, Mapping):
        return {key: _convert(v, dtype) for key, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_convert(v, dtype) for v in obj)
    if isinstance(obj, list):
        return [_convert(v, dtype) for v in obj]
    return obj


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


class _ModelEvaluator(_Evaluator):
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
        try:
            clone = copy.deepcopy(model)
        except Exception as e:  # deepcopy of arbitrary user objects can fail in many ways
            raise UnsupportedModelError(
                f"cannot deep-copy the model for checking ({_first_line(e)})",
                hint="make the model copyable (no open files or locks as attributes)",
            ) from e
        clone = clone.to(dtype)
        self.seed = seed
        self.random = True  # reseed until the loss is known not to draw random numbers
        self.cuda = any(p.device.type == "cuda" for p in clone.parameters())
        self.inputs = _convert(inputs, dtype)
        self.targets = _convert(targets, dtype)
        self.obj = _Objective(clone, loss_fn, regularization)
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
        self._setup_modules(clone, random_layers, notes)
        self.buffers = [(b, b.detach().clone()) for b in clone.buffers()]
        self.kink = _KinkState()
        self._hook_handles = self._add_kink_hooks(clone)
        self._fast_state: tuple[nn.Module, str, Tensor, Tensor] | None = None
        self._sparse: list[tuple[nn.Module, Tensor, Tensor, Tensor, Tensor, int]] | None = None
        # Modules whose column-tracked outputs are left as NaN placeholders in this call, and
        # (while validating) the modules whose tracked outputs a patched module picked up.
        self._stub: frozenset[nn.Module] = frozenset()
        self._consumed: set[nn.Module] | None = None
        self.patched: list[nn.Module] = []
        self.fast = self._find_linear_params(clone)  # tensor index -> (module, "weight"/"bias")
        self.fast_ok: dict[int, frozenset[nn.Module] | None] = {}  # None: generic path
        self.has_hooks = bool(self._hook_handles)
        self.want_vmap = vectorize is not False
        self.force_vmap = vectorize is True

        # Analytic gradient (the code under test) and the loss at θ.
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
        # Kink patterns at θ, and the size of the activations (for chunking).
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
        # Does the loss draw random numbers at all? (torch.manual_seed costs milliseconds, so
        # reseed before every evaluation only if it does.)
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
        self.n_evaluations = 4

    # -- set-up ---------------------------------------------------------------------------------
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
        slow, slow_ks = self._loop(t, self._coord_values(t, cols, eps))
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

    def eval_coords(
        self, t: int, cols: Tensor, eps: float, center: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        if self.want_vmap:
            self._try_vmap(t)
        if self.vectorized and t in self.fast:
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

    def _loop(self, t: int, values: Tensor) -> tuple[Tensor, Tensor | None]:
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

    def _vmapped(self, t: int, values: Tensor) -> tuple[Tensor, Tensor]:
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

    def _try_vmap(self, t: int) -> None:
        """Decide once whether vmap can run this model, by checking that it reproduces J(θ)."""
        self.want_vmap = False
        try:
            js, _ = self._vmapped(t, self.base[t].expand(2, -1))
        except Exception as e:  # any failure to batch means: use the loop
            if self.force_vmap:
                raise UnsupportedModelError(
                    f"vectorize=True but torch.func.vmap cannot run this model "
                    f"({_first_line(e)})",
                    hint="use vectorize='auto' to fall back to a loop",
                ) from e
            self.fallback_reason = f"torch.func.vmap cannot run the model ({_first_line(e)})"
            return
        tol = 1e4 * _unit_roundoff(self.base[t].dtype) * max(abs(self.j0), 1e-300)
        if float((js - self.j0).abs().max()) > tol:
            self.fallback_reason = (
                f"the vmapped evaluation gives J={float(js[0])!r} at the unperturbed point "
                f"instead of {self.j0!r} (a random layer that draws differently under vmap?)"
            )
            return
        self.vectorized = True

    def eval_rows(self, t: int, values: Tensor) -> tuple[Tensor, Tensor | None]:
        if self.want_vmap:
            self._try_vmap(t)
        if self.vectorized:
            try:
                return self._vmapped(t, values)
            except Exception as e:  # e.g. control flow on one tensor's values only
                if self.force_vmap:
                    raise
                self.vectorized = False
                self.fallback_reason = (
                    f"torch.func.vmap cannot run the model when {self.names[t]} is perturbed "
                    f"({_first_line(e)})"
                )
        return self._loop(t, values)

    def close(self) -> None:
        for h in self._hook_handles:
            h.remove()
        for m in self.patched:
            vars(m).pop("forward", None)


ParamsLike = Mapping[str, Any] | Sequence[Any]


class _FunctionEvaluator(_Evaluator):
    def __init__(
        self,
        f: Callable[[Any], Any],
        params: ParamsLike,
        claimed_grads: ParamsLike,
        *,
        dtype: torch.dtype,
        vectorize: bool | Literal["auto"],
    ) -> None:
        if not callable(f):
            raise ConfigError(f"f must be callable, got {type(f).__name__}", hint="pass f(params)")
        self.is_dict = isinstance(params, Mapping)
        if self.is_dict:
            assert isinstance(params, Mapping)
            if not isinstance(claimed_grads, Mapping):
                raise ConfigError(
                    "params is a dict but claimed_grads is not",
                    hint="pass claimed_grads as a dict with the same keys as params",
                )
            missing = [key for key in params if key not in claimed_grads]
            extra = [key for key in claimed_grads if key not in params]
            if missing or extra:
                raise ConfigError(
                    f"claimed_grads keys do not match params: missing {missing}, extra {extra}",
                    hint="give one gradient per parameter, under the same key",
                )
            self.names = [str(key) for key in params]
            self.keys: list[Any] = list(params)
            values = [params[key] for key in self.keys]
            claimed = [claimed_grads[key] for key in self.keys]
        elif isinstance(params, Sequence) and not isinstance(params, (str, bytes)):
            if not isinstance(claimed_grads, Sequence) or isinstance(claimed_grads, Mapping):
                raise ConfigError(
                    "params is a list but claimed_grads is not",
                    hint="pass claimed_grads as a list in the same order as params",
                )
            if len(claimed_grads) != len(params):
                raise ConfigError(
                    f"got {len(params)} params but {len(claimed_grads)} claimed gradients",
                    hint="give one gradient per parameter, in the same order",
                )
            self.names = [f"params[{i}]" for i in range(len(params))]
            self.keys = list(range(len(params)))
            values, claimed = list(params), list(claimed_grads)
        else:
            raise ConfigError(
                f"params must be a dict or list of tensors/arrays, got {type(params).__name__}",
                hint="e.g. gradcheck_fn(f, {'W1': W1, 'b1': b1}, {'W1': dW1, 'b1': db1})",
            )
        if not values:
            raise ConfigError("params is empty, nothing to check", hint="pass the parameters")
        self.f = f
        self.np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
        self.is_numpy: list[bool] = []
        self.shapes, self.base, self.grads = [], [], []
        for name, v, g in zip(self.names, values, claimed):
            tv, is_np = self._tensor(v, name, "params", dtype)
            tg, _ = self._tensor(g, name, "claimed_grads", dtype)
            if tuple(tg.shape) != tuple(tv.shape):
                raise ConfigError(
                    f"claimed gradient of {name} has shape {tuple(tg.shape)} but the parameter "
                    f"has shape {tuple(tv.shape)}",
                    hint="a gradient has exactly the shape of its parameter "
                    "(check transposes and reductions over the batch)",
                )
            if not torch.isfinite(tg).all():
                raise NonFiniteError(
                    f"the claimed gradient of {name} has non-finite values",
                    hint="check the backward pass that computes it",
                )
            self.is_numpy.append(is_np)
            self.shapes.append(tuple(tv.shape))
            self.base.append(tv.reshape(-1))
            self.grads.append(tg.reshape(-1).to(tv.device))
        self.want_vmap = vectorize is not False and not any(self.is_numpy)
        self.force_vmap = vectorize is True
        if self.force_vmap and any(self.is_numpy):
            raise ConfigError(
                "vectorize=True needs torch tensors; NumPy functions are evaluated in a loop",
                hint="use vectorize='auto'",
            )
        self.j0 = self._call(self._args(None, None))
        if not math.isfinite(self.j0):
            raise NonFiniteError(f"f(params) is {self.j0}", hint="check f and the parameters")
        self.n_evaluations = 1

    @staticmethod
    def _tensor(v: Any, name: str, what: str, dtype: torch.dtype) -> tuple[Tensor, bool]:
        if isinstance(v, Tensor):
            if not (v.is_floating_point() or v.is_complex()) and what == "params":
                raise ConfigError(
                    f"{what}[{name!r}] has dtype {v.dtype}; only floating parameters have "
                    f"gradients", hint="convert it with .double()",
                )
            return v.detach().to(dtype).clone(), False
        try:
            a = np.asarray(v)
        except Exception as e:  # not array-like at all
            raise ConfigError(
                f"{what}[{name!r}] is a {type(v).__name__}, not a tensor or array",
                hint="pass torch tensors or NumPy arrays",
            ) from e
        if a.dtype.kind not in "fiu" or (what == "params" and a.dtype.kind != "f"):
            raise ConfigError(
                f"{what}[{name!r}] has dtype {a.dtype}; expected floating values",
                hint="convert it with .astype(np.float64)",
            )
        return torch.from_numpy(np.array(a, dtype=np.float64)).to(dtype), True

    def _args(self, t: int | None, value: Tensor | None) -> Any:
        out = []
        for i, (b, shape, is_np) in enumerate(zip(self.base, self.shapes, self.is_numpy)):
            v = value if (t == i and value is not None) else b
            v = v.reshape(shape)
            out.append(v.detach().cpu().numpy().astype(self.np_dtype, copy=True) if is_np
                       else v.clone())
        if self.is_dict:
            return dict(zip(self.keys, out))
        return out

    def _call(self, args: Any) -> float:
        with torch.no_grad():
            j = _as_scalar(self.f(args), "f")
        return float(j)

    def _vmapped(self, t: int, values: Tensor) -> Tensor:
        def one(v: Tensor) -> Tensor:
            vals: list[Tensor] = [
                (v if i == t else b).reshape(s)
                for i, (b, s) in enumerate(zip(self.base, self.shapes))
            ]
            args = dict(zip(self.keys, vals)) if self.is_dict else vals
            return _as_scalar(self.f(args), "f")

        with torch.no_grad():
            js = torch.func.vmap(one)(values)
        self.n_evaluations += values.shape[0]
        return js.detach().to(torch.float64).cpu()

    def eval_rows(self, t: int, values: Tensor) -> tuple[Tensor, Tensor | None]:
        if self.want_vmap:
            self.want_vmap = False
            try:
                js = self._vmapped(t, self.base[t].expand(2, -1))
                tol = 1e4 * _unit_roundoff(values.dtype) * max(abs(self.j0), 1e-300)
                if float((js - self.j0).abs().max()) <= tol:
                    self.vectorized = True
                else:
                    self.fallback_reason = "vmapped f disagrees with f at the unperturbed point"
            except ConfigError:
                raise
            except Exception as e:  # any failure to batch means: use the loop
                if self.force_vmap:
                    raise UnsupportedModelError(
                        f"vectorize=True but torch.func.vmap cannot run f ({_first_line(e)})",
                        hint="use vectorize='auto' to fall back to a loop",
                    ) from e
                self.fallback_reason = f"torch.func.vmap cannot run f ({_first_line(e)})"
        if self.vectorized:
            return self._vmapped(t, values), None
        js = torch.empty(values.shape[0], dtype=torch.float64)
        for r in range(values.shape[0]):
            js[r] = self._call(self._args(t, values[r]))
        self.n_evaluations += values.shape[0]
        return js, None

    def close(self) -> None:
        pass


# ------------------------------------------------------------------------------------ the engine


def _rel(a: Tensor, b: Tensor) -> float:
    num = float(torch.linalg.vector_norm(a - b))
    den = float(torch.linalg.vector_norm(a)) + float(torch.linalg.vector_norm(b))
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def _verdict(rel: float, floor: float, ok_tol: float, bug_tol: float, resolvable: bool) -> Verdict:
    """ok ≤ max(ok_tol, roundoff floor) < suspicious ≤ max(bug_tol, 10·floor) < bug.

    When the dtype and ε cannot resolve the gradient at all (``resolvable`` false) an error
    above ``ok_tol`` that roundoff could explain reads "suspicious", never "ok"."""
    if rel <= ok_tol or (resolvable and rel <= floor):
        return "ok"
    if rel > max(bug_tol, 10.0 * floor):
        return "bug"
    return "suspicious"


def _run(
    ev: _Evaluator,
    *,
    eps: float,
    mode: Mode,
    k: int,
    n_directions: int,
    seed: int,
    ok_tol: float,
    bug_tol: float,
    chunk_size: int | None,
    max_memory_mb: float,
    n_worst: int,
    dtype: torch.dtype,
    notes: list[str],
    warnings: list[str],
    started: float,
) -> GradCheckReport:
    u = _unit_roundoff(dtype)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    resolvable = _precision_check(ev, eps, dtype, bug_tol, warnings)
    rows: list[TensorCheck] = []
    all_num: list[Tensor] = []
    all_ana: list[Tensor] = []
    for t, (name, shape, base, grad) in enumerate(zip(ev.names, ev.shapes, ev.base, ev.grads)):
        n = base.numel()
        gen = torch.Generator().manual_seed(seed * 1_000_003 + t)
        idx: Tensor | None
        if mode == "full":
            m, idx = n, torch.arange(n)
        elif mode == "sample":
            m = min(k, n)
            idx = torch.randperm(n, generator=gen)[:m].sort().values
        else:
            m, idx = n_directions, None
        per_row = 2 * (n + ev.act_numel) * itemsize * 3
        # Coordinates per vectorised call: within max_memory_mb, and at most _MAX_CHUNK (past a
        # few hundred the per-call overhead is amortised and bigger batches only spill caches),
        # split evenly so that no call is a small remainder.
        chunk = chunk_size or int(max(1, min(_MAX_CHUNK, max_memory_mb * 2**20 // max(per_row, 1))))
        if chunk_size is None:
            chunk = -(-m // -(-m // chunk))
        num, ana, fwd, bwd, jscale = (torch.empty(m, dtype=torch.float64) for _ in range(5))
        hook_crossed = torch.zeros(m, dtype=torch.bool)
        j0 = 0.0
        for a in range(0, m, chunk):
            b = min(m, a + chunk)
            c = b - a
            # The first call also evaluates J(θ) (last row) through the same path as the
            # perturbed values, for the one-sided differences.
            center = a == 0
            if idx is not None:
                cols = idx[a:b].to(base.device)
                analytic = grad[cols].to(torch.float64).cpu()
                js, ks = ev.eval_coords(t, cols, eps, center=center)
            else:
                dirs = torch.randn(c, n, generator=gen, dtype=torch.float64)
                dirs = dirs / torch.linalg.vector_norm(dirs, dim=1, keepdim=True)
                dirs = dirs.to(device=base.device, dtype=base.dtype)
                analytic = (dirs @ grad).to(torch.float64).cpu()
                batch = [base + eps * dirs, base - eps * dirs] + ([base[None]] if center else [])
                js, ks = ev.eval_rows(t, torch.cat(batch))
                del dirs
            if center:
                j0 = float(js[2 * c])
            jp, jm = js[:c], js[c : 2 * c]
            finite = torch.isfinite(jp) & torch.isfinite(jm)
            if not bool(finite.all()):
                bad = int((~finite).nonzero()[0, 0]) + a
                where = (
                    f"direction {bad}" if idx is None
                    else str([int(i) for i in np.unravel_index(int(idx[bad]), shape)])
                )
                raise NonFiniteError(
                    f"the loss is not finite at {name} {where} moved by ±{eps:g}",
                    hint="use a smaller eps, or inputs away from a singularity (log 0, 1/0)",
                )
            num[a:b] = (jp - jm) / (2.0 * eps)
            ana[a:b] = analytic
            fwd[a:b] = (jp - j0) / eps
            bwd[a:b] = (j0 - jm) / eps
            jscale[a:b] = torch.maximum(jp.abs(), jm.abs()).clamp_min(abs(j0))
            if ks is not None:
                hook_crossed[a:b] = (ks[:c] > 0) | (ks[c : 2 * c] > 0)
        # Roundoff of one centred difference: two evaluations, each ≈ _NOISE_SAFETY·u·|J|.
        noise = _NOISE_SAFETY * u * jscale / eps
        err = (num - ana).abs()
        split = (fwd - bwd).abs()
        # A kink crossed on one side: the one-sided slopes disagree by far more than roundoff
        # and the centred error is about half that disagreement (curvature, by contrast, makes
        # split = ε·J'' with a centred error of O(ε²)).
        onesided = (split > 2.0 * noise) & (err > noise) & (err >= 0.3 * split)
        crossed = hook_crossed | onesided
        explained = crossed & (err <= _KINK_SHARE * split + noise)
        den = float(torch.linalg.vector_norm(num)) + float(torch.linalg.vector_norm(ana))
        noise_norm = float(torch.linalg.vector_norm(noise))
        floor = noise_norm / den if den > 0 else 0.0
        rel = _rel(num, ana)
        verdict = _verdict(rel, floor, ok_tol, bug_tol, resolvable)
        keep = ~explained
        rel_smooth = _rel(num[keep], ana[keep])
        if verdict != "ok" and bool(explained.any()):
            den_s = float(torch.linalg.vector_norm(num[keep])) + float(
                torch.linalg.vector_norm(ana[keep])
            )
            floor_s = float(torch.linalg.vector_norm(noise[keep])) / den_s if den_s > 0 else 0.0
            smooth = _verdict(rel_smooth, floor_s, ok_tol, bug_tol, resolvable)
            verdict = "kink" if smooth == "ok" else smooth
        order = torch.argsort(err, descending=True)[:n_worst]
        worst = tuple(
            CoordinateCheck(
                index=None if idx is None
                else tuple(int(i) for i in np.unravel_index(int(idx[j]), shape)),
                direction=int(j) if idx is None else None,
                numeric=float(num[j]),
                analytic=float(ana[j]),
                abs_error=float(err[j]),
                kink=bool(explained[j]),
            )
            for j in order.tolist()
        )
        rows.append(
            TensorCheck(
                name=name,
                shape=tuple(shape),
                n_checked=m,
                rel_error=rel,
                abs_error=float(torch.linalg.vector_norm(num - ana)),
                numeric_norm=float(torch.linalg.vector_norm(num)),
                analytic_norm=float(torch.linalg.vector_norm(ana)),
                noise_floor=floor,
                rel_error_smooth=rel_smooth,
                kinks_crossed=int(crossed.sum()),
                verdict=verdict,
                worst=worst,
            )
        )
        if resolvable and floor > 0.1 * bug_tol:
            if float(torch.linalg.vector_norm(ana)) <= noise_norm:
                warnings.append(
                    f"{name}: the gradient is zero to within roundoff (analytic norm "
                    f"{float(torch.linalg.vector_norm(ana)):.1e}, numeric norm "
                    f"{float(torch.linalg.vector_norm(num)):.1e}, roundoff ≈ {noise_norm:.1e}); "
                    f"its relative error is not meaningful"
                )
            else:
                warnings.append(
                    f"{name}: roundoff alone can give a relative error of {floor:.1e} here "
                    f"(|J| ≈ {float(jscale.max()):.3g} against a gradient norm of "
                    f"{den / 2:.3g}); a small error in this tensor cannot be told from noise"
                )
        all_num.append(num)
        all_ana.append(ana)
    if ev.fast_used:
        notes.append(
            f"coordinates of {', '.join(ev.fast_used)} (nn.Linear) perturbed as rank-1 updates of "
            f"the layer output, propagated column-wise through elementwise activations "
            f"(checked against full perturbed forward passes first)"
        )
    if ev.fast_lean:
        notes.append(
            f"for {', '.join(ev.fast_lean)}, layer outputs that differ from θ in one column and "
            f"are read only by such layers were left unmaterialised (NaN placeholders; checked "
            f"against full perturbed forward passes first)"
        )
    return GradCheckReport(
        rows=tuple(rows),
        rel_error=_rel(torch.cat(all_num), torch.cat(all_ana)),
        mode=mode,
        eps=float(eps),
        dtype=str(dtype).replace("torch.", ""),
        ok_tol=ok_tol,
        bug_tol=bug_tol,
        n_evaluations=ev.n_evaluations,
        seconds=time.perf_counter() - started,
        vectorized=ev.vectorized,
        fallback_reason=ev.fallback_reason,
        notes=tuple(notes),
        warnings=tuple(warnings),
    )


def _precision_check(
    ev: _Evaluator, eps: float, dtype: torch.dtype, bug_tol: float, warnings: list[str]
) -> bool:
    """Whether roundoff ``u·|J|/ε`` is small against the gradient's typical coordinate.

    If it is not, no error below the roundoff can be read as "ok" (a warning says why)."""
    u = _unit_roundoff(dtype)
    g = torch.cat([x.to(torch.float64).cpu() for x in ev.grads])
    rms = float(torch.linalg.vector_norm(g)) / math.sqrt(max(g.numel(), 1))
    roundoff = _NOISE_SAFETY * u * max(abs(ev.j0), 1e-300) / eps
    if rms > 0.0 and roundoff / rms <= 0.1 * bug_tol:
        return True
    best = float(torch.finfo(dtype).eps) ** (1.0 / 3.0)
    warnings.append(
        f"{str(dtype).replace('torch.', '')} with eps={eps:g} cannot give a meaningful answer: "
        f"each difference carries roundoff ≈ machine_eps·|J|/eps ≈ {roundoff:.1e} (|J| = "
        f"{abs(ev.j0):.3g}) against a typical gradient coordinate of {rms:.1e}; use "
        f"dtype=torch.float64 (the default) or a larger step, eps ≈ {best:.0e} "
        f"(≈ machine_eps^(1/3), the step that balances roundoff against truncation error)"
    )
    return False


# ------------------------------------------------------------------------------------ public API


def gradcheck(
    model: nn.Module,
    loss_fn: Callable[..., Any],
    inputs: Any,
    targets: Any = None,
    *,
    eps: float = 1e-7,
    dtype: torch.dtype = torch.float64,
    mode: Mode = "full",
    k: int = 32,
    n_directions: int = 8,
    seed: int = 0,
    ok_tol: float = 1e-7,
    bug_tol: float = 1e-3,
    regularization: Callable[[nn.Module], Any] | None = None,
    random_layers: RandomLayers = "reseed",
    vectorize: bool | Literal["auto"] = "auto",
    chunk_size: int | None = None,
    max_memory_mb: float = 256.0,
    n_worst: int = 5,
) -> GradCheckReport:
    """Check the gradient of ``J = loss_fn(model(inputs), targets) + regularization(model)``.

    The model is deep-copied and cast to ``dtype`` (float64 by default); the user's model, its
    buffers and torch's RNG state are left exactly as they were. ``inputs`` is passed as
    ``model(*inputs)`` when it is a tuple or list, ``model(**inputs)`` when a dict, else
    ``model(inputs)``; ``targets=None`` calls ``loss_fn(output)``. Every parameter that requires
    grad is checked, tied parameters once.

    Args:
        eps: the step ε of the centred difference ``(J(θ+εe_i) − J(θ−εe_i)) / 2ε``.
        dtype: precision of the check; float32 with a small ε gives a warning, not a verdict.
        mode: ``"full"`` (every coordinate), ``"sample"`` (``k`` random coordinates per tensor),
            ``"directional"`` (``n_directions`` random unit directions per tensor).
        seed: seeds the sampled coordinates and directions, and torch's RNG before every
            evaluation (so dropout/RReLU draw the same masks each time).
        ok_tol, bug_tol: relative error ≤ ``ok_tol`` reads ``"ok"``, > ``bug_tol`` ``"bug"``,
            in between ``"suspicious"``. Where roundoff (``u·|J|/ε``) alone can exceed ``ok_tol``
            the ok bound rises to that floor, and a bug must exceed ten times the floor.
        regularization: ``callable(model) -> scalar`` added to the loss (an L2 term, say); it
            sees the perturbed parameters.
        random_layers: ``"reseed"`` keeps Dropout/RReLU in training mode and reseeds torch's RNG
            identically before every evaluation; ``"eval"`` puts those layers in eval mode.
        vectorize: ``"auto"`` batches the perturbed forward passes with ``torch.func.vmap`` and
            falls back to a loop where vmap cannot run; ``True`` requires vmap; ``False`` loops.
        chunk_size, max_memory_mb: perturbations per vmapped call (default: sized so that one
            call stays within ``max_memory_mb``).
        n_worst: how many worst coordinates (or directions) each row keeps.

    Note:
        BatchNorm in training mode normalises with batch statistics, which depend on every
        example and parameter upstream; the check perturbs the whole batch's forward pass, so
        that dependence is part of ``J`` as it should be. Running statistics are not updated.

    Example:
        >>> import torch, gradprobe as gp
        >>> _ = torch.manual_seed(0)
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        >>> rep = gp.gradcheck(net, torch.nn.functional.mse_loss, torch.randn(16, 4),
        ...                    torch.randn(16, 1), mode="sample", k=8)
        >>> rep.ok
        True
    """
    started = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model must be a torch.nn.Module, got {type(model).__name__}",
            hint="for a plain function of tensors or arrays use gp.gradcheck_fn",
        )
    if not callable(loss_fn):
        raise ConfigError(
            f"loss_fn must be callable, got {type(loss_fn).__name__}",
            hint="e.g. torch.nn.functional.mse_loss",
        )
    if regularization is not None and not callable(regularization):
        raise ConfigError(
            f"regularization must be callable(model) -> scalar, got "
            f"{type(regularization).__name__}",
            hint="e.g. lambda m: 1e-3 * sum((p**2).sum() for p in m.parameters())",
        )
    if random_layers not in ("reseed", "eval"):
        raise ConfigError(
            f"unknown random_layers {random_layers!r}", hint="choose 'reseed' or 'eval'"
        )
    _check_options(eps, dtype, mode, k, n_directions, ok_tol, bug_tol, chunk_size, vectorize)
    notes: list[str] = []
    warnings: list[str] = []
    devices = sorted(
        {p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"}
    )
    with torch.random.fork_rng(devices=devices):
        ev = _ModelEvaluator(
            model, loss_fn, inputs, targets, dtype=dtype, regularization=regularization,
            random_layers=random_layers, seed=seed, vectorize=vectorize, notes=notes,
            warnings=warnings,
        )
        try:
            return _run(
                ev, eps=eps, mode=mode, k=k, n_directions=n_directions, seed=seed,
                ok_tol=ok_tol, bug_tol=bug_tol, chunk_size=chunk_size,
                max_memory_mb=max_memory_mb, n_worst=n_worst, dtype=dtype, notes=notes,
                warnings=warnings, started=started,
            )
        finally:
            ev.close()


def gradcheck_fn(
    f: Callable[[Any], Any],
    params: ParamsLike,
    claimed_grads: ParamsLike,
    *,
    eps: float = 1e-7,
    dtype: torch.dtype = torch.float64,
    mode: Mode = "full",
    k: int = 32,
    n_directions: int = 8,
    seed: int = 0,
    ok_tol: float = 1e-7,
    bug_tol: float = 1e-3,
    vectorize: bool | Literal["auto"] = "auto",
    chunk_size: int | None = None,
    max_memory_mb: float = 256.0,
    n_worst: int = 5,
) -> GradCheckReport:
    """Check ``claimed_grads`` against centred differences of a scalar function ``f(params)``.

    ``params`` is a dict (rows are named by its keys) or a list (``params[i]``) of torch tensors
    or NumPy arrays; ``f`` receives the same container with the same kinds of values (fresh
    copies in ``dtype`` at every call, so it may not rely on mutating them) and returns a scalar.
    ``claimed_grads`` has the same structure and shapes: typically the output of a hand-written
    backward pass. Functions of tensors are batched with ``torch.func.vmap`` when possible;
    NumPy functions run in a loop. Kinks are found from one-sided differences. Options as in
    :func:`gradcheck`.

    Example:
        >>> import numpy as np, gradprobe as gp
        >>> x = np.array([1.0, -2.0, 3.0])
        >>> f = lambda p: float(np.sum((p["w"] * x) ** 2))
        >>> w = np.array([0.5, 1.5, -1.0])
        >>> gp.gradcheck_fn(f, {"w": w}, {"w": 2 * w * x**2}).ok
        True
        >>> gp.gradcheck_fn(f, {"w": w}, {"w": w * x**2}).failed   # forgot the factor 2
        ['w']
    """
    started = time.perf_counter()
    _check_options(eps, dtype, mode, k, n_directions, ok_tol, bug_tol, chunk_size, vectorize)
    notes: list[str] = []
    warnings: list[str] = []
    ev = _FunctionEvaluator(f, params, claimed_grads, dtype=dtype, vectorize=vectorize)
    return _run(
        ev, eps=eps, mode=mode, k=k, n_directions=n_directions, seed=seed, ok_tol=ok_tol,
        bug_tol=bug_tol, chunk_size=chunk_size, max_memory_mb=max_memory_mb, n_worst=n_worst,
        dtype=dtype, notes=notes, warnings=warnings, started=started,
    )


__all__ = ["CoordinateCheck", "GradCheckReport", "TensorCheck", "gradcheck", "gradcheck_fn"]
