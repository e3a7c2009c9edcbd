"""The Hugging Face Trainer callback with a real Trainer: a tiny GPT-2 built from a config (no
download), a generated dataset, CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import gradprobe as gp

transformers = pytest.importorskip("transformers", reason="transformers is not installed")
pytest.importorskip("accelerate", reason="Trainer needs accelerate")

from gradprobe.integrations.huggingface import GradprobeCallback, preclip  # noqa: E402

STEPS, ACCUM, MAX_NORM = 4, 2, 0.05


class Tokens(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 64, (n, 12), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2,
                                     n_head=2)
    model = transformers.GPT2LMHeadModel(config)
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=4,
        gradient_accumulation_steps=ACCUM, max_grad_norm=MAX_NORM, learning_rate=1e-3,
        logging_steps=1, report_to="none", use_cpu=True, save_strategy="no",
        dataloader_num_workers=0, disable_tqdm=True,
    )
    cb = GradprobeCallback(kinds=("grad", "act"))
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(64),
                                   callbacks=[cb])
    trainer.train()
    return out, trainer


def test_one_record_per_optimizer_step_under_the_logger_folder(trained):
    out, _ = trained
    run = gp.Run.open(out / "gradprobe")
    grads = run.scalars(kinds="grad")
    assert sorted(grads["step"].unique()) == list(range(STEPS))
    losses = run.losses()
    assert sorted(losses["step"]) == list(range(STEPS)) and np.isfinite(losses["loss"]).all()


def test_preclip_norm_is_the_trainers_logged_grad_norm_and_grad_is_after_clipping(trained):
    out, trainer = trained
    pre = preclip(out / "gradprobe")
    logged = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    total = pre.groupby("step")["total_norm"].first().to_numpy()
    assert len(logged) == STEPS
    np.testing.assert_allclose(total, logged, rtol=1e-4)
    assert (total > MAX_NORM).all()  # clipping was active: the two must differ
    # the Probe's grad rows are after clipping: their total norm is max_grad_norm
    raw = gp.Run.open(out / "gradprobe").raw_scalars()
    post = np.sqrt(raw[raw.kind == "grad"].groupby("step")["sumsq"].sum().to_numpy())
    np.testing.assert_allclose(post, MAX_NORM, rtol=1e-3)
    # and per layer, pre-clip = post-clip / clip_coef
    g = raw[raw.kind == "grad"].set_index(["step", "layer"])["sumsq"]
    p = pre.set_index(["step", "layer"])
    common = g.index.intersection(p.index)
    assert len(common) > 5
    np.testing.assert_allclose(np.sqrt(g[common]) / p.loc[common, "clip_coef"],
                               p.loc[common, "norm"], rtol=1e-3)
    assert float(p["clip_coef"].max()) < 1.0
