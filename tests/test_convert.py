"""convert / export_clean / overrides / calibrate / chips / projection on real model families.

Clean-equality runs the full torchvision models (weights=None, 32x32 inputs). Noisy forward +
backward runs models of the same families sized so the pure-torch reference backend stays fast
(its Philox stream costs a few µs per weight element): torchvision's ConvNeXt / EfficientNet
/ MobileNetV3 classes with small stage settings, a 2-layer ViT, and our CIFAR
ResNet-20 for the ResNet family (torchvision's ResNet-18 alone takes ~40 s with noise there).
The full-size models with noise run in `test_full_size_noisy_forward_backward`, marked ``slow``.
"""
import io

import pytest
import torch
from torch import nn

torchvision = pytest.importorskip("torchvision")
from torchvision.models.convnext import CNBlockConfig, ConvNeXt  # noqa: E402
from torchvision.models.efficientnet import EfficientNet, MBConvConfig  # noqa: E402
from torchvision.models.mobilenetv3 import InvertedResidualConfig, MobileNetV3  # noqa: E402
from torchvision.models.vision_transformer import VisionTransformer  # noqa: E402

import noisyops  # noqa: E402
from noisyops import LayerConfig, dispatch  # noqa: E402
from noisyops.nn import NoisyConv2d, NoisyLinear, NoisyMultiheadAttention  # noqa: E402

NOISY = LayerConfig(eta=0.05, w_range=2.0)


def small_vit(**kw):
    m = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64,
                          mlp_dim=128, num_classes=10, **kw)
    nn.init.normal_(m.heads.head.weight, std=0.05)  # torchvision zero-initialises the head
    return m


def small_mobilenet_v3():
    hs, re = "HS", "RE"
    setting = [InvertedResidualConfig(16, 3, 16, 16, True, re, 2, 1, 1.0),
               InvertedResidualConfig(16, 3, 32, 24, False, re, 2, 1, 1.0),
               InvertedResidualConfig(24, 5, 48, 24, True, hs, 1, 1, 1.0)]
    return MobileNetV3(setting, last_channel=64, num_classes=10)


FULL = {
    "resnet18": lambda: torchvision.models.resnet18(weights=None),
    "mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(weights=None),
    "efficientnet_b0": lambda: torchvision.models.efficientnet_b0(weights=None),
    "convnext_tiny": lambda: torchvision.models.convnext_tiny(weights=None),
    "vit_b_16": lambda: VisionTransformer(image_size=32, patch_size=8, num_layers=12, num_heads=12,
                                          hidden_dim=768, mlp_dim=3072),  # vit_b_16 widths, 32x32
}

SMALL = {
    "resnet20": lambda: noisyops.models.resnet20(),
    "mobilenet_v3": small_mobilenet_v3,
    "efficientnet": lambda: EfficientNet([MBConvConfig(1, 3, 1, 16, 8, 1), MBConvConfig(6, 3, 2, 8, 16, 1),
                                          MBConvConfig(6, 5, 2, 16, 24, 1)], 0.2, last_channel=64,
                                         num_classes=10),
    "convnext": lambda: ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], num_classes=10),
    "vit": small_vit,
}


def _count_layers(model):
    """(convs + linears outside attention, attention blocks) of a plain model."""
    mha = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    inner = {id(m.out_proj) for m in mha}
    n = sum(1 for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and id(m) not in inner)
    return n, len(mha)


@pytest.mark.filterwarnings("ignore:.*weight std is 0")  # ViT's zero-initialised head
@pytest.mark.parametrize("name", list(FULL))
def test_clean_conversion_is_identical(name):
    torch.manual_seed(0)
    model = FULL[name]().eval()
    x = torch.randn(1, 3, 32, 32)
    conv = noisyops.convert(model, LayerConfig())
    n, n_mha = _count_layers(model)
    layers = noisyops.noisy_layers(conv)
    assert len(layers) == n + 2 * n_mha  # every conv/linear, attention in- and out-projections
    assert [m.layer_key for _, m in layers] == list(range(len(layers)))
    assert not any(type(m) in (nn.Conv2d, nn.Linear, nn.MultiheadAttention) for m in conv.modules())
    before = dict(dispatch.backend_counts())
    with torch.no_grad():
        assert torch.equal(conv(x), model(x))
    if n_mha:  # with autograd on, torch's MHA takes its slow path instead of the fused one
        x.requires_grad_(True)
        assert torch.equal(conv(x), model(x))
    after = dispatch.backend_counts()
    assert sum(after.values()) > sum(before.values())  # the noisy ops really ran


