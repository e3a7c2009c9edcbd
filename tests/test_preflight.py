"""preflight: measurement against autograd, theory against measurement, verdict against training."""

import copy
import math
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradprobe as gp
from gradprobe.errors import ConfigError, NonFiniteError, UnsupportedModelError
from gradprobe.lab import train
from gradprobe.lab.data import circles
from gradprobe.lab.zoo import mlp
from gradprobe.theory import meanfield as mf

# torch.func's first use imports torch.jit helpers that warn about their own deprecation.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


def _init(net, s2, b2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen)
                               * math.sqrt(s2 / m.weight[0].numel()))
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * math.sqrt(b2))
    return net


def _reference_stats(net, x, seed):
    """Mean squares of every Linear output and of its gradient, by retain_grad (slow path)."""
    outs = []
    h = x
    for m in net:
        h = m(h)
        if isinstance(m, nn.Linear):
            h.retain_grad()
            outs.append(h)
    gen = torch.Generator().manual_seed(seed)
    h.backward(torch.randn(h.shape, generator=gen))
    return ([float(o.detach().double().pow(2).mean()) for o in outs],
            [float(o.grad.double().pow(2).mean()) for o in outs])


def test_measurements_match_autograd_reference_with_inplace_relu():
    torch.manual_seed(0)
    net = mlp([30, 40, 40, 40, 5], "relu")
    for m in net:
        if isinstance(m, nn.ReLU):
            m.inplace = True
    x = torch.randn(64, 30)
    report = gp.preflight(net, x, seed=7)
    ref_net = copy.deepcopy(net)
    for m in ref_net:
        if isinstance(m, nn.ReLU):
            m.inplace = False
    q_ref, g_ref = _reference_stats(ref_net, x, seed=7)
    rows = report.table().set_index("name").loc[["fc1", "fc2", "fc3", "out"]]
    np.testing.assert_allclose(rows["q_measured"].to_numpy(), q_ref, rtol=1e-5)
    np.testing.assert_allclose(rows["grad_ms"].to_numpy(), g_ref, rtol=1e-5)
    np.testing.assert_allclose(rows["ratio_measured"].to_numpy()[:3],
                               np.array(g_ref[:3]) / np.array(g_ref[1:]), rtol=1e-5)


def test_model_is_left_exactly_as_it_was():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(inplace=True),
                        nn.Dropout(0.3), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2))
    net.train()
    net[0].weight.grad = torch.ones_like(net[0].weight)  # an existing gradient stays
    state = copy.deepcopy(net.state_dict())
    x, y = torch.randn(32, 8), torch.randint(0, 2, (32,))
    rng = torch.get_rng_state()
    report = gp.preflight(net, x, F.cross_entropy, y)
    assert report.verdict in {"vanishing", "exploding", "fine"}
    after = net.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)  # BN running stats restored
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(net[0].weight.grad, torch.ones_like(net[0].weight))
    assert all(p.grad is None for n, p in net.named_parameters() if n != "0.weight")
    assert all(not m._forward_hooks for m in net.modules())
    assert net.training and net[3].training


def test_predictions_follow_the_mean_field_trajectory_and_agree_with_measurement():
    # Widths change from layer to layer: the prediction carries n_{l+1}/n_l.
    widths, s2, b2 = [200, 300, 150, 250, 200, 400, 200, 200, 300, 150, 200, 250, 200], 1.5, 0.05
    logs_meas, logs_pred = [], []
    for seed in range(3):
        torch.manual_seed(seed)
        net = _init(mlp(widths + [10], "tanh"), s2, b2, seed)
        x = torch.randn(128, widths[0])
        table = gp.preflight(net, x, seed=seed).table().set_index("name")
        # Slow reference: the recursion by hand from the weights actually drawn.
        linears = [m for m in net if isinstance(m, nn.Linear)]
        q = None
        for i, lin in enumerate(linears[:-1]):
            s_w2 = lin.in_features * float(lin.weight.detach().double().pow(2).mean())
            s_b2 = float(lin.bias.detach().double().pow(2).mean())
            if q is None:
                q = s_w2 * float(x.double().pow(2).mean()) + s_b2
            else:
                q = s_w2 * mf.second_moment("tanh", q) + s_b2
            nxt = linears[i + 1]
            pred = nxt.out_features * float(nxt.weight.detach().double().pow(2).mean()) * \
                mf.derivative_second_moment("tanh", q)
            name = f"fc{i + 1}"
            assert table.loc[name, "q_predicted"] == pytest.approx(q, rel=1e-9)
            assert table.loc[name, "ratio_predicted"] == pytest.approx(pred, rel=1e-9)
        rows = table[table["ratio_predicted"].notna()].iloc[:-1]  # the narrow out layer apart
        logs_meas.append(np.log(rows["ratio_measured"].to_numpy(float)))
        logs_pred.append(np.log(rows["ratio_predicted"].to_numpy(float)))
    assert math.exp(np.mean(logs_meas) - np.mean(logs_pred)) == pytest.approx(1.0, abs=0.03)
    # Per layer too (an inverted width ratio would cancel in the mean): three seeds, 10 %.
    per_layer = np.mean(logs_meas, axis=0) - np.mean(logs_pred, axis=0)
    assert np.ptp(np.mean(logs_pred, axis=0)) > 0.5  # the widths really move the ratios
    assert np.max(np.abs(per_layer)) < 0.1


