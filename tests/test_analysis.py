"""Analysis (`noisyops.analysis`): bias/variance identity and hand cases, the binning MI estimator
on known answers, the Walking Noise midpoint, plots written and non-empty, the report, and (with the
models layer) real runs that are deterministic and a small end-to-end CLI run on MNIST."""
import json
import math
import os

import pytest
import torch
from torch import nn

from noisyops.analysis import (bin_edges, binned_mutual_information, crossover_ratio, decompose, discretize,
                               entropy_bits, level_at_fraction, log_grid, midpoint_level, with_noise)
from noisyops.analysis import plots
from noisyops.analysis.report import write_report
from noisyops.config import LayerConfig


# ---- bias / variance (eq. 1-5) ---------------------------------------------------------------------
def test_squared_decomposition_hand_case():
    # the paper's eq. 1-5: two instances, one sample, two classes: f1 = (.8, .2), f2 = (.5, .5), y = (1, 0)
    p1, p2 = torch.tensor([0.8, 0.2], dtype=torch.float64), torch.tensor([0.5, 0.5], dtype=torch.float64)
    logits = torch.stack([p1.log(), p2.log()]).unsqueeze(1)               # [2, 1, 2]
    y = torch.tensor([0])
    t = decompose(logits, y, clean_logits=torch.tensor([[0.9, 0.1]], dtype=torch.float64).log())
    assert t == decompose(logits, y, torch.tensor([[0.9, 0.1]], dtype=torch.float64).log(), loss="squared")
    # arithmetic mean f̄ = (.65, .35); every term is the mean over the 2 outputs
    l_total = (((0.8 - 1) ** 2 + 0.2 ** 2) / 2 + ((0.5 - 1) ** 2 + 0.5 ** 2) / 2) / 2    # (0.04 + 0.25)/2
    l_bias = ((0.65 - 1) ** 2 + 0.35 ** 2) / 2                                          # 0.1225
    l_var = (((0.8 - 0.65) ** 2 + (0.2 - 0.35) ** 2) / 2 + ((0.5 - 0.65) ** 2 + (0.5 - 0.35) ** 2) / 2) / 2
    assert l_total == pytest.approx(0.145) and l_bias == pytest.approx(0.1225) and l_var == pytest.approx(0.0225)
    assert t.l_total == pytest.approx(l_total, rel=1e-12)
    assert t.l_bias == pytest.approx(l_bias, rel=1e-12)
    assert t.l_var == pytest.approx(l_var, rel=1e-12)
    assert t.l_pretrained == pytest.approx(((0.9 - 1) ** 2 + 0.1 ** 2) / 2, rel=1e-12)
    assert t.n_samples == 1


def test_squared_decomposition_right_and_wrong_instances():
    # half the instances are exactly right, half exactly wrong (C = 4): f̄ = (.5, .5, 0, 0)
    right = torch.tensor([0.0, -math.inf, -math.inf, -math.inf], dtype=torch.float64)
    wrong = torch.tensor([-math.inf, 0.0, -math.inf, -math.inf], dtype=torch.float64)
    logits = torch.stack([right, wrong, right, wrong]).unsqueeze(1)       # [4, 1, 4]
    t = decompose(logits, torch.tensor([0]))
    assert t.l_total == pytest.approx(0.5 * 0 + 0.5 * 2 / 4)              # wrong: two errors of 1, over 4
    assert t.l_bias == pytest.approx((0.25 + 0.25) / 4)
    assert t.l_var == pytest.approx((0.25 + 0.25) / 4)


