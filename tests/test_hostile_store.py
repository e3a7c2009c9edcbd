"""The run directory under hostile conditions: damaged, deleted and foreign files, a full disk,
SIGKILL and a second Ctrl-C, a run from a newer writer, and ``overwrite=True`` next to files
that are not the run's. Signals are real and sent to real processes."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import pandas as pd
import pytest
import tomllib
import torch
from torch import nn
from typer.testing import CliRunner

import gradprobe as gp
from gradprobe.errors import RunDataWarning, RunDirError
from gradprobe.store import writer as store

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def _train(run_dir, steps=6, *, flush_every=2, overwrite=False, model=None):
    model = model or _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gp.Probe(model, opt, run_dir=run_dir, flush_every=flush_every, hist_every=1,
                  overwrite=overwrite, budget=None) as probe:  # the same parts on any machine
        for _ in range(steps):
            loss = model(torch.randn(5, 4)).pow(2).mean()
            probe.observe_loss(loss)
            loss.backward()
            opt.step()
            opt.zero_grad()
    return probe.run


def _default_sigint() -> None:
    # a library the test process loaded earlier may have set SIGINT to "ignore", which a child
    # inherits through exec, and Python then installs no KeyboardInterrupt: a Ctrl-C sent to
    # the child would do nothing
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _child(code: str, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint, **kw)


def _files(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


# ------------------------------------------------------------------ overwrite=True (item 2)

NOT_A_RUN = {
    "no-meta": None,
    "meta-empty-object": "{}",
    "meta-list": "[1, 2]",
    "meta-garbage": "not json at all",
    "meta-missing-fields": '{"schema_version": 1, "status": "closed"}',
    "schema-version-true": ('{"schema_version": true, "config": {}, "environment": {}, '
                            '"layers": [], "status": "closed"}'),
}


@pytest.mark.parametrize("case", list(NOT_A_RUN))
def test_overwrite_refuses_what_is_not_a_run_and_deletes_nothing(case, tmp_path):
    d = tmp_path / "checkpoints"
    (d / "epoch-1").mkdir(parents=True)
    (d / "epoch-1" / "model.pt").write_bytes(b"weights")
    (d / "scalars").mkdir()  # looks like a run's folder, is not one
    (d / "scalars" / "part-00000.parquet").write_bytes(b"someone's file")
    if NOT_A_RUN[case] is not None:
        (d / "meta.json").write_text(NOT_A_RUN[case])
    before = _files(d)
    with pytest.raises(RunDirError, match=r"checkpoints.*holds no gradprobe run.*nothing was "
                                          r"deleted") as err:
        gp.Probe(_mlp(), run_dir=d, overwrite=True)  # refused when made, before attach
    assert err.value.hint
    with pytest.raises(RunDirError, match="nothing was deleted"):
        store.RunWriter.create(d, config={}, overwrite=True)
    assert _files(d) == before


def test_overwrite_clears_only_the_runs_own_files(tmp_path):
    d = tmp_path / "run"
    _train(d, 6)
    (d / "checkpoints").mkdir()
    (d / "checkpoints" / "model.pt").write_bytes(b"weights")
    (d / "notes.txt").write_text("keep me")
    (d / "hist" / "README").write_text("keep me too")
    (d / "scalars" / ".part-00009.parquet.tmp").write_bytes(b"PAR1 torn")  # a killed writer's
    run = _train(d, 2, overwrite=True)
    assert sorted(run.scalars().step.unique()) == [0, 1]
    assert (d / "checkpoints" / "model.pt").read_bytes() == b"weights"
    assert (d / "notes.txt").exists() and (d / "hist" / "README").exists()
    assert not (d / "scalars" / ".part-00009.parquet.tmp").exists()
    assert [p.name for p in store.part_files(d, "scalars")] == ["part-00000.parquet"]


def test_overwrite_refuses_a_linked_part_folder(tmp_path):
    d = tmp_path / "run"
    _train(d, 2)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "data.bin").write_bytes(b"x")
    for p in (d / "losses").iterdir():
        p.unlink()
    (d / "losses").rmdir()
    (d / "losses").symlink_to(elsewhere)
    before = _files(d)
    with pytest.raises(RunDirError, match="'losses' is a link.*nothing was deleted"):
        store.RunWriter.create(d, config={}, overwrite=True)
    assert _files(d) == before and (elsewhere / "data.bin").exists()


# ------------------------------------------------------------------ meta.json (item 7)

BAD_META = {
    "list": ("[1, 2, 3]", "holds a JSON list, not an object"),
    "schema-true": ('{"schema_version": true}', "schema_version True, not a positive integer"),
    "schema-negative": ('{"schema_version": -5}', "schema_version -5, not a positive"),
    "schema-string": ('{"schema_version": "1"}', "schema_version '1', not a positive"),
    "schema-newer": ('{"schema_version": 99}', "written by a newer gradprobe"),
    "layers-not-a-list": ('{"schema_version": 1, "layers": {}}', "layers that is a JSON dict"),
    "not-utf8": (b'{"schema_version": 1, "config": "\xff"}', "cannot read"),
}


@pytest.mark.parametrize("case", list(BAD_META))
def test_bad_meta_json_is_a_clear_run_dir_error(case, tmp_path):
    content, message = BAD_META[case]
    d = tmp_path / "run"
    d.mkdir()
    raw = content if isinstance(content, bytes) else content.encode()
    (d / "meta.json").write_bytes(raw)
    with pytest.raises(RunDirError, match=re.escape(message)):
        gp.Run.open(d)


def test_unknown_kind_from_a_newer_writer(tmp_path):
    w = store.RunWriter.create(tmp_path / "run", config={}, overwrite=False)
    frame = pd.DataFrame({"step": [0, 0], "layer_id": [0, 0], "kind": ["grad", "curvature"],
                          "count": [1, 1], "sum": [1.0, 1.0], "sumsq": [1.0, 1.0],
                          "abs_sum": [1.0, 1.0], "nonzero": [1.0, 1.0], "nonfinite": [0.0, 0.0],
                          "saturated": [0.0, 0.0], "dead": [0.0, 0.0], "units": [0.0, 0.0],
                          "ref_sumsq": [0.0, 0.0], "min": [1.0, 1.0], "max": [1.0, 1.0],
                          "skipped": [False, False], "scale": [1.0, 1.0]})
    w.write_part("scalars", frame, w.next_flush())
    run = gp.Run.open(w.path)
    for read in (run.scalars, run.raw_scalars):
        with pytest.raises(RunDirError, match=r"kinds \['curvature'\].*written by a newer "
                                              r"gradprobe") as err:
            read()
        assert err.value.hint == "upgrade gradprobe to read it"


# ------------------------------------------------------------------ events.jsonl (item 7)

def test_garbled_event_lines_are_counted_and_reported(tmp_path):
    w = store.RunWriter.create(tmp_path / "run", config={}, overwrite=False)
    w.append_event({"type": "nonfinite", "step": 1, "layer": "0"})
    with open(w.path / store.EVENTS, "ab") as f:
        f.write(b'{"type": "nonfinite", "step": 2, "layer": "\xff\xfe"}\n')  # not UTF-8
        f.write(b"garbage\n")
        f.write(b"[1, 2]\n")  # JSON, not an event
        f.write(b'{"type": "nonfinite", "step": 5, "layer": "2"}\n')
        f.write(b'{"type": "nonfin')  # torn by a kill
    run = gp.Run.open(w.path)
    with pytest.warns(RunDataWarning, match=r"events.jsonl: 4 lines skipped: lines 2 \(not "
                                            r"UTF-8\), 3 \(not JSON\), 4 \(not an object\), "
                                            r"6 \(not JSON\)"):
        events = run.events()
    assert events.step.tolist() == [1, 5]
    assert [d.file for d in run.damaged] == ["events.jsonl"]
    assert not run.truncated  # no step is missing


# ------------------------------------------------------------------ damaged parts (item 6, 7)

DAMAGE = {
    "zeroed": lambda p: p.write_bytes(b"\0" * p.stat().st_size),
    "empty": lambda p: p.write_bytes(b""),
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "deleted": lambda p: p.unlink(),
}


@pytest.mark.parametrize("how", list(DAMAGE))
def test_a_damaged_part_costs_its_own_steps_only(how, tmp_path):
    d = tmp_path / "run"
    _train(d, 6, flush_every=2)  # parts 0, 1, 2: steps 0-1, 2-3, 4-5
    DAMAGE[how](d / "scalars" / "part-00001.parquet")
    run = gp.Run.open(d)
    reason = "missing" if how == "deleted" else r"unreadable \(.*\)"
    with pytest.warns(RunDataWarning, match=rf"scalars/part-00001.parquet: {reason}; steps 2-3 "
                                            "missing"):
        steps = sorted(run.scalars().step.unique())
    assert steps == [0, 1, 4, 5]
    # a damaged part's losses are still there (its flush was committed); a deleted one's are
    # not (a flush without its scalars part is not committed)
    losses = [0, 1, 4, 5] if how == "deleted" else list(range(6))
    assert run.losses().step.tolist() == losses
    assert [str(x) for x in run.damaged] == [
        f"scalars/part-00001.parquet: {'missing' if how == 'deleted' else run.damaged[0].reason}"
        "; steps 2-3 missing"]
    assert run.damaged[0].steps == (2, 3) and run.truncated and run.status == "closed"


def test_a_damaged_last_part_and_damaged_histograms(tmp_path):
    d = tmp_path / "run"
    _train(d, 6, flush_every=2)
    DAMAGE["truncated"](d / "scalars" / "part-00002.parquet")
    DAMAGE["zeroed"](d / "hist" / "part-00000.parquet")
    run = gp.Run.open(d)
    with pytest.warns(RunDataWarning, match="steps from 4 on missing"):
        assert sorted(run.scalars().step.unique()) == [0, 1, 2, 3]
    with pytest.warns(RunDataWarning, match=r"hist/part-00000.parquet: unreadable .*; steps 0-1"):
        assert sorted(run.histograms().step.unique()) == [2, 3, 4, 5]
    with warnings.catch_warnings(record=True) as again:  # each damaged piece: one warning
        warnings.simplefilter("always")
        run.scalars()
    assert not [w for w in again if issubclass(w.category, RunDataWarning)]
    assert {x.file for x in run.damaged} == {"scalars/part-00002.parquet",
                                             "hist/part-00000.parquet"}


# ------------------------------------------------------------------ leftovers (item 7)

_FULL_DISK = """
import resource, signal, sys
import pandas as pd
from gradprobe.errors import RunDirError
from gradprobe.store.writer import RunWriter
w = RunWriter.create(sys.argv[1], config={}, overwrite=False)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))  # a disk that is full at 2 kB
try:
    w.write_meta(config={"big": "x" * 10000}, fsync=True)
