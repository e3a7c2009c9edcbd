"""circles: the displayed claims at a reduced size, Probe records against a hand-written loop,
reruns, the stacked Part 1 against separate training, bad options."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

import gradprobe as gp
from gradprobe.errors import ConfigError
from gradprobe.lab import train
from gradprobe.lab.experiments import circles

SMALL = {"epochs": 6, "seeds": 5}


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("circles")
    config = gp.lab.make_config("circles", **SMALL)
    return gp.lab.get("circles").run(config, out=out), out


DEEPER = "part 1: more layers is even worse"


def test_every_claim_holds_at_reduced_size(result):
    res, _ = result
    assert len(res.claims) == 4
    for claim in res.claims:
        if not claim.text.startswith(DEEPER):
            assert claim.holds, claim
    # after 6 epochs neither sigmoid network has left chance: "deeper is worse" cannot be told
    # apart yet, and the claim says so by failing (it holds from about 30 epochs, below)
    assert not res.claim(DEEPER).holds
    seeds = res.tables["seeds"]
    part2 = seeds[seeds.part == 2].groupby("activation")["acc_after"].mean()
    assert part2["sigmoid"] < part2["tanh"] and part2["sigmoid"] < part2["relu"]
    assert part2["sigmoid"] < 0.6  # no better than chance by much
    ratio = res.tables["gradient_ratio"].groupby("activation")["first_over_last"].median()
    assert ratio["sigmoid"] < 0.1 * ratio["tanh"]


def test_tables_runs_and_figures(result):
    res, out = result
    main = res.table
    assert list(main["part"]) == [1, 1, 1, 2, 2, 2]
    assert ((main["acc_after"] >= 0) & (main["acc_after"] <= 1)).all()
    seeds = res.tables["seeds"]
    assert len(seeds) == 6 * SMALL["seeds"]
    # mean ± std in the main table are those of the per-seed rows
    for (part, model), frame in seeds.groupby(["part", "model"]):
        row = main[(main.part == part) & (main.model == model)].iloc[0]
        assert row["acc_after"] == pytest.approx(frame["acc_after"].mean())
        assert row["acc_after_std"] == pytest.approx(frame["acc_after"].std())
    assert set(res.runs) == {f"{a}-seed{s}" for a in ("sigmoid", "tanh", "relu") for s in range(5)}
    for name, path in res.runs.items():
        assert path == out / "runs" / name and (path / "meta.json").exists()
    written = gp.lab.write(res, out, formats=("png",))
    for fig in ("accuracy_loss", "part2_weights", "part2_gradients"):
        assert out / f"{fig}.png" in written and (out / f"{fig}.png").stat().st_size > 20_000
    curves = res.tables["curves"]
    assert curves.groupby(["model", "seed"]).size().eq(SMALL["epochs"]).all()
    # the loss band the figure draws: mean ± std over seeds of each model's per-epoch loss
    bands = res.tables["loss_by_epoch"]
    assert len(bands) == 6 * SMALL["epochs"]
    for model, frame in curves.groupby("model"):
        wide = frame.pivot(index="epoch", columns="seed", values="loss")
        band = bands[bands.model == model].set_index("epoch")
        assert list(band.index) == list(range(1, SMALL["epochs"] + 1))
        assert band["loss_mean"].to_numpy() == pytest.approx(wide.mean(axis=1).to_numpy())
        assert band["loss_std"].to_numpy() == pytest.approx(wide.std(axis=1).to_numpy())


def test_more_layers_is_even_worse_for_sigmoid_after_50_epochs():
    res = gp.lab.run("circles", epochs=50, seeds=5, activations=("relu",))
    claim = res.claim(DEEPER)
    assert claim.holds, claim
    part1 = res.tables["seeds"].query("part == 1").groupby("model")["acc_after"].mean()
    assert part1["2-5-5-5-1 sigmoid"] < part1["2-5-1 sigmoid"] < part1["2-5-1 relu"]


def test_weight_figure_reads_weights_alone_from_init_to_the_end(result):
    """The kernel table starts at the drawn initialisation and ends with the trained model."""
    res, _ = result
    k = res.tables["kernels"]
    assert sorted(set(k["epoch"])) == list(range(SMALL["epochs"] + 1))
    model = circles._build((2, 5, 5, 5, 5, 1), "sigmoid", "normal", 0)
    start = k[(k.activation == "sigmoid") & (k.seed == 0) & (k.epoch == 0)].set_index("layer")
    for name in ("fc1", "fc2", "out"):
        w = getattr(model, name).weight.detach()
        assert start.loc[name, "std"] == pytest.approx(float(w.std(unbiased=False)), rel=1e-6)
        assert start.loc[name, "mean"] == pytest.approx(float(w.mean()), abs=1e-7)


def _loop(model, opt, x, y, seed, names, expected):
    for epoch in range(2):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        for i, start in enumerate(range(0, len(x), 32)):
            idx = order[start:start + 32]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            if i == 0:  # the Probe records the first step of each epoch
                for name in names:
                    layer = getattr(model, name)
                    w = torch.cat([layer.weight.detach().ravel(), layer.bias.detach().ravel()])
                    g = torch.cat([layer.weight.grad.ravel(), layer.bias.grad.ravel()])
                    expected[(epoch + 1, name, "weight")] = (w.mean(), w.std(unbiased=False), None)
                    expected[(epoch + 1, name, "grad")] = (g.mean(), g.std(unbiased=False),
                                                           g.abs().mean())
            opt.zero_grad()


def test_probe_records_match_a_hand_written_loop(result):
    """Re-train sigmoid seed 1 by hand and compare the per-layer statistics the Probe wrote."""
    res, _ = result
    seed, act = 1, "sigmoid"
    model = circles._build((2, 5, 5, 5, 5, 1), act, "normal", seed)
    x, y, _, _ = circles._datasets(circles.CirclesConfig(), seed)
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-3, alpha=0.9, eps=1e-7)
    names = ["fc1", "fc2", "fc3", "fc4", "out"]
    expected = {}
    with train.threads(1):
        _loop(model, opt, x, y, seed, names, expected)
    rec = res.tables["layers"]
    rec = rec[(rec.activation == act) & (rec.seed == seed)].set_index(["epoch", "layer", "kind"])
    for key, (mean, std, abs_mean) in expected.items():
        row = rec.loc[key]
        assert row["mean"] == pytest.approx(float(mean), rel=1e-4, abs=1e-9)
        assert row["std"] == pytest.approx(float(std), rel=1e-4)
        if abs_mean is not None:
            assert row["abs_mean"] == pytest.approx(float(abs_mean), rel=1e-4)


def test_rerun_gives_identical_numbers(tmp_path):
    exp = gp.lab.get("circles")  # run() only: no figures to draw
    config = gp.lab.make_config("circles", epochs=1, seeds=2)
    a = exp.run(config, out=tmp_path / "a")
    b = exp.run(config, out=tmp_path / "b")
    for name in ("main", "seeds", "curves", "layers"):
        assert a.tables[name].equals(b.tables[name]), name


def test_without_out_runs_go_to_a_temporary_folder():
    res = gp.lab.run("circles", epochs=1, seeds=1, part1=False, activations=("tanh",))
    (path,) = res.runs.values()
    try:
        assert path.exists() and "gradprobe-circles-" in str(path)
        assert list(res.table["model"]) == ["2-5-5-5-5-1 tanh, N(0,1²)"]
        assert np.isnan(res.table["tutorial"]).sum() == 0
    finally:
        shutil.rmtree(path.parent, ignore_errors=True)


@pytest.mark.parametrize(
    "options, match",
    [({"epochs": 0}, "epochs=0"), ({"seeds": 0}, "seeds=0"), ({"activations": ("swish2",)}, "swish2"),
     ({"factor": 1.5}, "factor=1.5"), ({"weight_std": -1.0}, "weight_std=-1")],
)
def test_bad_options(options, match):
    with pytest.raises(ConfigError, match=match) as err:
        gp.lab.run("circles", **options)
    assert err.value.hint
