"""Rows on disk when a run ends early (issues 14 and 16): ``flush_secs`` under a real SIGKILL,
and the flush a Ctrl-C caught on its way to the writer."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import gradprobe as gp
from gradprobe.capture import schedule as sched


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


_SLOW = textwrap.dedent("""
    import sys, time, torch, gradprobe as gp
    torch.set_num_threads(1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gp.Probe(model, opt, run_dir=sys.argv[1], flush_every=100000, flush_secs=0.3) as p:
        for step in range(1, 10**6):  # killed long before the end
            p.observe_loss(loss := model(torch.randn(8, 4)).pow(2).mean())
            loss.backward(), opt.step(), opt.zero_grad(), time.sleep(0.02)
            print("ready", flush=True) if step == 40 else None
""")


def test_flush_secs_puts_rows_on_disk_before_a_sigkill(tmp_path):
    run_dir = tmp_path / "killed"
    with subprocess.Popen([sys.executable, "-c", _SLOW, str(run_dir)],
                          stdout=subprocess.PIPE, text=True) as proc:
        line = proc.stdout.readline() if proc.stdout is not None else ""
        proc.send_signal(signal.SIGKILL)  # after 40 steps (about 1 s or more), or a crash
    assert line.strip() == "ready" and proc.returncode == -signal.SIGKILL
    run = gp.Run.open(run_dir)
    assert run.status == "running"  # killed: never closed
    steps = run.steps()
    # flush_every alone would have written nothing; flush_secs wrote every 0.3 s
    assert len(steps) >= 20 and list(steps.step) == list(range(len(steps)))
    assert set(run.scalars().step) >= set(range(sched.WARMUP))
    assert len(run.losses()) == len(steps)


def test_a_flush_caught_by_ctrl_c_in_its_hand_over_is_written_at_close(tmp_path):
    # issue 16: the flush a Ctrl-C caught before the writer took it was reported
    # "interrupted" and lost; now close() writes it, and the status says every step is there
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    probe = gp.Probe(model, opt, run_dir=tmp_path / "r", flush_every=1000).attach()
    for _ in range(5):
        model(torch.randn(16, 4)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    writer = probe._writer
    real_put = writer._queue.put

    def interrupted(item, *a, **k):
        if item is not None:  # the detach's flush: the Ctrl-C comes as it waits for room
            writer._queue.put = real_put
            raise KeyboardInterrupt
        return real_put(item, *a, **k)

    writer._queue.put = interrupted
    with pytest.raises(KeyboardInterrupt):
        probe.detach()
    run = gp.Run.open(tmp_path / "r")
    assert run.status == "closed" and run.meta["committed_step"] == 4 and not run.truncated
    assert list(run.steps().step) == list(range(5))
    assert set(run.scalars().step) == set(range(5))
