"""Autocast rules of the noisy ops (issue 10 item 4), tested with CPU bf16 autocast.

Under ``torch.autocast`` the forward ops cast x / weight / bias to the autocast dtype (the product
runs in it), noise and quantizers run in float32 (the plan's compute dtype for half inputs), the
output is in the autocast dtype and gradients reach fp32 parameters in fp32.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import noisyops
from noisyops import LayerConfig
from noisyops import functional as nf
from noisyops.training.loop import amp_dtype

NOISY = LayerConfig(eta=0.05, w_range=(-2.0, 2.0), in_bits=8, in_range=(-3.0, 3.0), out_bits=8,
                    out_range=(-10.0, 10.0))
BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_clean_under_autocast_is_torch_under_autocast(backend_env, backend):
    backend_env(backend)
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3), torch.randn(4)
    xl, wl = torch.randn(5, 6), torch.randn(3, 6)
    with torch.autocast(**BF16):
        y = nf.noisy_conv2d(x, w, b, padding=1, config=LayerConfig(), seed=0)
        yl = nf.noisy_linear(xl, wl, config=LayerConfig(), seed=0)
        want, want_l = F.conv2d(x, w, b, padding=1), F.linear(xl, wl)
    assert y.dtype == want.dtype == torch.bfloat16 and torch.equal(y, want)
    assert yl.dtype == torch.bfloat16 and torch.equal(yl, want_l)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_noisy_under_autocast_is_the_op_on_cast_inputs(backend_env, backend):
    backend_env(backend)
    torch.manual_seed(1)
    x = torch.randn(2, 3, 8, 8)
    w = (0.3 * torch.randn(4, 3, 3, 3)).requires_grad_()
    b = torch.randn(4, requires_grad=True)
    with torch.autocast(**BF16):
        y = nf.noisy_conv2d(x, w, b, padding=1, config=NOISY, seed=0, instance=3)
    want = nf.noisy_conv2d(x.bfloat16(), w.detach().bfloat16(), b.detach().bfloat16(), padding=1,
                           config=NOISY, seed=0, instance=3)
    assert y.dtype == torch.bfloat16 and torch.equal(y, want)
    y.float().square().sum().backward()
    assert w.grad.dtype == torch.float32 and b.grad.dtype == torch.float32
    assert w.grad.abs().sum() > 0


def test_float64_is_left_alone_under_autocast():
    x, w = torch.randn(2, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    with torch.autocast(**BF16):
        y = nf.noisy_linear(x, w, config=NOISY.replace(in_bits=None, out_bits=None), seed=0)
    assert y.dtype == torch.float64


def test_converted_model_trains_under_bf16_autocast():
    """Mixed dtypes between layers (bf16 activations, fp32 weights) are the autocast rule's job."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8),
                                torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 5))
    noisy = noisyops.convert(model, NOISY.replace(w_range=None, in_range=(-4.0, 4.0)))
    with torch.autocast(**BF16):
        out = noisy(torch.randn(4, 3, 10, 10))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    grads = [p.grad for p in noisy.parameters()]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)


def test_amp_dtype():
    assert amp_dtype(torch.device("cpu")) is None
    if torch.cuda.is_available():
        want = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        assert amp_dtype(torch.device("cuda")) == want