def test_unsupported_layers_are_measured_and_marked():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(16, 16)
            self.act = nn.Tanh()

        def forward(self, x):
            return x + self.act(self.lin(x))

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU(), Residual(),
                        nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 3))
    report = gp.preflight(net, torch.randn(16, 8))
    t = report.table().set_index("name")
    assert len(t) == 8  # every leaf module that ran has a row
    assert not t.loc["0", "theory"] and "LayerNorm" in t.loc["0", "note"]
    assert not t.loc["1", "theory"]
    assert not t.loc["2", "theory"] and "not preceded" in t.loc["2", "note"]
    # The residual's Linear feeds tanh, but the sum, not a weight layer, consumes tanh's output.
    assert t.loc["3.lin", "theory"] and math.isnan(t.loc["3.lin", "ratio_predicted"])
    assert t.loc["4", "theory"] and t.loc["4", "activation"] == "gelu"
    assert t.loc["6", "activation"] == "identity"
    assert np.isfinite(t["grad_ms"].to_numpy(float)).all()
    assert "no theory" in str(report)
    assert report.verdict_basis == "measurement"  # theory does not cover the whole chain


def test_conv_layers_are_supported_with_fan_out_per_input_element():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 64, 10),
    )
    _init(net, 2.0, 0.0)
    t = gp.preflight(net, torch.randn(32, 16, 8, 8)).table().set_index("name")
    assert t.loc["0", "fan_in"] == 16 * 9 and t.loc["2", "fan_out"] == 32 * 9
    assert t.loc["2", "ratio_predicted"] == pytest.approx(1.0, rel=0.1)  # He init: critical
    # Zero padding loses the border: on 8x8 maps the measured ratio is somewhat below 1.
    assert 0.7 < t.loc["2", "ratio_measured"] < 1.1
    assert t.loc["4", "next_layer"] == "7"  # through Flatten


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny nets: one thread avoids oversubscribing a shared CPU (10x faster there).
    with train.threads(1):
        yield


def _training_shows(net, x, y, steps=60, threshold=6.0):
    """What training shows, in preflight's own quantity: the Probe records dL/dh at every Linear
    output; G_t = ln(sum of squares at the first / at the last) over the learning phase (the steps
    before the training loss first falls below 0.1 ln 2, at least 10). Non-finite anywhere or
    median G_t > threshold: exploding; median G_t < -threshold: vanishing; else fine."""
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    with tempfile.TemporaryDirectory() as d:
        with gp.Probe(net, opt, run_dir=d, kinds=("drift", "act_grad"),
                      layer_types=(nn.Linear,)) as probe:
            for _ in range(steps):
                loss = F.binary_cross_entropy_with_logits(net(x), y)
                probe.observe_loss(loss)
                opt.zero_grad()
                loss.backward()
                opt.step()
        run = gp.Run.open(d)
        s, losses = run.scalars(), run.losses()["loss"].to_numpy(dtype=float)
    nonfinite = not np.isfinite(losses).all() or bool(s["nonfinite"].gt(0).any())
    below = np.flatnonzero(losses < 0.1 * math.log(2))
    s = s[s["step"] < max(int(below[0]) if len(below) else steps, 10)]

    def norm(layer, kind):
        return s[(s["layer"] == layer) & (s["kind"] == kind)]["norm"].to_numpy(dtype=float)

    with np.errstate(divide="ignore", invalid="ignore"):
        g = 2 * np.log(norm("fc1", "act_grad") / norm("out", "act_grad"))
        drift = np.log(norm("fc1", "drift")[-1] / norm("out", "drift")[-1])
    g_med = float(np.median(g[np.isfinite(g)]))
    verdict = ("exploding" if nonfinite or g_med > threshold
               else "vanishing" if g_med < -threshold else "fine")
    return verdict, g_med, float(drift), float(losses.min())


