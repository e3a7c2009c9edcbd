"""One configuration of a sweep: the task, its name, and the function that runs it.

The task is a feed-forward MLP (:func:`gradprobe.lab.common.initialised_mlp`: ``fc1, act1, ...,
fcL, actL, out``) trained by :func:`gradprobe.lab.train.fit` on a generated data set
(``make_circles``, ``make_moons``) or scikit-learn's ``load_digits``, recorded by ``gp.Probe``
(every statistic, once per epoch), then read back and diagnosed. :func:`execute` does all of it
for one :class:`TaskConfig` and is the one function both sweep backends call (a process of the
local pool or a Ray Tune trial), so a configuration gives the same numbers wherever it runs.

A run is written under ``out/.<name>.partial`` and renamed to ``out/<name>`` once its
``sweep.json`` (the configuration, what training measured, the depth profile and the findings)
is written: a folder ``out/<name>`` is always a complete run, and an interrupted one is redone.

Example
    >>> import tempfile
    >>> from gradprobe.lab.sweep_task import TaskConfig, execute
    >>> record = execute(TaskConfig(depth=2, width=4, epochs=2), tempfile.mkdtemp(), "demo")  # doctest: +SKIP
    >>> record["error"] is None                                                          # doctest: +SKIP
    True
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from gradprobe import activations
from gradprobe.errors import ConfigError

RECORD = "sweep.json"
"""The file written last into a sweep's run directory: its presence marks the run complete."""

RECOMMENDED = "recommended"
"""``init`` value meaning the activation table's recommended scheme (He for rectifiers, ...)."""


@dataclass(frozen=True)
class TaskConfig:
    """A sweep's training task. Every field can be a grid axis.

    ``depth`` hidden layers of ``width`` units with ``activation``, weights drawn by ``init``
    (a scheme of :func:`gradprobe.remedies.init_`, or ``"recommended"``: the activation's own),
    zero-mean biases as ``nn.Linear`` draws them; ``optimizer`` (a name of
    :data:`gradprobe.lab.train.OPTIMIZERS`) with ``lr``; ``epochs`` over ``n_samples`` points of
    ``dataset`` (``digits`` has its own 1797 images) in mini-batches of ``batch_size``.
    ``seed`` draws the data, the weights and the shuffling.
    """

    dataset: Literal["circles", "moons", "digits"] = "circles"
    activation: str = "relu"
    init: str = RECOMMENDED
    depth: int = 4
    width: int = 16
    seed: int = 0
    lr: float = 1e-3
    optimizer: str = "adam"
    epochs: int = 20
    batch_size: int = 64
    n_samples: int = 500

    def validate(self) -> None:
        """One :class:`~gradprobe.ConfigError` naming the first bad field and its fix."""
        from gradprobe.lab import train
        from gradprobe.remedies.init import SCHEMES

        activations.get(self.activation)
        if self.init != RECOMMENDED and self.init not in SCHEMES:
            raise ConfigError(f"unknown init {self.init!r}",
                              hint=f"choose {RECOMMENDED!r} or one of: " + ", ".join(SCHEMES))
        if self.optimizer.lower() not in train.OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}",
                              hint="choose one of: " + ", ".join(train.OPTIMIZERS))
        if self.dataset not in typing.get_args(typing.get_type_hints(TaskConfig)["dataset"]):
            raise ConfigError(f"unknown dataset {self.dataset!r}",
                              hint="choose one of: circles, moons, digits")
        for name, low in (("depth", 1), ("width", 1), ("epochs", 1), ("batch_size", 1),
                          ("n_samples", 4)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name}={value!r} must be an integer >= {low}",
                                  hint=f"e.g. {name}={getattr(TaskConfig(), name)}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr={self.lr!r} must be a positive number", hint="e.g. lr=1e-3")

    @property
    def scheme(self) -> str:
        """The initialisation scheme used (``init``, or the activation's recommendation)."""
        return activations.get(self.activation).recommended_init if self.init == RECOMMENDED \
            else self.init


FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(TaskConfig))


def coerce(name: str, value: Any) -> Any:
    """``value`` as field ``name`` expects it: strings from the command line converted
    (``"4"`` -> 4), ints accepted as floats, anything else of the wrong type refused."""
    from gradprobe.lab.base import _coerce, type_name

    annotation = typing.get_type_hints(TaskConfig)[name]
    example = f"give {name} values such as {getattr(TaskConfig(), name)!r}"
    try:
        value = _coerce(name, value, annotation)
    except ConfigError:
        raise ConfigError(f"grid field {name!r} got {value!r}, which is not a valid "
                          f"{type_name(annotation)}", hint=example) from None
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    expected = str if typing.get_origin(annotation) is Literal else annotation
    if not isinstance(value, expected) or isinstance(value, bool):
        raise ConfigError(
            f"grid field {name!r} got {value!r} of type {type(value).__name__}, expected "
            f"{expected.__name__}", hint=example,
        )
    return value


_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


def run_name(config: TaskConfig, axes: typing.Sequence[str]) -> str:
    """The folder name of ``config``'s run: ``field=value`` for each grid axis, joined by ``,``
    in the grid's order (``activation=relu,depth=4``). Deterministic, so a rerun finds it."""
    if not axes:
        return "run"
    parts = []
    for name in axes:
        value = getattr(config, name)
        text = repr(value) if isinstance(value, float) else str(value)
        parts.append(f"{name}={_UNSAFE.sub('-', text).strip('-') or 'x'}")
    return ",".join(parts)


