"""The run directory: atomic parts, commit order, torn files, schema version."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from gradprobe.errors import RunDirError
from gradprobe.store import writer as store
from gradprobe.store.run import Run


def _writer(tmp_path):
    return store.RunWriter.create(tmp_path / "run", config={"every": 1}, overwrite=False)


def test_meta_and_parts_roundtrip(tmp_path):
    w = _writer(tmp_path)
    meta = store.read_meta(w.path)
    assert meta["schema_version"] == store.SCHEMA_VERSION
    assert meta["config"] == {"every": 1} and meta["status"] == "running"
    assert "torch" in meta["environment"]
    for i in range(3):
        idx = w.next_flush()
        w.write_part("losses", pd.DataFrame({"step": [i], "loss": [float(i)], "count": [1]}), idx)
        w.write_part("scalars", pd.DataFrame({"step": [i]}), idx)
    assert store.read_parts(w.path, "losses")["step"].tolist() == [0, 1, 2]
    assert [p.name for p in store.part_files(w.path, "scalars")] == [
        "part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]


def test_uncommitted_and_temporary_parts_are_ignored(tmp_path):
    w = _writer(tmp_path)
    idx = w.next_flush()
    w.write_part("losses", pd.DataFrame({"step": [0], "loss": [1.0], "count": [1]}), idx)
    w.write_part("scalars", pd.DataFrame({"step": [0]}), idx)
    # a flush killed after its loss part, before its scalars part
    idx = w.next_flush()
    w.write_part("losses", pd.DataFrame({"step": [1], "loss": [2.0], "count": [1]}), idx)
    # a part killed while being written
    (w.path / "scalars" / ".part-00001.parquet.tmp").write_bytes(b"PAR1 torn")
    assert store.read_parts(w.path, "losses")["step"].tolist() == [0]
    assert store.read_parts(w.path, "scalars")["step"].tolist() == [0]


def test_torn_event_line_is_skipped(tmp_path):
    w = _writer(tmp_path)
    w.append_event({"type": "nonfinite", "step": 3})
    with open(w.path / store.EVENTS, "a") as f:
        f.write('{"type": "nonfin')  # killed mid-line
    assert store.read_events(w.path) == [{"type": "nonfinite", "step": 3}]


def test_newer_schema_is_refused(tmp_path):
    w = _writer(tmp_path)
    meta = json.loads((w.path / "meta.json").read_text())
    meta["schema_version"] = store.SCHEMA_VERSION + 1
    (w.path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(RunDirError, match="schema_version"):
        Run.open(w.path)


def test_run_dir_must_be_a_path(tmp_path):
    with pytest.raises(RunDirError, match="must be a path"):
        store.RunWriter.create(42, config={}, overwrite=False)  # type: ignore[arg-type]


def test_empty_run_reads_as_empty_frames(tmp_path):
    w = _writer(tmp_path)
    run = Run.open(w.path)
    assert run.scalars().empty and run.losses().empty and run.histograms().empty
    assert run.events().empty and run.layers.empty
    assert list(run.scalars().columns[:4]) == ["step", "layer", "kind", "count"]
