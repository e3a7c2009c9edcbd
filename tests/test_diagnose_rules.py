"""Each diagnosis rule on hand-made frames (pure functions: DataFrames in, findings out)."""

import math

import numpy as np
import pandas as pd
import pytest

from gradprobe.diagnose import (
    api,
    cures,
    depth,
    growth,
    inputs,
    loss,
    nonfinite,
    optimisation,
    units,
)
from gradprobe.diagnose.frames import Frames

COLS = ["count", "mean", "std", "rms", "abs_mean", "norm", "min", "max", "abs_max", "zero_frac",
        "nonfinite", "saturated_frac", "dead_frac"]


def layers(spec):
    """spec: list of (name, type, shapes, activation)."""
    return pd.DataFrame([
        {"layer_id": i, "name": n, "type": t, "depth": i, "param_shapes": s, "activation": a}
        for i, (n, t, s, a) in enumerate(spec)
    ]).astype({"depth": "Int64"})


def mlp_layers(depth_, act="relu", width=16):
    spec = []
    for i in range(depth_):
        spec.append((f"fc{i}", "Linear", [[width, width], [width]], None))
        spec.append((f"act{i}", {"relu": "ReLU", "tanh": "Tanh"}[act], [], act))
    spec.append(("head", "Linear", [[4, width], [4]], None))
    return layers(spec)


def rows(values, steps=30, **extra):
    """values: {(layer, kind): dict of columns or callable(step) -> dict}."""
    out = []
    for step in range(steps):
        for (layer, kind), v in values.items():
            cols = v(step) if callable(v) else v
            row = {c: np.nan for c in COLS} | {"count": 64.0, "nonfinite": 0.0} | cols
            out.append({"step": step, "layer": layer, "kind": kind, **row, "skipped": False,
                        **extra})
    frame = pd.DataFrame(out)
    frame["layer_id"] = 0
    return frame


def frames(lay, scal, losses=None, events=None, config=None):
    return Frames(layers=lay, scalars=scal,
                  losses=losses if losses is not None else pd.DataFrame(columns=["step", "loss"]),
                  events=events if events is not None else pd.DataFrame(), config=config or {})


def profile(lay, rate, kind="act_grad"):
    """act_grad RMS falling by `rate` per weight layer toward the input."""
    names = [n for n, t in zip(lay["name"], lay["type"]) if t == "Linear"]
    n = len(names)
    return {(name, kind): {"rms": rate ** (n - 1 - i), "norm": 1.0} for i, name in
            enumerate(names)}


@pytest.mark.parametrize("rate,fires", [(0.3, True), (0.9, False), (1.0, False)])
def test_vanishing_fires_on_a_geometric_collapse_only(rate, fires):
    lay = mlp_layers(6)
    f = frames(lay, rows(profile(lay, rate)))
    found = depth.vanishing(f)
    assert bool(found) is fires
    if fires:
        assert found[0].rule == "vanishing-gradients"
        assert found[0].layers[0] == "fc0"
        assert found[0].remedies[0].name == "init_"


def test_vanishing_is_scale_free():
    lay = mlp_layers(6)
    base = depth.vanishing(frames(lay, rows(profile(lay, 0.3))))
    scaled_values = {k: {**v, "rms": v["rms"] * 1e-9} for k, v in profile(lay, 0.3).items()}
    scaled = depth.vanishing(frames(lay, rows(scaled_values)))
    assert base and scaled
    assert base[0].evidence[0].value == pytest.approx(scaled[0].evidence[0].value)


def test_depth_factor_0_9_fires_only_when_deep():
    shallow, deep = mlp_layers(5), mlp_layers(60)
    assert not depth.vanishing(frames(shallow, rows(profile(shallow, 0.9), steps=10)))
    assert depth.vanishing(frames(deep, rows(profile(deep, 0.9), steps=10)))


def test_sigmoid_vanishing_names_swap_first():
    lay = mlp_layers(6, act="tanh")
    found = depth.vanishing(frames(lay, rows(profile(lay, 0.3))))
    assert found[0].remedies[0].name == "swap_activations_"
    assert found[0].remedies[0].kwargs == {"to": "relu"}


def test_exploding_across_depth():
    lay = mlp_layers(8)
    found = depth.exploding_depth(frames(lay, rows(profile(lay, 2.0))))
    assert found and found[0].rule == "exploding-gradients"
    assert not depth.vanishing(frames(lay, rows(profile(lay, 2.0))))
    assert not depth.exploding_depth(frames(lay, rows(profile(lay, 1.05))))