def test_log_loss_decomposition_hand_case():
    # two instances, one sample, two classes: p1 = (.8, .2), p2 = (.5, .5), label 0
    p1, p2 = torch.tensor([0.8, 0.2], dtype=torch.float64), torch.tensor([0.5, 0.5], dtype=torch.float64)
    logits = torch.stack([p1.log(), p2.log()]).unsqueeze(1)               # [2, 1, 2]
    y = torch.tensor([0])
    t = decompose(logits, y, clean_logits=torch.tensor([[0.9, 0.1]], dtype=torch.float64).log(), loss="log")
    g0, g1 = math.sqrt(0.8 * 0.5), math.sqrt(0.2 * 0.5)                  # geometric means
    z = g0 + g1
    l_total = -(math.log(0.8) + math.log(0.5)) / 2
    l_bias = -math.log(g0 / z)
    pb = (g0 / z, g1 / z)
    kl = lambda p: sum(a * math.log(a / b) for a, b in zip(pb, p))      # noqa: E731
    l_var = (kl((0.8, 0.2)) + kl((0.5, 0.5))) / 2
    assert t.l_total == pytest.approx(l_total, rel=1e-12)
    assert t.l_bias == pytest.approx(l_bias, rel=1e-12)
    assert t.l_var == pytest.approx(l_var, rel=1e-12)
    assert t.l_var == pytest.approx(-math.log(z), rel=1e-12)
    assert t.l_pretrained == pytest.approx(-math.log(0.9), rel=1e-12)
    assert t.n_samples == 1


@pytest.mark.parametrize("loss", ["squared", "log"])
def test_decompose_identity_and_limits(loss):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 50, 10, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, 10, (50,), generator=g)
    t = decompose(logits, y, loss=loss)
    assert t.l_total == pytest.approx(t.l_bias + t.l_var, rel=1e-12)
    assert t.l_var > 0
    one = decompose(logits[:1], y, clean_logits=logits[0], loss=loss)     # n = 1: no variance
    assert one.l_var == pytest.approx(0, abs=1e-12)
    assert one.l_bias == pytest.approx(one.l_total, rel=1e-12) == pytest.approx(one.l_pretrained)
    same = decompose(logits[:1].expand(5, -1, -1), y, clean_logits=logits[0], loss=loss)  # no noise
    assert same.l_var == pytest.approx(0, abs=1e-10)
    assert same.l_bias == pytest.approx(same.l_pretrained, rel=1e-12)
    with pytest.raises(ValueError, match="noisy_logits"):
        decompose(logits[0], y, loss=loss)
    with pytest.raises(ValueError, match="targets"):
        decompose(logits, y[:3], loss=loss)
    with pytest.raises(ValueError, match="loss="):
        decompose(logits, y, loss="hinge")


def test_squared_terms_are_bounded_and_var_is_the_softmax_variance():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(100, 30, 10, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, 10, (30,), generator=g)
    t = decompose(logits, y)
    f = torch.softmax(logits, -1)
    assert t.l_var == pytest.approx(float(f.var(0, unbiased=False).mean(-1).sum()), rel=1e-12)
    assert 0 <= t.l_bias / 30 <= 2 / 10 and 0 <= t.l_total / 30 <= 2 / 10   # ‖f − y‖² <= 2 per sample


def test_crossover_and_mi_fraction_by_hand():
    rows = [{"ratio": 0.0, "l_var": 0.0, "l_bias": 1.0}, {"ratio": 0.5, "l_var": 0.5, "l_bias": 1.0},
            {"ratio": 1.0, "l_var": 2.0, "l_bias": 1.5}]
    # d = -1, -0.5, +0.5: the sign changes between 0.5 and 1.0, halfway
    assert crossover_ratio(rows) == pytest.approx(0.75)
    assert crossover_ratio(rows[:2]) is None
    assert crossover_ratio([{"ratio": 0.2, "l_var": 2.0, "l_bias": 1.0}]) == 0.2
    mi = [{"level": 0.0, "normalized": 1.0}, {"level": 0.1, "normalized": 0.8}, {"level": 0.2, "normalized": 0.2}]
    assert level_at_fraction(mi, 0.5) == pytest.approx(0.15)
    assert level_at_fraction(mi, 0.1) is None


# ---- mutual information (eq. 6-7) ------------------------------------------------------------------
def test_bins_by_hand():
    clean = torch.tensor([[0.0, 10.0], [4.0, 30.0]])
    e = bin_edges(clean, 4)
    assert torch.allclose(e, torch.tensor([[1.0, 2.0, 3.0], [15.0, 20.0, 25.0]], dtype=torch.float64))
    v = torch.tensor([[-5.0, 10.0], [1.0, 15.1], [2.5, 24.0], [3.5, 99.0]])
    assert discretize(v, e).tolist() == [[0, 0], [0, 1], [2, 2], [3, 3]]
    with pytest.raises(ValueError, match="bins"):
        bin_edges(clean, 1)


