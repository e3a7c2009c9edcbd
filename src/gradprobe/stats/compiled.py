"""Compiled one-pass statistics of large tensors (``torch.compile`` / inductor).

The eager statistics of :mod:`gradprobe.stats` cost about six reductions per tensor; on CPU they
are bound by arithmetic, not by memory. The kernels here compute every field of a statistics
vector in **one pass**, with exact ``nonzero`` and ``nonfinite`` counts:

* :func:`rows` -- ``[len(ts), N_STATS]`` statistics of large tensors, the layout of
  :func:`gradprobe.stats.eager.tensor_stats` (``dead`` and ``ref_sumsq`` 0), with an activation's
  saturation rule (:mod:`gradprobe.activations`) fused in;
* :func:`weight_stats` -- the statistics of a weight tensor ``W`` together with
  ``Σ (W − W_prev)²`` and ``Σ (W − W0)²`` from the same pass over ``W``, so the update ratio and
  the drift write no difference tensor.

Shapes. A flat tensor of ``n ≥ 3·CHUNK`` elements is viewed as ``[r, CHUNK]`` rows
(``r = n // CHUNK − 1 ≥ 2``, marked dynamic) plus a tail of ``CHUNK ≤ t < 2·CHUNK`` elements
(dynamic too; neither is ever 0 or 1, sizes dynamo would specialise on): one compiled graph per
variant serves every size, and its inner loop has a static trip count the compiler vectorises
(a dynamic flat 1-D reduction ran about 2x slower). Rows are reduced in ``float32``
(``float64`` for ``float64`` input), half precision is upcast inside the kernel, and the row
results are summed in ``float64``: the accumulation error is that of 1024-element float32 sums.
Counts are summed per row as float32 (exact: at most 1024 per row) and across rows in float64
(exact below 2^53).

Availability. A kernel compiles on first use per (kind, device type, dtype, saturation rule);
the first use then runs it on a small known tensor and compares with the eager statistics.
The mode is an attribute of a :class:`CompiledKernels` object, which also holds the compiled
kernels and the reason of an earlier fallback. The process-wide instance :data:`KERNELS` (its
mode initialised from the environment variable ``GRADPROBE_FUSED``) is the one the Probe uses:
compiled graphs are per process anyway. Its mode selects:

* ``"off"`` (default; ``GRADPROBE_FUSED=0`` or ``off``): eager only. Compiling costs 6-15 s
  in the first recorded step and needs a working compiler, for a gain of 5-10 % of the step
  time on the CPU workloads measured (docs/probe.md): worth it for long runs, not by default;
* ``"auto"`` (``GRADPROBE_FUSED=auto``): the compiled path for tensors of at least
  :data:`MIN_NUMEL` elements, where the check passed; on any exception or mismatch the process
  falls back to eager and one warning says why;
* ``"on"`` (``GRADPROBE_FUSED=1``): the compiled path for every tensor of at least
  ``3·CHUNK`` elements, errors raised.

The compiled path is never used while dynamo is tracing (``torch.compiler.is_compiling()``, a
Probe inside a compiled model) or for tensors that require grad.

Example
    >>> import torch
    >>> from gradprobe.stats.compiled import CompiledKernels
    >>> kernels = CompiledKernels("off")
    >>> x = torch.randn(100_000)
    >>> kernels.usable(x)
    False
"""

from __future__ import annotations

import contextlib
import os
import types
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from gradprobe.errors import ConfigError
from gradprobe.stats import eager as S
from gradprobe.stats.schema import ordered

Mode = Literal["auto", "on", "off"]

CHUNK = 1024
"""Static inner dimension of the compiled reductions (elements per row)."""

MIN_NUMEL = 1 << 16
"""In ``"auto"`` mode, tensors with fewer elements stay on the eager path: a compiled call costs
about 70-100 µs of Python (dynamo's guards, the wrapper) on CPU, which the one-pass kernel earns
back only from about this size (benchmarks/fused_kernels.py: 0.96x at 65536 elements for the
statistics, 1.2x for the weight kernel, 1.2x and 1.8x at 262144)."""

FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def mode_from_env() -> Mode:
    """The mode named by ``GRADPROBE_FUSED`` (an unknown value warns and gives ``"off"``)."""
    v = os.environ.get("GRADPROBE_FUSED", "").strip().lower()
    if v == "auto":
        return "auto"
    if v in ("1", "on", "true", "yes"):
        return "on"
    if v not in ("", "0", "off", "false", "no"):
        warnings.warn(f"GRADPROBE_FUSED={v!r} is not a known value: the compiled kernels stay "
                      "off. Use auto, 1 (on) or 0 (off).", RuntimeWarning, stacklevel=2)
    return "off"


# ----------------------------------------------------------------------------------- kernels


def _split(x: Tensor) -> tuple[Tensor, Tensor]:
    """``[r, CHUNK]`` rows and a tail of ``CHUNK`` to ``2·CHUNK − 1`` elements of flat ``x``."""
    f = x.reshape(-1)
    r = f.numel() // CHUNK - 1
    return f[: r * CHUNK].view(r, CHUNK), f[r * CHUNK:]


def _reduce(m: Tensor, dim: int, sat: Callable[[Tensor], Tensor] | None) -> list[Tensor]:
    """Sum, Σx², Σ|x|, non-zero and non-finite counts, saturated count, min, max along ``dim``
    (inside the compiled graph: one loop over the elements)."""
    x = m if m.dtype == torch.float64 else m.float()
    one = x.dtype
    nonfinite = ~torch.isfinite(x)  # not (x * 0 != 0): the compiler folds x * 0 to 0
    out = [
        x.sum(dim), (x * x).sum(dim), x.abs().sum(dim), (x != 0).to(one).sum(dim),
        nonfinite.to(one).sum(dim),
        sat(x).to(one).sum(dim) if sat is not None else None,
        x.amin(dim), x.amax(dim),
    ]
    return [t for t in out if t is not None]


def _combine(a: list[Tensor], b: list[Tensor], has_sat: bool) -> Tensor:
    """The ``[N_STATS]`` float64 vector from the row results ``a`` and the tail's ``b``."""
    f64 = torch.float64
    n_add = 6 if has_sat else 5
    add = [ra.to(f64).sum() + rb.to(f64) for ra, rb in zip(a[:n_add], b[:n_add])]
    mn = torch.minimum(a[n_add].amin(), b[n_add]).to(f64)
    mx = torch.maximum(a[n_add + 1].amax(), b[n_add + 1]).to(f64)
    zero = torch.zeros((), dtype=f64, device=mn.device)
    return torch.stack(ordered(
        zero, zero, sum=add[0], sumsq=add[1], abs_sum=add[2], nonzero=add[3], nonfinite=add[4],
        saturated=add[5] if has_sat else zero, neg_min=-mn, max=mx))


def _make_stats_body(sat: Callable[[Tensor], Tensor] | None) -> Callable[..., Tensor]:
    def stats_body(m: Tensor, t: Tensor) -> Tensor:
        return _combine(_reduce(m, 1, sat), _reduce(t, 0, sat), sat is not None)
    return stats_body


def _diff_sq(a: Tensor, b: Tensor, dim: int) -> Tensor:
    d = (a if a.dtype == torch.float64 else a.float()) - (b if b.dtype == torch.float64
                                                          else b.float())
    return (d * d).sum(dim).to(torch.float64)


def _weight_body(m: Tensor, t: Tensor, pm: Tensor, pt: Tensor, im: Tensor, it: Tensor
                 ) -> Tensor:
    vec = _combine(_reduce(m, 1, None), _reduce(t, 0, None), False)
    up = _diff_sq(m, pm, 1).sum() + _diff_sq(t, pt, 0)
    dr = _diff_sq(m, im, 1).sum() + _diff_sq(t, it, 0)
    return torch.cat([vec, up.reshape(1), dr.reshape(1)])