def test_exploding_over_steps_growth_and_spike():
    lay = mlp_layers(2)
    grow = rows({("fc0", "grad"): lambda s: {"norm": 1.3 ** s}}, steps=40)
    assert growth.exploding_steps(frames(lay, grow))
    flat = rows({("fc0", "grad"): lambda s: {"norm": 1.0 + 0.3 * (s % 3)}}, steps=40)
    assert not growth.exploding_steps(frames(lay, flat))
    spike = rows({("fc0", "grad"): lambda s: {"norm": 1e3 if s == 25 else 1.0}}, steps=40)
    found = growth.exploding_steps(frames(lay, spike))
    assert found and found[0].steps == (25, 25)


def test_loss_spike_above_start_only():
    lay = mlp_layers(2)
    base = rows({("fc0", "grad"): {"norm": 1.0}}, steps=40)
    loss_up = pd.DataFrame({"step": range(40), "loss": [2.0 / (1 + s) if s != 30 else 50.0
                                                         for s in range(40)]})
    assert growth.exploding_steps(frames(lay, base, losses=loss_up))
    small = pd.DataFrame({"step": range(40), "loss": [2.0 / (1 + s) if s != 30 else 1.0
                                                       for s in range(40)]})
    assert not growth.exploding_steps(frames(lay, base, losses=small))


def test_amp_skipped_steps_are_not_findings():
    lay = mlp_layers(2)
    scal = rows({("fc0", "grad"): {"norm": 1.0, "nonfinite": 0.0}}, steps=40)
    scal.loc[scal["step"] == 20, ["norm", "nonfinite"]] = [math.inf, 5.0]
    scal.loc[scal["step"] == 20, "skipped"] = True
    ev = pd.DataFrame([{"step": 20, "layer": "fc0", "pass": "step", "kind": "grad",
                        "nonfinite": 5, "amp_skipped": True}])
    f = frames(lay, scal, events=ev)
    assert not nonfinite.nonfinite(f)
    assert not growth.exploding_steps(f)


def test_nonfinite_names_first_layer_pass_and_step():
    lay = mlp_layers(2)
    ev = pd.DataFrame([
        {"step": 7, "layer": "fc1", "pass": "backward", "kind": "act_grad", "nonfinite": 3,
         "amp_skipped": False},
        {"step": 9, "layer": "fc0", "pass": "forward", "kind": "act", "nonfinite": 8,
         "amp_skipped": False}])
    found = nonfinite.nonfinite(frames(lay, rows({}, steps=1), events=ev))
    assert found[0].layers == ("fc1",) and found[0].steps == (7, 9)
    assert "backward" in found[0].explanation


def test_nonfinite_flags_of_an_always_on_step_are_not_read_as_counts():
    """An always-on event flags layers (``nonfinite=-1``): the evidence counts the flagged
    layers and says the pass was inferred, never "-1 > 0"."""
    lay = mlp_layers(2)
    ev = pd.DataFrame([{"step": 30, "layer": "fc1", "pass": "act_grad", "kind": "act_grad",
                        "nonfinite": -1, "n_layers": 2, "amp_skipped": False,
                        "tier": "always", "inferred": True}])
    head = nonfinite.nonfinite(frames(lay, rows({}, steps=1), events=ev))[0].evidence[0]
    assert head.value == 2 and "flags" in head.name and "inferred" in head.note, head
    counted = ev.assign(nonfinite=12, tier=None, inferred=None)
    head = nonfinite.nonfinite(frames(lay, rows({}, steps=1), events=counted))[0].evidence[0]
    assert head.value == 12 and "inferred" not in head.note, head


def test_dead_relu_needs_persistence_and_samples():
    lay = mlp_layers(2)
    dead = rows({("act0", "act"): {"dead_frac": 0.8, "units": 16.0, "count": 1024.0}})
    assert units.dead_relu(frames(lay, dead))[0].layers == ("act0",)
    noisy = rows({("act0", "act"): lambda s: {"dead_frac": 0.8 if s % 2 else 0.1,
                                              "units": 16.0, "count": 1024.0}})
    assert not units.dead_relu(frames(lay, noisy))
    batch1 = rows({("act0", "act"): {"dead_frac": 0.5, "units": 16.0, "count": 16.0}})
    assert not units.dead_relu(frames(lay, batch1))