def test_mi_deterministic_bijection_equals_entropy_of_bins():
    # 4 inputs, one coordinate, each input deterministically in its own bin: I = H(T) = 2 bits
    codes = torch.arange(4).view(4, 1, 1).expand(4, 5, 1)
    r = binned_mutual_information(codes)
    assert r["mi"] == pytest.approx(2.0, abs=1e-12) and r["h_t_given_x"] == pytest.approx(0, abs=1e-12)
    # 2 coordinates × 4 bins, 16 inputs on distinct codes, repeated identically: 4 bits
    c2 = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij"), -1).reshape(16, 1, 2)
    assert binned_mutual_information(c2.expand(16, 3, 2))["mi"] == pytest.approx(4.0, abs=1e-12)
    # non-uniform deterministic map: I = H(T) of the image distribution (3 of 4 inputs -> bin 0)
    c3 = torch.tensor([0, 0, 0, 1]).view(4, 1, 1)
    h = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    assert binned_mutual_information(c3)["mi"] == pytest.approx(h, abs=1e-12)
    assert entropy_bits(c3.view(4, 1)) == pytest.approx(h, abs=1e-12)


def test_mi_independent_noise_is_near_zero():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 4, (300, 400, 1), generator=g)   # output independent of the input
    r = binned_mutual_information(codes)
    assert r["h_t"] == pytest.approx(2.0, abs=1e-3)
    # plug-in bias of H(T|X) with R = 400 and 4 symbols ≈ 3/(2·400·ln 2) ≈ 0.005 bits
    assert 0 <= r["mi"] < 0.02


def test_mi_partial_information_by_hand():
    # input j in {0, 1}: output = j with prob 1 (R=2 repeats: one j, one 2+j)? -> H(T)=2, H(T|X)=1
    codes = torch.tensor([[[0], [2]], [[1], [3]]])
    r = binned_mutual_information(codes)
    assert (r["h_t"], r["h_t_given_x"], r["mi"]) == pytest.approx((2.0, 1.0, 1.0))


# ---- walking noise helpers -------------------------------------------------------------------------
def test_midpoint_by_hand():
    mp = midpoint_level([0.01, 0.1, 1.0], [0.9, 0.7, 0.3], clean=0.9, chance=0.1)
    assert mp["status"] == "ok" and mp["threshold"] == pytest.approx(0.5)
    assert mp["midpoint"] == pytest.approx(math.sqrt(0.1), rel=1e-12)    # halfway in log
    mp = midpoint_level([0.01, 0.1], [0.9, 0.8], 0.9, 0.1)
    assert mp["status"] == "above_grid" and mp["midpoint"] == math.inf
    mp = midpoint_level([0.01, 0.1], [0.2, 0.1], 0.9, 0.1)
    assert mp["status"] == "below_grid" and mp["midpoint"] == 0.01
    # 1/4 of the way: a = .9 -> .1 over [1, 10^4], threshold .7 -> 10^1
    mp = midpoint_level([1.0, 1e4], [0.9, 0.1], 0.9, 0.5)
    assert mp["midpoint"] == pytest.approx(10.0, rel=1e-12)
    with pytest.raises(ValueError, match="levels"):
        midpoint_level([0.1, 0.01], [0.9, 0.1], 0.9, 0.1)
    with pytest.raises(ValueError, match="accuracies"):
        midpoint_level([0.01, 0.1], [0.9], 0.9, 0.1)


def test_log_grid_and_with_noise():
    g = log_grid(0.001, 1.0, 4)
    assert g == pytest.approx([0.001, 0.01, 0.1, 1.0], rel=1e-12)
    base = LayerConfig(eta=0.3, eta_mul=0.2, out_noise=0.1, w_range=2.0, w_bits=4)
    assert with_noise(base, 0.05, "additive") == base.replace(eta=0.05, eta_mul=0.0, out_noise=0.0)
    assert with_noise(base, 0.05, "multiplicative") == base.replace(eta=0.0, eta_mul=0.05, out_noise=0.0)
    assert with_noise(base, 0.05, "mixed") == base.replace(eta=0.05, eta_mul=0.05, out_noise=0.0)
    assert with_noise(base, 0.5, "additive", "outputs") == base.replace(eta=0.0, eta_mul=0.0, out_noise=0.5)
    with pytest.raises(ValueError, match="target='outputs'"):
        with_noise(base, 0.5, "mixed", "outputs")
    with pytest.raises(ValueError, match="kind"):
        with_noise(base, 0.5, "gaussian")


