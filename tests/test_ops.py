"""The public ops against the spec statement, the clean identity, sampling modes, autograd, opcheck."""
import pytest
import torch
import torch.nn.functional as F

import spec_statement as spec
from noisyops import LayerConfig, dispatch
from noisyops.functional import noisy_conv2d, noisy_linear
from noisyops.ops import noisy_conv2d_op, noisy_linear_op
from noisyops.params import resolve

CPU_BACKENDS = [name for name in ("reference", "cpu") if dispatch.backend(name).status()[0]]

CONFIGS = {
    "add": LayerConfig(eta=0.1),
    "mul": LayerConfig(eta_mul=0.2),
    "mixed_clip_k": LayerConfig(eta=0.05, eta_mul=0.05, w_range=2.0),
    "wq_range": LayerConfig(eta=0.02, w_range=(-0.4, 0.5), w_bits=4),
    "in_out_q": LayerConfig(eta=0.04, in_bits=8, in_range=(-1.5, 2.0), out_bits=8, out_range=(-4.0, 3.0)),
    "out_noise_tiles": LayerConfig(out_noise=0.3, tile_rows=18),
    "everything": LayerConfig(eta=0.05, eta_mul=0.03, w_range=2.5, w_bits=6, in_bits=5,
                              in_range=(-2.0, 2.0), out_bits=6, out_range=(-6.0, 6.0), out_noise=0.1,
                              tile_rows=9),
}


def _instance(cfg, batch):
    if cfg.sampling == "per_instance":
        return torch.tensor([3, 0, 3, 2**40 + 1][:batch], dtype=torch.int64)
    return 5