def test_saturation_ignores_an_output_sigmoid():
    lay = layers([("fc0", "Linear", [[8, 8]], None), ("t0", "Tanh", [], "tanh"),
                  ("fc1", "Linear", [[8, 8]], None), ("t1", "Tanh", [], "tanh"),
                  ("head", "Linear", [[1, 8]], None), ("out", "Sigmoid", [], "sigmoid")])
    scal = rows({("t0", "act"): {"saturated_frac": 0.2}, ("out", "act"):
                 {"saturated_frac": 0.99}})
    assert not units.saturation(frames(lay, scal))
    scal = rows({("t0", "act"): {"saturated_frac": 0.95}})
    found = units.saturation(frames(lay, scal))
    assert found[0].layers == ("t0",) and found[0].severity == "error"


def test_symmetry_constant_pair_not_identity_or_zero_head():
    lay = mlp_layers(2)
    const = {"rms": 0.1, "std": 0.0, "zero_frac": 0.0}
    rand = {"rms": 0.1, "std": 0.1, "zero_frac": 0.0}
    ident = {"rms": 0.2, "std": 0.2, "zero_frac": 0.94}
    zero = {"rms": 0.0, "std": 0.0, "zero_frac": 1.0}
    assert units.symmetry(frames(lay, rows({("fc0", "weight"): const, ("fc1", "weight"): zero,
                                             ("head", "weight"): rand})))
    assert not units.symmetry(frames(lay, rows({("fc0", "weight"): ident,
                                                ("fc1", "weight"): ident,
                                                ("head", "weight"): rand})))
    assert not units.symmetry(frames(lay, rows({("fc0", "weight"): rand,
                                                ("fc1", "weight"): rand,
                                                ("head", "weight"): zero})))


def _losses(values):
    return pd.DataFrame({"step": range(len(values)), "loss": values})


def test_loss_plateau_at_chance_and_not_on_learning():
    lay = mlp_layers(2)
    scal = rows({}, steps=1)
    flat = _losses([math.log(4) + 0.01 * np.sin(s) for s in range(50)])
    found = loss.loss_plateau(frames(lay, scal, losses=flat))
    assert found and any("chance" in e.note for e in found[0].evidence)
    learning = _losses([math.log(4) * math.exp(-s / 10) for s in range(50)])
    assert not loss.loss_plateau(frames(lay, scal, losses=learning))
    # the scale of the loss does not matter
    assert loss.loss_plateau(frames(lay, scal, losses=flat.assign(loss=flat["loss"] * 1e4)))


def test_learning_rate_high_low_and_healthy():
    lay = mlp_layers(3)

    def upd(v):
        return {(n, "update"): {"norm": v} for n in ("fc0", "fc1", "fc2", "head")}
    assert optimisation.learning_rate(frames(lay, rows(upd(0.5))))[0].evidence[0].value == 0.5
    low = optimisation.learning_rate(frames(lay, rows(upd(0.0))))
    assert low and low[0].remedies[0].kwargs["factor"] > 1
    assert not optimisation.learning_rate(frames(lay, rows(upd(1e-3))))


def test_input_scale_estimate():
    lay = layers([("fc0", "Linear", [[32, 100], [32]], None), ("r", "ReLU", [], "relu"),
                  ("head", "Linear", [[4, 32], [4]], None)])
    w = {"rms": 0.1, "std": 0.1}

    def scal(x_rms, peak=4.0):
        act_rms = x_rms * 0.1 * 10.0
        return rows({("fc0", "weight"): w, ("fc0", "drift"): {"norm": 1e-3},
                     ("fc0", "act"): {"rms": act_rms, "abs_max": peak * act_rms}})
    assert inputs.input_scale(frames(lay, scal(100.0)))
    assert not inputs.input_scale(frames(lay, scal(1.0)))
    assert inputs.input_scale(frames(lay, scal(1.0, peak=300.0)))


def test_rules_tolerate_empty_frames():
    f = frames(layers([("fc0", "Linear", [[2, 2]], None)]),
               pd.DataFrame(columns=["step", "layer", "kind", *COLS]))
    assert len(api.diagnose_frames(f)) == 0