# ---- plots and report ------------------------------------------------------------------------------
def _png_ok(path):
    assert os.path.isfile(path) and os.path.getsize(path) > 2000
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def _fake_results():
    rows = lambda f: [{"eta": e, "mean": f(e), "std": 0.01, "ci_low": f(e) - 0.02,  # noqa: E731
                       "ci_high": f(e) + 0.02, "half_width": 0.02, "n": 5} for e in (0, 0.05, 0.1)]
    ev = {"accuracies": [0.9, 0.92, 0.91, 0.88], "losses": [0.3, 0.2, 0.25, 0.4], "n_samples": 100,
          "chip_ids": [0, 1, 2, 3], "stopped_early": False, "seconds": 1.0, "target_half_width": None,
          "clean_accuracy": 0.95,
          "summary": {"n": 4, "mean": 0.9025, "std": 0.017, "sem": 0.0085, "half_width": 0.027,
                      "ci_low": 0.875, "ci_high": 0.93, "confidence": 0.95}}
    sweep = {"a": rows(lambda e: 0.9 - e), "b": rows(lambda e: 0.9 - 2 * e)}
    grid = {"train_etas": [0.0, 0.1], "infer_etas": [0.0, 0.05, 0.1], "mean": [[0.9, 0.8, 0.5], [0.88, 0.85, 0.8]]}
    bv = [{"ratio": r, "l_total": 0.1 + r, "l_bias": 0.1 + r / 3, "l_var": 2 * r / 3, "l_pretrained": 0.1,
           "n_samples": 10, "n_instances": 5} for r in (0, 0.5, 1.0)]
    mi = {"rows": [{"level": l, "mi": 3 - l, "h_t": 3.0, "h_t_given_x": l, "normalized": 1 - l / 3}
                   for l in (0.0, 1.0, 2.0)],
          "clean": {"mi": 3.0}, "bins": 4, "output": "softmax", "n_inputs": 10, "n_repeats": 5,
          "kind": "additive", "target": "weights"}
    wk = {"kind": "additive", "target": "weights", "levels": [0.01, 0.1, 1.0], "clean_accuracy": 0.9,
          "chance": 0.1, "layers": ["conv1", "fc"], "n_chips": 3,
          "curves": {n: [{"level": l, "mean": a, "std": 0.01, "ci_low": a - 0.01, "ci_high": a + 0.01, "n": 3}
                         for l, a in zip([0.01, 0.1, 1.0], accs)]
                     for n, accs in (("conv1", [0.9, 0.6, 0.2]), ("fc", [0.9, 0.85, 0.7]))},
          "midpoints": {"conv1": {"midpoint": 0.2, "status": "ok", "threshold": 0.5},
                        "fc": {"midpoint": math.inf, "status": "above_grid", "threshold": 0.5}}}
    return ev, sweep, grid, bv, mi, wk


def test_plots_written_and_report(tmp_path):
    ev, sweep, grid, bv, mi, wk = _fake_results()
    d = str(tmp_path)
    figs = {"eval": plots.plot_chip_accuracies(ev, f"{d}/e.png"),
            "sweep": plots.plot_eta_sweep(sweep, f"{d}/s.png"),
            "grid": plots.plot_heatmap(grid, f"{d}/g.png"),
            "biasvar": plots.plot_bias_variance(bv, f"{d}/b.png"),
            "mi": plots.plot_mutual_information(mi, f"{d}/m.png"),
            "walking_0_curves": plots.plot_walking_curves(wk, f"{d}/sub/w.png"),
            "walking_0_midpoints": plots.plot_walking_midpoints(wk, f"{d}/sub/wm.png")}
    for p in figs.values():
        _png_ok(p)
    rep = write_report(d, {"model": "x"}, {"eval": ev, "sweep": sweep, "grid": grid, "biasvar": bv,
                                           "mi": mi, "walking": [wk]}, figs)
    text = open(rep).read()
    for needle in ("Repeated noisy evaluation", "| mean | 90.25 |", "Accuracy vs η", "Training η",
                   "l_var > l_bias: 0.5", "I / I_clean", "| conv1 | 0.2 | ok |", "above_grid",
                   "![walking_0_curves](sub/w.png)"):
        assert needle in text, needle


