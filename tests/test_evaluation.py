"""Repeated noisy evaluation (`noisyops.evaluation`): statistics against hand computations, the
chip loop with a scripted chip forward, and (when the models layer is present) real per_instance
chips: deterministic, independent of the group size, equal to single-chip passes."""
import math
import os

import pytest
import torch
from torch import nn

from noisyops.evaluation import as_batches, evaluate_chips, summarize, t_quantile


# ---- statistics ------------------------------------------------------------------------------------
def test_summarize_by_hand():
    s = summarize([1.0, 2.0, 3.0, 4.0])
    assert s.n == 4 and s.mean == 2.5
    std = math.sqrt((1.5 ** 2 + 0.5 ** 2 + 0.5 ** 2 + 1.5 ** 2) / 3)   # ddof = 1: sqrt(5/3)
    assert s.std == pytest.approx(std, rel=1e-15)
    assert s.sem == pytest.approx(std / 2, rel=1e-15)
    # t_{0.975, 3} = 3.182446 (tables)
    assert s.half_width == pytest.approx(3.182446 * std / 2, rel=1e-6)
    assert (s.ci_low, s.ci_high) == pytest.approx((2.5 - s.half_width, 2.5 + s.half_width))


def test_t_quantiles_match_tables():
    # printed t tables (6 decimals)
    assert t_quantile(0.95, 1) == pytest.approx(12.706205, abs=1e-6)
    assert t_quantile(0.95, 3) == pytest.approx(3.182446, abs=1e-6)
    assert t_quantile(0.95, 9) == pytest.approx(2.262157, abs=1e-6)
    assert t_quantile(0.99, 4) == pytest.approx(4.604095, abs=1e-6)
    assert t_quantile(0.95, 10 ** 6) == pytest.approx(1.959966, abs=1e-5)


def test_summarize_edge_cases():
    s = summarize([0.5])
    assert s.mean == 0.5 and math.isnan(s.std) and math.isnan(s.half_width)
    s = summarize([0.7] * 5)
    assert s.std == 0 and s.half_width == 0
    with pytest.raises(ValueError, match="values"):
        summarize([])
    with pytest.raises(ValueError, match="finite"):
        summarize([0.1, float("nan")])
    with pytest.raises(ValueError, match="confidence"):
        summarize([0.1, 0.2], confidence=1.5)


# ---- the chip loop with a scripted forward ---------------------------------------------------------
N = 10


def _data():
    x = torch.arange(N, dtype=torch.float32).unsqueeze(1)   # sample j holds the value j
    y = torch.zeros(N, dtype=torch.int64)
    return x, y


def scripted(model, x, k, off):
    """Chip c classifies sample j correctly (class 0) iff j < 2c + 1: accuracy min(2c+1, N)/N."""
    chips = torch.arange(off, off + k, dtype=torch.float32).view(k, 1)
    good = (x[:, 0].view(1, -1) < 2 * chips + 1)
    logits = torch.zeros(k, x.shape[0], 2)
    logits[..., 0] = good.float()
    logits[..., 1] = 0.5
    return logits


@pytest.mark.parametrize("group_size,batch_size", [(1, 10), (3, 4), (4, 3), (10, 1)])
def test_evaluate_chips_by_hand(group_size, batch_size):
    r = evaluate_chips(nn.Identity(), _data(), 4, group_size=group_size, batch_size=batch_size,
                       chip_forward=scripted)
    assert r.chip_ids == [0, 1, 2, 3]
    assert r.accuracies == pytest.approx([0.1, 0.3, 0.5, 0.7], abs=1e-15)
    assert r.n_samples == N and not r.stopped_early
    s = summarize([0.1, 0.3, 0.5, 0.7])
    assert r.summary.mean == pytest.approx(0.4) and r.summary.std == pytest.approx(s.std)
    # loss: CE of logits (1, .5) when right, (0, .5) when wrong, label 0
    right, wrong = math.log(1 + math.exp(-0.5)), math.log(1 + math.exp(0.5))
    assert r.losses[1] == pytest.approx(0.3 * right + 0.7 * wrong, rel=1e-12)


def test_evaluate_chips_offset():
    r = evaluate_chips(nn.Identity(), _data(), 3, chip_offset=2, group_size=2, chip_forward=scripted)
    assert r.chip_ids == [2, 3, 4]
    assert r.accuracies == pytest.approx([0.5, 0.7, 0.9])


