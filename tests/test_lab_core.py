"""The lab's contract (config parsing, writing), the shared training loop and figure helpers."""

from __future__ import annotations

import json
import math
import typing
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

import gradprobe as gp
from gradprobe.errors import ConfigError
from gradprobe.lab import base, train, zoo


@dataclass(frozen=True)
class _Cfg:
    n: int = 1
    x: float = 0.5
    flag: bool = False
    names: tuple[str, ...] = ("a",)
    values: tuple[float, ...] = (1.0,)
    mode: typing.Literal["fast", "slow"] = "fast"
    limit: float | None = None


def test_coerce_converts_every_field_type():
    hints = typing.get_type_hints(_Cfg)
    assert base._coerce("n", "12", hints["n"]) == 12
    assert base._coerce("x", "1e-3", hints["x"]) == pytest.approx(1e-3)
    assert base._coerce("flag", "yes", hints["flag"]) is True
    assert base._coerce("flag", "off", hints["flag"]) is False
    assert base._coerce("names", "a, b,c", hints["names"]) == ("a", "b", "c")
    assert base._coerce("values", "1.5,0.5", hints["values"]) == (1.5, 0.5)
    assert base._coerce("mode", "slow", hints["mode"]) == "slow"
    assert base._coerce("limit", "none", hints["limit"]) is None
    assert base._coerce("limit", "2.5", hints["limit"]) == 2.5
    assert base._coerce("n", 7, hints["n"]) == 7  # non-strings pass through


@pytest.mark.parametrize(
    "field, value, expected",
    [("n", "1.5", "int"), ("flag", "maybe", "bool"), ("mode", "medium", "one of 'fast', 'slow'"),
     ("values", "1,x", "comma-separated list of float"), ("limit", "big", "float or none")],
)
def test_coerce_errors_name_the_option_and_type(field, value, expected):
    hints = typing.get_type_hints(_Cfg)
    with pytest.raises(ConfigError) as err:
        base._coerce(field, value, hints[field])
    assert repr(field) in err.value.message and repr(value) in err.value.message
    assert expected in err.value.message
    assert err.value.hint and f"--{field}" in err.value.hint


def test_make_config_rejects_unknown_options_and_experiments():
    with pytest.raises(ConfigError, match="no option 'dept'") as err:
        base.make_config("linear-chain", dept=3)
    assert "depth" in (err.value.hint or "")
    with pytest.raises(ConfigError, match="unknown experiment 'nope'") as err:
        base.make_config("nope")
    assert "linear-chain" in (err.value.hint or "")
    cfg = base.make_config("linear-chain", depth="7", scales="2,0.25")
    assert cfg.depth == 7 and cfg.scales == (2.0, 0.25)


def test_write_produces_every_file_and_no_temporaries(tmp_path):
    result = gp.lab.run("linear-chain", depth=4, out=tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"main.csv", "main.md", "layers.csv", "linear_chain.png", "linear_chain.svg",
            "summary.json"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["config"]["depth"] == 4
    assert [c["holds"] for c in summary["claims"]] == [c.holds for c in result.claims]
    md = (tmp_path / "main.md").read_text().splitlines()
    assert md[0].startswith("| a |") and len(md) == 2 + len(result.table)
    assert (tmp_path / "linear_chain.png").read_bytes()[:4] == b"\x89PNG"


# --- training loop -------------------------------------------------------------------------


def _data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g)
    y = ((x ** 2).sum(1, keepdim=True) < 1.2).float()
    return x, y


