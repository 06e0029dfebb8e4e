"""SPEC section 5: every public entry rejects bad input with an error naming the argument,
the value and what was expected."""
import math

import pytest
import torch

from noisyops import LayerConfig
from noisyops.functional import noisy_conv2d, noisy_linear


@pytest.mark.parametrize("kwargs,exc,words", [
    (dict(eta=-0.1), ValueError, ["eta=-0.1", ">= 0"]),
    (dict(eta=math.nan), ValueError, ["eta=nan"]),
    (dict(eta_mul="big"), TypeError, ["eta_mul='big'"]),
    (dict(out_noise=math.inf), ValueError, ["out_noise=inf"]),
    (dict(w_bits=0, w_range=1.0), ValueError, ["w_bits=0", "1..16"]),
    (dict(in_bits=17), ValueError, ["in_bits=17", "1..16"]),
    (dict(out_bits=4.0), TypeError, ["out_bits=4.0"]),
    (dict(in_range=(1.0, 1.0)), ValueError, ["in_range=(1.0, 1.0)", "lo < hi"]),
    (dict(out_range=(0.0, math.nan)), ValueError, ["out_range=", "NaN"]),
    (dict(in_range=(0.0, math.inf)), ValueError, ["in_range=", "finite"]),
    (dict(w_range=(2.0, -2.0)), ValueError, ["w_range=(2.0, -2.0)", "lo < hi"]),
    (dict(w_range=-2.0), ValueError, ["w_range=-2.0", "> 0"]),
    (dict(w_range=(1.0,)), TypeError, ["w_range=(1.0,)"]),
    (dict(w_bits=4), ValueError, ["w_bits=4", "w_range=None"]),
    (dict(tile_rows=0), ValueError, ["tile_rows=0"]),
    (dict(sampling="per_batch"), ValueError, ["sampling='per_batch'", "per_call"]),
    (dict(clean_grad_input=1), TypeError, ["clean_grad_input=1"]),
])
def test_layer_config_rejects(kwargs, exc, words):
    with pytest.raises(exc) as info:
        LayerConfig(**kwargs)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


X = torch.randn(2, 4, 6, 6)
W = torch.randn(3, 4, 3, 3)
CFG = LayerConfig(eta=0.1)


@pytest.mark.parametrize("call,exc,words", [
    (lambda: noisy_conv2d(X[0, 0], W, config=CFG, seed=0), ValueError, ["input", "4-D", "(6, 6)"]),
    (lambda: noisy_conv2d(X, W[0], config=CFG, seed=0), ValueError, ["weight", "4-D"]),
    (lambda: noisy_conv2d(X.long(), W, config=CFG, seed=0), TypeError, ["input", "torch.int64"]),
    (lambda: noisy_conv2d(X.double(), W, config=CFG, seed=0), TypeError, ["weight", "float32", "float64"]),
    (lambda: noisy_conv2d(X, W, torch.randn(4), config=CFG, seed=0), ValueError, ["bias", "[3]", "(4,)"]),
    (lambda: noisy_conv2d(X[:, :3], W, config=CFG, seed=0), ValueError, ["input", "4 channels"]),
    (lambda: noisy_conv2d(X, W, groups=0, config=CFG, seed=0), ValueError, ["groups=0"]),
    (lambda: noisy_conv2d(X, W, stride=0, config=CFG, seed=0), ValueError, ["stride=0", ">= 1"]),
    (lambda: noisy_conv2d(X, W, padding=(1, 2, 3), config=CFG, seed=0), TypeError, ["padding=(1, 2, 3)"]),
    (lambda: noisy_conv2d(X, W, padding="full", config=CFG, seed=0), ValueError, ["padding='full'"]),
    (lambda: noisy_conv2d(X, W, config=CFG, seed=-1), ValueError, ["seed=-1", "2^64"]),
    (lambda: noisy_conv2d(X, W, config=CFG, seed=2**64), ValueError, ["seed=", "2^64"]),
    (lambda: noisy_conv2d(X, W, config=CFG, seed=0.5), TypeError, ["seed=0.5"]),
    (lambda: noisy_conv2d(X, W, config=CFG, seed=0, layer_key=-3), ValueError, ["layer_key=-3"]),
    (lambda: noisy_conv2d(X, W, config={"eta": 0.1}, seed=0), TypeError, ["config=", "LayerConfig"]),
    (lambda: noisy_conv2d(X, W, config=CFG, seed=0, instance=-1), ValueError, ["instance=-1"]),
    (lambda: noisy_conv2d(X, W, config=CFG, seed=0, instance="a"), TypeError, ["instance='a'"]),
    (lambda: noisy_conv2d(X, W, config=CFG.replace(sampling="per_instance"), seed=0, instance=3),
     TypeError, ["instance=3", "per_instance", "[2]"]),
    (lambda: noisy_conv2d(X, W, config=CFG.replace(sampling="per_instance"), seed=0,
                          instance=torch.tensor([0, 1, 2])), ValueError, ["instance", "[2]", "(3,)"]),
    (lambda: noisy_conv2d(X, W, config=CFG.replace(sampling="per_instance"), seed=0,
                          instance=torch.tensor([0.0, 1.0])), ValueError, ["instance", "int64"]),
    (lambda: noisy_conv2d(X, W, config=CFG.replace(sampling="per_instance"), seed=0,
                          instance=torch.tensor([0, -4])), ValueError, ["instance", ">= 0", "-4"]),
    (lambda: noisy_conv2d(X, W, config=CFG.replace(sampling="per_sample"), seed=0, instance=2**40),
     ValueError, ["instance=1099511627776", "[0, 549755813888)"]),
    (lambda: noisy_conv2d(X, W, config=LayerConfig(in_bits=8), seed=0), ValueError,
     ["in_range=None", "in_bits=8"]),
    (lambda: noisy_conv2d(X, W, config=LayerConfig(out_bits=8), seed=0), ValueError,
     ["out_range=None", "out_bits=8"]),
    (lambda: noisy_conv2d(X, W, config=CFG, seed=0, instance=torch.tensor([1, 2])), ValueError,
     ["instance", "0-d"]),
    (lambda: noisy_conv2d(X, W.to("meta"), config=CFG, seed=0), ValueError, ["weight", "meta", "cpu"]),
    (lambda: noisy_linear(torch.randn(3, 5), torch.randn(2, 4), config=CFG, seed=0), ValueError,
     ["input", "last dim 4", "(3, 5)"]),
    (lambda: noisy_linear(torch.randn(5), torch.randn(2, 5), config=CFG.replace(sampling="per_sample"),
                          seed=0), ValueError, ["input", "per_sample", "batch"]),
    (lambda: noisy_linear(torch.randn(3, 5), torch.randn(2, 5, 1), config=CFG, seed=0), ValueError,
     ["weight", "2-D"]),
    (lambda: noisy_linear(torch.randn(3, 5), torch.randn(2, 5), torch.randn(3), config=CFG, seed=0),
     ValueError, ["bias", "[2]"]),
])
def test_functional_rejects(call, exc, words):
    with pytest.raises(exc) as info:
        call()
    for w in words:
        assert w in str(info.value), (w, str(info.value))


