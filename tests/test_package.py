"""Package-level promises: a light import and a stable public surface."""

import subprocess
import sys
import types


def _python(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_import_does_not_load_optional_dependencies():
    loaded = _python(
        "import sys, gradprobe; "
        "print(sorted(m for m in ('matplotlib', 'sklearn', 'transformers', 'typer', 'rich') "
        "if m in sys.modules))"
    )
    assert loaded == "[]"


def test_gp_gradcheck_is_the_function_in_any_import_order():
    kind = _python(
        "import importlib, types; import gradprobe.check; "
        "from gradprobe.check import TensorCheck; import gradprobe as gp; "
        "m = importlib.import_module('gradprobe.check'); "
        "print(isinstance(gp.gradcheck, types.FunctionType), isinstance(m, types.ModuleType))"
    )
    assert kind == "True True"


def test_public_names_resolve():
    import gradprobe as gp

    for name in gp.__all__:
        assert getattr(gp, name) is not None, name
    assert isinstance(gp.lab, types.ModuleType)
    assert callable(gp.preflight) and callable(gp.remedies.init_)


def test_every_data_file_of_the_package_is_shipped():
    """Files of the package that are not Python (the C kernels' sources) are listed in
    pyproject's package-data, so that a wheel carries them."""
    from pathlib import Path

    import pytest

    import gradprobe

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    root = Path(gradprobe.__file__).parent
    data = {p.relative_to(root).as_posix() for p in root.rglob("*")
            if p.is_file() and p.suffix not in (".py", ".pyc", ".typed")}
    pyproject = root.parents[1] / "pyproject.toml"
    listed = set(tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-data"]
                 ["gradprobe"])
    assert data and data <= listed, sorted(data - listed)
