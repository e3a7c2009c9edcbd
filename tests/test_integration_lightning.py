"""The Lightning callback with a real ``Trainer`` (CPU), against the same model trained by a plain
loop with ``gp.Probe`` attached: same seed, same batches, so every statistic must agree."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import gradprobe as gp

pl = pytest.importorskip("lightning.pytorch", reason="lightning is not installed")

from gradprobe.integrations.lightning import GradprobeCallback  # noqa: E402

os.environ.setdefault("OMP_NUM_THREADS", "1")
BATCH, N, LR = 8, 48, 0.05
STATS = ["count", "sum", "sumsq", "abs_sum", "nonzero", "nonfinite", "saturated", "dead",
         "min", "max"]


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(),
                                 nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], i: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR)


def data() -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, 4, generator=g)
    return torch.utils.data.TensorDataset(x, x[:, :1] * 2 - x[:, 1:2] ** 2)


def loader() -> torch.utils.data.DataLoader:  # type: ignore[type-arg]
    return torch.utils.data.DataLoader(data(), batch_size=BATCH, shuffle=False)


def fit(tmp, steps: int, accum: int = 1, **trainer_kwargs):
    torch.set_num_threads(1)
    model = Net()
    cb = GradprobeCallback(**trainer_kwargs.pop("cb", {}))
    trainer = pl.Trainer(max_steps=steps, accumulate_grad_batches=accum, accelerator="cpu",
                         devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=str(tmp), callbacks=[cb], **trainer_kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the data loader's worker count and such
        trainer.fit(model, loader())
    return model, cb


def plain(run_dir, steps: int, accum: int = 1, clip: float | None = None):
    """The reference: the same module, batches and optimizer in a plain loop, a Probe with
    the optimizer's step hooks."""
    torch.set_num_threads(1)
    model = Net()
    opt = model.configure_optimizers()
    batches = iter(loader())
    with gp.Probe(model, opt, run_dir=run_dir) as probe:
        for _ in range(steps):
            for j in range(accum):
                x, y = next(batches)
                loss = model.training_step((x, y), j)
                probe.observe_loss(loss)
                (loss / accum).backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            opt.zero_grad()
    return model


def table(run_dir) -> pd.DataFrame:
    raw = gp.Run.open(run_dir).raw_scalars()
    return raw.set_index(["step", "layer", "kind"]).sort_index()[STATS]


def assert_same(a: pd.DataFrame, b: pd.DataFrame, kinds=None) -> None:
    if kinds is not None:
        a = a[a.index.get_level_values("kind").isin(kinds)]
        b = b[b.index.get_level_values("kind").isin(kinds)]
    assert list(a.index) == list(b.index)
    np.testing.assert_allclose(a.to_numpy(float), b.to_numpy(float), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("accum", [1, 2], ids=["no-accumulation", "accumulate-2"])
def test_every_statistic_equals_a_plain_loop_with_the_probe(tmp_path, accum):
    steps = 3
    model, cb = fit(tmp_path / "pl", steps, accum)
    ref = plain(tmp_path / "ref", steps, accum)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q)  # the same training, probe or not
    run_dir = tmp_path / "pl" / "gradprobe"  # logger=False: under default_root_dir
    assert cb.run_dir == run_dir
    a, b = table(run_dir), table(tmp_path / "ref")
    # one record per optimizer step, every kind of the reference
    assert sorted(a.index.get_level_values("step").unique()) == list(range(steps))
    assert set(a.index.get_level_values("kind")) >= {"grad", "weight", "update", "act",
                                                     "act_grad"}
    assert_same(a, b)
    la, lb = gp.Run.open(run_dir).losses(), gp.Run.open(tmp_path / "ref").losses()
    np.testing.assert_allclose(la["loss"], lb["loss"], rtol=1e-6)
    # the activations of both micro-batches are in the step's record
    act = a.xs("act", level="kind")
    assert (act["count"].to_numpy() % (BATCH * accum) == 0).all()
    assert act.xs("net.1", level="layer")["count"].iloc[0] == BATCH * accum * 16


def test_grad_is_before_clipping_and_weights_after_the_clipped_update(tmp_path):
    steps, clip = 3, 0.05
    model, cb = fit(tmp_path / "pl", steps, gradient_clip_val=clip)
    plain(tmp_path / "ref", steps, clip=clip)  # its probe sees the clipped gradients
    a, b = table(tmp_path / "pl" / "gradprobe"), table(tmp_path / "ref")
    assert_same(a, b, kinds=["weight", "update", "act"])
    pre = np.sqrt(a.xs("grad", level="kind")["sumsq"].groupby("step").sum().to_numpy())
    post = np.sqrt(b.xs("grad", level="kind")["sumsq"].groupby("step").sum().to_numpy())
    np.testing.assert_allclose(post, clip, rtol=1e-4)  # clipping was active in both
    assert (pre > 2 * clip).all()
    # clipping scales every gradient by clip / ‖g‖: per layer, pre = post * ‖g‖ / clip
    ga = a.xs("grad", level="kind")["sumsq"]
    gb = b.xs("grad", level="kind")["sumsq"]
    factor = pd.Series(pre / clip, index=range(steps))
    np.testing.assert_allclose(np.sqrt(ga), np.sqrt(gb) * factor.reindex(
        ga.index.get_level_values("step")).to_numpy(), rtol=1e-4)
    # the always-on tier's per-layer norms are read at the same moment: before clipping
    norms = gp.Run.open(tmp_path / "pl" / "gradprobe").grad_norms()
    total = norms.groupby("step")["grad_norm"].apply(lambda g: np.sqrt((g**2).sum()))
    np.testing.assert_allclose(total.to_numpy(), pre, rtol=1e-5)