# ---- inputs torch would reject deep in a kernel: caught first, with a named ValueError ---------------
X1 = torch.randn(1, 4, 5, 5)


@pytest.mark.parametrize("call,words", [
    # kernel larger than the padded input
    (lambda: noisy_conv2d(X1, torch.randn(2, 4, 7, 3), config=CFG, seed=0),
     ["weight", "kernel (7, 3)", "spans 7 along H", "padded input has 5", "no larger than the padded input"]),
    (lambda: noisy_conv2d(X1, torch.randn(2, 4, 3, 8), padding=1, config=CFG, seed=0),
     ["weight", "spans 8 along W", "padded input has 7", "2·padding=2"]),
    # dilation makes the kernel span more than the padded input
    (lambda: noisy_conv2d(X1, torch.randn(2, 4, 3, 3), dilation=3, config=CFG, seed=0),
     ["weight", "dilation=[3, 3]", "spans 7", "padded input has 5"]),
    # channel mismatch
    (lambda: noisy_conv2d(X1, torch.randn(2, 3, 3, 3), config=CFG, seed=0),
     ["input", "expected 3 channels", "(1, 4, 5, 5)"]),
    # groups that do not divide C_in / C_out
    (lambda: noisy_conv2d(X1, torch.randn(3, 2, 3, 3), groups=3, config=CFG, seed=0),
     ["groups=3", "divisor of the input's C_in=4"]),
    (lambda: noisy_conv2d(X1, torch.randn(3, 2, 3, 3), groups=2, config=CFG, seed=0),
     ["weight", "C_out=3", "divisible by groups=2"]),
    # empty spatial input, empty weight dims
    (lambda: noisy_conv2d(torch.randn(1, 4, 0, 5), torch.randn(2, 4, 1, 1), padding=1, config=CFG, seed=0),
     ["input", "non-empty spatial dims", "(1, 4, 0, 5)"]),
    (lambda: noisy_conv2d(X1, torch.randn(0, 4, 3, 3), config=CFG, seed=0),
     ["weight", "C_out, C_in/groups, kh and kw >= 1", "(0, 4, 3, 3)"]),
    (lambda: noisy_conv2d(X1, torch.randn(2, 4, 0, 3), config=CFG, seed=0),
     ["weight", "(2, 4, 0, 3)"]),
    # feature mismatch (linear)
    (lambda: noisy_linear(torch.randn(2, 3, 6), torch.randn(4, 5), config=CFG, seed=0),
     ["input", "last dim 5", "(2, 3, 6)"]),
    # padding='same' cases torch handles asymmetrically
    (lambda: noisy_conv2d(X1, torch.randn(2, 4, 2, 2), padding="same", config=CFG, seed=0),
     ["padding='same'", "symmetric padding", "F.pad"]),
    (lambda: noisy_conv2d(X1, torch.randn(2, 4, 3, 3), stride=2, padding="same", config=CFG, seed=0),
     ["padding='same'", "stride=[2, 2]", "stride 1"]),
])
def test_functional_rejects_what_torch_rejects(call, words):
    with pytest.raises(ValueError) as info:
        call()
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_modules_reject_what_torch_rejects():
    from torch import nn
    from noisyops.nn import NoisyConv2d, NoisyLinear
    conv = NoisyConv2d.from_module(nn.Conv2d(4, 2, 5), CFG)
    with pytest.raises(ValueError, match=r"weight: kernel \(5, 5\).*padded input has 3"):
        conv(torch.randn(1, 4, 3, 3))
    with pytest.raises(ValueError, match=r"input: expected 4 channels.*\(1, 3, 6, 6\)"):
        conv(torch.randn(1, 3, 6, 6))
    lin = NoisyLinear.from_module(nn.Linear(5, 2), CFG)
    with pytest.raises(ValueError, match=r"input: expected last dim 5.*\(3, 4\)"):
        lin(torch.randn(3, 4))
    assert conv.calls.item() == 0 and lin.calls.item() == 0  # rejected before the counter moved