@pytest.mark.parametrize("name", list(SMALL))
def test_noisy_forward_backward_reaches_every_weight(name):
    torch.manual_seed(0)
    model = SMALL[name]()
    conv = noisyops.convert(model, NOISY.replace(eta_mul=0.01), seed=3).train()
    x = torch.randn(2, 3, 32, 32)
    out = conv(x)
    with torch.no_grad():
        assert not torch.equal(out, model.train()(x))
    out.square().mean().backward()
    for pname, p in conv.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
    noisy_w = [m._noisy_weight() for _, m in noisyops.noisy_layers(conv)]
    assert all(w.grad.abs().sum() > 0 for w in noisy_w)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*weight std is 0")
@pytest.mark.parametrize("name", list(FULL))
def test_full_size_noisy_forward_backward(name):
    """The full torchvision models with noise (8-20 s each with the C++ cpu backend, 2 threads)."""
    torch.manual_seed(0)
    conv = noisyops.convert(FULL[name](), NOISY.replace(eta_mul=0.01), seed=3).train()
    conv(torch.randn(2, 3, 32, 32)).square().mean().backward()
    for pname, p in conv.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("name", ["convnext", "vit"])
def test_save_load_resume_reproduces_noise(name):
    torch.manual_seed(0)
    cfg = NOISY.replace(out_noise=0.01)
    model = noisyops.convert(SMALL[name](), cfg, seed=1234).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model(x)
        buf = io.BytesIO()
        torch.save(model.state_dict(), buf)
        expected = [model(x), model(x)]
        buf.seek(0)
        torch.manual_seed(1)  # a different init: everything must come from the checkpoint
        fresh = noisyops.convert(SMALL[name](), cfg, seed=0).eval()
        fresh.load_state_dict(torch.load(buf, weights_only=True))
        got = [fresh(x), fresh(x)]
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert not torch.equal(got[0], got[1])


def test_clean_state_dict_loads_strict_and_export_clean():
    torch.manual_seed(0)
    plain = SMALL["vit"]().eval()
    other = noisyops.convert(SMALL["vit"](), NOISY)  # different random init
    res = other.load_state_dict(plain.state_dict())
    assert not res.missing_keys and not res.unexpected_keys
    back = noisyops.export_clean(other).eval()
    assert not any(isinstance(m, noisyops.nn.NoisyModuleMixin) for m in back.modules())
    assert type(back.encoder.layers[0].self_attention) is nn.MultiheadAttention
    assert type(back.encoder.layers[0].self_attention.out_proj) is \
        nn.modules.linear.NonDynamicallyQuantizableLinear
    assert set(back.state_dict()) == set(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(back(x), plain(x))


def test_layer_keys_overrides_skip():
    torch.manual_seed(0)
    model = noisyops.models.resnet20()
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    special = LayerConfig(eta=0.2)
    conv = noisyops.convert(model, NOISY, seed=5, overrides={"layer2.*": special, "layer2.0.conv1": None,
                                                             "linear": LayerConfig()},
                            skip=["layer3.2.*"], skip_first=True)
    mods = dict(conv.named_modules())
    for key, n in enumerate(names):
        m = mods[n]
        if n == "conv1" or n == "layer2.0.conv1" or n.startswith("layer3.2."):
            assert type(m) is nn.Conv2d, n
            continue
        assert m.layer_key == key, n  # numbering counts the skipped layers
        want = special if n.startswith("layer2.") else LayerConfig() if n == "linear" else NOISY
        assert m.config == want, n
        assert m.get_seed() == 5
    with pytest.raises(ValueError, match="match no"):
        noisyops.convert(model, NOISY, overrides={"layer9.*": None})
    with pytest.raises(ValueError, match="match no"):
        noisyops.convert(model, NOISY, skip=["nonexistent"])
    last = noisyops.convert(model, NOISY, skip_last=True)
    assert type(last.linear) is nn.Linear and isinstance(last.conv1, NoisyConv2d)
    with pytest.raises(ValueError, match="already"):
        noisyops.convert(conv, NOISY)
    assert type(model.conv1) is nn.Conv2d  # inplace=False leaves the original alone


def test_skipping_a_layer_keeps_other_layers_noise():
    torch.manual_seed(0)
    model = noisyops.models.resnet20()
    a = noisyops.convert(model, NOISY, seed=1)
    b = noisyops.convert(model, NOISY, seed=1, skip=["layer1.0.conv1"])
    assert a.layer3[0].conv2.layer_key == b.layer3[0].conv2.layer_key
    x = torch.randn(1, 64, 8, 8)
    assert torch.equal(a.layer3[0].conv2(x), b.layer3[0].conv2(x))


def test_shared_module_is_converted_once():
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    conv = noisyops.convert(model, NOISY)
    assert conv[0] is conv[2] and isinstance(conv[0], NoisyLinear)
    assert len(noisyops.noisy_layers(conv)) == 1


def test_mha_variants_match_torch_when_clean():
    torch.manual_seed(0)
    for kw in [dict(), dict(batch_first=True), dict(bias=False), dict(add_bias_kv=True),
               dict(add_zero_attn=True, batch_first=True)]:
        mha = nn.MultiheadAttention(16, 4, **kw).eval()
        nmha = noisyops.convert(mha, LayerConfig())
        assert isinstance(nmha, NoisyMultiheadAttention)
        bf = kw.get("batch_first", False)
        q = torch.randn(3, 5, 16) if bf else torch.randn(5, 3, 16)
        kv = torch.randn(3, 7, 16) if bf else torch.randn(7, 3, 16)
        kv2 = torch.randn_like(kv)
        kpm = torch.zeros(3, 7, dtype=torch.bool)
        kpm[:, -2:] = True
        cases = [((q, q, q), {}), ((q, q, q), dict(need_weights=False)),
                 ((q, kv, kv), {}), ((q, kv, kv2), dict(average_attn_weights=False)),
                 ((q, kv, kv), dict(key_padding_mask=kpm, need_weights=False)),
                 ((q[0], q[0], q[0]), {})]
        for args, kwargs in cases:
            y_ref, w_ref = mha(*args, **kwargs)
            y, w = nmha(*args, **kwargs)
            torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
            if w_ref is not None:
                torch.testing.assert_close(w, w_ref, rtol=1e-6, atol=1e-6)
            else:
                assert w is None


def test_transformer_encoder_layer_fast_path_is_disabled():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True, dropout=0.0).eval()
    conv = noisyops.convert(layer, NOISY)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():  # eval + no_grad is where torch takes its fused fast path
        y_clean = noisyops.export_clean(conv)(x)
        assert not torch.equal(conv(x), y_clean)  # noise is applied: the fast path was not taken
    assert int(conv.self_attn.calls) == 1 and int(conv.linear1.calls) == 1


