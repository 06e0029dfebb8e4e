"""NoisyConv2d / NoisyLinear: drop-in equality, state (seed, counter, ranges), noise contract."""
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from noisyops import LayerConfig, dispatch
from noisyops.functional import noisy_conv2d, noisy_linear
from noisyops.nn import NoisyConv2d, NoisyLinear
from noisyops.nn.base import int64_to_seed, seed_to_int64

NOISY = LayerConfig(eta=0.05, w_range=2.0)


def _conv(**kw):
    torch.manual_seed(0)
    return nn.Conv2d(**{"in_channels": 4, "out_channels": 6, "kernel_size": 3, **kw})


# ---- clean equality ------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [
    dict(padding=1),
    dict(padding=1, padding_mode="reflect"),
    dict(padding=(1, 2), padding_mode="replicate"),
    dict(padding=2, padding_mode="circular"),
    dict(padding="same"),
    dict(padding="same", kernel_size=4),           # asymmetric 'same' (even kernel)
    dict(padding="same", kernel_size=(2, 3), padding_mode="reflect"),
    dict(padding="valid", dilation=2),
    dict(stride=2, padding=1, bias=False),
    dict(groups=2, padding=1),
    dict(in_channels=4, out_channels=8, groups=4, padding=1),  # depthwise x2
])
def test_conv_clean_equals_nn_conv2d(kw):
    conv = _conv(**kw).eval()
    m = NoisyConv2d.from_module(conv, LayerConfig())
    x = torch.randn(2, 4, 9, 8)
    assert torch.equal(m(x), conv(x))
    assert torch.equal(m(x[0]), conv(x[0]))  # unbatched
    assert m.weight is conv.weight


def test_linear_clean_equals_nn_linear():
    torch.manual_seed(0)
    lin = nn.Linear(7, 5)
    m = NoisyLinear.from_module(lin, LayerConfig())
    for shape in [(3, 7), (7,), (2, 4, 7), (2, 3, 4, 7)]:
        x = torch.randn(*shape)
        assert torch.equal(m(x), lin(x)), shape


def test_constructor_is_drop_in():
    m = NoisyConv2d(3, 8, 3, padding=1, bias=False, config=NOISY, seed=5, layer_key=3)
    assert isinstance(m, nn.Conv2d) and m.bias is None and m.layer_key == 3 and m.get_seed() == 5
    lin = NoisyLinear(4, 2, config=NOISY)
    assert isinstance(lin, nn.Linear) and lin.weight.shape == (2, 4)
    assert lin(torch.randn(3, 4)).shape == (3, 2)


# ---- noise contract: module == functional op with the counter as instance -----------------------
@pytest.mark.parametrize("sampling", ["per_call", "per_sample"])
def test_conv_module_matches_functional(sampling):
    cfg = NOISY.replace(sampling=sampling, eta_mul=0.02)
    conv = _conv(padding=1)
    m = NoisyConv2d.from_module(conv, cfg, seed=11, layer_key=4)
    x = torch.randn(3, 4, 6, 6)
    for call in range(3):
        assert int(m.calls) == call
        y = m(x)
        ref = noisy_conv2d(x, conv.weight, conv.bias, 1, 1, config=cfg, seed=11, layer_key=4,
                           instance=call)
        assert torch.equal(y, ref)
    assert int(m.calls) == 3
    assert dispatch.last_backend("conv2d_fwd") is not None


def test_linear_module_matches_functional_and_advances_in_eval():
    lin = nn.Linear(6, 4)
    m = NoisyLinear.from_module(lin, NOISY, seed=3, layer_key=2).eval()
    x = torch.randn(5, 6)
    with torch.no_grad():
        y0, y1 = m(x), m(x)
    assert int(m.calls) == 2 and not torch.equal(y0, y1)
    assert torch.equal(y1, noisy_linear(x, lin.weight, lin.bias, config=NOISY, seed=3, layer_key=2,
                                        instance=1))


def test_weight_range_fixed_at_conversion():
    lin = nn.Linear(8, 8)
    std = float(lin.weight.detach().double().std())
    m = NoisyLinear.from_module(lin, LayerConfig(eta=0.1, w_range=2.5))
    assert m.weight_range == pytest.approx((-2.5 * std, 2.5 * std))
    m_none = NoisyLinear.from_module(lin, LayerConfig(eta=0.1))  # noise reference ±2 std, no clip
    assert m_none.weight_range == pytest.approx((-2 * std, 2 * std))
    assert m_none._params.w_clip == 0 and m_none._params.w_std_k == 0
    m_pair = NoisyLinear.from_module(lin, LayerConfig(w_range=(-0.1, 0.2)))
    assert m_pair.weight_range == (-0.1, 0.2)
    with torch.no_grad():
        lin.weight.mul_(10)  # training moves weights: the range stays fixed
    assert m.weight_range == pytest.approx((-2.5 * std, 2.5 * std))
    m.config = m.config.replace(w_range=1.0)  # a new w_range re-fixes it on the current weights
    assert m.weight_range == pytest.approx((-10 * std, 10 * std), rel=1e-6)
    assert m.w_range.dtype == torch.float64 and m.w_range.tolist() == pytest.approx(list(m.weight_range))


def test_zero_weights_fall_back_to_per_call_range():
    lin = nn.Linear(4, 3)
    nn.init.zeros_(lin.weight)
    with pytest.warns(UserWarning, match="std is 0"):
        m = NoisyLinear.from_module(lin, NOISY)
    assert m.weight_range is None and m._params.w_std_k == 2.0
    assert torch.equal(m(torch.ones(2, 4)), lin(torch.ones(2, 4)))  # zero range: zero noise


