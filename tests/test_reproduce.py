"""The reproduction scripts' bookkeeping (no training): the --paper preset of train.reproduce_mnist,
its table, and the tolerated-η summary of train.reproduce_cifar on hand-made results."""
import json
import os

import pytest
import torch

from train import reproduce_cifar as RC
from train import reproduce_mnist as RM


def test_tolerated_eta_by_hand():
    # clean 0.90; the curve falls to 0.88 at η = 0.04 and 0.80 at 0.08: a drop of 0.02 is reached
    # exactly at 0.04, a drop of 0.06 three quarters of the way from 0.04 to 0.08
    curve = [(0.02, 0.895), (0.04, 0.88), (0.08, 0.80)]
    assert RC.tolerated_eta(0.90, curve, 0.02) == pytest.approx(0.04)
    assert RC.tolerated_eta(0.90, curve, 0.06) == pytest.approx(0.04 + 0.04 * (0.88 - 0.84) / 0.08)
    assert RC.tolerated_eta(0.90, curve, 0.2) is None
    assert RC.tolerated_eta(0.90, [(0.02, 0.80)], 0.05) == pytest.approx(0.01)   # from (0, clean)


def test_cifar_summary_ratio():
    res = {"clean_finetuned": 0.90, "n_eval": 100, "budget": {},
           "students": {"inject/0.02/0": {"mean": 0.89}, "inject/0.02/1": {"mean": 0.87},
                        "inject/0.04/0": {"mean": 0.80}, "inject/0.04/1": {"mean": 0.80},
                        "distill/0.02/0": {"mean": 0.90}, "distill/0.04/0": {"mean": 0.86},
                        "none/0.02/0": {"mean": 0.70}, "none/0.04/0": {"mean": 0.50}}}
    s = RC.summarize(res, drops=(0.02,))
    assert s["methods"]["inject"][0.02] == {"mean": pytest.approx(0.88), "runs": [0.89, 0.87]}
    assert s["tolerated"]["inject"][0.02] == pytest.approx(0.02)          # 0.88 at 0.02
    assert s["tolerated"]["distill"][0.02] == pytest.approx(0.02 + 0.02 * 0.02 / 0.04)
    assert s["ratio"][0.02] == pytest.approx(1.5)
    text = RC.table(res)
    assert "88.00 (89.00, 87.00)" in text and "| 2 points |" in text


def test_mnist_paper_preset_and_table(tmp_path, capsys):
    assert RM.PAPER["etas"] == [0.05, 0.1, 0.15, 0.2, 0.25, 0.3]
    assert RM.PAPER["student_teacher"] == "finetuned" and RM.PAPER["clean_grad"] is True
    assert (RM.PAPER["T"], RM.PAPER["alpha"], RM.PAPER["adc"]) == (6.0, 1.0, True)
    out = str(tmp_path)
    with open(os.path.join(out, "results_distill.json"), "w") as f:
        json.dump({"0.2": {"mean": 0.99, "std": 0.001, "n": 20, "clean": 0.991, "clean_eval": 0.991}}, f)
    assert RM.main(["--paper", "--table", "--out", out]) == 0
    text = capsys.readouterr().out
    assert "| η=0.05 | η=0.1 | η=0.15 | η=0.2 | η=0.25 | η=0.3 |" in text
    assert "| noise injection + distillation | not run | not run | not run | 99.00 ± 0.10 |" in text


def test_mnist_model_flag_reaches_the_run_config(tmp_path, monkeypatch):
    """``--model lenet_caffe`` is the network the pipeline builds (the config it is handed)."""
    import train.pipeline as pipeline
    seen = {}

    class Stop(Exception):
        pass

    def fake_prepare(cfg):
        seen.update(cfg)
        raise Stop

    monkeypatch.setattr(pipeline, "prepare", fake_prepare)
    for name in ("lenet_caffe", "lenet5"):
        with pytest.raises(Stop):
            RM.main(["--paper", "--prepare-only", "--out", str(tmp_path), "--model", name])
        assert seen["model"]["name"] == name
    with pytest.raises(SystemExit):
        RM.main(["--paper", "--prepare-only", "--out", str(tmp_path), "--model", "lenet7"])


def test_lenet_caffe_shapes_and_conversion():
    """Caffe's MNIST LeNet: 28x28 -> 10 logits, 2 convs + 2 linears (all converted), 431,080 weights
    + biases; build_model knows it; a bad num_classes names the argument."""
    import noisyops
    from noisyops import LayerConfig, models
    from train.models import build_model
    net = models.lenet_caffe()
    assert net(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    assert sum(p.numel() for p in net.parameters()) == 431080
    noisy = noisyops.convert(net, LayerConfig(eta=0.1))
    assert len(list(noisyops.noisy_layers(noisy))) == 4
    assert isinstance(build_model("lenet_caffe"), models.CaffeLeNet)
    with pytest.raises(ValueError, match="num_classes"):
        models.lenet_caffe(num_classes=0)


def test_cifar_results_merge_across_processes(tmp_path):
    """Two processes sharing --out: each store keeps the other's students (merged under a lock)."""
    path = str(tmp_path / "results.json")
    a = {"n_eval": 10, "students": {"inject/0.02/0": {"mean": 0.9}}}
    b = {"n_eval": 10, "students": {"inject/0.02/1": {"mean": 0.8}}}
    RC._store(path, a)
    merged = RC._store(path, b)
    assert set(merged["students"]) == {"inject/0.02/0", "inject/0.02/1"}
    assert RC._load(path) == merged
    b["students"]["inject/0.02/1"] = {"mean": 0.7}  # a rewrite of one's own student wins
    assert RC._store(path, b)["students"]["inject/0.02/1"] == {"mean": 0.7}


def test_fresh_student_noise_does_not_depend_on_the_start_models_history():
    """Students copied from a fine-tuned model draw the same noise whatever number of calls that
    model made before (trained in this process vs loaded from a checkpoint)."""
    import torch
    import noisyops
    from noisyops import LayerConfig
    from train.pipeline import fresh_student
    torch.manual_seed(0)
    base = noisyops.convert(torch.nn.Sequential(torch.nn.Linear(8, 4)), LayerConfig(eta=0.1))
    x = torch.randn(3, 8)
    used = __import__("copy").deepcopy(base)
    for _ in range(5):
        used(x)  # the start model's counters move on
    a, b = fresh_student(base, 3), fresh_student(used, 3)
    assert torch.equal(a(x), b(x)) and torch.equal(a(x), b(x))
    assert not torch.equal(fresh_student(base, 4)(x), fresh_student(base, 3)(x))  # the seed matters