def test_merge_keeps_one_finding_per_rule():
    lay = mlp_layers(8)
    scal = pd.concat([rows(profile(lay, 2.0), steps=40),
                      rows({("fc0", "grad"): lambda s: {"norm": 1.3 ** s}}, steps=40)])
    d = api.diagnose_frames(frames(lay, scal))
    assert d.rules.count("exploding-gradients") == 1
    f = next(iter(d))
    assert len(f.evidence) >= 3


# ---------------------------------------------------------------- inputs, spikes, cures

def _two_layer():
    return layers([("fc0", "Linear", [[32, 8], [32]], None), ("r0", "ReLU", [], "relu"),
                   ("fc1", "Linear", [[32, 32], [32]], None), ("r1", "ReLU", [], "relu"),
                   ("head", "Linear", [[4, 32], [4]], None)])


def test_small_inputs_seen_through_the_weight_gradient():
    # ‖g_l‖² = κ ‖δ_l‖² (fan_in · E[x²] + 1); κ = 3 on both layers, layer 2's input RMS 0.7
    def scal(x_rms):
        k, d1, d2, h = 3.0, 0.5, 2.0, 0.7
        return rows({
            ("fc0", "grad"): {"norm": math.sqrt(k * d1 ** 2 * (8 * x_rms ** 2 + 1))},
            ("fc1", "grad"): {"norm": math.sqrt(k * d2 ** 2 * (32 * h ** 2 + 1))},
            ("fc0", "act_grad"): {"norm": d1}, ("fc1", "act_grad"): {"norm": d2},
            ("r0", "act"): {"rms": h},
            ("fc0", "act"): {"rms": 0.3, "abs_max": 1.0}, ("fc0", "weight"): {"rms": 0.3},
        })
    est = inputs.input_rms_from_gradients(frames(_two_layer(), scal(1e-3)))
    assert est is not None and est[0] == "fc0" and est[1] < 0.01
    assert inputs.input_rms_from_gradients(frames(_two_layer(), scal(1.0)))[1] == \
        pytest.approx(1.0)
    found = inputs.input_scale(frames(_two_layer(), scal(1e-3)))
    assert found and "weight gradients" in found[0].evidence[0].name
    assert not inputs.input_scale(frames(_two_layer(), scal(1.0)))


def test_spikes_on_outlier_batches_are_the_inputs():
    lay = _two_layer()
    outliers = {15, 25, 33}

    def scal(surge, spikes=(25, 33)):
        return rows({
            ("fc0", "weight"): {"rms": 0.1},
            ("fc0", "act"): lambda s: {"rms": 100.0 if surge and s in outliers else 1.0,
                                       "abs_max": 4.0},
            ("fc0", "grad"): lambda s: {"norm": 100.0 if s in spikes else 1.0},
        }, steps=40)
    assert not growth.exploding_steps(frames(lay, scal(True)))
    found = inputs.input_scale(frames(lay, scal(True)))
    assert found and {e.name for e in found[0].evidence} >= {
        "a batch's input RMS / the quiet batches'", "gradient-norm spike on an outlier batch"}
    # the same spikes on clean batches are exploding gradients; a spike off the outliers too
    assert growth.exploding_steps(frames(lay, scal(False)))
    assert growth.exploding_steps(frames(lay, scal(True, spikes=(25, 30))))[0].steps == (30, 30)
    assert not inputs.input_scale(frames(lay, scal(False)))


def test_stuck_at_chance_after_falling_to_it():
    lay = layers([("fc0", "Linear", [[8, 2], [8]], None), ("s", "Sigmoid", [], "sigmoid"),
                  ("out", "Linear", [[1, 8], [1]], None)])
    scal = rows({("fc0", "weight"): {"rms": 1.0}}, steps=60)

    def losses(end):
        return pd.DataFrame({"step": range(60), "loss": [end + (0.85 - end) * math.exp(-s / 5)
                                                         for s in range(60)]})
    found = loss.loss_plateau(frames(lay, scal, losses=losses(math.log(2))))
    assert found and any("ln C" in e.name for e in found[0].evidence)
    for e in found[0].evidence:  # every comparison shown is one that holds
        if e.relation == "<":
            assert e.threshold is not None and e.value < e.threshold, e
    assert not loss.loss_plateau(frames(lay, scal, losses=losses(0.05)))