except RunDirError as exc:
    print("meta:", exc.message)
try:
    w.write_part("scalars", pd.DataFrame({"step": range(5000)}), w.next_flush())
except OSError as exc:
    print("part:", exc)
"""


def test_a_full_disk_leaves_no_temporary_files(tmp_path):
    d = tmp_path / "run"
    proc = _child(_FULL_DISK, str(d))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "meta: cannot write" in out and "File too large" in out and "part:" in out
    assert not [p for p in d.rglob(".*.tmp")]  # was: a 0-byte .meta.json.tmp
    assert gp.Run.open(d).status == "running"  # the previous meta.json is intact


_HANG_ON_RENAME = """
import os, sys, time
import pandas as pd
from gradprobe.store.writer import RunWriter
w = RunWriter.create(sys.argv[1], config={}, overwrite=False)
w.write_part("scalars", pd.DataFrame({"step": [0]}), w.next_flush())
real = os.replace
def replace(src, dst):  # killed after writing a part's temporary file, before its rename
    if str(src).endswith(".parquet.tmp"):
        print("written", flush=True)
        time.sleep(60)
    return real(src, dst)
os.replace = replace
w.write_part("scalars", pd.DataFrame({"step": [1]}), w.next_flush())
"""


def test_sigkill_leftover_part_tmp_is_ignored_then_cleaned_on_the_next_open(tmp_path):
    d = tmp_path / "run"
    proc = _child(_HANG_ON_RENAME, str(d))
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "written"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    leftover = d / "scalars" / ".part-00001.parquet.tmp"
    assert leftover.is_file()
    assert store.read_parts(d, "scalars").step.tolist() == [0]  # the leftover is ignored
    assert gp.Run.open(d).damaged == []
    _train(d, 1, overwrite=True)  # the next open for write removes it
    assert not leftover.exists() and not list(d.rglob("*.tmp"))


# ------------------------------------------------------------------ a second Ctrl-C (item 3)

_SLOW_WRITER = """
import faulthandler, signal, sys, threading, time, torch
faulthandler.register(signal.SIGUSR1, all_threads=True)
from torch import nn
import gradprobe as gp
from gradprobe.store.writer import RunWriter
torch.set_num_threads(1)
real = RunWriter.write_part
def slow(self, kind, frame, index):  # a slow disk: the close has to wait for it
    if kind == "scalars" and index >= 2:
        sys.stdout.write(f"writing {index}\\n"); sys.stdout.flush()  # one write: no interleaving
        time.sleep(1.0)
    return real(self, kind, frame, index)
