"""Does-no-harm, hook lifecycle and every bad input's error."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradprobe as gp
from gradprobe.errors import ConfigError, RunDirError, UnsupportedModelError


def _mlp():
    return nn.Sequential(nn.Linear(5, 16), nn.ReLU(inplace=True), nn.Linear(16, 16), nn.Tanh(),
                         nn.Linear(16, 3))


def _cnn():
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


class _Rnn(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(5, 8, batch_first=True)
        self.lstm = nn.LSTM(8, 8, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h, _ = self.gru(x)
        h, _ = self.lstm(h)
        return self.head(h.mean(1))


ARCHS = {
    "mlp": (_mlp, (8, 5)),
    "cnn_bn": (_cnn, (8, 2, 6, 6)),
    "gru_lstm": (_Rnn, (8, 4, 5)),
}


def _train(make, shape, steps, run_dir=None, accum=1, **kw):
    torch.manual_seed(0)
    model = make()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(*shape, generator=g), torch.randint(0, 3, (shape[0],), generator=g))
            for _ in range(steps * accum)]

    def loop(probe=None):
        it = iter(data)
        for _ in range(steps):
            for _ in range(accum):
                x, y = next(it)
                loss = nn.functional.cross_entropy(model(x), y)
                if probe is not None:
                    probe.observe_loss(loss)
                loss.backward()
            opt.step()
            opt.zero_grad()

    if run_dir is None:
        loop()
    else:
        with gp.Probe(model, opt, run_dir=run_dir, hist_every=7, flush_every=16, **kw) as probe:
            loop(probe)
    return model


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_parameters_bit_identical_with_probe(arch, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: avoid thread start-up cost on a busy machine
    torch.use_deterministic_algorithms(True)
    try:
        make, shape = ARCHS[arch]
        plain = _train(make, shape, 50)
        # everything every step (budget=None), and the default attach (the always-on tier
        # every step, the full tier on the budget's schedule)
        probed = _train(make, shape, 50, run_dir=tmp_path / "r", budget=None)
        default = _train(make, shape, 50, run_dir=tmp_path / "d")
    finally:
        torch.use_deterministic_algorithms(False)
        torch.set_num_threads(threads)
    for model in (probed, default):
        for (n, a), b in zip(plain.named_parameters(), model.parameters()):
            assert torch.equal(a, b), n
        for a, b in zip(plain.buffers(), model.buffers()):
            assert torch.equal(a, b)
    assert len(gp.Run.open(tmp_path / "r").scalars(kinds="grad").step.unique()) == 50
    assert len(gp.Run.open(tmp_path / "d").grad_norms().step.unique()) == 50


def _hook_count(model):
    n = 0
    for m in model.modules():
        n += len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        n += len(getattr(m, "_backward_pre_hooks", {}))
    return n


def test_detach_removes_every_hook_and_flushes(tmp_path):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = _hook_count(model)
    probe = gp.Probe(model, opt, run_dir=tmp_path / "r", flush_every=1000)
    with probe:
        assert _hook_count(model) > before
        assert len(opt._optimizer_step_pre_hooks) == 1
        for _ in range(3):
            model(torch.randn(4, 5)).sum().backward()
            opt.step()
            opt.zero_grad()
        assert probe.run.scalars().empty  # still buffered
    assert _hook_count(model) == before
    assert len(opt._optimizer_step_pre_hooks) == 0 and len(opt._optimizer_step_post_hooks) == 0
    assert sorted(probe.run.scalars().step.unique()) == [0, 1, 2]
    assert probe.run.meta["status"] == "closed"
    # the model behaves as before: outputs unchanged by a forward that would have been recorded
    x = torch.randn(4, 5)
    assert torch.equal(model(x), model(x))


def test_two_probes_coexist(tmp_path):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gp.Probe(model, opt, run_dir=tmp_path / "a") as pa, \
            gp.Probe(model, opt, run_dir=tmp_path / "b", kinds=("grad",)) as pb:
        for _ in range(2):
            model(torch.randn(4, 5)).sum().backward()
            opt.step()
            opt.zero_grad()
    ga = pa.run.scalars(kinds="grad")
    gb = pb.run.scalars(kinds="grad")
    assert ga[["step", "layer", "norm"]].equals(gb[["step", "layer", "norm"]])
    assert set(gb.kind) == {"grad"}


def test_eval_forward_not_recorded(tmp_path):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gp.Probe(model, opt, run_dir=tmp_path / "r") as probe:
        model(torch.randn(4, 5)).sum().backward()
        with torch.no_grad():
            model(torch.randn(100, 5))
        opt.step()
    act = probe.run.scalars(kinds="act", layers="0")
    assert list(act["count"]) == [4 * 16]


# ----------------------------------------------------------------------------------- errors


def test_not_a_module(tmp_path):
    with pytest.raises(UnsupportedModelError, match="nn.Module"):
        gp.Probe(lambda x: x, run_dir=tmp_path / "r")


def test_no_parameters(tmp_path):
    with pytest.raises(UnsupportedModelError, match="no parameters"):
        gp.Probe(nn.Sequential(nn.ReLU()), run_dir=tmp_path / "r")


def test_attach_twice(tmp_path):
    model = _mlp()
    probe = gp.Probe(model, run_dir=tmp_path / "r")
    with pytest.warns(RuntimeWarning, match="no completed step"), probe:  # nothing recorded
        with pytest.raises(ConfigError, match="already attached"):
            probe.attach()
    with pytest.raises(ConfigError, match="already recorded"):
        probe.attach()


def test_optimizer_of_another_model(tmp_path):
    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(ConfigError, match=r"param_groups\[0\].*not a parameter of the model"):
        gp.Probe(_mlp(), opt, run_dir=tmp_path / "r")


def test_non_empty_run_dir(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "notes.txt").write_text("x")
    with pytest.raises(RunDirError, match="not empty") as err:
        gp.Probe(_mlp(), run_dir=tmp_path / "r")
    assert "overwrite=True" in err.value.hint
    # overwrite only replaces a previous run, never foreign files
    with pytest.raises(RunDirError, match="holds no gradprobe run"):
        with gp.Probe(_mlp(), run_dir=tmp_path / "r", overwrite=True):
            pass
    assert (tmp_path / "r" / "notes.txt").exists()


def test_overwrite_previous_run(tmp_path):
    model = _mlp()
    for _ in range(2):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with gp.Probe(model, opt, run_dir=tmp_path / "r", overwrite=True) as probe:
            model(torch.randn(2, 5)).sum().backward()
            opt.step()
    assert list(probe.run.scalars(kinds="grad", layers="0").step) == [0]


def test_unwritable_run_dir(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirError, match="cannot write run_dir"):
        with gp.Probe(_mlp(), run_dir=tmp_path / "file" / "run"):
            pass


def test_pattern_matching_nothing(tmp_path):
    with pytest.raises(ConfigError, match="'enc.*' matches no tracked module") as err:
        gp.Probe(_mlp(), run_dir=tmp_path / "r", layers=["0", "enc.*"])
    assert "e.g. 0, 1, 2" in err.value.hint


def test_layer_selection(tmp_path):
    model = _mlp()
    probe = gp.Probe(model, run_dir=tmp_path / "r", layers="[02]")
    assert [lay.name for lay in probe._layers] == ["0", "2"]
    probe = gp.Probe(model, run_dir=tmp_path / "r2", layer_types=nn.Tanh)
    assert [lay.name for lay in probe._layers] == ["3"]
    with pytest.raises(ConfigError, match="match no module"):
        gp.Probe(model, run_dir=tmp_path / "r3", layer_types=nn.Conv2d)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"every": 0}, "every must be a positive integer"),
        ({"flush_every": 1.5}, "flush_every must be"),
        ({"hist_every": -1}, "hist_every must be"),
        ({"kinds": ("grad", "acts")}, "unknown kinds"),
        ({"on_nonfinite": "ignore"}, "on_nonfinite"),
        ({"layer_types": [int]}, "layer_types"),
    ],
)
def test_bad_options(kw, match, tmp_path):
    with pytest.raises(ConfigError, match=match):
        gp.Probe(_mlp(), run_dir=tmp_path / "r", **kw)


def test_step_and_observe_outside_probe(tmp_path):
    probe = gp.Probe(_mlp(), run_dir=tmp_path / "r")
    with pytest.raises(ConfigError, match="not attached"):
        probe.step()
    with pytest.raises(ConfigError, match="not attached"):
        probe.observe_loss(torch.tensor(1.0))
    with pytest.raises(RunDirError, match="not been attached"):
        _ = probe.run


def test_open_not_a_run(tmp_path):
    with pytest.raises(RunDirError, match="not a gradprobe run"):
        gp.Run.open(tmp_path)


def test_non_zero_rank_records_nothing(tmp_path, monkeypatch):
    import gradprobe.capture.distributed as dist

    monkeypatch.setattr(dist, "rank", lambda: 1)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = _hook_count(model)
    with gp.Probe(model, opt, run_dir=tmp_path / "r") as probe:
        assert _hook_count(model) == before and not opt._optimizer_step_pre_hooks
        loss = model(torch.randn(2, 5)).sum()
        probe.observe_loss(loss)
        loss.backward()
        opt.step()
    assert not (tmp_path / "r").exists()
    with pytest.raises(RunDirError, match="non-zero torch.distributed rank"):
        _ = probe.run


def _ddp_worker(rank: int, run_dir: str, port: int) -> None:
    from datetime import timedelta

    import torch.distributed as tdist

    # A bounded timeout: a rank that died must fail the test, not hang it at a collective.
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                             world_size=2, timeout=timedelta(seconds=60))
    try:
        torch.manual_seed(0)
        model = nn.parallel.DistributedDataParallel(_mlp())
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with gp.Probe(model, opt, run_dir=run_dir) as probe:
            for step in range(3):
                g = torch.Generator().manual_seed(10 * step + rank)
                loss = model(torch.randn(4, 5, generator=g)).pow(2).mean()
                probe.observe_loss(loss)
                loss.backward()
                opt.step()
                opt.zero_grad()
        if rank == 0:
            grads = probe.run.scalars(kinds="grad")
            assert sorted(grads.step.unique()) == [0, 1, 2]
            # DDP's layers are found under the wrapper's name
            assert set(grads.layer) == {"module.0", "module.2", "module.4"}
    finally:
        # Both ranks reach teardown together: a rank that destroys its gloo group while its peer
        # still holds the connection can abort the peer ("terminate called without an active
        # exception").
        tdist.barrier()
        tdist.destroy_process_group()


def test_ddp_two_ranks_only_rank0_writes(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(str(tmp_path / "r"), port), nprocs=2, join=True)
    run = gp.Run.open(tmp_path / "r")
    assert run.meta["status"] == "closed"
    assert len(run.losses()) == 3
