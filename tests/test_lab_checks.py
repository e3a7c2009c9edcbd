"""The config checks the experiments share (lab.config_checks.need_*): each bad value gets one
ConfigError naming the experiment, the option and its value, with the option's default as the
hint; the boundaries are the ones Python's comparisons give."""

import math
from dataclasses import dataclass

import pytest

from gradprobe.errors import ConfigError
from gradprobe.lab import base, config_checks


@dataclass(frozen=True)
class Cfg:
    depth: int = 20
    lr: float = 0.01
    momentum: float = 0.9
    sizes: tuple[int, ...] = (2, 8)
    gains: tuple[float, ...] = (1.0, 1.5)


@pytest.mark.parametrize("depth", [-3, 0, 1, 2, 3])
def test_at_least_accepts_exactly_the_values_at_or_above_the_minimum(depth):
    cfg = Cfg(depth=depth)
    if depth >= 2:
        config_checks.need_at_least("demo", cfg, 2, "depth")
        return
    with pytest.raises(ConfigError) as err:
        config_checks.need_at_least("demo", cfg, 2, "depth")
    assert err.value.message == f"demo: needs depth >= 2, got depth={depth}"
    assert err.value.hint == "e.g. --depth 20"


@pytest.mark.parametrize("sizes", [(), (1, 8), (8, 1), (2, 8)])
def test_at_least_checks_every_element_of_a_tuple(sizes):
    ok = bool(sizes) and min(sizes) >= 2
    if ok:
        config_checks.need_at_least("demo", Cfg(sizes=sizes), 2, "sizes")
        return
    with pytest.raises(ConfigError, match=r"needs every sizes >= 2") as err:
        config_checks.need_at_least("demo", Cfg(sizes=sizes), 2, "sizes")
    assert f"sizes={sizes}" in err.value.message and err.value.hint == "e.g. --sizes 2,8"


@pytest.mark.parametrize("lr", [0.0, -1.0, math.inf, math.nan, 1e-300, 3.0])
def test_positive_means_finite_and_above_zero(lr):
    if lr > 0 and math.isfinite(lr):
        config_checks.need_positive("demo", Cfg(lr=lr), "depth", "lr")
        return
    with pytest.raises(ConfigError) as err:
        config_checks.need_positive("demo", Cfg(lr=lr), "depth", "lr")  # names the failing option only
    assert err.value.message == f"demo: lr must be a positive number, got lr={lr}"
    assert err.value.hint == "e.g. --lr 0.01"


def test_positive_tuple_names_the_option_and_its_default():
    with pytest.raises(ConfigError, match="gains must be positive numbers") as err:
        config_checks.need_positive("demo", Cfg(gains=(1.0, -2.0)), "gains")
    assert err.value.hint == "e.g. --gains 1,1.5"
    with pytest.raises(ConfigError, match="gains must be positive numbers"):
        config_checks.need_positive("demo", Cfg(gains=()), "gains")


@pytest.mark.parametrize("closed", [(True, False), (False, False), (True, True), (False, True)])
@pytest.mark.parametrize("value", [-0.1, 0.0, 0.5, 1.0, 1.1])
def test_within_follows_the_closed_ends(value, closed):
    inside = (value >= 0 if closed[0] else value > 0) and (value <= 1 if closed[1] else value < 1)
    cfg = Cfg(momentum=value)
    if inside:
        config_checks.need_within("demo", cfg, "momentum", 0, 1, closed=closed)
        return
    with pytest.raises(ConfigError) as err:
        config_checks.need_within("demo", cfg, "momentum", 0, 1, closed=closed)
    interval = ("[" if closed[0] else "(") + "0, 1" + ("]" if closed[1] else ")")
    assert err.value.message == f"demo: momentum must lie in {interval}, got momentum={value}"
    assert err.value.hint == "e.g. --momentum 0.9"


@pytest.mark.parametrize("name, options, words", [
    ("deep-relu", {"depth": 1}, ["deep-relu", "depth >= 2", "depth=1"]),
    ("rnn", {"radii": (0.9, -1.0)}, ["rnn", "radii must be positive numbers"]),
    ("pretraining", {"momentum": 1.0}, ["pretraining", "momentum must lie in [0, 1)"]),
    ("outliers", {"outlier_fraction": 0.5}, ["outliers", "(0, 0.5)", "outlier_fraction=0.5"]),
])
def test_experiments_word_their_errors_alike(name, options, words):
    with pytest.raises(ConfigError) as err:
        base.make_config(name, **options)
    assert all(w in err.value.message for w in words), err.value.message
    assert err.value.hint.startswith("e.g. --")
