"""Smoke test of benchmarks/always_on.py in quick mode on W1: every variant is timed and in the
table, and every planted event is reported found or missed. Timing figures are not asserted."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import always_on as bench  # noqa: E402
import always_on_planted as planted  # noqa: E402


@pytest.fixture(scope="module")
def w1() -> bench.Workload:
    torch.set_num_threads(1)
    return bench.workloads(["W1"], torch.device("cpu"))[0]


def test_quick_table_has_every_variant(w1: bench.Workload, tmp_path: Path) -> None:
    args = bench.parse_args(["--quick", "--workloads", "W1"])
    assert args.variant_list == list(bench.VARIANTS)
    try:
        t = bench.time_workload(w1, args.variant_list, repeats=args.repeats, steps=args.steps,
                                round_secs=args.round_secs, tmp=tmp_path, warm=args.warmup)
    finally:
        bench.finish_wandb()
    assert set(t.per_step) == set(bench.VARIANTS)
    for v in bench.VARIANTS:
        assert len(t.per_step[v]) == 1 and t.steps[v] == args.steps == 1
        assert math.isfinite(t.overall(v)) and t.overall(v) > 0
    assert t.overall("bare") == 1.0
    table = bench.format_timing(t)
    rows = [line.split()[1] for line in table.splitlines()[1:]]
    assert rows[:len(bench.VARIANTS)] == list(bench.VARIANTS)
    assert "everything / floor" in table
    assert (tmp_path / "W1-default" / "meta.json").exists()  # the Probe variants wrote runs


class _Step:
    """One training step of W1 with ``instruments(model, opt)`` attached, and the references
    read one by one: the input, the tracked outputs and their gradients, W0, the gradients, the
    loss and the weights after the step."""

    def __init__(self, w1: bench.Workload, *instruments: Any) -> None:
        self.model, (self.x, y) = w1.model(), w1.batches(1)[0]
        opt = w1.optimizer(self.model)
        self.tools = [make(self.model, opt) for make in instruments]
        self.acts: list[torch.Tensor] = []
        self.act_grads: list[torch.Tensor] = []
        hooks = [m.register_forward_hook(self._keep) for m in bench.tracked(self.model)]
        self.w0 = [p.detach().clone() for p in self.model.parameters()]
        self.loss = w1.loss(self.model, (self.x, y))
        for tool in self.tools:
            if hasattr(tool, "observe"):
                tool.observe(self.loss)
        self.loss.backward()
        self.grads = [p.grad.clone() for p in self.model.parameters()]  # type: ignore[union-attr]
        opt.step()
        for h in hooks:
            h.remove()
        for tool in self.tools:
            tool.close()
        self.ws = [p.detach() for p in self.model.parameters()]

    def _keep(self, m: torch.nn.Module, a: object, out: torch.Tensor) -> None:
        self.acts.append(out.detach().clone())
        out.register_hook(self.act_grads.append)


def test_floor_reads_every_tensor(w1: bench.Workload) -> None:
    """The floor's norms are those of the gradients, weights, kept weights, W0, hooked
    activations, their gradients and the input, computed one by one."""
    s = _Step(w1, bench.FusedRead)
    (floor,) = s.tools
    ref = [g.norm() for g in s.grads] + [w.norm() for w in s.ws]
    ref += [w.norm() for w in s.w0] * 2  # weights before this first step are W0
    ref += [a.norm() for a in s.acts] + [g.norm() for g in s.act_grads] + [s.x.norm()]
    assert floor.last is not None and len(s.acts) == 9 and len(s.act_grads) == 9
    torch.testing.assert_close(floor.last, torch.stack(ref))


def test_always_floor_and_stats_plain_read_what_they_say(w1: bench.Workload) -> None:
    """``always_floor``'s row: each tracked output's sum, each gradient's norm, the loss;
    ``stats_plain``: min, max, sum, Σx², Σ|x| and the non-zero count of each tensor, then the
    update and drift sums of squares, computed one by one here."""
    s = _Step(w1, bench.AlwaysFloor, bench.StatsRead)
    floor, plain = s.tools
    want = [a.sum() for a in s.acts] + [g.norm() for g in s.grads] + [s.loss.detach()]
    torch.testing.assert_close(floor.row, torch.stack(want))
    assert floor.bad == 0
    ref = []
    for t in s.grads + s.ws + s.acts + s.act_grads + [s.x]:
        ref += [t.min(), t.max(), t.sum(), t.pow(2).sum(), t.abs().sum(),
                (t != 0).sum().to(t.dtype)]
    for w, w_0 in zip(s.ws, s.w0):  # before this first step the kept weights are W0
        ref += [(w - w_0).pow(2).sum()] * 2
    assert plain.last is not None
    torch.testing.assert_close(plain.last, torch.stack(ref))


def test_planted_events_reported(w1: bench.Workload, tmp_path: Path) -> None:
    res = planted.planted_check(w1, steps=30, seed=0, tmp=tmp_path)
    fwd, grad, spikes = planted.draw_steps(30, 0)
    kinds = [(p.what, p.step) for p in res if p.step >= 0]
    assert kinds == [("nonfinite activation", fwd), ("nonfinite act_grad", grad)] + [
        ("gradient spike", s) for s in spikes]
    text = planted.format_planted("W1", res)
    for p in res:
        if p.step >= 0:
            assert f"step {p.step:>4}" in text
            assert ("FOUND" if p.found else "MISSED") in text
    assert f"planted events found: {sum(p.found for p in res if p.step >= 0)}/5" in text


def test_planted_checker_can_miss(w1: bench.Workload, tmp_path: Path) -> None:
    """Without the plants the checker reports every event missed and no false alarm: it reads
    the run, it does not echo what was planted."""
    res = planted.planted_check(w1, steps=30, seed=0, tmp=tmp_path, plant=False)
    assert [p.found for p in res if p.step >= 0] == [False] * 5
    assert res[-1].what == "false alarms" and res[-1].found


@pytest.mark.parametrize("argv, message", [
    (["--workloads", "W9"], "--workloads: unknown ['W9']"),
    (["--variants", "bare,tb"], "--variants: unknown ['tb']"),
    (["--steps", "-1"], "--steps must be >= 0"),
    (["--repeats", "0"], "--repeats must be >= 1"),
])
def test_bad_arguments(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert message in capsys.readouterr().err