def _reference_loop(model, x, y, *, lr, batch_size, epochs, seed):
    """The obvious loop, written out: same shuffles, Adam with the lab's defaults."""
    opt = torch.optim.Adam(model.parameters(), lr=lr, eps=1e-7)
    losses = []
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        batch_losses = []
        for start in range(0, len(x), batch_size):
            idx = order[start:start + batch_size]
            loss = nn.functional.binary_cross_entropy_with_logits(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            batch_losses.append(loss.item())
        losses.append(sum(batch_losses) / len(batch_losses))
    return losses


def test_fit_matches_the_obvious_loop_bit_for_bit():
    x, y = _data()
    with train.seeded(3):
        a = zoo.mlp([2, 6, 1], "tanh")
    with train.seeded(3):
        b = zoo.mlp([2, 6, 1], "tanh")
    result = train.fit(a, x, y, optimizer="adam", lr=0.01, batch_size=20, epochs=4, seed=5)
    ref = _reference_loop(b, x, y, lr=0.01, batch_size=20, epochs=4, seed=5)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    np.testing.assert_allclose(result.epoch_losses, ref, rtol=1e-6)
    assert result.steps_per_epoch == math.ceil(96 / 20) and result.steps == 4 * 5


def test_fit_is_deterministic_and_leaves_global_rng_alone():
    x, y = _data()
    before = torch.random.get_rng_state()
    runs = []
    for _ in range(2):
        with train.seeded(1):
            m = zoo.mlp([2, 5, 5, 1], "sigmoid")
        runs.append(train.fit(m, x, y, optimizer="rmsprop", batch_size=32, epochs=3, seed=2))
    assert torch.equal(before, torch.random.get_rng_state())
    assert runs[0].epoch_losses == runs[1].epoch_losses
    assert runs[0].accuracy_after == runs[1].accuracy_after


def test_accuracy_against_numpy():
    x, y = _data(50)
    with train.seeded(0):
        m = zoo.mlp([2, 4, 1], "relu")
    logits = m(x).detach().numpy()[:, 0]
    expected = np.mean((logits > 0).astype(float) == y.numpy()[:, 0])
    assert train.accuracy(m, x, y) == pytest.approx(expected)
    with train.seeded(0):
        m3 = zoo.mlp([2, 4, 3], "relu")
    labels = torch.arange(50) % 3
    expected3 = np.mean(m3(x).detach().numpy().argmax(1) == labels.numpy())
    assert train.accuracy(m3, x, labels) == pytest.approx(expected3)


def test_optimizers_by_name_and_bad_arguments():
    params = list(nn.Linear(2, 1).parameters())
    opt = train.make_optimizer("RMSprop", params)
    assert isinstance(opt, torch.optim.RMSprop)
    assert opt.defaults["alpha"] == 0.9 and opt.defaults["eps"] == 1e-7
    assert train.make_optimizer("momentum", params, lr=0.5).defaults["momentum"] == 0.9
    with pytest.raises(ConfigError, match="unknown optimizer 'lbfgsx'"):
        train.make_optimizer("lbfgsx", params)
    with pytest.raises(ConfigError, match="lr=-1"):
        train.make_optimizer("sgd", params, lr=-1)
    x, y = _data(10)
    m = nn.Linear(2, 1)
    with pytest.raises(ConfigError, match="batch_size=0"):
        train.fit(m, x, y, batch_size=0)
    with pytest.raises(ConfigError, match="as many targets"):
        train.fit(m, x, y[:5])
    with pytest.raises(ConfigError, match="unknown loss"):
        train.fit(m, x, y, loss="hinge")  # type: ignore[arg-type]


# --- figure helpers ------------------------------------------------------------------------


def test_scale_choice():
    from gradprobe.report import style

    assert style.spans_decades([1e-7, 1e-3]) and not style.spans_decades([0.1, 5.0])
    assert not style.spans_decades([0.0, 1e3])  # zero cannot go on a log axis
    assert style.choose_scale([1e-7, 1e-1]) == "log"
    assert style.choose_scale([0.2, 0.3]) == "linear"
    assert style.choose_scale([-1e-6, 1e2]) == "symlog"
    assert style.choose_scale([1e-7, 1.0], "linear") == "linear"


def test_layer_colours_and_legend_follow_depth():
    from gradprobe.report import style

    names = ["fc1", "fc2", "fc3", "out"]
    colors = style.layer_colors(names)
    assert list(colors) == names and len(set(colors.values())) == 4
    fig, axes = style.figure(1, 1, title="t")
    ax = axes[0, 0]
    series = {n: [10.0 ** -(3 * i), 10.0 ** -(3 * i + 1)] for i, n in enumerate(names)}
    used = style.plot_layers(ax, [0, 1], series, title="g", xlabel="epoch", ylabel="|g|")
    assert used == "log" and ax.get_yscale() == "log"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == names
    assert ax.get_title() == "g" and ax.get_xlabel() == "epoch" and ax.get_ylabel() == "|g|"
    assert [tuple(line.get_color()) for line in ax.get_lines()] == list(colors.values())


def test_distinct_colours_stay_distinct_past_the_house_palette():
    from gradprobe.report import style

    few = [f"c{i}" for i in range(len(style.CATEGORY_COLORS))]
    assert style.distinct_colors(few) == style.category_colors(few)
    for n in (len(few) + 1, 10, 15, 20):  # category_colors would cycle here
        names = [f"c{i}" for i in range(n)]
        colors = style.distinct_colors(names)
        assert list(colors) == names and len(set(colors.values())) == n, n


def test_fit_stacked_equals_separate_training():
    seeds = [0, 1, 2]
    data = [_data(70, seed=s) for s in seeds]

    def build(s):
        with train.seeded(10 + s):
            return zoo.mlp([2, 5, 5, 1], "sigmoid")

    alone = [build(s) for s in seeds]
    together = [build(s) for s in seeds]
    ref = [train.fit(m, *d, optimizer="adam", lr=0.01, batch_size=16, epochs=3, seed=s)
           for m, d, s in zip(alone, data, seeds)]
    got = train.fit_stacked(together, data, seeds=seeds, optimizer="adam", lr=0.01,
                            batch_size=16, epochs=3)
    for m_ref, m_got in zip(alone, together):
        for p_ref, p_got in zip(m_ref.parameters(), m_got.parameters()):
            torch.testing.assert_close(p_got, p_ref, rtol=1e-5, atol=1e-6)
    for r, g in zip(ref, got):
        np.testing.assert_allclose(g.epoch_losses, r.epoch_losses, rtol=1e-5)
        assert g.accuracy_after == r.accuracy_after and g.accuracy_before == r.accuracy_before


def test_fit_stacked_rejects_mismatches():
    x, y = _data(20)
    with pytest.raises(ConfigError, match="one data set and one seed per model"):
        train.fit_stacked([zoo.mlp([2, 3, 1])], [(x, y)], seeds=[0, 1])
    with pytest.raises(ConfigError, match="differ at position"):
        train.StackedMLP([zoo.mlp([2, 3, 1], "tanh"), zoo.mlp([2, 3, 1], "relu")])
    with pytest.raises(ConfigError, match="differ in size"):
        train.fit_stacked([zoo.mlp([2, 3, 1]), zoo.mlp([2, 3, 1])], [(x, y), (x[:10], y[:10])],
                          seeds=[0, 1])
    for bad, match in (({"batch_size": 0}, "batch_size=0"), ({"epochs": -1}, "epochs=-1")):
        with pytest.raises(ConfigError, match=match):  # the same checks as fit's (train.Loop)
            train.fit_stacked([zoo.mlp([2, 3, 1])], [(x, y)], seeds=[0], **bad)
        with pytest.raises(ConfigError, match=match):
            train.fit(zoo.mlp([2, 3, 1]), x, y, **bad)


def test_linear_chain_builder_inits_and_rejects_unknown():
    import torch

    from gradprobe.errors import ConfigError
    from gradprobe.lab.zoo import linear_chain

    net = linear_chain(16, 3, "orthogonal", dtype=torch.float64)
    for layer in net:
        w = layer.weight
        torch.testing.assert_close(w @ w.T, torch.eye(16, dtype=torch.float64), atol=1e-5, rtol=0)  # drawn in float32
        assert layer.bias is None
    wide = linear_chain(400, 1, "gaussian")
    assert abs(wide[0].weight.std().item() - 400**-0.5) < 0.02 * 400**-0.5
    with pytest.raises(ConfigError, match="unknown linear-chain init 'identity'"):
        linear_chain(4, 2, "identity")
