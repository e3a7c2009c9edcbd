"""benchmarks/lr_small_grid.py refuses a wrong ``--archs`` or ``--out`` with one argparse error,
before any training."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import lr_small_grid as grid  # noqa: E402


@pytest.mark.parametrize("argv, message", [
    (["--archs", "mlp,resnet"], "--archs: unknown ['resnet']; choose from mlp, cnn, lstm, bert"),
    (["--archs", ","], "--archs: unknown none given"),
    (["--out", "FILE"], "exists and is not a folder"),
])
def test_bad_arguments(argv, message, tmp_path, monkeypatch, capsys):
    a_file = tmp_path / "taken"
    a_file.write_text("")
    argv = [str(a_file) if a == "FILE" else a for a in argv]
    monkeypatch.setattr(sys, "argv", ["lr_small_grid.py", *argv])
    monkeypatch.setattr(grid, "good_rate", lambda *a: pytest.fail("trained before checking"))
    with pytest.raises(SystemExit) as exc:
        grid.main()
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
