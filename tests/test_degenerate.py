"""Degenerate and non-finite inputs on every backend that runs here (reference, cpu, and triton
under TRITON_INTERPRET=1), forward and backward:

* empty batches (a last partial batch, a DDP shard), empty inner dims of a linear input, one output
  channel, ``tile_rows`` larger than K, K = 1;
* ranges that cannot be formed: ``w_range = k`` on weights whose std is 0 or undefined (the
  documented max|W| rule, docs/models.md), a constant calibration activation (widened), never NaN;
* NaN and ±Inf in inputs or weights propagate through every quantizer and clip (never a finite
  number); NaN in a calibration batch is an error naming the layer.
"""
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import noisyops
from noisyops import LayerConfig, dispatch
from noisyops.functional import noisy_conv2d, noisy_linear
from noisyops.nn import NoisyLinear

BACKENDS = ["reference"] + [b for b in ("cpu",) if dispatch.backend(b).status()[0]]
if os.environ.get("TRITON_INTERPRET") == "1" and dispatch.backend("triton").status()[0]:
    BACKENDS.append("triton")

EVERYTHING = LayerConfig(eta=0.05, eta_mul=0.03, w_range=2.5, w_bits=6, in_bits=5, in_range=(-2.0, 2.0),
                         out_bits=6, out_range=(-6.0, 6.0), out_noise=0.1, tile_rows=9)
QUANT = {
    "in_q": LayerConfig(in_bits=8, in_range=(-1.0, 1.0)),
    "out_q": LayerConfig(out_bits=8, out_range=(-1.0, 1.0)),
    "w_clip_q": LayerConfig(w_range=(-1.0, 1.0), w_bits=4),
    "noise": LayerConfig(eta=0.1, eta_mul=0.05, out_noise=0.05),
    "everything": EVERYTHING,
}


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("NOISYOPS_BACKEND", request.param)
    dispatch.reset_counts()
    yield request.param
    ran = {b for (_, b) in dispatch.backend_counts()}
    assert request.param in ran, ran  # the forced backend really ran (no silent fallback)


def _inst(cfg, n):
    return torch.arange(n, dtype=torch.int64) % 3 if cfg.sampling == "per_instance" else 4


def _dtype(backend):
    return torch.float32 if backend == "triton" else torch.float64  # triton declines float64


# ---- empty and tiny shapes ------------------------------------------------------------------------------
@pytest.mark.parametrize("sampling", ["per_call", "per_sample", "per_instance"])
@pytest.mark.parametrize("name", ["noise", "everything"])
def test_empty_batch_conv_forward_backward(backend, name, sampling):
    cfg = QUANT[name].replace(sampling=sampling)
    dt = _dtype(backend)
    x = torch.randn(0, 4, 6, 6, dtype=dt, requires_grad=True)
    w = torch.randn(3, 4, 3, 3, dtype=dt, requires_grad=True)
    b = torch.randn(3, dtype=dt, requires_grad=True)
    y = noisy_conv2d(x, w, b, padding=1, config=cfg, seed=1, instance=_inst(cfg, 0))
    assert y.shape == (0, 3, 6, 6)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))
    xc = torch.randn(0, 4, 6, 6, dtype=dt).contiguous(memory_format=torch.channels_last)
    assert noisy_conv2d(xc, w.detach(), config=cfg, seed=1, instance=_inst(cfg, 0)).shape == (0, 3, 4, 4)


@pytest.mark.parametrize("sampling", ["per_call", "per_sample", "per_instance"])
@pytest.mark.parametrize("xshape", [(0, 5), (0, 2, 5), (2, 0, 5)])
def test_empty_linear_forward_backward(backend, sampling, xshape):
    cfg = EVERYTHING.replace(sampling=sampling)
    dt = _dtype(backend)
    x = torch.randn(xshape, dtype=dt, requires_grad=True)
    w = torch.randn(3, 5, dtype=dt, requires_grad=True)
    b = torch.randn(3, dtype=dt, requires_grad=True)
    y = noisy_linear(x, w, b, config=cfg, seed=1, instance=_inst(cfg, xshape[0]))
    assert y.shape == xshape[:-1] + (3,)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