RunWriter.write_part = slow
model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
try:
    with gp.Probe(model, opt, run_dir=sys.argv[1], flush_every=2, budget=None):
        for step in range(11):  # flushes 0-4 handed over, step 10 still buffered
            model(torch.randn(5, 4)).sum().backward()
            opt.step()
            opt.zero_grad()
        sys.stdout.write("ready\\n"); sys.stdout.flush()
        time.sleep(60)  # more work: the first Ctrl-C comes here
except KeyboardInterrupt:
    print("interrupted", flush=True)
    time.sleep(2.5)  # longer than a slow write: an abandoned writer thread has stopped by now
    alive = [t.name for t in threading.enumerate() if t.name.startswith("gradprobe-writer")]
    print("writer threads:", alive, flush=True)
"""


_LINES: dict[int, queue.Queue] = {}


def _readline(proc: subprocess.Popen, timeout: float = 60.0) -> str:
    """The child's next line of stdout; on a hang, its stacks (faulthandler) in the failure.

    A reader thread feeds a queue: select() on a buffered pipe misses lines already read into
    the buffer, and readline() at the end of the output returns "" at once."""
    if proc.pid not in _LINES:
        lines: queue.Queue = queue.Queue()
        _LINES[proc.pid] = lines

        def pump() -> None:
            assert proc.stdout is not None
            for line in iter(proc.stdout.readline, ""):
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
    try:
        line = _LINES[proc.pid].get(timeout=timeout)
    except queue.Empty:
        proc.send_signal(signal.SIGUSR1)
        time.sleep(1)
        proc.kill()
        pytest.fail("the child hangs:\n" + proc.communicate()[1])
    if line is None:  # end of output: the child has exited
        pytest.fail(f"the child exited ({proc.wait()}) early:\n" + (proc.stderr.read()
                                                                      if proc.stderr else ""))
    return line


def test_second_ctrl_c_during_detach_says_interrupted_with_the_last_committed_step(tmp_path):
    d = tmp_path / "run"
    proc = _child(_SLOW_WRITER, str(d))
    try:
        while _readline(proc).strip() != "ready":
            pass
        proc.send_signal(signal.SIGINT)  # the first Ctrl-C: the loop stops, detach begins
        # detach hands the last flush over and waits for the slow writes: the second Ctrl-C
        # comes while the writer thread is busy with the next one
        assert _readline(proc).startswith("writing")
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        rest = []
        while (line := _LINES[proc.pid].get(timeout=10)) is not None:
            rest.append(line)
        out, err = "".join(rest), (proc.stderr.read() if proc.stderr else "")
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "interrupted" in out and "writer threads: []" in out, out + err
    meta = json.loads((d / "meta.json").read_text())
    run = gp.Run.open(d)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RunDataWarning)
        on_disk = set(run.steps().step)  # every step (the always-on tier's table)
    # was: "closed" with every step counted, or "interrupted" with the last flush lost when
    # the second Ctrl-C caught it on its way to the writer. Now the status says what is on
    # disk, either way: a Ctrl-C in the hand-over (submit) keeps the flush, written at the
    # close after the others ("closed", every step); a Ctrl-C in the wait for the writer
    # abandons it after the part it is writing ("interrupted", up to committed_step).
    info = {k: meta.get(k) for k in ("status", "steps", "committed_step")}
    assert meta["steps"] == 11 and meta["committed_step"] == max(on_disk), (info, out)
    if meta["status"] == "closed":
        assert on_disk == set(range(11)) and not run.truncated, (info, sorted(on_disk))
    else:
        assert meta["status"] == "interrupted", (info, out)
        assert 10 not in on_disk and run.truncated, (info, sorted(on_disk))


# ------------------------------------------------------------------ runs ls / show (item 6, 7)

def _cli(*args):
    from gradprobe.cli.main import _register, app

    _register()
    return CliRunner().invoke(app, list(args))


def test_runs_ls_lists_every_run_and_marks_the_bad_ones(tmp_path):
    _train(tmp_path / "a-good", 4)
    _train(tmp_path / "b-damaged", 6)
    DAMAGE["zeroed"](tmp_path / "b-damaged" / "scalars" / "part-00001.parquet")
    _train(tmp_path / "c-newer", 2)
    meta = json.loads((tmp_path / "c-newer" / "meta.json").read_text())
    (tmp_path / "c-newer" / "meta.json").write_text(json.dumps({**meta, "schema_version": 7}))
    (tmp_path / "d-list").mkdir()
    (tmp_path / "d-list" / "meta.json").write_text("[]")
    out = _cli("runs", "ls", str(tmp_path))
    assert out.exit_code == 0, out.output
    lines = {ln.split()[0].rsplit("/", 1)[-1]: ln for ln in out.output.splitlines()[1:]}
    assert set(lines) == {"a-good", "b-damaged", "c-newer", "d-list"}
    assert lines["a-good"].split()[1:3] == ["closed", "4"]
    assert lines["b-damaged"].split()[1] == "closed*"
    assert "1 damaged part (scalars/part-00001.parquet: unreadable" in lines["b-damaged"]
    assert "steps 2-3 missing" in lines["b-damaged"]
    assert lines["c-newer"].split()[1] == "unreadable" and "newer gradprobe" in lines["c-newer"]
    assert lines["d-list"].split()[1] == "unreadable" and "JSON list" in lines["d-list"]


def test_runs_show_says_what_is_missing(tmp_path):
    _train(tmp_path / "r", 6)
    DAMAGE["deleted"](tmp_path / "r" / "scalars" / "part-00001.parquet")
    out = _cli("runs", "show", str(tmp_path / "r"))
    assert out.exit_code == 0, out.output
    assert "missing: 1 damaged part (scalars/part-00001.parquet: missing; steps 2-3" in out.output
    assert "grad at step 5" in out.output


def test_a_newline_in_a_module_name_keeps_the_table_whole(tmp_path):
    model = nn.Sequential()
    model.add_module("in\nput", nn.Linear(4, 8))
    model.add_module("act", nn.Tanh())
    model.add_module("out", nn.Linear(8, 1))
    _train(tmp_path / "r", 2, model=model)
    out = _cli("runs", "show", str(tmp_path / "r"))
    assert out.exit_code == 0, out.output
    table = out.output.split("grad at step 1:\n", 1)[1].splitlines()
    assert len(table) == 3  # header and one line per layer with parameters
    assert table[1].startswith("in\\nput ")
    assert len({len(ln.split()) for ln in table[1:]}) == 1


# ------------------------------------------------------------------ packaging (item 7)

def test_pyarrow_requirement_excludes_the_release_before_the_cve_fix():
    from packaging.requirements import Requirement

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (spec,) = [Requirement(d) for d in deps if Requirement(d).name == "pyarrow"]
    assert not spec.specifier.contains("14.0.0")  # CVE-2023-47248
    assert spec.specifier.contains("14.0.1")
