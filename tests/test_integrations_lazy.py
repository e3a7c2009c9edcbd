"""``gp.integrations``: importing gradprobe or the package imports no framework; each adapter
loads on first use; a framework that is missing names the extra to install."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gradprobe as gp

CODE = """
import json, sys
sys.modules["keras"] = None                # as if the extra were not installed
sys.modules["pytorch_lightning"] = None
sys.modules["lightning"] = None
import gradprobe as gp
out = {"loaded": sorted(m for m in ("lightning", "keras", "transformers")
                        if sys.modules.get(m) is not None),
       "dir": [n for n in dir(gp.integrations) if n in ("keras", "lightning", "huggingface")]}
for name in ("keras", "lightning"):
    try:
        getattr(gp.integrations, name)
    except ModuleNotFoundError as err:
        out[name] = str(err)
try:
    gp.integrations.tensorflow
except AttributeError as err:
    out["unknown"] = str(err)
print(json.dumps(out))
"""


def test_no_framework_at_import_and_missing_extras_named():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(gp.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["loaded"] == []
    assert out["dir"] == ["huggingface", "keras", "lightning"]
    assert "pip install 'gradprobe[keras]'" in out["keras"]
    assert "pip install 'gradprobe[lightning]'" in out["lightning"]
    assert "has no attribute 'tensorflow'" in out["unknown"]