def _vs_reference(fn, monkeypatch, backend, tol):
    """Run ``fn`` (returns outputs and grads) on the backend and on the reference."""
    got = fn()
    monkeypatch.setenv("NOISYOPS_BACKEND", "reference")
    want = fn()
    monkeypatch.setenv("NOISYOPS_BACKEND", backend)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=tol, atol=tol)


@pytest.mark.parametrize("case", ["one_out_channel", "tile_rows_gt_K", "K_is_1", "1x1_input"])
def test_tiny_conv_shapes_match_reference(backend, monkeypatch, case):
    dt = _dtype(backend)
    shapes = {"one_out_channel": ((2, 3, 5, 5), (1, 3, 3, 3), 1),
              "tile_rows_gt_K": ((2, 2, 4, 4), (3, 2, 2, 2), 1),
              "K_is_1": ((3, 1, 4, 4), (2, 1, 1, 1), 0),
              "1x1_input": ((2, 2, 1, 1), (2, 2, 3, 3), 1)}
    xs, ws, pad = shapes[case]
    cfg = EVERYTHING.replace(tile_rows=1000) if case == "tile_rows_gt_K" else EVERYTHING.replace(tile_rows=1)
    g = torch.Generator().manual_seed(0)
    x0, w0 = torch.randn(xs, generator=g, dtype=dt), torch.randn(ws, generator=g, dtype=dt) * 0.5

    def run():
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        y = noisy_conv2d(x, w, padding=pad, config=cfg.replace(sampling="per_sample"), seed=3, instance=2)
        y.backward(torch.ones_like(y))
        assert torch.isfinite(y).all()
        return y.detach(), x.grad, w.grad
    _vs_reference(run, monkeypatch, backend, 1e-4 if dt == torch.float32 else 1e-9)


@pytest.mark.parametrize("fin,fout,tile_rows", [(1, 1, None), (1, 4, 1), (6, 1, 100), (7, 3, 1)])
def test_tiny_linear_shapes_match_reference(backend, monkeypatch, fin, fout, tile_rows):
    dt = _dtype(backend)
    g = torch.Generator().manual_seed(1)
    x0, w0 = torch.randn(3, fin, generator=g, dtype=dt), torch.randn(fout, fin, generator=g, dtype=dt)
    cfg = EVERYTHING.replace(tile_rows=tile_rows, w_range=(-1.0, 1.0))

    def run():
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        y = noisy_linear(x, w, config=cfg, seed=3, instance=2)
        y.backward(torch.ones_like(y))
        return y.detach(), x.grad, w.grad
    _vs_reference(run, monkeypatch, backend, 1e-4 if dt == torch.float32 else 1e-9)


# ---- ranges that cannot be formed ---------------------------------------------------------------------
@pytest.mark.parametrize("w_bits", [None, 4])
def test_w_range_k_on_zero_weights_is_exactly_the_bias(backend, w_bits):
    """std(W) = 0 and max|W| = 0: the empty range (0, 0); the zero weights stay zero, σ = 0."""
    dt = _dtype(backend)
    cfg = LayerConfig(eta=0.1, eta_mul=0.05, w_range=2.0, w_bits=w_bits)
    x = torch.randn(3, 4, 5, 5, dtype=dt, requires_grad=True)
    w = torch.zeros(2, 4, 3, 3, dtype=dt, requires_grad=True)
    b = torch.tensor([0.5, -1.0], dtype=dt)
    y = noisy_conv2d(x, w, b, config=cfg, seed=0)
    assert torch.equal(y, b.view(1, -1, 1, 1).expand_as(y))
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()
    yl = noisy_linear(torch.randn(2, 4, dtype=dt), torch.zeros(3, 4, dtype=dt), config=cfg, seed=0)
    assert torch.equal(yl, torch.zeros_like(yl))


@pytest.mark.parametrize("w_bits", [None, 4])
def test_w_range_k_on_constant_or_single_weights_keeps_them(backend, w_bits):
    """std(W) = 0 (all equal) or undefined (one weight): the range is ±k·max|W| (it holds W), so
    the result is neither NaN nor zeroed."""
    dt = _dtype(backend)
    cfg = LayerConfig(w_range=2.0, w_bits=w_bits)
    x = torch.randn(3, 4, dtype=dt)
    for w in (torch.full((2, 4), 0.75, dtype=dt), torch.tensor([[-1.25]], dtype=dt)):
        xx = x[:, : w.shape[1]]
        y = noisy_linear(xx, w, config=cfg, seed=0)
        a = float(w.abs().max())
        wq = w if w_bits is None else (-2 * a + torch.round((w + 2 * a) / (4 * a / 15)) * (4 * a / 15))
        torch.testing.assert_close(y, F.linear(xx, wq))
        assert y.abs().sum() > 0


