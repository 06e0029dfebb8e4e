"""noisyops.models: CIFAR ResNets (pretrained weights load and are accurate) and LeNet-5."""
import os
import pickle

import numpy as np
import pytest
import torch
from torch import nn

import noisyops
from noisyops import LayerConfig
from noisyops.models import (cifar_normalization, lenet5, load_cifar_resnet, resnet20, resnet32,
                             resnet44, resnet56)


def _cifar_test(shared_dir, n):
    path = os.path.join(shared_dir, "data", "cifar10_mini", "cifar-10-batches-py", "test_batch")
    if not os.path.isfile(path):
        pytest.skip(f"{path} not found")
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="latin1")
    x = torch.from_numpy(np.asarray(batch["data"][:n], dtype=np.uint8)).view(-1, 3, 32, 32).float() / 255
    mean, std = cifar_normalization()
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    return x, torch.tensor(batch["labels"][:n])


@pytest.mark.parametrize("fn,blocks,params", [(resnet20, 3, 269_722), (resnet32, 5, 464_154),
                                              (resnet44, 7, 658_586), (resnet56, 9, 853_018)])
def test_cifar_resnet_shapes(fn, blocks, params):
    m = fn()
    assert len(m.layer1) == blocks and len(m.layer3) == blocks
    assert sum(p.numel() for p in m.parameters()) == params
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert not any(isinstance(mod, nn.Conv2d) and mod.kernel_size == (1, 1) for mod in m.modules())  # option A


def test_lenet5_shapes():
    m = lenet5()
    assert m(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert [n for n, mod in m.named_modules() if isinstance(mod, (nn.Conv2d, nn.Linear))] == \
        ["conv1", "conv2", "fc1", "fc2", "fc3"]
    with pytest.raises(ValueError, match="num_classes"):
        lenet5(num_classes=0)


@pytest.mark.parametrize("name", ["resnet20", "resnet32"])
def test_pretrained_keys_match(shared_dir, name):
    path = os.path.join(shared_dir, "weights", f"{name}_cifar10.pt")
    sd = torch.load(path, weights_only=True)
    m = {"resnet20": resnet20, "resnet32": resnet32}[name]()
    # the files carry no BatchNorm num_batches_tracked (BatchNorm fills it in when loading)
    assert {k for k in m.state_dict() if not k.endswith("num_batches_tracked")} == set(sd)
    m.load_state_dict(sd)  # strict


def test_resnet20_pretrained_accuracy(shared_dir):
    x, y = _cifar_test(shared_dir, 500)
    model = load_cifar_resnet("resnet20", os.path.join(shared_dir, "weights", "resnet20_cifar10.pt"))
    assert not model.training
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    # README: 91.78% on the full test set; the first 500 images are the exact originals
    assert acc >= 0.88, acc  # measured: 0.910
    noisy = noisyops.convert(model, LayerConfig())
    with torch.no_grad():
        assert torch.equal(noisy(x[:64]), model(x[:64]))


def test_load_cifar_resnet_errors(tmp_path):
    with pytest.raises(ValueError, match="name"):
        load_cifar_resnet("resnet18")
    with pytest.raises(FileNotFoundError, match="path"):
        load_cifar_resnet("resnet20", str(tmp_path / "missing.pt"))
