"""The function evaluator of ``gradcheck_fn``: a function of named numpy or torch arrays."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from gradprobe.check.evaluator import (
    _Evaluator,
)
from gradprobe.check.options import (
    ParamsLike,
    _as_scalar,
)
from gradprobe.errors import ConfigError, NonFiniteError


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

    def _batched(self, t: int, values: Tensor) -> tuple[Tensor, Tensor | None]:
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
        return js.detach().to(torch.float64).cpu(), None

    def _looped(self, t: int, values: Tensor) -> tuple[Tensor, Tensor | None]:
        js = torch.empty(values.shape[0], dtype=torch.float64)
        for r in range(values.shape[0]):
            js[r] = self._call(self._args(t, values[r]))
        self.n_evaluations += values.shape[0]
        return js, None

    def close(self) -> None:
        pass


# ------------------------------------------------------------------------------------ the engine