def _own_code(fn: Callable[..., Tensor], name: str) -> Callable[..., Tensor]:
    """A copy of ``fn`` with its own code object: dynamo keeps compiled graphs, and counts
    recompilations against its limit, per code object, so each variant gets its own."""
    code = fn.__code__.replace(co_name=name)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__,  # type: ignore[return-value]
                              fn.__closure__)


def _compile(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``torch.compile`` (inductor, static shapes except the dims marked dynamic); the tests
    replace this to simulate a platform where compilation fails."""
    return torch.compile(fn, dynamic=False, fullgraph=True)  # type: ignore[return-value]


def _check_tensor(dtype: torch.dtype, device: torch.device) -> list[Tensor]:
    """Known inputs for the first-use check: small integers (every float32 sum exact, so the
    compiled and eager results must agree bit for bit), a tail, and a copy with NaN and Inf."""
    n = 3 * CHUNK + 7
    x = (torch.arange(n, dtype=torch.float64) * 7 % 9 - 4).to(dtype=dtype, device=device)
    y = x.clone()
    y[5], y[n - 3] = float("nan"), float("inf")
    return [x, y]


def _eager_row(x: Tensor, sat: Callable[[Tensor], Tensor] | None) -> Tensor:
    xf = S.as_float(x)
    return S.fix_nonfinite_([xf], S.chunked_stats([xf], sat))[0]


def _plain(device_type: str) -> contextlib.AbstractContextManager[Any]:
    """No autograd and no autocast around a compiled call: dynamo guards on both (a hook under
    AMP would otherwise compile a second graph)."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.no_grad())
    if torch.is_autocast_enabled(device_type):
        stack.enter_context(torch.autocast(device_type, enabled=False))
    return stack


class CompiledKernels:
    """The compiled statistics kernels of one process: the mode, the kernels compiled so far
    and why ``"auto"`` fell back to eager (``broken``). ``compile`` is the compiler
    (``torch.compile``; tests replace it to simulate a platform where compilation fails)."""

    def __init__(self, mode: Mode = "off") -> None:
        self.mode: Mode = "off"
        self.kernels: dict[tuple[Any, ...], Callable[..., Tensor]] = {}
        self.broken: str | None = None
        self.compile: Callable[[Callable[..., Tensor]], Callable[..., Tensor]] = _compile
        self.set_mode(mode)

    @classmethod
    def from_env(cls) -> CompiledKernels:
        """Kernels in the mode that ``GRADPROBE_FUSED`` names."""
        return cls(mode_from_env())

    def set_mode(self, value: Mode) -> None:
        """Select ``"auto"``, ``"on"`` or ``"off"`` (and forget an earlier fallback, so that
        ``"auto"`` tries to compile again)."""
        if value not in ("auto", "on", "off"):
            raise ConfigError(f"fused mode must be 'auto', 'on' or 'off', not {value!r}",
                              hint='e.g. gradprobe.stats.compiled.KERNELS.set_mode("auto")')
        self.mode = value
        self.broken = None

    def usable(self, x: Tensor) -> bool:
        """True where the compiled path should summarise ``x`` (mode, size, dtype, not tracing,
        no autograd, no earlier fallback)."""
        if self.mode == "off" or self.broken is not None:
            return False
        n = x.numel()
        if n < (MIN_NUMEL if self.mode == "auto" else 3 * CHUNK):
            return False
        return (x.dtype in FLOATS and not x.requires_grad and not x.is_sparse
                and not torch.compiler.is_compiling())

    def _kernel(self, kind: str, x: Tensor, sat: Callable[[Tensor], Tensor] | None = None
                ) -> Callable[..., Tensor] | None:
        """The compiled kernel for ``x``'s device type and dtype, compiled and checked on first
        use; ``None`` when ``"auto"`` fell back to eager."""
        key = (kind, x.device.type, x.dtype, sat)
        k = self.kernels.get(key)
        if k is not None:
            return k
        name = f"_gradprobe_{kind}_{x.device.type}_{str(x.dtype)[6:]}_{len(self.kernels)}"
        body = _make_stats_body(sat) if kind == "stats" else _weight_body
        try:
            k = self.compile(_own_code(body, name))
            for c in _check_tensor(x.dtype, x.device):
                parts = _split(c)
                for p in parts:
                    torch._dynamo.mark_dynamic(p, 0)
                if kind == "stats":
                    got = k(*parts)
                    want = _eager_row(c, sat)
                else:
                    prev, init = c.flip(0), c * 0.5
                    ps, is_ = _split(prev), _split(init)
                    for p in (*ps, *is_):
                        torch._dynamo.mark_dynamic(p, 0)
                    got = k(*parts, *ps, *is_)
                    cf = c.double()
                    want = torch.cat([_eager_row(c, None),
                                      ((cf - prev.double()) ** 2).sum().reshape(1),
                                      ((cf - init.double()) ** 2).sum().reshape(1)])
                # counts, extrema and these sums of small integers are exact in both paths; the
                # eager sum of squares goes through a square root (vector_norm), hence rtol
                if not torch.allclose(got, want, rtol=1e-6, atol=0.0, equal_nan=True):
                    raise RuntimeError(f"compiled {kind} kernel disagrees with the eager path on a "
                                       f"known {x.dtype} tensor: {got.tolist()} != {want.tolist()}")
        except Exception as e:
            self._give_up(e)
            return None
        self.kernels[key] = k
        return k


    def _give_up(self, e: Exception) -> None:
        """``"on"``: re-raise. ``"auto"``: fall back to eager for the rest of the process, with one
        warning that says why."""
        if self.mode == "on":
            raise e
        self.broken = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        warnings.warn(
            f"gradprobe: compiled statistics kernels unavailable ({self.broken}); using the eager "
            "path for the rest of this process. Set GRADPROBE_FUSED=0 to skip the attempt and "
            "silence this warning.", RuntimeWarning, stacklevel=4)


    def rows(self, ts: Sequence[Tensor], saturated: Callable[[Tensor], Tensor] | None = None
             ) -> Tensor | None:
        """``[len(ts), N_STATS]`` float64 statistics of large tensors of one device, with
        exact ``nonzero`` and ``nonfinite`` counts, or ``None`` where the compiled path is not
        available (the caller runs the eager path). Callers pass detached tensors for which
        :func:`usable` holds."""
        out = []
        with _plain(ts[0].device.type):
            for t in ts:
                k = self._kernel("stats", t, saturated)
                if k is None:
                    return None
                try:
                    out.append(k(*_split(t)))
                except Exception as e:  # e.g. dynamo's recompilation limit
                    self._give_up(e)
                    return None
            return torch.stack(out)


    def weight_stats(self, w: Tensor, prev: Tensor | None, init: Tensor | None) -> Tensor | None:
        """``[N_STATS + 2]``: the statistics of ``w`` (exact counts), then ``Σ (w − prev)²`` and
        ``Σ (w − init)²`` (0 where that tensor is ``None``), in one pass over ``w``; ``None`` where
        the compiled path is not available. ``prev`` and ``init`` have ``w``'s shape and dtype."""
        with _plain(w.device.type):
            k = self._kernel("weight", w)
            if k is None:
                return None
            try:
                return k(*_split(w), *_split(w if prev is None else prev),
                         *_split(w if init is None else init))
            except Exception as e:
                self._give_up(e)
                return None


KERNELS = CompiledKernels.from_env()
"""The process-wide kernels the Probe uses (compiled graphs are per process). Set the mode with
``KERNELS.set_mode("auto")`` or the environment variable ``GRADPROBE_FUSED``."""


__all__ = ["CHUNK", "KERNELS", "MIN_NUMEL", "CompiledKernels", "mode_from_env"]
