"""pytest-benchmark of the CPU backend's kernels, next to their plain-torch counterparts.

Run: ``pytest benchmarks/bench_ops_cpu.py --benchmark-only --benchmark-group-by=group``
(all cores; compare within a group). Shapes are ResNet-50 layers (layer3 3x3 conv 256->256 at
14x14, batch 16) unless named otherwise.
"""
import pytest
import torch
import torch.nn.functional as F

from noisyops import LayerConfig, _ext, functional
from noisyops.backends import cpu
from noisyops.params import resolve

C = _ext.cpu()[0]
pytestmark = pytest.mark.skipif(C is None or not cpu.available()[0], reason="cpu backend not built")

N = 1 << 22  # normals per call


@pytest.fixture(autouse=True)
def _force_cpu(monkeypatch):
    monkeypatch.setenv("NOISYOPS_BACKEND", "cpu")


def _layer(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 256, 14, 14, generator=g)
    w = 0.05 * torch.randn(256, 256, 3, 3, generator=g)
    return x, w


# ---- noise stream -----------------------------------------------------------------------------
@pytest.mark.benchmark(group="normals 4M")
def test_philox_normals(benchmark):
    benchmark(C.cpu_normals, 1, 2, 0, 3, N)


@pytest.mark.benchmark(group="normals 4M")
def test_torch_randn(benchmark):
    benchmark(torch.randn, N)


# ---- weights ------------------------------------------------------------------------------------
@pytest.mark.benchmark(group="noisy weights 590k")
def test_noisy_weights_fused(benchmark):
    _, w = _layer()
    out = torch.empty_like(w).unsqueeze(0)
    benchmark(C.cpu_noisy_weights_, w, out, [7], -0.1, 0.1, True, 8, 0.008, 0.0, 1, 2)


@pytest.mark.benchmark(group="noisy weights 590k")
def test_noisy_weights_torch(benchmark):
    _, w = _layer()

    def naive():
        wc = w.clamp(-0.1, 0.1)
        wq = torch.fake_quantize_per_tensor_affine(wc, 0.2 / 255, 128, 0, 255)
        return wq + 0.008 * torch.randn_like(wq)
    benchmark(naive)


@pytest.mark.benchmark(group="noisy weights 590k x 8 chips")
def test_noisy_weights_8_instances(benchmark):
    _, w = _layer()
    out = torch.empty((8,) + tuple(w.shape))
    benchmark(C.cpu_noisy_weights_, w, out, list(range(8)), 0.0, 0.0, False, 0, 0.008, 0.0, 1, 2)


# ---- quantizers -----------------------------------------------------------------------------------
@pytest.mark.benchmark(group="input quantizer 800k")
def test_input_quantize(benchmark):
    x, _ = _layer()
    benchmark(C.cpu_quantize, x, -2.0, 2.0, 8)


@pytest.mark.benchmark(group="input quantizer 800k")
def test_input_fake_quantize_torch(benchmark):
    x, _ = _layer()
    benchmark(torch.fake_quantize_per_tensor_affine, x, 4.0 / 255, 128, 0, 255)