def alternating(model, x, k, off):
    """Even chips: 4 of 10 right, odd chips: 6 of 10 right."""
    chips = torch.arange(off, off + k).view(k, 1)
    thr = torch.where(chips % 2 == 0, 4, 6)
    good = torch.arange(x.shape[0]).view(1, -1) < thr
    logits = torch.zeros(k, x.shape[0], 2)
    logits[..., 0] = good.float()
    logits[..., 1] = 0.5
    return logits


def test_adaptive_stops_when_ci_narrow():
    target = 0.05
    # by hand: accuracies .4, .6, .4, ...; after each group of 2, stop once t·std/sqrt(n) < target
    expected = None
    for n in range(4, 200, 2):
        if summarize([0.4, 0.6] * (n // 2)).half_width < target:
            expected = n
            break
    r = evaluate_chips(nn.Identity(), _data(), 200, group_size=2, min_chips=4,
                       target_half_width=target, chip_forward=alternating)
    assert r.stopped_early and len(r.accuracies) == expected
    assert r.summary.half_width < target
    assert summarize(r.accuracies[:-2]).half_width >= target   # one group earlier was not enough
    # target never met within the cap: runs all chips, not "stopped early"
    r = evaluate_chips(nn.Identity(), _data(), 6, group_size=2, min_chips=4, target_half_width=1e-6,
                       chip_forward=alternating)
    assert len(r.accuracies) == 6 and not r.stopped_early


def test_evaluate_chips_bad_args():
    with pytest.raises(ValueError, match="n_chips"):
        evaluate_chips(nn.Identity(), _data(), 0, chip_forward=scripted)
    with pytest.raises(ValueError, match="target_half_width"):
        evaluate_chips(nn.Identity(), _data(), 4, target_half_width=-1, chip_forward=scripted)
    with pytest.raises(ValueError, match="chip_forward returned shape"):
        evaluate_chips(nn.Identity(), _data(), 4, chip_forward=lambda m, x, k, o: torch.zeros(k, 2))


def test_as_batches_forms():
    x, y = _data()
    b = as_batches((x, y), 4)
    assert [t.shape[0] for t, _ in b] == [4, 4, 2]
    b2 = as_batches(torch.utils.data.TensorDataset(x, y), 3, limit=7)
    assert sum(t.shape[0] for t, _ in b2) == 7 and torch.equal(b2[0][0], x[:3])
    class OneByOne(torch.utils.data.Dataset):     # only int indexing
        def __len__(self):
            return N

        def __getitem__(self, i):
            return x[i], int(y[i])
    b4 = as_batches(OneByOne(), 4)
    assert torch.equal(torch.cat([t for t, _ in b4]), x) and b4[0][1].dtype == torch.int64
    b3 = as_batches([(x[:5], y[:5]), (x[5:], y[5:])], 10)
    assert len(b3) == 1 and torch.equal(b3[0][0], x)
    with pytest.raises(ValueError, match="batch_size"):
        as_batches((x, y), 0)


# ---- real chips (models layer) ---------------------------------------------------------------------
def _tiny_noisy(eta=0.2, seed=3):
    import noisyops
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 1, 6, 6, generator=g)
    with torch.no_grad():
        y = net(x).argmax(-1)          # labels = the clean net's answers: clean accuracy 1
    model = noisyops.convert(net, noisyops.LayerConfig(eta=eta), seed=seed).eval()
    return model, (x, y)


def test_real_chips_deterministic_and_group_invariant():
    model, data = _tiny_noisy()
    a = evaluate_chips(model, data, 6, group_size=6, batch_size=16)
    b = evaluate_chips(model, data, 6, group_size=6, batch_size=16)
    c = evaluate_chips(model, data, 6, group_size=1, batch_size=40)
    assert a.accuracies == b.accuracies and a.losses == b.losses
    assert a.accuracies == c.accuracies
    assert c.losses == pytest.approx(a.losses, rel=1e-5)
    assert len(set(a.accuracies)) > 1, "η = 0.2 should make chips differ"


def test_real_chip_equals_its_own_single_pass():
    """Chip k of a group == chip k evaluated alone (offset k), and noise off == clean accuracy."""
    import noisyops
    from noisyops.evaluation import clean_accuracy
    model, data = _tiny_noisy()
    grouped = evaluate_chips(model, data, 4, group_size=4)
    for k in range(4):
        alone = evaluate_chips(model, data, 1, chip_offset=k, min_chips=2)
        assert alone.accuracies[0] == grouped.accuracies[k]
    clean = clean_accuracy(model, data)
    for _, m in noisyops.noisy_layers(model):
        m.config = m.config.replace(eta=0.0)
    flat = evaluate_chips(model, data, 3)
    assert flat.accuracies == [clean] * 3 and flat.summary.std == 0


def test_group_size_auto_and_checked():
    from noisyops.evaluation import resolve_group_size
    cpu = as_batches(_data(), 5)
    assert resolve_group_size(None, cpu) == 1
    assert resolve_group_size(4, cpu) == 4
    with pytest.raises(ValueError, match="group_size"):
        resolve_group_size(0, cpu)
    r = evaluate_chips(nn.Identity(), cpu, 3, chip_forward=scripted)    # auto on CPU: one chip a call
    assert r.accuracies == pytest.approx([0.1, 0.3, 0.5])


# ---- the CLI on any model and any dataset (noisyops.evaluate, noisyops.zoo) -------------------------
def _image_folder(root, classes=("cat", "dog", "emu"), per_class=4, size=(40, 36), seed=0):
    """A tiny ImageFolder tree ``root/<class>/<i>.png`` of random RGB images; returns root."""
    from PIL import Image
    g = torch.Generator().manual_seed(seed)
    for c in classes:
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(per_class):
            px = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(px).save(os.path.join(root, c, f"{i}.png"))
    return root


def _cli(argv, tmp_path, name="out"):
    from noisyops.evaluate import main
    return main(argv + ["--out", str(tmp_path / name), "--no-progress", "--chips", "3", "--group", "3"])


def test_cli_factory_model_checkpoint_none_imagefolder_val_and_train(tmp_path):
    root = str(tmp_path / "data")
    _image_folder(os.path.join(root, "val"))
    _image_folder(os.path.join(root, "train"), seed=1)
    res = _cli(["--model", "tests.test_zoo:tiny_factory", "--model-kwargs", '{"num_classes": 3}',
                "--checkpoint", "none", "--dataset", f"imagefolder:{root}", "--resize", "34",
                "--image-size", "32", "--in-bits", "8", "--out-bits", "8", "--w-range", "2",
                "--w-bits", "8", "--batch-size", "5", "--calib-batches", "2"], tmp_path)
    assert res["meta"]["test samples"] == 12 and res["meta"]["checkpoint"].startswith("none")
    assert len(res["eval"]["accuracies"]) == 3
    from noisyops.evaluate import build_parser, load_data
    args = build_parser().parse_args(["--model", "x", "--checkpoint", "none", "--out", "o",
                                      "--dataset", f"imagefolder:{root}", "--resize", "34", "--image-size", "32"])
    x, y = load_data(args, train=False)[0]                              # one batch of all 12 images
    assert x.shape[1:] == (3, 32, 32) and sorted(set(y.tolist())) == [0, 1, 2]
    # the usual transform by hand: resize shorter side (36 -> 34), centre crop 32, ImageNet normalisation
    from PIL import Image
    from torchvision.transforms import functional as TF
    img = Image.open(os.path.join(root, "val", "cat", "0.png")).convert("RGB")
    ref = TF.normalize(TF.to_tensor(TF.center_crop(TF.resize(img, 34), 32)),
                       [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    assert torch.equal(x[0], ref)


def test_cli_timm_model_on_flat_imagefolder(tmp_path):
    pytest.importorskip("timm")
    root = _image_folder(str(tmp_path / "flat"))        # PATH/<class>/*: no val/ and no train/
    res = _cli(["--model", "timm:test_resnet", "--model-kwargs", '{"num_classes": 3}', "--checkpoint", "none",
                "--dataset", f"imagefolder:{root}", "--resize", "32", "--image-size", "32",
                "--eta", "0.05", "--what", "eval,sweep", "--sweep-etas", "0,0.05", "--sweep-chips", "2"], tmp_path)
    assert res["meta"]["test samples"] == 12
    assert res["sweep"]["timm:test_resnet"][0]["std"] == 0          # η = 0: every chip identical
    assert os.path.isfile(str(tmp_path / "out" / "report.md"))


def test_cli_torchvision_model_with_checkpoint(tmp_path):
    import torchvision
    root = _image_folder(str(tmp_path / "d"), per_class=2)
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None, num_classes=3).eval()
    ck = str(tmp_path / "r18.pt")
    torch.save(net.state_dict(), ck)
    res = _cli(["--model", "torchvision:resnet18", "--model-kwargs", '{"num_classes": 3}', "--checkpoint", ck,
                "--dataset", f"imagefolder:{root}", "--resize", "32", "--image-size", "32", "--eta", "0"], tmp_path)
    from noisyops.evaluate import build_parser, load_data
    args = build_parser().parse_args(["--model", "x", "--checkpoint", "none", "--out", "o", "--dataset",
                                      f"imagefolder:{root}", "--resize", "32", "--image-size", "32"])
    x, y = load_data(args)[0]
    with torch.no_grad():
        acc = float((net(x).argmax(1) == y).double().mean())
    assert res["eval"]["clean_accuracy"] == pytest.approx(acc)            # the checkpoint was loaded
    assert res["eval"]["accuracies"] == [acc] * 3                          # η = 0: the clean network


def test_cli_bad_model_and_dataset_messages(tmp_path):
    with pytest.raises(SystemExit, match="--model: model='nosuch'"):
        _cli(["--model", "nosuch", "--checkpoint", "none", "--dataset", "mnist"], tmp_path)
    with pytest.raises(SystemExit, match="--model-kwargs"):
        _cli(["--model", "lenet5", "--model-kwargs", "{bad", "--checkpoint", "none", "--dataset", "mnist"], tmp_path)
    with pytest.raises(SystemExit, match="expected mnist, cifar10 or imagefolder:PATH"):
        _cli(["--model", "lenet5", "--checkpoint", "none", "--dataset", "svhn"], tmp_path)
    only_train = str(tmp_path / "only_train")
    _image_folder(os.path.join(only_train, "train"), per_class=1)
    with pytest.raises(SystemExit, match="(?s)not found.*only_train/val.*imagefolder:PATH"):
        _cli(["--model", "lenet5", "--checkpoint", "none", "--dataset", f"imagefolder:{only_train}"], tmp_path)


@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_missing_dataset_says_where_and_never_downloads(tmp_path, monkeypatch, dataset):
    import torchvision.datasets as tvd
    def no_network(*a, **k):
        raise AssertionError("tried to download")
    monkeypatch.setattr(tvd.MNIST, "download", no_network)
    monkeypatch.setattr(tvd.CIFAR10, "download", no_network)
    empty = str(tmp_path / "empty")
    os.makedirs(empty)
    with pytest.raises(SystemExit) as e:
        _cli(["--model", "lenet5", "--checkpoint", "none", "--dataset", dataset, "--data-root", empty], tmp_path)
    msg = str(e.value)
    assert "not found" in msg and os.path.abspath(empty) in msg and "--data-root" in msg and "--download" in msg
    with pytest.raises(AssertionError, match="tried to download"):     # --download does try
        _cli(["--model", "lenet5", "--checkpoint", "none", "--dataset", dataset, "--data-root", empty,
              "--download"], tmp_path)


def test_progress_is_lines_when_not_a_terminal(monkeypatch):
    import io
    from noisyops import progress
    monkeypatch.delenv("NOISYOPS_PROGRESS", raising=False)
    buf = io.StringIO()                                                   # not a tty
    assert progress.progress_mode(buf) == "lines"
    bar = progress.LineProgress(total=1000, desc="chips", unit="chip", interval=3600, file=buf)
    for _ in range(1000):
        bar.update(1)
    bar.set_postfix(acc="0.9")
    bar.close()
    bar.close()
    lines = buf.getvalue().splitlines()
    assert lines == [lines[0]] and lines[0].startswith("chips: 1000/1000 chip [") and "acc=0.9" in lines[0]
    buf2 = io.StringIO()
    every = progress.LineProgress(range(3), desc="x", interval=0, file=buf2)
    assert list(every) == [0, 1, 2] and len(buf2.getvalue().splitlines()) == 4   # 3 updates + close
    monkeypatch.setenv("NOISYOPS_PROGRESS", "off")
    assert progress.progress_mode() == "off"
    assert list(progress.progress_iter(range(2))) == [0, 1]
    monkeypatch.setenv("NOISYOPS_PROGRESS", "sometimes")
    with pytest.raises(ValueError, match="NOISYOPS_PROGRESS"):
        progress.progress_mode()