def test_verdict_agrees_with_what_training_shows():
    # Judged by the gradient phenomenon during training, not by final accuracy (a net whose early
    # layers' gradients vanish can still fit circles with its last layers). SGD, whose steps are
    # proportional to the gradients; Adam's per-parameter normalisation can undo a moderate
    # vanishing within tens of steps (docs/theory.md, "Verdict vs training").
    x, y, _, _ = circles(400, seed=0)
    bce = F.binary_cross_entropy_with_logits
    crit_s2 = mf.critical_sigma_w2("tanh", 0.05)
    sizes = [2] + [32] * 24 + [1]
    sigmoid = mlp(sizes, "sigmoid")
    gen = torch.Generator().manual_seed(0)
    for m in sigmoid.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight, generator=gen)
            nn.init.zeros_(m.bias)
    nets = {
        "tanh ordered": (_init(mlp(sizes, "tanh"), 0.5, 0.05), "vanishing"),
        "tanh critical": (_init(mlp(sizes, "tanh"), crit_s2, 0.05), "fine"),
        "relu sigma_w2=3": (_init(mlp(sizes, "relu"), 3.0, 0.0), "exploding"),
        "sigmoid xavier": (sigmoid, "vanishing"),
    }
    reports = {}
    for name, (net, expected) in nets.items():
        torch.manual_seed(0)
        reports[name] = report = gp.preflight(net, x, bce, y)
        verdict, g_train, drift, best_loss = _training_shows(net, x, y)
        assert report.verdict == verdict == expected, (name, report, g_train)
        if expected == "vanishing":
            # The first layer barely leaves its initialisation compared with the last.
            assert drift < -3, (name, drift)
        if name == "tanh critical":
            assert best_loss < 0.3, best_loss  # and it learns
    r_crit = reports["tanh critical"]
    assert r_crit.meanfield is not None
    assert r_crit.meanfield.chi1 == pytest.approx(1.0, abs=0.05)  # drawn weights: near 1
    r_ord = reports["tanh ordered"]
    assert r_ord.phase == "ordered" and r_ord.verdict_basis == "theory"
    assert r_ord.predicted_log_gain is not None
    # Theory's gain and the measured one agree to well within the ±6 verdict band.
    assert abs(r_ord.predicted_log_gain - r_ord.measured_log_gain) < 3
    assert r_ord.max_depth is not None and r_ord.max_depth < 24
    # The fix uses the biases actually drawn (32 of them: σ_b² within ~25 % of 0.05).
    fix = r_ord.fix
    assert fix is not None and fix.sigma_w2 == pytest.approx(1.76, abs=0.1)
    assert mf.chi1("tanh", fix.sigma_w2, fix.sigma_b2) == pytest.approx(1.0, abs=1e-6)


def test_bad_inputs_give_one_clear_error():
    net = mlp([4, 8, 2], "tanh")
    with pytest.raises(UnsupportedModelError, match="nn.Module"):
        gp.preflight(lambda x: x, torch.randn(8, 4))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="tensor or a tuple"):
        gp.preflight(net, [[1.0, 2.0]])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="at least 2"):
        gp.preflight(net, torch.randn(1, 4))
    with pytest.raises(ConfigError, match="scalar"):
        gp.preflight(net, torch.randn(8, 4), lambda out: out)
    with pytest.raises(ConfigError, match="threshold"):
        gp.preflight(net, torch.randn(8, 4), threshold=-1.0)
    huge = _init(mlp([4, 8, 8, 2], "relu"), 1e80, 0.0)
    with pytest.raises(NonFiniteError, match="non-finite"):
        gp.preflight(huge, torch.randn(8, 4))


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "gradprobe.cli.main", "preflight", *args],
                          capture_output=True, text=True, cwd=cwd)


def _cli_inproc(capsys, *args):
    """The same entry point in this process (no interpreter start-up per case)."""
    from gradprobe.cli.main import main

    with pytest.raises(SystemExit) as exc:
        main(["preflight", *args])
        raise SystemExit(0)
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


def test_cli_mlp_verdicts_and_csv(tmp_path, capsys):
    out = _cli("--mlp", "64,64x16,10", "--activation", "tanh", "--init", "sigma_w2:0.5",
               "--sigma-b2", "0.05", "--csv", str(tmp_path / "t.csv"))
    assert out.returncode == 0, out.stderr
    assert "VANISHING" in out.stdout and (tmp_path / "t.csv").exists()
    code, stdout, _ = _cli_inproc(capsys, "--mlp", "64,64x16,10", "--activation", "tanh",
                                  "--init", "critical", "--sigma-b2", "0.05")
    assert code == 0 and "FINE" in stdout


