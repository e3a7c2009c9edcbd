"""The README's main job (scripts/headline.sh, run by scripts/main.sh) at a small size: every
artefact it promises exists and the diagnosis names the vanishing layers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_headline_pipeline_small(tmp_path):
    env = dict(os.environ, HEADLINE_QUICK="1", OMP_NUM_THREADS="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    out = tmp_path / "results"
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "headline.sh"), str(out)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    for name in ["README.md", "circles/accuracy_loss.png", "circles/part2_gradients.png",
                 "circles/main.md", "deep-sigmoid/run/meta.json", "deep-sigmoid/diagnosis.json",
                 "deep-sigmoid/report.html", "doctor/report.html", "doctor/doctor.json"]:
        assert (out / name).is_file(), name
    index = (out / "README.md").read_text()
    assert all(f"`{d}" in index for d in ["circles/", "deep-sigmoid/report.html", "doctor/"])

    diagnosis = json.loads((out / "deep-sigmoid" / "diagnosis.json").read_text())
    vanishing = [f for f in diagnosis["findings"] if f["rule"] == "vanishing-gradients"]
    assert vanishing, [f["rule"] for f in diagnosis["findings"]]
    # the hidden Linear layers of the Sequential: 0, 2, 4, ... (the sigmoids sit between them)
    assert {"0", "2", "4"} <= set(vanishing[0]["layers"])
    assert "vanishing-gradients" in proc.stdout  # the terminal shows the findings

    doctor = json.loads((out / "doctor" / "doctor.json").read_text())
    assert doctor["entries"] and not doctor["healthy"]
    html = (out / "deep-sigmoid" / "report.html").read_text()
    assert "vanishing-gradients" in html and "http://" not in html and "https://" not in html
