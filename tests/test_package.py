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