def test_noise_enabled_false_is_clean_with_quantizers_kept():
    lin = nn.Linear(6, 4)
    cfg = LayerConfig(eta=0.2, eta_mul=0.1, out_noise=0.3, w_range=2.0)
    m = NoisyLinear.from_module(lin, cfg)
    m.noise_enabled = False
    x = torch.randn(3, 6)
    lo, hi = m.weight_range
    assert torch.equal(m(x), F.linear(x, lin.weight.clamp(lo, hi), lin.bias))
    m.noise_enabled = True
    assert not torch.equal(m(x), F.linear(x, lin.weight.clamp(lo, hi), lin.bias))


# ---- seeds and state_dict --------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, (1 << 63) - 1, 1 << 63, (1 << 64) - 1, 0xDEADBEEFCAFEF00D])
def test_seed_roundtrip_64bit(seed):
    assert int64_to_seed(seed_to_int64(seed)) == seed
    m = NoisyLinear(3, 2, config=NOISY, seed=seed)
    assert m.seed.dtype == torch.int64 and int64_to_seed(int(m.seed)) == seed
    assert m._params.seed == seed
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    m2 = NoisyLinear(3, 2, config=NOISY, seed=0)
    m2.load_state_dict(torch.load(buf, weights_only=True))
    assert m2.get_seed() == seed and m2._params.seed == seed


def test_bad_seed_and_key():
    with pytest.raises(ValueError, match="seed"):
        NoisyLinear(3, 2, seed=1 << 64)
    with pytest.raises(ValueError, match="seed"):
        NoisyLinear(3, 2, seed=-1)
    with pytest.raises(ValueError, match="layer_key"):
        NoisyLinear(3, 2, layer_key=-1)
    with pytest.raises(TypeError, match="config"):
        NoisyLinear(3, 2, config={"eta": 0.1})


def test_state_dict_resume_continues_noise():
    conv = _conv(padding=1)
    m = NoisyConv2d.from_module(conv, NOISY.replace(eta_mul=0.05), seed=9, layer_key=1)
    x = torch.randn(2, 4, 5, 5)
    m(x), m(x)
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    expected = [m(x), m(x)]
    m2 = NoisyConv2d(4, 6, 3, padding=1, config=NOISY.replace(eta_mul=0.05), seed=0, layer_key=1)
    m2.load_state_dict(sd)
    assert int(m2.calls) == 2 and m2.weight_range == m.weight_range
    assert all(torch.equal(m2(x), e) for e in expected)


def test_clean_state_dict_loads_and_refixes_range():
    lin = nn.Linear(5, 4)
    m = NoisyLinear(5, 4, config=NOISY)
    res = m.load_state_dict(lin.state_dict())  # strict: noise buffers are optional keys
    assert not res.missing_keys and not res.unexpected_keys
    std = float(lin.weight.detach().double().std())
    assert m.weight_range == pytest.approx((-2 * std, 2 * std))


def test_half_keeps_range_buffers_float64():
    m = NoisyLinear(5, 4, config=NOISY).half()
    assert m.weight.dtype == torch.float16 and m.w_range.dtype == torch.float64
    assert m.calls.dtype == torch.int64 and m.seed.dtype == torch.int64


def test_extra_repr_shows_config():
    r = repr(NoisyConv2d(3, 4, 3, config=NOISY, seed=7, layer_key=2))
    assert "eta=0.05" in r and "w_range=2.0" in r and "layer_key=2" in r and "seed=7" in r


# ---- sampling modes --------------------------------------------------------------------------------
def test_per_sample_gives_each_sample_its_noise():
    lin = nn.Linear(6, 4)
    m = NoisyLinear.from_module(lin, NOISY.replace(sampling="per_sample"))
    x = torch.randn(1, 6).repeat(3, 1)
    y = m(x)
    assert not torch.equal(y[0], y[1]) and not torch.equal(y[1], y[2])


def test_per_instance_uses_chip_ids_and_keeps_counter():
    lin = nn.Linear(6, 4)
    m = NoisyLinear.from_module(lin, NOISY.replace(sampling="per_instance"))
    x = torch.randn(1, 6).repeat(4, 1)
    with pytest.raises(ValueError, match="chip ids"):
        m(x)
    m.chip_ids = torch.tensor([0, 1, 0, 1])
    y = m(x)
    # same chip, same input: same noisy weights (rows of one GEMM may differ in the last bit)
    torch.testing.assert_close(y[0], y[2], rtol=1e-6, atol=1e-6)
    assert (y[0] - y[1]).abs().max() > 1e-3
    assert int(m.calls) == 0
    assert torch.equal(m(x), y)  # a chip keeps its noise across calls
    m.chip_ids = torch.tensor([0, 1, 0])
    with pytest.raises(ValueError, match="shape"):
        m(x)


def test_forward_argument_errors():
    m = NoisyConv2d(3, 4, 3, config=NOISY)
    with pytest.raises(ValueError, match="input"):
        m(torch.randn(3, 5))
    with pytest.raises(TypeError, match="dtype"):
        m(torch.randn(1, 3, 5, 5, dtype=torch.float64))
    lin = NoisyLinear(3, 2, config=NOISY.replace(sampling="per_sample"))
    with pytest.raises(ValueError, match="batch dim"):
        lin(torch.randn(3))


def test_gradients_reach_clean_weights():
    conv = _conv(padding=1)
    m = NoisyConv2d.from_module(conv, NOISY.replace(in_bits=8, in_range=(-3.0, 3.0)))
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    m(x).square().sum().backward()
    assert conv.weight.grad is not None and conv.bias.grad is not None and x.grad is not None
    assert torch.isfinite(conv.weight.grad).all() and conv.weight.grad.abs().sum() > 0
