"""normalization: norms over batch sizes, BatchNorm's train vs eval mode; claims at a small size."""

import pytest
import torch
from torch import nn

from gradprobe.errors import ConfigError
from gradprobe.lab import train
from gradprobe.lab.experiments import normalization as N

SMALL = N.NormalizationConfig(batch_sizes=(2, 8), epochs=1, mlp_depth=6, cnn_depth=4,
                              channels=8)


@pytest.fixture(scope="module")
def result():
    with train.threads(1):
        return N.run(SMALL)


def test_batchnorm_mode_claims_hold(result):
    for prefix in ("BatchNorm in training mode", "forgetting model.eval()"):
        claim = result.claim(prefix)
        assert claim.holds, (claim.text, claim.evidence)


def test_small_batch_claims_are_computed_from_the_table(result):
    acc = result.tables["runs"].set_index(["arch", "norm", "batch"])["test_acc"]
    gn2, bn2 = acc[("MLP", "group", 2)], acc[("MLP", "batch", 2)]
    bn_drop = acc[("MLP", "batch", 8)] - bn2
    gn_drop = acc[("MLP", "group", 8)] - gn2
    expected = bool(gn2 - bn2 > 0.05 and bn_drop > gn_drop)
    assert result.claim("MLP: at batch 2").holds == expected
    # the CNN's BatchNorm pools 64 positions per image: its claim is that batch 2 does not hurt
    expected = bool(acc[("CNN", "batch", 2)] >= acc[("CNN", "batch", 8)] - 0.05)
    assert result.claim("CNN: BatchNorm2d").holds == expected


def test_large_batches_only_fail_the_small_batch_claim():
    # with batches of 32 and 64 BatchNorm has not degraded: GroupNorm does not beat it by 0.05
    with train.threads(1):
        r = N.run(N.NormalizationConfig(batch_sizes=(32, 64), epochs=1, mlp_depth=4,
                                        cnn_depth=2, channels=8))
    assert not r.claim("MLP: at batch 32").holds


def test_norms_are_inserted_by_add_norm():
    cfg = N.NormalizationConfig(mlp_depth=3, cnn_depth=2, channels=8)
    kinds = {"batch": (nn.BatchNorm1d, nn.BatchNorm2d), "layer": (nn.LayerNorm, nn.GroupNorm),
             "group": (nn.GroupNorm,), "instance": (nn.InstanceNorm2d,)}
    for arch, norms in N.NORMS.items():
        for norm in norms[1:]:
            model = N.build(arch, norm, cfg)
            found = [m for m in model if isinstance(m, kinds[norm])]
            assert len(found) == (3 if arch == "MLP" else 2), (arch, norm)


def test_groupnorm_output_does_not_depend_on_the_batch():
    model = N.build("CNN", "group", N.NormalizationConfig(cnn_depth=2, channels=8)).train()
    x = torch.randn(6, 64)
    torch.testing.assert_close(model(x)[:1], model(x[:1]))


def test_eval_single_equals_eval_batch(result):
    a = result.data["modes"]["acc"]
    assert a["eval"] == a["eval_single"]


def test_bad_config():
    with pytest.raises(ConfigError, match="batch sizes"):
        N.NormalizationConfig(batch_sizes=(1, 8)).validate()


def test_figures(result):
    figs = N.plot(result)
    assert set(figs) == {"batch_size", "loss_curves", "train_vs_eval"}
    for fig in figs.values():
        for ax in fig.axes:
            assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel()