@pytest.mark.benchmark(group="output quantizer + mask 800k")
def test_out_quant_mask(benchmark):
    y, _ = _layer()
    words = torch.empty((y.numel() + 31) // 32, dtype=torch.int32)
    benchmark(C.cpu_out_quant_, y.clone(), y.clone(), words, -2.0, 2.0, 8, True)


@pytest.mark.benchmark(group="output quantizer + mask 800k")
def test_out_fake_quantize_torch_with_mask(benchmark):
    y, _ = _layer()

    def naive():
        m = (y >= -2.0) & (y <= 2.0)
        return torch.fake_quantize_per_tensor_affine(y, 4.0 / 255, 128, 0, 255), m
    benchmark(naive)


@pytest.mark.benchmark(group="output noise 800k")
def test_out_noise(benchmark):
    y, _ = _layer()
    ids = torch.full((y.shape[0],), 3, dtype=torch.int64)
    benchmark(C.cpu_out_noise_, y, ids, 0, 0.01, 1, 2)


# ---- whole layer ------------------------------------------------------------------------------------
CFG = LayerConfig(eta=0.04, in_bits=8, in_range=(-3.0, 3.0), out_bits=8, out_range=(-20.0, 20.0))


@pytest.mark.benchmark(group="conv 3x3 256ch 14x14 b16 forward")
def test_conv_clean(benchmark):
    x, w = _layer()
    with torch.no_grad():
        benchmark(F.conv2d, x, w, None, 1, 1)


@pytest.mark.benchmark(group="conv 3x3 256ch 14x14 b16 forward")
def test_conv_noisy(benchmark):
    x, w = _layer()
    with torch.no_grad():
        benchmark(lambda: functional.noisy_conv2d(x, w, None, 1, 1, config=CFG, seed=1, instance=2))


@pytest.mark.benchmark(group="conv 3x3 256ch 14x14 b16 forward+backward")
def test_conv_train_clean(benchmark):
    x, w = _layer()
    x.requires_grad_()
    w.requires_grad_()
    benchmark(lambda: F.conv2d(x, w, None, 1, 1).sum().backward())


@pytest.mark.benchmark(group="conv 3x3 256ch 14x14 b16 forward+backward")
def test_conv_train_noisy(benchmark):
    x, w = _layer()
    x.requires_grad_()
    w.requires_grad_()
    benchmark(lambda: functional.noisy_conv2d(x, w, None, 1, 1, config=CFG, seed=1, instance=2).sum().backward())


@pytest.mark.benchmark(group="conv per_instance 8 chips x b16 (cached)")
def test_conv_per_instance_8_chips(benchmark):
    x, w = _layer()
    x8 = x.repeat(8, 1, 1, 1)
    ids = torch.arange(8).repeat_interleave(16)
    cfg = CFG.replace(sampling="per_instance")
    with torch.no_grad():
        benchmark(lambda: functional.noisy_conv2d(x8, w, None, 1, 1, config=cfg, seed=1, instance=ids))


@pytest.mark.benchmark(group="conv per_sample b16")
def test_conv_per_sample(benchmark):
    x, w = _layer()
    cfg = CFG.replace(sampling="per_sample")
    with torch.no_grad():
        benchmark(lambda: functional.noisy_conv2d(x, w, None, 1, 1, config=cfg, seed=1, instance=2))


@pytest.mark.benchmark(group="linear 2048->1000 b16 forward")
def test_linear_clean(benchmark):
    x, w = torch.randn(16, 2048), 0.02 * torch.randn(1000, 2048)
    with torch.no_grad():
        benchmark(F.linear, x, w)


@pytest.mark.benchmark(group="linear 2048->1000 b16 forward")
def test_linear_noisy(benchmark):
    x, w = torch.randn(16, 2048), 0.02 * torch.randn(1000, 2048)
    with torch.no_grad():
        benchmark(lambda: functional.noisy_linear(x, w, config=CFG, seed=1, instance=2))


# ---- backward passes over activations (issue 12) ------------------------------------------------------
def _bwd_tensors():
    x, w = _layer()
    y = F.conv2d(x, w, None, 1, 1)
    g = torch.randn_like(y)
    words = torch.empty((y.numel() + 31) // 32, dtype=torch.int32)
    C.cpu_out_quant_(y.clone(), y.clone(), words, -2.0, 2.0, 8, True)
    xbits = torch.empty((x.numel() + 31) // 32, dtype=torch.int32)
    return x, w, g, words, xbits, torch.empty_like(x), torch.empty_like(g), torch.randn_like(x)


@pytest.mark.benchmark(group="backward passes 800k: out mask + Q_in(x) + input STE")
def test_bwd_passes_separate(benchmark):
    """Before issue 12: mask g, re-quantize x, then the input mask reads x again."""
    x, w, g, words, xbits, xq, gm, gx = _bwd_tensors()

    def run():
        C.cpu_mask_grad_out(g, words, gm)
        C.cpu_quantize_out(x, xq, -2.0, 2.0, 8)
        C.cpu_ste_mask_(gx, x, -2.0, 2.0)
    benchmark(run)


@pytest.mark.benchmark(group="backward passes 800k: out mask + Q_in(x) + input STE")
def test_bwd_passes_fused(benchmark):
    """Q_in(x) packs the input's bits in the same pass; the mask reads the bits (1/32 of x)."""
    x, w, g, words, xbits, xq, gm, gx = _bwd_tensors()

    def run():
        C.cpu_mask_grad_out(g, words, gm)
        C.cpu_quantize_mask_out(x, xq, xbits, -2.0, 2.0, 8)
        C.cpu_mask_grad_out(gx, xbits, gx)
    benchmark(run)


@pytest.mark.benchmark(group="backward passes 800k: out mask + Q_in(x) + input STE")
def test_bwd_passes_fused_one_region(benchmark):
    """As fused, with the out mask, Q_in(x)+bits and Wn recorded into one parallel region."""
    x, w, g, words, xbits, xq, gm, gx = _bwd_tensors()
    wn = torch.empty_like(w).unsqueeze(0)

    def run():
        ps = C.CpuPasses()
        ps.mask_grad_out(g, words, gm)
        ps.quantize_mask_out(x, xq, xbits, -2.0, 2.0, 8)
        ps.noisy_weights_(w, wn, [7], 0.0, 0.0, False, 0, 0.008, 0.0, 1, 2)
        ps.run()
        C.cpu_mask_grad_out(gx, xbits, gx)
    benchmark(run)


@pytest.mark.benchmark(group="backward passes 800k: out mask + Q_in(x) + input STE")
def test_bwd_passes_fused_separate_regions(benchmark):
    """The same kernels as the one-region variant, one parallel region each."""
    x, w, g, words, xbits, xq, gm, gx = _bwd_tensors()
    wn = torch.empty_like(w).unsqueeze(0)

    def run():
        C.cpu_mask_grad_out(g, words, gm)
        C.cpu_quantize_mask_out(x, xq, xbits, -2.0, 2.0, 8)
        C.cpu_noisy_weights_(w, wn, [7], 0.0, 0.0, False, 0, 0.008, 0.0, 1, 2)
        C.cpu_mask_grad_out(gx, xbits, gx)
    benchmark(run)