def test_cures_from_the_run():
    lay = _two_layer()
    g = rows({("fc0", "grad"): lambda s: {"norm": 3.0 + (s % 2)}}, steps=30)
    clip = cures.clip_for(frames(lay, g), "why")
    assert clip.kwargs["max_norm"] == pytest.approx(5 * 3.5, rel=0.05)  # 2 significant digits
    assert cures.clip_for(frames(lay, g[g["step"] < 3]), "why").kwargs == {"max_norm": 1.0}
    rnn = layers([("rnn", "LSTM", [[64, 1], [64, 16]], None), ("head", "Linear", [[1, 16]],
                                                                          None)])
    first = cures.init_model(frames(rnn, g), "why")[0]
    assert first.kwargs == {"scheme": "orthogonal", "gain": 1.0, "layers": ["rnn"]}
    assert [r.name for r in cures.init_model(frames(lay, g), "why")] == ["init_"]


def test_dead_relu_names_relu_for_the_swap():
    lay = mlp_layers(2)
    scal = rows({("act0", "act"): {"dead_frac": 0.9, "units": 16.0, "count": 64 * 16.0}})
    swap = [r for r in units.dead_relu(frames(lay, scal))[0].remedies
            if r.name == "swap_activations_"]
    assert swap and swap[0].kwargs == {"to": "leaky_relu", "from_": "relu"}


def test_growth_needs_a_sustained_rise_against_a_robust_start():
    lay = _two_layer()

    def run(norm):
        return growth.exploding_steps(frames(lay, rows({("fc0", "grad"): lambda s: {
            "norm": norm(s)}}, steps=60)))

    # a tiny first gradient (a flat start), then an ordinary level: no explosion
    assert not run(lambda s: 1e-3 if s == 0 else 0.2 + 0.05 * (s % 3))
    # a rise (no step a spike) that passes 100x the start for 4 smoothed steps only
    assert not run(lambda s: 1.27 ** s if s < 18 else 200.0 if s < 22 else 1.0)
    # geometric growth that holds: explosion, with the start taken as a median
    found = run(lambda s: 1.1 ** s)
    assert found and found[0].rule == "exploding-gradients"
    assert "median of the first" in found[0].evidence[0].note


def _budgeted(lay, full_steps, every_norm, steps):
    """A budgeted run's frames: ``grad`` rows at ``full_steps`` only, the always-on tier's
    per-step norm of ``fc0`` (``every_norm(step)``) at every step."""
    scal = rows({("fc0", "grad"): lambda s: {"norm": every_norm(s)}}, steps=steps)
    scal = scal[scal["step"].isin(full_steps)]
    norms = pd.DataFrame({"step": range(steps), "layer": "fc0",
                          "grad_norm": [every_norm(s) for s in range(steps)],
                          "grad_nonfinite": False, "skipped": False})
    return Frames(layers=lay, scalars=scal, norms=norms)


def test_a_slow_rise_between_sparse_full_steps_is_not_a_spike():
    lay = mlp_layers(2)
    full = [*range(10), *range(109, 114)]  # warm-up, then a triggered window 100 steps later
    f = _budgeted(lay, full, lambda s: min(1.035 ** s, 40.0), 150)  # x40 over 110 steps
    assert not growth.gradient_spikes(f).size and not growth.exploding_steps(f)
    # the full steps alone would show step 109 at 40x the median of the 10 steps before it
    sparse = Frames(layers=lay, scalars=f.scalars)
    assert growth.gradient_spikes(sparse).index.tolist()[:1] == [109]


def test_a_spike_on_an_always_on_step_is_found_at_its_step():
    lay = mlp_layers(2)
    f = _budgeted(lay, range(10), lambda s: 1e3 if s == 57 else 1.0, 100)
    found = growth.exploding_steps(f)
    assert found and found[0].steps == (57, 57)
    assert not growth.exploding_steps(Frames(layers=lay, scalars=f.scalars))  # not in the rows


def test_amp_skipped_steps_leave_the_every_step_norm():
    lay = mlp_layers(2)
    f = _budgeted(lay, range(10), lambda s: 1e3 if s == 57 else 1.0, 100)
    f.norms.loc[f.norms["step"] == 57, "skipped"] = True  # the scaler skipped that step
    assert 57 not in growth.grad_norm(f).index and not growth.exploding_steps(f)
    # a run written before the two tiers: the flag is on its scalars
    g = _budgeted(lay, range(100), lambda s: 1e3 if s == 57 else 1.0, 100)
    g.scalars.loc[g.scalars["step"] == 57, "skipped"] = True
    assert 57 not in growth.grad_norm(g).index