# ---- real models (models layer) --------------------------------------------------------------------
def _noisyops_models():
    import noisyops
    return noisyops


def _tiny():
    noisyops = _noisyops_models()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 8),
                        nn.ReLU(), nn.Linear(8, 3))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(60, 1, 6, 6, generator=g)
    with torch.no_grad():
        y = net(x).argmax(-1)
    return noisyops.convert(net, LayerConfig(eta=0.05), seed=7).eval(), (x, y)


def test_walking_noise_real_deterministic_and_restores():
    from noisyops.analysis import walking_noise
    model, data = _tiny()
    before = [m.config for _, m in _noisyops_models().noisy_layers(model)]
    kw = dict(kind="additive", target="weights", n_chips=4, group_size=4)
    a = walking_noise(model, data, [0.02, 0.2, 2.0], **kw)
    b = walking_noise(model, data, [0.02, 0.2, 2.0], **kw)
    assert a.to_dict() == b.to_dict()
    assert [m.config for _, m in _noisyops_models().noisy_layers(model)] == before
    assert a.clean_accuracy == 1.0 and a.chance == pytest.approx(1 / 3)
    assert len(a.layers) == 3
    for n in a.layers:   # more noise, lower accuracy (same chips at every level)
        means = [r["mean"] for r in a.curves[n]]
        assert means[-1] < means[0]
    o = walking_noise(model, data, [0.01, 1.0, 100.0], kind="additive", target="outputs", n_chips=2)
    assert all(o.curves[n][-1]["mean"] < 0.8 for n in o.layers)
    m = walking_noise(model, data, [0.02, 2.0], kind="multiplicative", n_chips=2)
    assert set(m.midpoints) == set(m.layers)


def test_bias_variance_and_mi_real():
    from noisyops.analysis import bias_variance_sweep, mutual_information_sweep
    model, data = _tiny()
    for loss in ("squared", "log"):
        bv = bias_variance_sweep(model, data, [0.0, 0.5, 2.0], n_instances=6, group_size=3, loss=loss)
        assert bv[0]["l_var"] == pytest.approx(0, abs=1e-9)
        assert bv[0]["l_total"] == pytest.approx(bv[0]["l_pretrained"], rel=1e-6)
        assert bv[0]["l_bias"] == pytest.approx(bv[0]["l_pretrained"], rel=1e-6)
        for r in bv:
            assert r["l_total"] == pytest.approx(r["l_bias"] + r["l_var"], rel=1e-9)
            assert r["loss"] == loss and r["n_instances"] == 6
        assert bv[2]["l_var"] > bv[1]["l_var"] > 0
        assert bv == bias_variance_sweep(model, data, [0.0, 0.5, 2.0], n_instances=6, group_size=3, loss=loss)
    mi = mutual_information_sweep(model, data, [0.0, 0.1, 5.0], n_repeats=8, group_size=4)
    norm = [r["normalized"] for r in mi["rows"]]
    assert norm[0] == pytest.approx(1.0) and norm[2] < norm[0]


def test_sweeps_real():
    from noisyops.analysis import eta_sweep, train_infer_grid
    model, data = _tiny()
    sw = eta_sweep({"m": model}, data, [0.0, 0.1, 1.0], n_chips=3, group_size=3)
    assert sw["m"][0]["mean"] == 1.0 and sw["m"][0]["std"] == 0
    assert sw["m"][2]["mean"] < 1.0
    gr = train_infer_grid({0.0: model, 0.1: model}, data, [0.0, 1.0], n_chips=3)
    assert gr["mean"][0] == gr["mean"][1] == [sw["m"][0]["mean"], pytest.approx(gr["mean"][0][1])]


