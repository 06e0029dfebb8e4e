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