def test_module_with_zero_weights_and_k_range_is_finite():
    lin = nn.Linear(4, 3)
    nn.init.zeros_(lin.weight)
    with pytest.warns(UserWarning, match="std is 0"):
        m = NoisyLinear.from_module(lin, LayerConfig(eta=0.05, w_range=2.0, w_bits=4))
    x = torch.randn(5, 4, requires_grad=True)
    y = m(x)
    assert torch.equal(y, lin.bias.detach().expand(5, 3))
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(m.weight.grad).all()


def test_constant_calibration_activation_gets_a_nonempty_range():
    """A layer whose input is constant (lo = hi) gets ``lo ± 1e-6·max(|lo|, 1)``; the quantized
    output stays finite and within one level of the unquantized one."""
    torch.manual_seed(0)
    net = noisyops.convert(nn.Sequential(nn.Linear(3, 2)), LayerConfig(in_bits=8, out_bits=8))
    x = torch.full((4, 3), 2.0)
    ranges = noisyops.calibrate(net, [x])
    (lo, hi), _ = ranges["0"]
    assert lo < 2.0 < hi and hi - lo == pytest.approx(4e-6, rel=1e-3)
    y = net(x)
    assert torch.isfinite(y).all()
    m = net[0]
    with pytest.raises(ValueError, match=r"in_range=\(1.0, 1.0\).*lo < hi"):
        m.set_ranges(in_range=(1.0, 1.0))


# ---- non-finite values --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(QUANT))
def test_nan_in_input_propagates(backend, name):
    dt = _dtype(backend)
    cfg = QUANT[name]
    x = torch.randn(3, 6, dtype=dt)
    x[1, 2] = math.nan
    w = torch.randn(4, 6, dtype=dt) * 0.3
    y = noisy_linear(x, w, config=cfg, seed=0)
    assert torch.isnan(y[1]).all(), y  # every output of the sample reads x[1, 2]
    assert torch.isfinite(y[[0, 2]]).all()
    xc = torch.randn(2, 3, 5, 5, dtype=dt)
    xc[0, 1, 2, 2] = math.nan
    yc = noisy_conv2d(xc, torch.randn(2, 3, 3, 3, dtype=dt) * 0.3, padding=1, config=cfg, seed=0)
    assert torch.isnan(yc[0, :, 1:4, 1:4]).all() and torch.isfinite(yc[1]).all()


@pytest.mark.parametrize("name", ["in_q", "out_q", "w_clip_q", "noise"])
def test_nan_in_weight_propagates(backend, name):
    """A NaN weight makes every output it feeds NaN (a fixed range keeps the others finite)."""
    dt = _dtype(backend)
    cfg = QUANT[name]
    if cfg.w_range is None:
        cfg = cfg.replace(w_range=(-1.0, 1.0))
    w = torch.randn(4, 6, dtype=dt) * 0.3
    w[2, 3] = math.nan
    y = noisy_linear(torch.randn(3, 6, dtype=dt), w, config=cfg, seed=0)
    assert torch.isnan(y[:, 2]).all(), y
    assert torch.isfinite(y[:, [0, 1, 3]]).all()


def test_nan_weight_with_measured_range_makes_every_output_nan(backend):
    """``w_range = k`` (or None) measures std(W): a NaN weight makes the range NaN, so every output
    is NaN (never a finite substitute)."""
    dt = _dtype(backend)
    w = torch.randn(4, 6, dtype=dt)
    w[0, 0] = math.nan
    for cfg in (LayerConfig(w_range=2.0, w_bits=4), LayerConfig(eta=0.1)):
        y = noisy_linear(torch.randn(3, 6, dtype=dt), w, config=cfg, seed=0)
        assert torch.isnan(y).all()


