"""The lab's experiment contract: a frozen config dataclass, ``run(config, progress)`` that
computes (no drawing), ``plot(result)`` that draws (no computing), and a registry.

Each experiment module calls :func:`register` at import time; ``gradprobe.lab.experiments``
imports them all. Results carry *claims*: statements the experiment displays (e.g. "the
measured gradient norm follows a^(L-1)"), each with whether it held in this run, so the CLI can
print them and the tests can assert them at a small size.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import pandas as pd

from gradprobe.errors import ConfigError

if TYPE_CHECKING:  # matplotlib is imported only by plot functions
    from matplotlib.figure import Figure


class Progress(Protocol):
    """Called as ``progress(description, done, total)``; the CLI draws a bar from it."""

    def __call__(self, description: str, done: int, total: int) -> None: ...


def no_progress(description: str, done: int, total: int) -> None:
    """The default progress callback: does nothing."""


@dataclass(frozen=True)
class Claim:
    """A statement an experiment displays, and whether this run's measurements support it."""

    text: str
    holds: bool
    evidence: str = ""


@dataclass
class LabResult:
    """What an experiment returns. ``tables['main']`` is the headline table."""

    name: str
    config: Any
    tables: dict[str, pd.DataFrame]
    data: dict[str, Any] = field(default_factory=dict)
    claims: list[Claim] = field(default_factory=list)
    runs: dict[str, Path] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)

    @property
    def table(self) -> pd.DataFrame:
        return self.tables["main"]

    def claim(self, prefix: str) -> Claim:
        """The claim whose text starts with ``prefix`` (for tests)."""
        found = [c for c in self.claims if c.text.startswith(prefix)]
        if len(found) != 1:
            raise KeyError(f"{len(found)} claims start with {prefix!r}: {[c.text for c in self.claims]}")
        return found[0]


@dataclass(frozen=True)
class Experiment:
    name: str
    summary: str
    config_cls: type
    run: Callable[..., LabResult]
    plot: Callable[[LabResult], dict[str, Figure]]


EXPERIMENTS: dict[str, Experiment] = {}


def register(
    name: str, summary: str, config_cls: type, run: Callable[..., LabResult],
    plot: Callable[[LabResult], dict[str, Figure]],
) -> Experiment:
    """Add an experiment to the registry (called once per experiment module)."""
    if not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"{config_cls!r} must be a frozen dataclass")
    exp = Experiment(name, summary, config_cls, run, plot)
    EXPERIMENTS[name] = exp
    return exp


def type_name(annotation: Any) -> str:
    """A readable name for a config field's type, for help and error messages.

    >>> type_name(int), type_name(tuple[float, ...]), type_name(typing.Literal["a", "b"])
    ('int', 'comma-separated list of float', "one of 'a', 'b'")
    """
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is tuple:
        return f"comma-separated list of {type_name(args[0] if args else str)}"
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("none" if a is type(None) else type_name(a) for a in args)
    return str(getattr(annotation, "__name__", annotation))


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    """Turn a CLI string into the field's type (int, float, bool, str, Literal, Optional and
    tuples of those)."""
    if not isinstance(value, str):
        return value
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    try:
        if annotation in (int, "int"):
            return int(value)
        if annotation in (float, "float"):
            return float(value)
        if annotation in (bool, "bool"):
            low = value.lower()
            if low in {"1", "true", "yes", "on"}:
                return True
            if low in {"0", "false", "no", "off"}:
                return False
            raise ValueError(value)
        if origin is tuple:
            inner = args[0] if args else str
            return tuple(_coerce(name, v.strip(), inner) for v in value.split(",") if v.strip())
        if origin is typing.Literal:
            if value not in args:
                raise ValueError(value)
            return value
        if origin in (typing.Union, types.UnionType):
            if type(None) in args and value.lower() in {"none", "null", ""}:
                return None
            for arg in args:
                if arg is type(None):
                    continue
                try:
                    return _coerce(name, value, arg)
                except ConfigError:
                    continue
            raise ValueError(value)
    except ValueError:
        raise ConfigError(
            f"option {name!r} got {value!r}, which is not a valid {type_name(annotation)}",
            hint=f"--{name.replace('_', '-')} expects {type_name(annotation)}",
        ) from None
    return value


def make_config(name: str, **overrides: Any) -> Any:
    """The experiment's default config with ``overrides`` applied (strings are converted)."""
    exp = get(name)
    fields = {f.name: f for f in dataclasses.fields(exp.config_cls)}
    hints = typing.get_type_hints(exp.config_cls)
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ConfigError(
            f"experiment {name!r} has no option {', '.join(repr(u) for u in unknown)}",
            hint="its options are: " + ", ".join(sorted(fields)),
        )
    values = {k: _coerce(k, v, hints.get(k, str)) for k, v in overrides.items()}
    config = exp.config_cls(**values)
    validate = getattr(config, "validate", None)
    if callable(validate):
        validate()
    return config


def get(name: str) -> Experiment:
    from gradprobe.lab import experiments  # noqa: F401  (registers every experiment)

    if name not in EXPERIMENTS:
        raise ConfigError(
            f"unknown experiment {name!r}",
            hint="`gradprobe lab list` shows them: " + ", ".join(sorted(EXPERIMENTS)),
        )
    return EXPERIMENTS[name]


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def write(result: LabResult, out: Path, *, formats: tuple[str, ...] = ("png", "svg")) -> list[Path]:
    """Write figures (PNG and SVG), tables (Markdown and CSV) and ``summary.json`` under ``out``.

    Each file is written to a temporary name and renamed, so an interrupted write never leaves a
    half-written file under its final name.
    """
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def _atomic(path: Path, writer: Callable[[Path], object]) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        writer(tmp)
        tmp.replace(path)
        written.append(path)

    for tname, frame in result.tables.items():
        md = _markdown(frame) + "\n"
        _atomic(out / f"{tname}.csv", partial(_write_csv, frame))
        _atomic(out / f"{tname}.md", partial(_write_text, md))

    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    figures = get(result.name).plot(result)
    for fname, fig in figures.items():
        for fmt in formats:
            _atomic(out / f"{fname}.{fmt}", partial(_save_figure, fig, fmt))
        plt.close(fig)

    summary = {
        "experiment": result.name,
        "config": _jsonable(result.config),
        "claims": [dataclasses.asdict(c) for c in result.claims],
        "runs": {k: str(v) for k, v in result.runs.items()},
    }
    _atomic(out / "summary.json", partial(_write_text, json.dumps(summary, indent=2, default=str)))
    result.files = written
    return written


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    frame.to_csv(path, index=False)


def _write_text(text: str, path: Path) -> None:
    path.write_text(text)


def _save_figure(fig: Figure, fmt: str, path: Path) -> None:
    # A figure with a layout engine (constrained layout, as report.style makes them) is already
    # laid out; "tight" would draw it a second time just to measure it.
    tight = None if fig.get_layout_engine() is not None else "tight"
    fig.savefig(path, format=fmt, dpi=130, bbox_inches=tight)


def _markdown(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (no tabulate dependency)."""
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cols = [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(fmt(v) for v in row) + " |")
    return "\n".join(lines)
