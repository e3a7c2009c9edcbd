"""The Keras 3 callback with a real ``model.fit`` on the PyTorch backend, in a subprocess (the
backend is chosen once per process, when keras is imported): a Functional model with a nested
Sequential, fit a few steps with gradient clipping. The reference is this process's own torch
recomputation of the model from the weights Keras had before each step: forward, loss and
``torch.autograd`` gradients, with the kernels used as stored, ``(in, out)``."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import gradprobe as gp

if importlib.util.find_spec("keras") is None:
    pytest.skip("keras is not installed", allow_module_level=True)

N, BATCH, EPOCHS, LR, CLIP = 24, 8, 2, 0.1, 0.5
STEPS = EPOCHS * N // BATCH

SCRIPT = textwrap.dedent(f"""
    import json, sys, numpy as np, torch
    torch.set_num_threads(1)
    import keras
    from gradprobe.integrations.keras import GradprobeCallback
    out = sys.argv[1]
    keras.utils.set_random_seed(0)
    inp = keras.Input((3,))
    h = keras.layers.Dense(8, activation="tanh", name="d1")(inp)
    block = keras.Sequential([keras.Input((8,)), keras.layers.Dense(
        6, activation="relu", bias_initializer=keras.initializers.Constant(-0.7), name="d2")],
        name="block")
    o = keras.layers.Dense(1, name="out")(block(h))
    model = keras.Model(inp, o)
    model.compile(optimizer=keras.optimizers.SGD({LR}, global_clipnorm={CLIP}), loss="mse")
    x = np.random.RandomState(1).randn({N}, 3).astype("float32")
    y = (x[:, :1] * 2 - x[:, 1:2] ** 2).astype("float32")
    before = []

    class Weights(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            before.append([keras.ops.convert_to_numpy(v) for v in model.trainable_weights])

    with GradprobeCallback(out + "/run") as cb:
        model.fit(x, y, batch_size={BATCH}, epochs={EPOCHS}, shuffle=False, verbose=0,
                  callbacks=[cb, Weights()], validation_data=(x, y))
    before.append([keras.ops.convert_to_numpy(v) for v in model.trainable_weights])
    np.savez(out + "/ref.npz", x=x, y=y,
             **{{f"w{{t}}_{{i}}": w for t, ws in enumerate(before) for i, w in enumerate(ws)}})
    errors = {{}}
    for what, make in [
        ("run_dir", lambda: GradprobeCallback(3)),
        ("optimizer", lambda: GradprobeCallback(out + "/o", optimizer=None)),
        ("kinds", lambda: model.fit(x, y, epochs=1, verbose=0,
                                    callbacks=[GradprobeCallback(out + "/k", kinds=("gradient",))])),
    ]:
        try:
            make()
        except Exception as e:
            errors[what] = type(e).__name__ + ": " + str(e)
    model.compile(optimizer=keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1)),
                  loss="mse")
    try:
        model.fit(x, y, epochs=1, verbose=0, callbacks=[GradprobeCallback(out + "/ls")])
    except Exception as e:
        errors["loss_scale"] = type(e).__name__ + ": " + str(e)
    names = [v.path for v in model.trainable_weights]

    class Boom(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch == 2:
                raise RuntimeError("boom")

    model.compile(optimizer="sgd", loss="mse")
    with GradprobeCallback(out + "/boom") as cb:
        try:
            model.fit(x, y, batch_size=4, verbose=0, callbacks=[cb, Boom()])
        except RuntimeError:
            pass
    from gradprobe.integrations.keras import _activation
    conv = keras.Sequential([keras.Input((6, 6, 2)), keras.layers.Conv2D(3, 3, activation="relu"),
                             keras.layers.ReLU(), keras.layers.Flatten(),
                             keras.layers.Dense(4, activation="relu"),
                             keras.layers.ReLU(max_value=1.0),
                             keras.layers.Activation("sigmoid")])
    rules = [_activation(layer) for layer in conv.layers]
    json.dump({{"errors": errors, "names": names, "rules": rules}}, open(out + "/out.json", "w"))
""")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    out = tmp_path_factory.mktemp("keras")
    env = dict(os.environ, KERAS_BACKEND="torch", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(Path(gp.__file__).parents[1]),
                                           os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = np.load(out / "ref.npz")
    meta = json.loads((out / "out.json").read_text())
    return out, ref, meta


def reference(ref) -> dict[str, list]:
    """Per step: the loss, per layer Σg² of the loss's gradients, the weights' Σw² after the
    step and the layers' outputs, recomputed in torch from Keras's weights before the step."""
    torch.set_num_threads(1)
    x, y = torch.from_numpy(ref["x"]), torch.from_numpy(ref["y"])
    out: dict[str, list] = {k: [] for k in ("loss", "grad", "weight", "update", "act",
                                             "saturated", "dead")}
    for t in range(STEPS):
        k1, b1, k2, b2, k3, b3 = (torch.tensor(ref[f"w{t}_{i}"], requires_grad=True)
                                  for i in range(6))
        after = [torch.from_numpy(ref[f"w{t + 1}_{i}"]) for i in range(6)]
        i = (t % (N // BATCH)) * BATCH
        xb, yb = x[i:i + BATCH], y[i:i + BATCH]
        h1 = torch.tanh(xb @ k1 + b1)  # Dense: x @ kernel, kernel (in, out)
        h2 = torch.relu(h1 @ k2 + b2)
        o = h2 @ k3 + b3
        loss = (o - yb).pow(2).mean()
        grads = torch.autograd.grad(loss, [k1, b1, k2, b2, k3, b3])
        out["loss"].append(float(loss.detach()))
        out["grad"].append([float(sum(g.pow(2).sum() for g in grads[j:j + 2]))
                            for j in (0, 2, 4)])
        out["weight"].append([float(sum(w.pow(2).sum() for w in after[j:j + 2]))
                              for j in (0, 2, 4)])
        before = [k1, b1, k2, b2, k3, b3]
        out["update"].append([float(torch.sqrt(
            sum((after[j + m] - before[j + m].detach()).pow(2).sum() for m in (0, 1))
            / sum(after[j + m].pow(2).sum() for m in (0, 1)))) for j in (0, 2, 4)])
        out["act"].append([(float(a.sum()), float(a.pow(2).sum()), a.numel())
                           for a in (h1.detach(), h2.detach(), o.detach())])
        # tanh saturated where 1 - a² < 0.05; a ReLU unit dead when 0 on the whole batch
        out["saturated"].append(int((1 - h1.detach() ** 2 < 0.05).sum()))
        out["dead"].append(int((h2 == 0).all(0).sum()))
    return out


LAYERS = ["d1", "block/d2", "out"]


def test_layers_walked_by_their_keras_names(fitted):
    out, _, _ = fitted
    run = gp.Run.open(out / "run")
    lay = run.layers.set_index("name")
    assert list(lay.index) == LAYERS  # the nested model's layer under its model's name
    assert list(lay["type"]) == ["Dense"] * 3
    assert list(lay["activation"]) == ["tanh", "relu", None]
    assert lay.loc["d1", "param_shapes"] == [[3, 8], [8]]  # the kernel as Keras stores it


def test_statistics_equal_a_torch_recomputation_of_the_model(fitted):
    out, ref, _ = fitted
    want = reference(ref)
    run = gp.Run.open(out / "run")
    raw = run.raw_scalars().set_index(["kind", "step", "layer"]).sort_index()
    assert sorted(raw.index.get_level_values("step").unique()) == list(range(STEPS))

    def col(kind: str, field: str) -> np.ndarray:
        return np.array([[raw.loc[(kind, t, name), field] for name in LAYERS]
                         for t in range(STEPS)])

    np.testing.assert_allclose(run.losses()["loss"], want["loss"], rtol=1e-5)
    # gradients before the optimizer's clipping (they were clipped: total norm > CLIP)
    np.testing.assert_allclose(col("grad", "sumsq"), want["grad"], rtol=1e-4)
    assert (np.sqrt(np.sum(want["grad"], axis=1)) > CLIP).all()
    np.testing.assert_allclose(col("weight", "sumsq"), want["weight"], rtol=1e-5)
    upd = run.scalars(kinds="update").set_index(["step", "layer"])["norm"]
    np.testing.assert_allclose([[upd[(t, n)] for n in LAYERS] for t in range(STEPS)],
                               want["update"], rtol=1e-4)
    acts = np.array(want["act"])  # (step, layer, [sum, sumsq, count])
    np.testing.assert_allclose(col("act", "sum"), acts[..., 0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(col("act", "sumsq"), acts[..., 1], rtol=1e-4)
    assert (col("act", "count") == acts[..., 2]).all()  # validation passes not recorded
    # the activations applied inside the Dense layers are known: saturated and dead units
    np.testing.assert_array_equal(col("act", "saturated")[:, 0], want["saturated"])
    np.testing.assert_array_equal(col("act", "dead")[:, 1], want["dead"])
    assert sum(want["saturated"]) > 0 and sum(want["dead"]) > 0  # the comparison can fail


def test_bad_arguments_are_refused_with_the_fix(fitted):
    _, _, meta = fitted
    err = meta["errors"]
    assert err["run_dir"].startswith("ConfigError: run_dir must be a path")
    assert err["optimizer"].startswith("ConfigError: GradprobeCallback sets optimizer itself")
    assert "unknown kinds ['gradient']" in err["kinds"]
    assert err["loss_scale"].startswith("UnsupportedModelError: the model's optimizer is a "
                                        "LossScaleOptimizer")


def test_grad_rows_hold_each_layers_parameters_once(fitted):
    out, _, meta = fitted
    raw = gp.Run.open(out / "run").raw_scalars()
    counts = raw[(raw.kind == "grad") & (raw.step == 0)].set_index("layer")["count"]
    assert counts.to_dict() == {"d1": 3 * 8 + 8, "block/d2": 8 * 6 + 6, "out": 6 + 1}
    assert len(meta["names"]) == 6  # the model's trainable variables, all of them counted


def test_a_fit_that_raises_inside_with_keeps_the_steps_done(fitted):
    out, _, _ = fitted
    run = gp.Run.open(out / "boom")
    assert run.status == "closed"
    assert sorted(run.raw_scalars()["step"].unique()) == [0, 1]


def test_unit_rules_only_where_units_are_where_the_probe_counts_them(fitted):
    _, _, meta = fitted
    # channels-last image outputs (N, H, W, C) get none; a ReLU with a cap is not torch's ReLU
    assert meta["rules"] == [None, None, None, "relu", None, "sigmoid"]