def _data(config: TaskConfig) -> tuple[Any, ...]:
    from gradprobe.lab import common, data

    if config.dataset == "digits":
        return (*common.standardized_digits(config.seed), 10, "cross_entropy")
    loader = data.circles if config.dataset == "circles" else data.moons
    return (*loader(config.n_samples, seed=config.seed), 1, "bce")


def train_and_record(config: TaskConfig, run_dir: Path) -> dict[str, Any]:
    """Train ``config``'s network under ``gp.Probe(run_dir=run_dir)``; what training measured."""
    from gradprobe.lab import common, train

    xtr, ytr, xte, yte, n_out, loss = _data(config)
    model, _ = common.initialised_mlp([int(xtr.shape[1])] + [config.width] * config.depth,
                                      config.activation, config.scheme, seed=config.seed,
                                      bias=True, head=n_out)
    with train.seeded(config.seed):  # activations that draw (RReLU) use the global RNG
        fit = train.fit(model, xtr, ytr, loss=loss, optimizer=config.optimizer, lr=config.lr,
                        epochs=config.epochs, batch_size=config.batch_size, seed=config.seed,
                        x_test=xte, y_test=yte, run_dir=run_dir, num_threads=1)
    return {"final_loss": fit.loss_after, "train_acc": fit.accuracy_after,
            "test_acc": fit.test_accuracy_after, "initial_loss": fit.loss_before,
            "steps": fit.steps}


def summarise(run_dir: Path) -> dict[str, Any]:
    """What a sweep's table shows of a run, read back from its directory: the last recorded
    loss, the gradient RMS of the first and last weight layers at the first and last recorded
    steps (their ratio first/last: ≪ 1 when the gradient vanishes on its way to the input,
    ≫ 1 when it explodes), and the findings of ``gp.diagnose``."""
    from gradprobe.diagnose import diagnose
    from gradprobe.store.run import Run

    run = Run.open(run_dir)
    losses = run.losses()
    grads = run.scalars(kinds="grad")
    order = [n for n in run.layers.sort_values("depth")["name"] if n in set(grads["layer"])]
    out: dict[str, Any] = {"last_step_loss": float(losses["loss"].iloc[-1]) if len(losses)
                           else math.nan}
    first, last = (order[0], order[-1]) if order else (None, None)
    out.update(first_layer=first, last_layer=last)
    for when, step in (("first_step", grads["step"].min()), ("last_step", grads["step"].max())):
        at = grads[grads["step"] == step].set_index("layer")["rms"]
        lo, hi = (float(at.get(first, math.nan)), float(at.get(last, math.nan))) if order \
            else (math.nan, math.nan)
        out[f"first_grad_rms_{when}"] = lo
        out[f"last_grad_rms_{when}"] = hi
        out[f"grad_ratio_{when}"] = lo / hi if hi > 0 else math.nan
    diagnosis = diagnose(run)
    out["findings"] = len(diagnosis)
    out["rules"] = list(dict.fromkeys(f.rule for f in diagnosis))
    return out


def _error(exc: BaseException) -> str:
    text = exc.message if hasattr(exc, "message") else str(exc)
    return f"{type(exc).__name__}: {' '.join(str(text).split())}"


def execute(config: TaskConfig | dict[str, Any], out: str | Path, name: str) -> dict[str, Any]:
    """Run one configuration into ``out/name`` and return its record (what ``sweep.json``
    holds): ``name``, ``config``, ``error`` (``None``, or one line saying what failed, in
    which case no run is kept), ``seconds``, and the trained and read-back values.

    Never raises for a failing configuration: the sweep reports it and goes on.
    """
    start = time.perf_counter()
    cfg = config if isinstance(config, TaskConfig) else TaskConfig(**config)
    record: dict[str, Any] = {"name": name, "config": dataclasses.asdict(cfg), "error": None}
    root = Path(out)
    staging = root / f".{name}.partial"
    try:
        cfg.validate()
        shutil.rmtree(staging, ignore_errors=True)
        record.update(train_and_record(cfg, staging))
        record.update(summarise(staging))
        record["seconds"] = time.perf_counter() - start
        (staging / RECORD).write_text(json.dumps(record, indent=2, default=_jsonable) + "\n")
        final = root / name
        if final.exists():  # never replace a folder this sweep did not write
            raise FileExistsError(f"{final} appeared while the run was written")
        staging.replace(final)
    except Exception as exc:  # a failing configuration is a row of the table, not a crash
        shutil.rmtree(staging, ignore_errors=True)
        record["error"] = _error(exc)
        record["seconds"] = time.perf_counter() - start
    return record


def _jsonable(value: Any) -> Any:
    return float(value) if hasattr(value, "__float__") else str(value)


def read_record(run_dir: Path) -> dict[str, Any] | None:
    """The record of a complete run in ``run_dir``, or ``None`` if there is none (yet)."""
    path = run_dir / RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "config" in record else None


__all__ = ["FIELDS", "RECORD", "RECOMMENDED", "TaskConfig", "coerce", "execute", "read_record",
           "run_name", "summarise", "train_and_record"]