def test_per_sample_noise_in_attention_follows_batch_dim():
    torch.manual_seed(0)
    model = noisyops.convert(small_vit(), NOISY.replace(sampling="per_sample")).eval()
    x = torch.randn(1, 3, 32, 32).repeat(3, 1, 1, 1)
    with torch.no_grad():
        y = model(x)
    assert (y[0] - y[1]).abs().max() > 1e-4 and (y[1] - y[2]).abs().max() > 1e-4


def test_set_config_seed_reset_calls():
    model = noisyops.convert(noisyops.models.resnet20(), NOISY)
    noisyops.set_config(model, LayerConfig(eta=0.3), names="layer1.*")
    assert model.layer1[0].conv1.config.eta == 0.3 and model.layer2[0].conv1.config.eta == 0.05
    noisyops.set_config(model, lambda n, c: c.replace(eta_mul=0.1))
    assert model.layer1[0].conv1.config.eta_mul == 0.1 and model.linear.config.eta_mul == 0.1
    with pytest.raises(ValueError, match="match no"):
        noisyops.set_config(model, NOISY, names="nope")
    noisyops.set_seed(model, (1 << 64) - 1)
    assert all(m.get_seed() == (1 << 64) - 1 for _, m in noisyops.noisy_layers(model))
    model(torch.randn(1, 3, 32, 32))
    assert int(model.conv1.calls) == 1
    noisyops.reset_calls(model)
    assert all(int(m.calls) == 0 for _, m in noisyops.noisy_layers(model))


def test_project_weights_and_hook():
    torch.manual_seed(0)
    model = noisyops.convert(noisyops.models.lenet5(), NOISY)
    opt = torch.optim.SGD(model.parameters(), lr=10.0)
    proj = noisyops.WeightProjection(model).attach(opt)
    model(torch.randn(4, 1, 28, 28)).square().sum().backward()
    opt.step()
    for _, m in noisyops.noisy_layers(model):
        lo, hi = m.weight_range
        assert m.weight.min() >= lo and m.weight.max() <= hi
        assert (m.weight == hi).any() or (m.weight == lo).any()  # lr=10 pushed weights out: clipped
    proj.remove()
    free = noisyops.convert(noisyops.models.lenet5(), LayerConfig(eta=0.1))  # w_range None: no clip
    with torch.no_grad():
        free.fc1.weight.mul_(100)
    w = free.fc1.weight.clone()
    noisyops.project_weights(free)
    assert torch.equal(free.fc1.weight, w)