@pytest.mark.parametrize("name", ["in_q", "out_q", "w_clip_q", "everything"])
def test_inf_in_input_propagates_through_every_quantizer(backend, name):
    """±Inf in an input is never quantized to a finite level (SPEC: faults propagate): the DAC, the
    weight clip and the ADC pass ±Inf through, so the outputs that read it are ±Inf (or NaN where
    +Inf and −Inf meet), the others stay finite; its straight-through gradient is 0."""
    dt = _dtype(backend)
    cfg = QUANT[name].replace(eta=0.0, eta_mul=0.0, out_noise=0.0) if name == "everything" else QUANT[name]
    x = torch.tensor([[math.inf, 0.25, 0.5], [-math.inf, 0.25, 0.5], [0.1, 0.2, 0.3]], dtype=dt,
                     requires_grad=True)
    w = torch.tensor([[0.5, 0.5, 0.5], [0.25, -0.5, 0.75]], dtype=dt)
    y = noisy_linear(x, w, config=cfg, seed=0)
    assert torch.equal(y[0].detach(), torch.full((2,), math.inf, dtype=dt)), y
    assert torch.equal(y[1].detach(), torch.tensor([-math.inf, -math.inf], dtype=dt)), y
    assert torch.isfinite(y[2]).all(), y
    y[2].sum().backward()
    if cfg.in_bits:
        assert x.grad[0, 0] == 0 and x.grad[1, 0] == 0  # outside [lo, hi]: no straight-through gradient


def test_inf_in_one_crossbar_tile_does_not_poison_the_others(backend):
    """Crossbar tiles are separate partial sums (SPEC section 1): an Inf input read by tile 0 makes
    that tile's ADC output ±Inf and the digital sum ±Inf, never NaN through ``Inf·0`` in the tiles
    that do not hold its channel; the other outputs stay finite."""
    dt = _dtype(backend)
    cfg = LayerConfig(w_range=(-1.0, 1.0), out_bits=6, out_range=(-4.0, 4.0), tile_rows=2)
    x = torch.tensor([[math.inf, 0.25, 0.5, 0.1], [0.1, 0.2, 0.3, -math.inf]], dtype=dt)
    w = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.25, -0.5, 0.75, -0.25]], dtype=dt)
    y = noisy_linear(x, w, config=cfg, seed=0)
    assert torch.equal(y[0], torch.tensor([math.inf, math.inf], dtype=dt)), y
    assert torch.equal(y[1], torch.tensor([-math.inf, math.inf], dtype=dt)), y


def test_inf_in_a_weight_propagates_through_clip_and_quantizer(backend):
    """An Inf weight under a fixed range is not clipped to ``w_hi``: the outputs it feeds are ±Inf."""
    dt = _dtype(backend)
    w = torch.tensor([[0.5, 0.5, 0.5], [0.25, -0.5, 0.75]], dtype=dt)
    w[1, 1] = -math.inf
    x = torch.tensor([[0.25, 0.5, 0.75]], dtype=dt)
    for cfg in (QUANT["w_clip_q"], QUANT["w_clip_q"].replace(out_bits=8, out_range=(-1.0, 1.0))):
        y = noisy_linear(x, w, config=cfg, seed=0)
        assert torch.isfinite(y[0, 0]) and y[0, 1] == -math.inf, y


def test_inf_without_a_quantizer_propagates(backend):
    dt = _dtype(backend)
    x = torch.tensor([[math.inf, 0.0, 0.5]], dtype=dt)
    y = noisy_linear(x, torch.ones(2, 3, dtype=dt), config=LayerConfig(eta=0.1), seed=0)
    assert not torch.isfinite(y).any()


def test_nan_in_calibration_batch_names_the_layer():
    torch.manual_seed(0)
    net = noisyops.convert(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)),
                           LayerConfig(in_bits=8, out_bits=8))
    good = torch.randn(8, 3)
    bad = good.clone()
    bad[5, 1] = math.nan
    with pytest.raises(ValueError, match=r"layer '0' got 4 NaN/Inf values in its pre-bias output|"
                                         r"layer '0' got 1 NaN/Inf values in its input") as info:
        noisyops.calibrate(net, [good, bad])
    assert "calibration batch 1" in str(info.value)
    with torch.no_grad():
        net[2].weight[0, 0] = math.nan
    with pytest.raises(ValueError, match=r"layer '2' got .* NaN/Inf values in its pre-bias output"):
        noisyops.calibrate(net, [good])