def test_cli_model_factory_and_errors(tmp_path, capsys, monkeypatch):
    (tmp_path / "mynets.py").write_text(textwrap.dedent("""
        import torch
        def make():
            return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(),
                                       torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 4))
    """))
    out = _cli("--model", "mynets:make", "--input-shape", "8,3,8,8", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "Conv2d" in out.stdout
    for args, message in [
        (["--mlp", "10,ax3"], "not a list of widths"),
        (["--mlp", "10,10", "--init", "bogus"], "unknown --init"),
        (["--mlp", "10,10", "--init", "normal:abc"], "must be a number"),
        (["--model", "mynets"], "module.path:factory"),
        (["--model", "mynets:make"], "--input-shape"),
        (["--model", "mynets:make", "--input-shape", "8,3,5,5"], "failed on inputs"),
        (["--model", "mynets:nothing", "--input-shape", "8,3,8,8"], "no callable"),
        ([], "exactly one of"),
    ]:
        monkeypatch.chdir(tmp_path)
        code, _, err = _cli_inproc(capsys, *args)
        assert code == 2, (args, err)
        assert message in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 2  # error + hint


def test_saturation_decides_trainability_and_matches_the_gaussian_fraction():
    # Sigmoid with N(0, 1.5²) weights: chi1 ~ 1 (gain "fine"), but most hidden units saturated.
    torch.manual_seed(0)
    net = mlp([32] + [64] * 6 + [10], "sigmoid")
    for m in net.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=1.5)
            nn.init.zeros_(m.bias)
    report = gp.preflight(net, torch.randn(512, 32))
    assert report.verdict == "fine" and not report.trainable
    assert any(r.startswith("saturated") for r in report.reasons)
    # Reference: a Gaussian pre-activation of second moment q is saturated (sigma' < 0.0125)
    # where |u| > logit(0.98734), with probability erfc(u_sat / sqrt(2q)).
    band = (1 - math.sqrt(1 - 0.05)) / 2
    u_sat = math.log((1 - band) / band)
    t = report.table().set_index("name")
    hidden_q = [t.loc[f"fc{i}", "q_measured"] for i in range(2, 7)]
    expected = np.mean([math.erfc(u_sat / math.sqrt(2 * q)) for q in hidden_q])
    assert report.saturation == pytest.approx(expected, abs=0.05)
    assert report.mean_shift > 0.5 and "common to all examples" in str(report)


def test_common_mode_against_a_loop_and_a_centred_net():
    from gradprobe.theory.measure import common_mode

    a = (torch.randn(50, 7) + torch.linspace(-2, 2, 7)).double()
    mean = sum(float(a[:, j].mean()) ** 2 for j in range(7))
    total = sum(float(a[:, j].pow(2).mean()) for j in range(7))
    assert float(common_mode(a)) == pytest.approx(mean / total, rel=1e-9)
    net = _init(mlp([32, 64, 64, 64, 10], "tanh"), 1.0, 0.0)  # centred, critical
    report = gp.preflight(net, torch.randn(256, 32))
    assert report.trainable and report.reasons == () and report.mean_shift < 0.1
    assert report.saturation < 0.05 and report.degree < 1


def test_chaos_and_degree_decide_trainability():
    # Chaotic tanh (sigma_w2 = 10): xi_c is about 4.4 layers, so 30 steps > 6 xi_c (threshold
    # raised so that the gradient criterion stays silent and the chaos criterion is seen alone).
    net = _init(mlp([32] + [32] * 30 + [10], "tanh"), 10.0, 0.0)
    report = gp.preflight(net, torch.randn(256, 32), threshold=1e3)
    assert report.meanfield is not None and report.phase == "chaotic"
    assert report.depth_over_xi_c == pytest.approx(30 / report.meanfield.xi_c)
    assert report.depth_over_xi_c > 6 and not report.trainable
    assert any(r.startswith("chaotic phase") for r in report.reasons)
    # Degree: ReLU with sigma_w2 = 1 loses ln 2 of gradient variance per layer.
    relu = _init(mlp([32] + [64] * 20 + [10], "relu"), 1.0, 0.0)
    deep = gp.preflight(relu, torch.randn(256, 32))
    assert deep.degree == pytest.approx(20 * math.log(2) / 6, rel=0.1) and not deep.trainable
    assert "degree" in str(deep) and "fix:" in str(deep)


def test_preflight_on_a_model_without_weight_layers_says_so():
    with pytest.raises(gp.UnsupportedModelError, match="no weight layer"):
        gp.preflight(torch.nn.Sequential(torch.nn.Tanh()), torch.randn(8, 3))


def test_preflight_cli_refuses_an_unbounded_mlp():
    from gradprobe.cli.preflight import parse_sizes

    with pytest.raises(gp.ConfigError, match="100,001 layers"):
        parse_sizes("4,8x100000,1")
    assert parse_sizes("4,8x3,1") == [4, 8, 8, 8, 1]
