"""`gradprobe lab list|run`: option parsing, output, one-line errors."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pandas as pd
import pytest

from gradprobe.cli.lab import parse_options
from gradprobe.cli.main import main
from gradprobe.errors import ConfigError
from gradprobe.lab import base


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_parse_options():
    assert parse_options(["--depth", "20", "--scales=1.5,0.5", "--fast", "--x-y", "-3"]) == {
        "depth": "20", "scales": "1.5,0.5", "fast": "true", "x_y": "-3",
    }
    with pytest.raises(ConfigError, match="unexpected argument 'oops'"):
        parse_options(["oops"])
    with pytest.raises(ConfigError, match="given twice"):
        parse_options(["--depth", "2", "--depth=3"])


def test_list_shows_experiments_and_defaults(capsys):
    code, out, _ = _cli(capsys, "lab", "list")
    assert code == 0
    assert "linear-chain" in out and "sigmoid-bound" in out and "--depth 50" in out
    assert "--part1 true" in out


def test_run_writes_outputs_and_prints_table_and_claims(capsys, tmp_path):
    code, out, err = _cli(capsys, "lab", "run", "linear-chain", "--depth", "6", "--scales=2,0.5",
                          "--seed", "3", "--out", str(tmp_path))
    assert code == 0, err
    assert "linear-chain: main table" in out and "✓" in out and "✗" not in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["config"]["depth"] == 6 and summary["config"]["seed"] == 3
    assert summary["config"]["scales"] == [2.0, 0.5]
    table = pd.read_csv(tmp_path / "main.csv")
    assert table["output_ratio"].tolist() == pytest.approx([2.0 ** 5, 0.5 ** 5], rel=1e-12)
    assert (tmp_path / "linear_chain.png").exists()


@pytest.mark.parametrize(
    "args, message",
    [(["lab", "run", "linear-chain", "--dept", "3"], "no option 'dept'"),
     (["lab", "run", "linear-chain", "--depth", "three"], "not a valid int"),
     (["lab", "run", "linear-chain", "--depth", "1"], "depth=1"),
     (["lab", "run", "no-such"], "unknown experiment 'no-such'"),
     (["lab", "run", "linear-chain", "stray"], "unexpected argument 'stray'"),
     (["lab", "run", "linear-chain", "--scales", "1,x"], "comma-separated list of float"),
     (["lab", "run", "linear-chain", "--depth", "2", "--depth=3"], "given twice")],
)
def test_bad_input_is_one_line_error_with_hint(capsys, tmp_path, args, message):
    code, out, err = _cli(capsys, *args, "--out", str(tmp_path / "o"))
    assert code == 2
    lines = err.strip().splitlines()
    assert lines[0].startswith("error: ") and message in lines[0]
    assert lines[1].startswith("hint: ")
    assert not (tmp_path / "o").exists()  # nothing written for a bad config


@dataclass(frozen=True)
class _FailCfg:
    n: int = 1


def _fail_run(config, *, progress, out):
    progress("work", 1, 1)
    return base.LabResult("always-fails", config, {"main": pd.DataFrame({"n": [config.n]})},
                          claims=[base.Claim("this never holds", False, "by construction")])


def test_strict_exits_1_when_a_claim_fails(capsys, tmp_path):
    from gradprobe.lab import experiments  # noqa: F401  (fill the registry first)

    base.register("always-fails", "test", _FailCfg, _fail_run, lambda r: {})
    try:
        code, out, _ = _cli(capsys, "lab", "run", "always-fails", "--out", str(tmp_path))
        assert code == 0 and "✗ this never holds" in out
        code, out, _ = _cli(capsys, "lab", "run", "always-fails", "--strict", "--out", str(tmp_path))
        assert code == 1
    finally:
        base.EXPERIMENTS.pop("always-fails", None)