def test_calibrate_percentiles_and_fixed():
    torch.manual_seed(0)
    model = noisyops.convert(noisyops.models.lenet5().eval(), NOISY.replace(in_bits=6, out_bits=6))
    batches = [(torch.randn(8, 1, 28, 28), torch.zeros(8)) for _ in range(3)]
    with pytest.raises(ValueError, match="calibrate"):
        model(batches[0][0])
    # reference percentiles from a clean copy with hooks
    clean = noisyops.export_clean(model).eval()
    seen = {}
    hooks = [clean.fc2.register_forward_hook(lambda m, i, o: seen.setdefault("fc2", []).append(
        (i[0].detach(), (o - m.bias).detach())))]
    for x, _ in batches:
        clean(x)
    hooks[0].remove()
    xs = torch.cat([a.reshape(-1) for a, _ in seen["fc2"]]).double()
    ys = torch.cat([b.reshape(-1) for _, b in seen["fc2"]]).double()
    r = noisyops.calibrate(model, batches)
    q = torch.tensor([0.001, 0.999], dtype=torch.float64)
    in_rng, out_rng = r["fc2"]
    assert in_rng == pytest.approx(torch.quantile(xs, q).tolist(), rel=1e-5, abs=1e-6)
    assert out_rng == pytest.approx(torch.quantile(ys, q).tolist(), rel=1e-4, abs=1e-5)
    assert model.fc2.input_range == in_rng and model.fc2.in_range.tolist() == list(in_rng)
    assert all(int(m.calls) == 0 for _, m in noisyops.noisy_layers(model))  # counters restored
    y1 = model(batches[0][0])  # quantizers now work with the fixed ranges
    assert torch.isfinite(y1).all()
    r2 = noisyops.calibrate(model, batches, lo_pct=1.0, hi_pct=99.0, max_batches=1)
    assert r2["fc2"][0][1] <= in_rng[1]
    with pytest.raises(ValueError, match="lo_pct"):
        noisyops.calibrate(model, batches, lo_pct=50, hi_pct=10)


def test_run_chips_matches_single_chip_runs():
    torch.manual_seed(0)
    model = noisyops.convert(noisyops.models.lenet5(), NOISY).eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        yk = noisyops.run_chips(model, x, 3, chip_offset=2)
        assert yk.shape == (3, 3, 10)
        for c in range(3):
            for _, m in noisyops.noisy_layers(model):
                m.config = m.config.replace(sampling="per_instance")
                m.chip_ids = torch.full((3,), 2 + c, dtype=torch.int64)
            torch.testing.assert_close(model(x), yk[c], rtol=1e-5, atol=1e-5)
        for _, m in noisyops.noisy_layers(model):
            m.config = m.config.replace(sampling="per_call")
            m.chip_ids = None
        assert (yk[0] - yk[1]).abs().max() > 1e-3
        assert torch.equal(noisyops.run_chips(model, x, 3, chip_offset=2), yk)  # chips are fixed
    assert model.conv1.config.sampling == "per_call" and int(model.conv1.calls) == 0
    with pytest.raises(ValueError, match="k="):
        noisyops.run_chips(model, x, 0)


def test_calibrate_attention_and_quantized_vit_runs():
    torch.manual_seed(0)
    model = noisyops.convert(small_vit().eval(), NOISY.replace(in_bits=8, out_bits=8))
    r = noisyops.calibrate(model, torch.randn(4, 3, 32, 32))
    attn = "encoder.layers.encoder_layer_0.self_attention"
    assert attn in r and attn + ".out_proj" in r and len(r) == len(noisyops.noisy_layers(model))
    assert model.encoder.layers[0].self_attention.input_range == r[attn][0]
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(2, 3, 32, 32))).all()


def test_convert_edge_cases():
    lin = nn.Linear(3, 3)
    assert isinstance(noisyops.convert(lin, NOISY), NoisyLinear)  # the model itself is a layer
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 2))
    same = noisyops.convert(model, NOISY, inplace=True)
    assert same is model and isinstance(model[0], NoisyConv2d)
    with pytest.raises(ValueError, match="lazy"):
        noisyops.convert(nn.Sequential(nn.LazyLinear(4)), NOISY)
    wn = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(3, 3)), nn.Linear(3, 3))
    with pytest.raises(ValueError, match="parametrizations"):
        noisyops.convert(wn, NOISY)
    assert isinstance(noisyops.convert(wn, NOISY, skip=["0"])[1], NoisyLinear)

    class Doubling(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    with pytest.warns(UserWarning, match="own forward"):
        noisyops.convert(nn.Sequential(Doubling(2, 2)), NOISY)
    with pytest.raises(TypeError, match="config"):
        noisyops.convert(model, {"eta": 0.1})
    refl = nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect")
    back = noisyops.export_clean(noisyops.convert(refl, LayerConfig()))
    assert type(back) is nn.Conv2d and back.padding_mode == "reflect"
