"""``gradprobe doctor SCRIPT``: run the doctor on the ``make`` and ``train`` a script defines.

The script is a Python file with two module-level functions (see :mod:`gradprobe.remedies.doctor`)::

    def make():                          # -> (model, optimizer), fresh on each call
        ...
    def train(model, optimizer, probe):  # the training loop; returns the final loss or None
        ...

Optionally ``data`` (sample data for ``standardize_inputs_``/``pretrain_``; a function is
called once to get it) and ``diagnose(run)`` (a diagnosis to use instead of gradprobe's own).
The script is imported as a module (its ``if __name__ == "__main__":`` block does not run), in
every worker process too, so ``--workers`` needs nothing more from it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import typer

from gradprobe.errors import ConfigError

_LOADED: dict[str, ModuleType] = {}  # per process: a script is imported once


def load_script(path: str | Path) -> ModuleType:
    """Import the script at ``path`` as a module; :class:`ConfigError` with one line if it fails."""
    p = Path(path).resolve()
    key = str(p)
    if key in _LOADED:
        return _LOADED[key]
    if not p.exists():
        raise ConfigError(f"script {str(path)!r} does not exist", hint="give the path to a .py file")
    if not p.is_file() or p.suffix != ".py":
        raise ConfigError(f"script {str(path)!r} is not a Python file (.py)",
                          hint="the doctor runs a .py file defining make() and train()")
    # A name fixed by the path, so that worker processes import it under the same name.
    name = "_gradprobe_script_" + hashlib.sha1(key.encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, p)
    if spec is None or spec.loader is None:
        raise ConfigError(f"script {str(path)!r} cannot be imported")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as err:
        del sys.modules[name]
        raise ConfigError(f"script {str(path)!r} is not valid Python: line {err.lineno}: {err.msg}"
                          ) from err
    except Exception as err:
        del sys.modules[name]
        raise ConfigError(f"running script {str(path)!r} raised {type(err).__name__}: {err}",
                          hint="run it with python first; --debug shows the traceback") from err
    _LOADED[key] = module
    return module


class ScriptFunction:
    """A script's function by path and name: pickles as such, so spawned workers can call it."""

    def __init__(self, path: str | Path, name: str) -> None:
        self.path = str(Path(path).resolve())
        self.name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(load_script(self.path), self.name)(*args, **kwargs)

    def __repr__(self) -> str:
        return f"{Path(self.path).name}:{self.name}"


def _function(module: ModuleType, path: str, name: str, required: bool) -> ScriptFunction | None:
    fn = getattr(module, name, None)
    if fn is None:
        if required:
            raise ConfigError(
                f"script {path!r} defines no {name}()",
                hint="define make() -> (model, optimizer) and train(model, optimizer, probe)",
            )
        return None
    if not callable(fn):
        raise ConfigError(f"{name} in script {path!r} is a {type(fn).__name__}, not a function")
    return ScriptFunction(path, name)


def doctor_command(
    script: str = typer.Argument(..., help="Python file defining make() and train(model, optimizer, probe)."),
    out: Path = typer.Option(Path("runs/doctor"), "--out", help="Directory for the runs and the report."),
    workers: int = typer.Option(1, "--workers", min=1, help="Processes for the remedy runs."),
    max_remedies: int = typer.Option(6, "--max-remedies", min=1, help="The most remedies to try."),
    seed: int = typer.Option(0, "--seed", help="Seed before each make() and train()."),
) -> None:
    """Diagnose the script's training run, try the remedies the findings name, compare."""
    from gradprobe.remedies.doctor import doctor

    module = load_script(script)
    make = _function(module, script, "make", True)
    train = _function(module, script, "train", True)
    diagnose = _function(module, script, "diagnose", False)
    data = getattr(module, "data", None)
    if callable(data):
        data = data()
    report = doctor(make, train, out=out, workers=workers, max_remedies=max_remedies,  # type: ignore[arg-type]
                    data=data, seed=seed, diagnose=diagnose)
    typer.echo(str(report))
    page = report.html(out / "report.html")
    typer.echo(f"report: {page}")
    typer.echo(f"runs and doctor.json: {out}")


def register(app: typer.Typer) -> None:
    app.command("doctor")(doctor_command)


__all__ = ["ScriptFunction", "doctor_command", "load_script", "register"]