@pytest.fixture(params=CPU_BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("NOISYOPS_BACKEND", request.param)
    dispatch.reset_counts()
    yield request.param
    assert dispatch.backend_counts(), "no op ran"
    assert {b for (_, b) in dispatch.backend_counts()} == {request.param}


@pytest.mark.parametrize("sampling", ["per_call", "per_sample", "per_instance"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_conv2d_matches_spec_statement(backend, name, sampling):
    cfg = CONFIGS[name].replace(sampling=sampling)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 7, 6, generator=g, dtype=torch.float64)
    W = torch.randn(5, 4, 3, 3, generator=g, dtype=torch.float64) * 0.3
    b = torch.randn(5, generator=g, dtype=torch.float64)
    inst = _instance(cfg, 3)
    y = noisy_conv2d(x, W, b, stride=(2, 1), padding=(1, 2), dilation=(1, 2), config=cfg, seed=77,
                     layer_key=4, instance=inst)
    want = spec.conv2d(x, W, b, (2, 1), (1, 2), (1, 2), cfg, 77, 4, inst)
    torch.testing.assert_close(y, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("sampling", ["per_call", "per_sample", "per_instance"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_linear_matches_spec_statement(backend, name, sampling):
    cfg = CONFIGS[name].replace(sampling=sampling)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 37, generator=g, dtype=torch.float64)
    W = torch.randn(6, 37, generator=g, dtype=torch.float64) * 0.3
    b = torch.randn(6, generator=g, dtype=torch.float64)
    inst = _instance(cfg, 4)
    y = noisy_linear(x, W, b, config=cfg, seed=2**64 - 3, layer_key=9, instance=inst)
    want = spec.linear(x, W, b, cfg, 2**64 - 3, 9, inst)
    torch.testing.assert_close(y, want, rtol=1e-9, atol=1e-9)


CONV_SHAPES = [  # (x shape, w shape, stride, padding, dilation, groups)
    ((2, 4, 9, 9), (6, 4, 3, 3), 1, 1, 1, 1),
    ((1, 4, 8, 11), (8, 2, 3, 5), (2, 1), (0, 2), (1, 1), 2),  # groups, non-square, batch 1
    ((3, 6, 10, 10), (6, 1, 3, 3), 2, 1, 1, 6),  # depthwise, stride
    ((2, 3, 12, 12), (5, 3, 3, 3), 1, 2, 2, 1),  # dilation
    ((2, 5, 6, 7), (4, 5, 1, 1), 1, 0, 1, 1),  # pointwise
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", CONV_SHAPES)
def test_clean_conv2d_equals_F_conv2d_bit_for_bit(backend, shape, dtype):
    xs, ws, stride, padding, dilation, groups = shape
    x = torch.randn(xs).to(dtype)
    w = torch.randn(ws).to(dtype)
    b = torch.randn(ws[0]).to(dtype)
    y = noisy_conv2d(x, w, b, stride, padding, dilation, groups, config=LayerConfig(), seed=1)
    assert torch.equal(y, F.conv2d(x, w, b, stride, padding, dilation, groups))
    x_cl = x.contiguous(memory_format=torch.channels_last)
    y_cl = noisy_conv2d(x_cl, w, None, stride, padding, dilation, groups, config=LayerConfig(), seed=1)
    assert torch.equal(y_cl, F.conv2d(x_cl, w, None, stride, padding, dilation, groups))
    assert y_cl.is_contiguous(memory_format=torch.channels_last) == F.conv2d(
        x_cl, w, None, stride, padding, dilation, groups).is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("xshape", [(5, 13), (13,), (2, 3, 13)])
def test_clean_linear_equals_F_linear_bit_for_bit(backend, xshape, dtype):
    x = torch.randn(xshape).to(dtype)
    w = torch.randn(7, 13).to(dtype)
    b = torch.randn(7).to(dtype)
    assert torch.equal(noisy_linear(x, w, b, config=LayerConfig(), seed=0), F.linear(x, w, b))


@pytest.mark.parametrize("shape", CONV_SHAPES)
def test_noisy_conv_odd_shapes_match_per_group_statement(backend, shape):
    """Groups: each group is an independent conv with its own slice of the noisy weight tensor."""
    xs, ws, stride, padding, dilation, groups = shape
    cfg = LayerConfig(eta=0.1, eta_mul=0.05)
    x = torch.randn(xs, dtype=torch.float64)
    w = torch.randn(ws, dtype=torch.float64)
    y = noisy_conv2d(x, w, None, stride, padding, dilation, groups, config=cfg, seed=3, instance=2)
    wn = spec.noisy_weight(w, cfg, 3, 0, 2)
    torch.testing.assert_close(y, F.conv2d(x, wn, None, stride, padding, dilation, groups))


# ---- sampling modes ------------------------------------------------------------------------------
def test_per_call_shares_noise_per_sample_does_not(backend):
    x = torch.randn(1, 8, dtype=torch.float64).repeat(4, 1)
    w = torch.randn(3, 8, dtype=torch.float64)
    y = noisy_linear(x, w, config=LayerConfig(eta=0.1), seed=1, instance=0)
    assert torch.equal(y[0], y[3])
    y2 = noisy_linear(x, w, config=LayerConfig(eta=0.1, sampling="per_sample"), seed=1, instance=0)
    assert not torch.equal(y2[0], y2[1])
    assert not torch.equal(noisy_linear(x, w, config=LayerConfig(eta=0.1), seed=1, instance=1), y)


def test_per_sample_is_per_instance_with_derived_ids(backend):
    x = torch.randn(5, 4, 6, 6)
    w = torch.randn(3, 4, 3, 3)
    cfg = LayerConfig(eta=0.1, out_noise=0.05, tile_rows=18)
    y = noisy_conv2d(x, w, config=cfg.replace(sampling="per_sample"), seed=9, instance=7)
    ids = 7 * 2**24 + torch.arange(5)
    y2 = noisy_conv2d(x, w, config=cfg.replace(sampling="per_instance"), seed=9, instance=ids)
    assert torch.equal(y, y2)


def test_per_instance_chip_is_fixed_across_batches(backend):
    cfg = LayerConfig(eta=0.1, sampling="per_instance")
    w = torch.randn(3, 8)
    xa, xb = torch.randn(2, 8), torch.randn(3, 8)
    ya = noisy_linear(xa, w, config=cfg, seed=4, instance=torch.tensor([5, 6]))
    yb = noisy_linear(torch.cat([xb, xa]), w, config=cfg, seed=4, instance=torch.tensor([1, 2, 5, 5, 6]))
    torch.testing.assert_close(yb[3:], ya, rtol=1e-6, atol=1e-6)
    # chip 5 on every sample = per_call with counter 5
    yc = noisy_linear(xa, w, config=cfg.replace(sampling="per_call"), seed=4, instance=5)
    torch.testing.assert_close(yc[0], ya[0], rtol=1e-6, atol=1e-6)


def test_noise_statistics_through_identity_input(backend):
    """y = I @ Wnᵀ exposes Wn: additive noise has mean 0 and std σ = η·(w_max − w_min)."""
    n_in, n_out = 256, 256
    w = torch.zeros(n_out, n_in, dtype=torch.float64)
    eye = torch.eye(n_in, dtype=torch.float64)
    cfg = LayerConfig(eta=0.05, w_range=(-1.0, 1.0))
    wn = noisy_linear(eye, w, config=cfg, seed=11, instance=3).t()
    sigma = 0.05 * 2.0
    assert abs(float(wn.mean())) < 5 * sigma / n_in
    assert abs(float(wn.std()) / sigma - 1) < 0.02
    w1 = torch.ones(n_out, n_in, dtype=torch.float64)
    wm = noisy_linear(eye, w1, config=LayerConfig(eta_mul=0.1, w_range=(-2.0, 2.0)), seed=11).t()
    assert abs(float(wm.mean()) - 1) < 5 * 0.1 / n_in
    assert abs(float(wm.std()) / 0.1 - 1) < 0.02


def test_out_noise_statistics_and_tiles(backend):
    x = torch.zeros(64, 4, 8, 8)
    w = torch.zeros(16, 4, 3, 3)
    y1 = noisy_conv2d(x, w, padding=1, config=LayerConfig(out_noise=0.5), seed=2)
    assert abs(float(y1.std()) - 0.5) < 0.02
    y4 = noisy_conv2d(x, w, padding=1, config=LayerConfig(out_noise=0.5, tile_rows=9), seed=2)
    assert abs(float(y4.std()) - 0.5 * 2.0) < 0.04  # 4 tiles of 1 channel: sqrt(4)·σ


# ---- autograd --------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampling", ["per_call", "per_sample", "per_instance"])
def test_gradcheck_linear_noise(backend, sampling):
    cfg = LayerConfig(eta=0.05, w_range=(-10.0, 10.0), out_noise=0.1, tile_rows=3, sampling=sampling)
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    inst = torch.tensor([1, 2, 1]) if sampling == "per_instance" else 3
    assert torch.autograd.gradcheck(
        lambda x, w, b: noisy_linear(x, w, b, config=cfg, seed=5, layer_key=1, instance=inst), (x, w, b))


def test_gradcheck_conv_noise(backend):
    cfg = LayerConfig(eta=0.05, w_range=(-10.0, 10.0), sampling="per_sample")
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: noisy_conv2d(x, w, b, 1, 1, (2, 1), 2, config=cfg, seed=5, instance=2), (x, w, b),
        fast_mode=True)


def test_straight_through_masks(backend):
    """Zero gradient exactly where the input, weight or output quantizer saturated; the input
    gradient goes through the noisy weights of the forward pass (or clean ones on request)."""
    cfg = LayerConfig(eta=0.1, w_range=(-0.5, 0.5), w_bits=8, in_bits=8, in_range=(-1.0, 1.0),
                      out_bits=8, out_range=(-0.8, 0.8))
    x = torch.tensor([[-2.0, -0.5, 0.3, 1.5]], dtype=torch.float64, requires_grad=True)
    w = torch.tensor([[0.2, -0.7, 0.4, 0.1], [0.9, 0.1, -0.2, 0.3], [-0.1, 0.2, 0.3, 0.05]],
                     dtype=torch.float64, requires_grad=True)
    y = noisy_linear(x, w, config=cfg, seed=3, instance=1)
    g = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    y.backward(g)
    wq = spec.noisy_weight(w.detach(), cfg.replace(eta=0.0), 3, 0, 1)
    wn = spec.noisy_weight(w.detach(), cfg, 3, 0, 1)
    xq = spec.Q(x.detach(), -1.0, 1.0, 8)
    pre = xq @ wn.t()
    g_masked = g * ((pre >= -0.8) & (pre <= 0.8))
    in_mask = (x.detach() >= -1) & (x.detach() <= 1)
    torch.testing.assert_close(x.grad, (g_masked @ wn) * in_mask)
    w_mask = (w.detach() >= -0.5) & (w.detach() <= 0.5)
    torch.testing.assert_close(w.grad, (g_masked.t() @ xq) * w_mask)
    assert bool((x.grad[0, [0, 3]] == 0).all()) and bool((w.grad[0, 1] == 0).all())
    # clean_grad_input: same masks, Wq instead of Wn
    x2 = x.detach().clone().requires_grad_()
    noisy_linear(x2, w.detach(), config=cfg.replace(clean_grad_input=True), seed=3, instance=1).backward(g)
    torch.testing.assert_close(x2.grad, (g_masked @ wq) * in_mask)


def test_backward_regenerates_the_forward_noise(backend):
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    cfg = LayerConfig(eta=0.2, w_range=(-5.0, 5.0))
    y = noisy_conv2d(x, w, padding=1, config=cfg, seed=8, layer_key=2, instance=6)
    g = torch.randn_like(y)
    y.backward(g)
    wn = spec.noisy_weight(w.detach(), cfg, 8, 2, 6).float()
    torch.testing.assert_close(x.grad, torch.nn.grad.conv2d_input(x.shape, wn, g, padding=1),
                               rtol=1e-4, atol=1e-4)


# ---- opcheck ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["add", "in_out_q", "everything"])
def test_opcheck_conv2d(backend, name):
    cfg = CONFIGS[name]
    p = resolve(cfg, seed=12, layer_key=1)
    fp, ip = p.to_op_args()
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    w = (torch.randn(6, 2, 3, 3) * 0.3).requires_grad_()
    b = torch.randn(6, requires_grad=True)
    torch.library.opcheck(noisy_conv2d_op, (x, w, b, [1, 1], [1, 1], [1, 1], 2, fp, ip, torch.tensor(3)))


@pytest.mark.parametrize("name", ["mul", "in_out_q", "everything"])
@pytest.mark.parametrize("sampling", ["per_call", "per_instance"])
def test_opcheck_linear(backend, name, sampling):
    cfg = CONFIGS[name].replace(sampling=sampling)
    fp, ip = resolve(cfg, seed=12, layer_key=1).to_op_args()
    x = torch.randn(3, 20, requires_grad=True)
    w = (torch.randn(5, 20) * 0.3).requires_grad_()
    inst = torch.tensor([0, 4, 0]) if sampling == "per_instance" else torch.tensor(2)
    torch.library.opcheck(noisy_linear_op, (x, w, None, fp, ip, inst))


def test_deterministic_and_seed_sensitive(backend):
    x = torch.randn(2, 3, 5, 5)
    w = torch.randn(4, 3, 3, 3)
    cfg = CONFIGS["everything"]
    a = noisy_conv2d(x, w, config=cfg, seed=1, instance=2)
    assert torch.equal(a, noisy_conv2d(x, w, config=cfg, seed=1, instance=2))
    assert not torch.equal(a, noisy_conv2d(x, w, config=cfg, seed=2, instance=2))
    assert not torch.equal(a, noisy_conv2d(x, w, config=cfg, seed=1, instance=2, layer_key=1))