def test_cli_end_to_end_mnist(tmp_path, shared_dir):
    """A tiny LeNet-5 (briefly trained here) through the CLI on 200 MNIST test images (< 60 s)."""
    noisyops = _noisyops_models()
    from noisyops import models
    from noisyops.evaluate import main, load_data
    import argparse
    torch.manual_seed(0)
    net = models.lenet5()
    args = argparse.Namespace(dataset="mnist", data_root=os.path.join(shared_dir, "data"), batch_size=100)
    train = load_data(args, train=True, limit=1000)
    opt = torch.optim.Adam(net.parameters(), 2e-3)
    for _ in range(2):
        for x, y in train:
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    ck = str(tmp_path / "lenet.pt")
    torch.save(net.state_dict(), ck)
    out = str(tmp_path / "out")
    base = ["--model", "lenet5", "--checkpoint", ck, "--dataset", "mnist", "--data-root",
            os.path.join(shared_dir, "data"), "--limit", "200", "--batch-size", "200", "--out", out,
            "--chips", "6", "--group", "6", "--eta", "0.05", "--no-progress"]
    argv = base + ["--what", "eval,walking,biasvar,mi,sweep",
                   "--walk-levels", "0.01:1:3", "--walk-chips", "2", "--walk-layers", "conv1,fc3",
                   "--ratios", "0,1", "--instances", "4", "--mi-levels", "0,0.1", "--mi-repeats", "4", "--mi-inputs", "50",
                   "--sweep-etas", "0,0.1", "--sweep-chips", "2"]
    res = main(argv)
    with open(os.path.join(out, "results.json")) as f:
        saved = json.load(f)
    assert saved["eval"]["summary"]["n"] == 6 and saved["eval"]["clean_accuracy"] > 0.5
    assert saved["mi"]["n_inputs"] == 50 and saved["mi"]["n_repeats"] == 4 and saved["mi"]["split"] == "train"
    assert [r["loss"] for r in saved["biasvar"]] == ["squared", "squared"]
    assert saved["biasvar"][0]["n_samples"] == 200
    for name in ("report.md", "eval_chips.csv", "eval_chips.png", "walking_additive_weights.png",
                 "walking_additive_weights_midpoints.png", "biasvar.png", "mi.png", "sweep.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    again = main(base + ["--what", "eval,grid,sweep", "--grid", f"0={ck},0.1={ck}", "--sweep-models",
                         f"copy={ck}", "--sweep-etas", "0,0.1", "--sweep-chips", "2"])
    assert again["eval"]["accuracies"] == res["eval"]["accuracies"]          # deterministic
    assert again["eval"]["losses"] == res["eval"]["losses"]
    assert again["sweep"]["copy"] == again["sweep"]["lenet5"] == res["sweep"]["lenet5"]
    gr = again["grid"]                                                        # same checkpoint twice
    assert gr["train_etas"] == [0.0, 0.1] and gr["mean"][0] == gr["mean"][1]
    assert gr["mean"][0] == [r["mean"] for r in res["sweep"]["lenet5"]]
    assert os.path.getsize(os.path.join(out, "grid.png")) > 0


def test_cli_cifar_pretrained_resnet20_adaptive(tmp_path, shared_dir):
    """The CIFAR path: pretrained ResNet-20 on 50 cifar10_mini test images, adaptive eval."""
    _noisyops_models()
    from noisyops.evaluate import main
    out = str(tmp_path / "c")
    res = main(["--model", "resnet20", "--checkpoint", "pretrained", "--dataset", "cifar10",
                "--data-root", os.path.join(shared_dir, "data"), "--limit", "50", "--out", out,
                "--what", "eval", "--eta", "0.01", "--chips", "12", "--group", "4",
                "--ci-half-width", "0.5", "--no-progress"])
    ev = res["eval"]
    assert ev["clean_accuracy"] > 0.6                  # a trained network, correctly normalised
    assert ev["stopped_early"] and len(ev["accuracies"]) == 8   # min_chips 5 -> first check after 8
    assert os.path.isfile(os.path.join(out, "report.md"))