def test_bf16_autocast_records_unscaled_finite_gradients_of_the_same_size(tmp_path):
    steps = 2
    fit(tmp_path / "pl", steps, precision="bf16-mixed")
    plain(tmp_path / "ref", steps)
    a, b = table(tmp_path / "pl" / "gradprobe"), table(tmp_path / "ref")
    ga, gb = a.xs("grad", level="kind"), b.xs("grad", level="kind")
    assert (ga["nonfinite"] == 0).all()
    # bf16 has 8 bits of mantissa: the norms agree to a few percent, not to float32
    np.testing.assert_allclose(np.sqrt(ga["sumsq"]), np.sqrt(gb["sumsq"]), rtol=0.05)
    act = a.xs("act", level="kind")
    assert (act["count"] > 0).all()


class SkipStep1(pl.plugins.precision.Precision):
    """The GradScaler's structure (``MixedPrecision.optimizer_step``): closure, then
    ``on_before_optimizer_step``, then ``scaler.step``, which does not call ``optimizer.step()``
    when it found inf/NaN gradients; here at step 1."""

    def optimizer_step(self, optimizer, model, closure, **kwargs):  # type: ignore[no-untyped-def]
        if model.trainer.global_step != 1:
            return super().optimizer_step(optimizer, model, closure, **kwargs)
        result = closure()
        self._after_closure(model, optimizer)
        return result


def test_a_step_the_optimizer_skipped_is_marked_skipped(tmp_path):
    model, cb = fit(tmp_path / "pl", 3, plugins=[SkipStep1()])
    run = gp.Run.open(tmp_path / "pl" / "gradprobe")
    sc = run.scalars(kinds=("grad", "update"))
    assert sorted(sc["step"].unique()) == [0, 1, 2]
    assert sc.groupby("step")["skipped"].all().tolist() == [False, True, False]
    assert (sc[(sc.kind == "grad") & (sc.step == 1)]["norm"] > 0).all()
    upd = sc[sc.kind == "update"].set_index("step")["norm"]
    assert (upd.loc[[0, 2]] > 0).all() and not (upd.loc[[1]] > 0).any()  # 0 or not recorded
    assert cb._handle is None  # the optimizer's hook removed at the end of the fit


def test_run_dir_under_the_loggers_folder_and_given_run_dir(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(str(tmp_path / "logs"), name="exp")
    cb = GradprobeCallback(kinds=("grad",))
    trainer = pl.Trainer(max_steps=2, logger=logger, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[cb])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Net(), loader())
    assert cb.run_dir == tmp_path / "logs" / "exp" / "version_0" / "gradprobe"
    assert sorted(gp.Run.open(cb.run_dir).raw_scalars()["step"].unique()) == [0, 1]
    _, cb2 = fit(tmp_path / "root", 1, cb={"run_dir": tmp_path / "mine", "kinds": ("grad",)})
    assert cb2.run_dir == tmp_path / "mine" and gp.Run.open(cb2.run_dir).status == "closed"


class Boom(Net):
    def training_step(self, batch, i):  # type: ignore[no-untyped-def]
        if self.global_step == 2:
            raise RuntimeError("boom")
        return super().training_step(batch, i)


def test_an_exception_in_training_detaches_and_keeps_the_steps_done(tmp_path):
    cb = GradprobeCallback(run_dir=tmp_path / "run")
    trainer = pl.Trainer(max_steps=5, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[cb],
                         default_root_dir=str(tmp_path))
    with warnings.catch_warnings(), pytest.raises(RuntimeError, match="boom"):
        warnings.simplefilter("ignore")
        trainer.fit(Boom(), loader())
    assert cb.probe is not None and not cb.probe.attached
    run = gp.Run.open(tmp_path / "run")
    assert run.status == "closed"
    assert sorted(run.raw_scalars()["step"].unique()) == [0, 1]


class TwoOptimizers(Net):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, i):  # type: ignore[no-untyped-def]
        return None

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return [torch.optim.SGD(self.net[0].parameters(), lr=LR),
                torch.optim.SGD(self.net[2].parameters(), lr=LR)]


def test_bad_arguments_are_refused_with_the_fix(tmp_path):
    assert gp.integrations.lightning.GradprobeCallback is GradprobeCallback  # the lazy attribute
    with pytest.raises(gp.ConfigError, match="run_dir must be a path"):
        GradprobeCallback(run_dir=3)  # type: ignore[arg-type]
    with pytest.raises(gp.ConfigError, match="sets optimizer itself"):
        GradprobeCallback(optimizer=torch.optim.SGD(Net().parameters(), lr=0.1))
    with pytest.raises(gp.ConfigError, match="kinds"):  # the Probe's own check, at fit
        fit(tmp_path / "k", 1, cb={"kinds": ("gradient",)})
    cb = GradprobeCallback(run_dir=tmp_path / "two")
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[cb])
    with warnings.catch_warnings(), pytest.raises(gp.ConfigError, match="exactly one optimizer"):
        warnings.simplefilter("ignore")
        trainer.fit(TwoOptimizers(), loader())
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(gp.RunDirError):
        fit(tmp_path / "x", 1, cb={"run_dir": tmp_path / "full"})
