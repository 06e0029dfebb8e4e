"""The `cpu` backend (C++ kernels around ATen) against the pure-torch reference.

Kernel-level tests call `noisyops.backends.cpu` and `noisyops.reference` with the same arguments;
the backward of both gets the reference's out mask, so a one-ulp difference in a forward value that
flips a quantizer bit cannot leak into the gradient comparison. Quantized outputs may differ by one
level where the pre-quantization values straddle a rounding tie (normals agree within a few ulp,
not bit for bit), so those compare "all but a tiny fraction exactly, the rest within one level".
End-to-end tests go through the custom ops with ``NOISYOPS_BACKEND=cpu`` and check the dispatch
counts, so a silent fallback to the reference fails them.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from noisyops import LayerConfig, dispatch, functional, reference, stream
from noisyops.backends import cpu
from noisyops.params import resolve

pytestmark = pytest.mark.skipif(not cpu.available()[0], reason=f"cpu backend: {cpu.available()[1]}")

TOL = {torch.float32: (2e-5, 2e-5), torch.float64: (2e-6, 2e-6), torch.bfloat16: (2e-2, 2e-2)}
# float64 is bounded by the float32 normals (few-ulp log/sincos differences), not by float64 rounding.


def _assert_close(a, b, dtype, what, level=0.0, frac=0.0):
    """allclose with dtype-tied tolerances; with ``level > 0`` at most ``frac`` of the elements may
    differ by up to one quantizer level (rounding ties)."""
    rtol, atol = TOL[dtype]
    a, b = a.double(), b.double()
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
    err = (a - b).abs()
    bad = err > atol * scale + rtol * b.abs()
    if level > 0:
        nbad = int(bad.sum())
        assert nbad <= max(1, frac * a.numel()), f"{what}: {nbad} of {a.numel()} elements differ"
        assert float(err.max()) <= level * 1.001 + atol * scale, f"{what}: max err {float(err.max())}"
    else:
        assert not bool(bad.any()), (f"{what}: max err {float(err.max())} "
                                     f"({int(bad.sum())} of {a.numel()} elements)")


CONFIGS = {
    "clean": LayerConfig(),
    "add": LayerConfig(eta=0.05),
    "mixed_clip_wq": LayerConfig(eta=0.03, eta_mul=0.1, w_range=(-0.4, 0.35), w_bits=4),
    "kstd": LayerConfig(eta=0.04, w_range=2.0),
    "quant_tiles": LayerConfig(eta=0.04, in_bits=8, in_range=(-2.0, 2.5), out_bits=6,
                               out_range=(-3.0, 3.0), out_noise=0.05, tile_rows=20),
    "outq_one_tile": LayerConfig(eta=0.04, in_bits=4, in_range=(-1.5, 1.5), out_bits=8,
                                 out_range=(-2.0, 2.0)),
    "outnoise_clean_grad": LayerConfig(eta=0.04, out_noise=0.1, tile_rows=30, clean_grad_input=True),
}

CONV_GEOMS = {
    "plain": dict(n=3, cin=4, cout=6, hw=(6, 7), k=3, stride=2, padding=1, dilation=1, groups=1),
    "grouped_dil": dict(n=2, cin=4, cout=6, hw=(7, 5), k=3, stride=1, padding=(1, 2), dilation=2, groups=2),
    "depthwise_b1": dict(n=1, cin=4, cout=4, hw=(5, 5), k=3, stride=1, padding=1, dilation=1, groups=4),
}


def _ids(sampling, n):
    if sampling == "per_instance":
        return torch.tensor([(3 * s + 1) % 3 for s in range(n)], dtype=torch.int64)  # unequal groups
    return torch.tensor(7, dtype=torch.int64)


def _params(cfg, sampling):
    return resolve(cfg.replace(sampling=sampling), seed=2**33 + 5, layer_key=3)


def _conv_case(geom, dtype, channels_last=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(geom["n"], geom["cin"], *geom["hw"], generator=g, dtype=torch.float64).to(dtype)
    w = (0.3 * torch.randn(geom["cout"], geom["cin"] // geom["groups"], geom["k"], geom["k"], generator=g,
                           dtype=torch.float64)).to(dtype)
    b = torch.randn(geom["cout"], generator=g, dtype=torch.float64).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, w, b


def _pair(v):
    return [v, v] if isinstance(v, int) else list(v)


def _level(p):
    return (p.out_hi - p.out_lo) / ((1 << p.out_bits) - 1) * (p.num_tiles(1, 1) + 8) if p.out_bits else 0.0


# ---- the noise stream ------------------------------------------------------------------------------
def test_vectorised_normals_match_reference():
    from noisyops import _ext
    C = _ext.cpu()[0]
    for seed, key, purpose, inst, n in [(0, 0, 0, 0, 1000), (2**40 + 3, 7, 1, 2**35 + 11, 4099),
                                        (123, 5, 2, 9, 37)]:
        got = C.cpu_normals(seed, key, purpose, inst, n)
        want = stream.normals(seed, key, purpose, inst, n)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)


def test_weight_noise_words_and_normals_vs_reference():
    """W = 0 and sigma = 1 exposes the additive stream itself at every element, any offset."""
    from noisyops import _ext
    C = _ext.cpu()[0]
    w = torch.zeros(3, 5, 7, 3)
    ids = [0, 5, 2**33 + 1]
    out = torch.empty((3,) + tuple(w.shape))
    C.cpu_noisy_weights_(w, out, ids, 0.0, 0.0, False, 0, 1.0, 0.0, 99, 4)
    for k, inst in enumerate(ids):
        want = stream.normals(99, 4, stream.PURPOSE_ADD, inst, w.numel()).view_as(w)
        torch.testing.assert_close(out[k], want, rtol=1e-5, atol=2e-6)


def test_quantizer_exact_vs_reference():
    from noisyops import _ext
    C = _ext.cpu()[0]
    x = torch.linspace(-3, 3, 10007)
    x = torch.cat([x, torch.tensor([-2.0, 2.5, 0.0, float("inf"), -float("inf")])])
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        xd = x.to(dtype)
        want = reference.quantize(xd.to(reference.compute_dtype(dtype)), -2.0, 2.5, 5).to(dtype)
        assert torch.equal(C.cpu_quantize(xd, -2.0, 2.5, 5), want), dtype


def _edge_values(lo, hi, n, dtype, channels_last=False):
    """x of shape [n, 3, 5, 7] with the quantizer's edge cases: exact lo / hi, one ulp outside,
    rounding ties, +-0, +-inf, NaN (odd numel: the last mask word is partial)."""
    g = torch.Generator().manual_seed(5)
    x = (lo - 1.0 + (hi - lo + 2.0) * torch.rand(n * 3 * 5 * 7, generator=g, dtype=torch.float64)).to(dtype)
    delta = (hi - lo) / 255
    edge = torch.tensor([lo, hi, lo + 0.5 * delta, lo + 2.5 * delta, 0.0, -0.0, float("inf"),
                         -float("inf"), float("nan")], dtype=dtype)
    edge = torch.cat([edge, torch.nextafter(edge[:2], torch.tensor([-1e30, 1e30], dtype=dtype))])
    x[:edge.numel()] = edge
    x = x.view(n, 3, 5, 7)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("channels_last", [False, True])
def test_quantize_mask_out_bit_exact(dtype, n, channels_last):
    """The fused backward pass: Q(x) and the packed input mask equal the reference bit for bit."""
    from noisyops import _ext
    C = _ext.cpu()[0]
    lo, hi = -1.25, 2.0
    x = _edge_values(lo, hi, n, dtype, channels_last)
    out = torch.empty_like(x)
    words = torch.full(((x.numel() + 31) // 32,), -1, dtype=torch.int32)
    C.cpu_quantize_mask_out(x, out, words, lo, hi, 8)
    want = reference.quantize(x, lo, hi, 8)
    assert out.stride() == x.stride()
    torch.testing.assert_close(out, want, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(words, reference.pack_mask([reference.in_range_mask(x, lo, hi)])[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mask_grad_in_place_bit_exact(dtype):
    """``cpu_mask_grad_out(g, words, g)`` (in place) == where(bit, g, +0) bit for bit, NaN / -0 kept."""
    from noisyops import _ext
    C = _ext.cpu()[0]
    g = torch.randn(4, 3, 5, 7, generator=torch.Generator().manual_seed(2), dtype=dtype)
    g.view(-1)[:4] = torch.tensor([float("nan"), -0.0, float("inf"), -float("inf")], dtype=dtype)
    mask = torch.rand(g.shape, generator=torch.Generator().manual_seed(3)) < 0.6
    mask.view(-1)[:4] = torch.tensor([True, True, False, True])
    words = reference.pack_mask([mask])[0]
    want = torch.where(mask, g, torch.zeros((), dtype=dtype))
    out = g.clone()
    C.cpu_mask_grad_out(out, words, out)
    ity = torch.int64 if dtype == torch.float64 else torch.int32
    assert torch.equal(out.view(ity), want.view(ity))
    out2 = torch.empty_like(g)
    C.cpu_mask_grad_out(g, words, out2)
    assert torch.equal(out2.view(ity), want.view(ity))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("numel,p_clear", [(37, 0.3), (32 * 2048 * 3 + 5, 0.002), (70001, 0.0), (4096, 1.0)])
@pytest.mark.parametrize("recorded", [False, True])
def test_mask_grad_borrow_masks_then_restores_bit_exact(dtype, numel, p_clear, recorded):
    """``cpu_mask_grad_borrow(g, words)`` masks g in place exactly as ``cpu_mask_grad_out`` would,
    touches only the words with a cleared bit, and ``restore()`` gives back g bit for bit (NaN,
    -0, ±Inf, a partial last word, blocks of 2048 words) without bumping g's version counter."""
    from noisyops import _ext
    C = _ext.cpu()[0]
    gen = torch.Generator().manual_seed(11)
    g = torch.randn(numel, generator=gen, dtype=dtype)
    g[:4] = torch.tensor([float("nan"), -0.0, float("inf"), -float("inf")], dtype=dtype)
    mask = torch.rand(numel, generator=gen) >= p_clear
    mask[1] = False  # the -0 lane is masked: +0 while borrowed, -0 again after restore
    words = reference.pack_mask([mask])[0]
    ity = torch.int64 if dtype == torch.float64 else torch.int32
    g0, v0 = g.clone(), g._version
    want = torch.where(mask, g, torch.zeros((), dtype=dtype))
    if recorded:
        passes = C.CpuPasses()
        borrow = passes.mask_grad_borrow(g, words)
        passes.run()
    else:
        borrow = C.cpu_mask_grad_borrow(g, words)
    assert torch.equal(g.view(ity), want.view(ity))
    assert borrow.touched_words == int((words != -1).sum()) == C.cpu_cleared_words(words)
    borrow.restore()
    assert borrow.restored and borrow.touched_words == 0
    assert torch.equal(g.view(ity), g0.view(ity)) and g._version == v0
    borrow.restore()  # idempotent
    assert torch.equal(g.view(ity), g0.view(ity))


def test_mask_grad_in_place_sparse_equals_dense():
    """In place with ``sparse=True`` (words whose 32 bits are all set skipped) and without, the
    result is the out-of-place one bit for bit, a partial last word included."""
    from noisyops import _ext
    C = _ext.cpu()[0]
    g = torch.randn(32 * 64 + 7)
    mask = torch.ones(g.shape, dtype=torch.bool)
    mask[[5, 32 * 10 + 3, g.numel() - 1]] = False
    words = reference.pack_mask([mask])[0]
    want = torch.empty_like(g)
    C.cpu_mask_grad_out(g, words, want)
    for sparse in (True, False):
        out = g.clone()
        C.cpu_mask_grad_out(out, words, out, sparse)
        assert torch.equal(out.view(torch.int32), want.view(torch.int32))
    assert int((words != -1).sum()) == 3 == C.cpu_cleared_words(words)


@pytest.mark.parametrize("max_cleared", [1.0, 0.0])
def test_backward_borrowed_gradient_is_restored_and_aliasing_gradient_is_copied(monkeypatch, max_cleared):
    """The per_call backward borrows a caller's float32 gradient for the out mask when few enough
    mask words have a cleared bit (``SPARSE_MAX_CLEARED``; 1.0: always, 0.0: never here): results
    equal the reference, the gradient is bit for bit what it was, its version unchanged; a gradient
    that *is* the saved input (``y.backward(x)`` shapes) is never borrowed (Q_in(x) reads x)."""
    monkeypatch.setattr(cpu, "SPARSE_MAX_CLEARED", max_cleared)
    borrowed = []
    real = cpu._out_masked_grads

    def spy(*a, **k):
        out = real(*a, **k)
        borrowed.append(out[1] is not None)
        return out
    monkeypatch.setattr(cpu, "_out_masked_grads", spy)
    geom = dict(n=2, cin=4, cout=4, hw=(6, 6), k=3, stride=1, padding=1, dilation=1, groups=1)
    x, w, _ = _conv_case(geom, torch.float32)
    x = x * 2.0
    p = _params(CONFIGS["outq_one_tile"], "per_call")
    inst = _ids("per_call", geom["n"])
    args = ([1, 1], [1, 1], [1, 1], 1)
    y_ref, m_ref = reference.conv2d_fwd(x, w, None, *args, p, inst)
    assert y_ref.shape == x.shape
    for g in (torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(4)), x):
        g0, v0 = g.clone(), g._version
        gx_ref, gw_ref = reference.conv2d_bwd(g0, x.clone(), w, *args, p, inst, m_ref,
                                              list(y_ref.stride()), True, True)
        gx, gw = cpu.conv2d_bwd(g, x, w, *args, p, inst, m_ref, list(y_ref.stride()), True, True)
        assert torch.equal(g.view(torch.int32), g0.view(torch.int32)) and g._version == v0
        _assert_close(gx, gx_ref, torch.float32, "grad_x")
        _assert_close(gw, gw_ref, torch.float32, "grad_w")
    assert borrowed == [max_cleared == 1.0, False]


@pytest.mark.parametrize("channels_last", [False, True])
def test_backward_fused_input_mask_matches_reference_and_keeps_grad(channels_last):
    """The backward with the fused re-quantization + packed input mask (need_x and need_w) gives the
    reference's gradients, zero exactly where x saturated, and leaves the incoming gradient alone."""
    geom = CONV_GEOMS["plain"]
    x, w, b = _conv_case(geom, torch.float32, channels_last)
    x = x * 2.0  # about a third of x outside the input range
    p = _params(CONFIGS["outq_one_tile"], "per_call")
    inst = _ids("per_call", geom["n"])
    args = (_pair(geom["stride"]), _pair(geom["padding"]), _pair(geom["dilation"]), geom["groups"])
    y_ref, m_ref = reference.conv2d_fwd(x, w, b, *args, p, inst)
    g = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(1))
    g = g.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    g0 = g.clone()
    gx_ref, gw_ref = reference.conv2d_bwd(g, x, w, *args, p, inst, m_ref, list(y_ref.stride()), True, True)
    gx, gw = cpu.conv2d_bwd(g, x, w, *args, p, inst, m_ref, list(y_ref.stride()), True, True)
    assert torch.equal(g, g0), "the incoming gradient was modified"
    outside = ~reference.in_range_mask(x, p.in_lo, p.in_hi)
    assert bool(outside.any())
    assert torch.equal(gx[outside], torch.zeros_like(gx[outside]))
    _assert_close(gx, gx_ref, torch.float32, "grad_x")
    _assert_close(gw, gw_ref, torch.float32, "grad_w")


@pytest.mark.parametrize("numel", [37, 70001])  # below / above the kernels' grain: inline / split
def test_passes_one_region_equal_kernels_run_one_by_one(numel):
    """Kernels recorded into ``CpuPasses`` and run as one parallel region write exactly what the
    same kernels write when called one by one (each thread takes a share of every pass)."""
    from noisyops import _ext
    C = _ext.cpu()[0]
    gen = torch.Generator().manual_seed(9)
    x = 3 * torch.randn(numel, generator=gen)
    g = torch.randn(numel, generator=gen)
    words = reference.pack_mask([torch.rand(numel, generator=gen) < 0.7])[0]
    w = 0.1 * torch.randn(numel, generator=gen)
    args_w = ([3, 11], -0.2, 0.2, True, 6, 0.01, 0.05, 2**33 + 1, 4)
    want = dict(gm=torch.empty_like(g), xq=torch.empty_like(x), xq2=torch.empty_like(x),
                bits=torch.empty_like(words), wn=torch.empty((2, numel)))
    C.cpu_mask_grad_out(g, words, want["gm"])
    C.cpu_quantize_mask_out(x, want["xq"], want["bits"], -2.0, 2.5, 8)
    C.cpu_quantize_out(x, want["xq2"], -2.0, 2.5, 4)
    C.cpu_noisy_weights_(w, want["wn"], *args_w)
    got = {k: torch.full_like(v, -7) for k, v in want.items()}
    ps = C.CpuPasses()
    ps.mask_grad_out(g, words, got["gm"])
    ps.quantize_mask_out(x, got["xq"], got["bits"], -2.0, 2.5, 8)
    ps.quantize_out(x, got["xq2"], -2.0, 2.5, 4)
    ps.noisy_weights_(w, got["wn"], *args_w)
    assert len(ps) == 4 and torch.equal(got["wn"], torch.full_like(want["wn"], -7))  # recorded, not run
    ps.run()
    assert len(ps) == 0
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_backend_records_its_kernels_in_one_region(monkeypatch):
    """The backend's forward and backward run their independent kernels through ``CpuPasses``
    (and give the same result when the extension has no ``CpuPasses``: kernels one by one)."""
    geom = CONV_GEOMS["plain"]
    x, w, b = _conv_case(geom, torch.float32)
    p = _params(CONFIGS["outq_one_tile"], "per_call")
    inst = _ids("per_call", geom["n"])
    args = (_pair(geom["stride"]), _pair(geom["padding"]), _pair(geom["dilation"]), geom["groups"])
    runs = []
    real = cpu._run
    monkeypatch.setattr(cpu, "_run", lambda ps: (runs.append(len(ps) if ps is not None else None), real(ps)))
    y, m = cpu.conv2d_fwd(x, w, b, *args, p, inst)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    gx, gw = cpu.conv2d_bwd(g, x, w, *args, p, inst, m, list(y.stride()), True, True)
    assert runs == [2, 3], runs  # forward: Q_in(x), Wn; backward: out mask, Q_in(x)+bits, Wn
    monkeypatch.setattr(cpu, "_new_passes", lambda: None)
    y2, m2 = cpu.conv2d_fwd(x, w, b, *args, p, inst)
    gx2, gw2 = cpu.conv2d_bwd(g, x, w, *args, p, inst, m, list(y.stride()), True, True)
    assert torch.equal(y, y2) and torch.equal(m, m2) and torch.equal(gx, gx2) and torch.equal(gw, gw2)
    # the weight gradient alone makes no noisy weights (it does not read them): same gradient
    gx3, gw3 = cpu.conv2d_bwd(g, x, w, *args, p, inst, m, list(y.stride()), False, True)
    assert gx3 is None and torch.equal(gw3, gw)


# ---- conv kernels vs reference ------------------------------------------------------------------
def _check_conv(cfg_name, sampling, dtype, geom_name, channels_last=False):
    geom = CONV_GEOMS[geom_name]
    x, w, b = _conv_case(geom, dtype, channels_last)
    p = _params(CONFIGS[cfg_name], sampling)
    inst = _ids(sampling, geom["n"])
    args = (_pair(geom["stride"]), _pair(geom["padding"]), _pair(geom["dilation"]), geom["groups"])
    y_ref, m_ref = reference.conv2d_fwd(x, w, b, *args, p, inst)
    y, m = cpu.conv2d_fwd(x, w, b, *args, p, inst)
    assert y.dtype == dtype and y.stride() == y_ref.stride(), (y.stride(), y_ref.stride())
    assert m.dtype == torch.int32 and m.shape == m_ref.shape
    lvl = _level(p)
    _assert_close(y, y_ref, dtype, "y", level=lvl, frac=0.01 if dtype == torch.bfloat16 else 0.002)
    if m.numel():
        flips = int(torch.bitwise_xor(m, m_ref).view(torch.uint8).flatten().tolist().count(0) != m.numel() * 4)
        diff_bits = sum(bin(v & 0xFFFFFFFF).count("1") for v in torch.bitwise_xor(m, m_ref).flatten().tolist())
        assert diff_bits <= max(1, y.numel() * m.shape[0] // 200), (flips, diff_bits)
    g = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    g = g.to(dtype).contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    gx_ref, gw_ref = reference.conv2d_bwd(g, x, w, *args, p, inst, m_ref, list(y_ref.stride()), True, True)
    gx, gw = cpu.conv2d_bwd(g, x, w, *args, p, inst, m_ref, list(y_ref.stride()), True, True)
    _assert_close(gx, gx_ref, dtype, "grad_x")
    _assert_close(gw, gw_ref, dtype, "grad_w")
    gx2, gw2 = cpu.conv2d_bwd(g, x, w, *args, p, inst, m_ref, list(y_ref.stride()), True, False)
    assert gw2 is None
    _assert_close(gx2, gx_ref, dtype, "grad_x only")


@pytest.mark.parametrize("cfg_name", list(CONFIGS))
@pytest.mark.parametrize("sampling", ["per_call", "per_sample", "per_instance"])
def test_conv_fp32_all_configs(cfg_name, sampling):
    _check_conv(cfg_name, sampling, torch.float32, "plain")


@pytest.mark.parametrize("geom_name", list(CONV_GEOMS))
@pytest.mark.parametrize("cfg_name", ["mixed_clip_wq", "quant_tiles"])
@pytest.mark.parametrize("sampling", ["per_call", "per_instance"])
def test_conv_geometries(geom_name, cfg_name, sampling):
    _check_conv(cfg_name, sampling, torch.float32, geom_name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("cfg_name", ["add", "quant_tiles", "mixed_clip_wq"])
def test_conv_dtypes(dtype, cfg_name):
    _check_conv(cfg_name, "per_sample" if cfg_name == "add" else "per_call", dtype, "plain")


@pytest.mark.parametrize("cfg_name", ["add", "quant_tiles", "outq_one_tile"])
@pytest.mark.parametrize("sampling", ["per_call", "per_sample"])
def test_conv_channels_last(cfg_name, sampling):
    _check_conv(cfg_name, sampling, torch.float32, "plain", channels_last=True)


def test_conv_clean_is_exact_f_conv2d():
    x, w, b = _conv_case(CONV_GEOMS["plain"], torch.float32)
    p = _params(LayerConfig(), "per_call")
    y, m = cpu.conv2d_fwd(x, w, b, [2, 2], [1, 1], [1, 1], 1, p, torch.tensor(0))
    assert torch.equal(y, F.conv2d(x, w, b, 2, 1)) and m.numel() == 0


def test_per_instance_equal_groups_grouped_path():
    """Equal samples per chip, interleaved: the grouped-conv path with a gather."""
    x, w, b = _conv_case(CONV_GEOMS["plain"], torch.float32)
    x = torch.cat([x, x[:1]])
    ids = torch.tensor([0, 1, 0, 1], dtype=torch.int64)
    p = _params(CONFIGS["mixed_clip_wq"], "per_instance")
    y_ref, _ = reference.conv2d_fwd(x, w, b, [2, 2], [1, 1], [1, 1], 1, p, ids)
    y, _ = cpu.conv2d_fwd(x, w, b, [2, 2], [1, 1], [1, 1], 1, p, ids)
    _assert_close(y, y_ref, torch.float32, "y")
    y2, _ = cpu.conv2d_fwd(x, w, b, [2, 2], [1, 1], [1, 1], 1, p, ids)
    assert torch.equal(y, y2)
    with torch.no_grad():
        w.add_(0.01)  # the op keeps no state: the next call sees the new weights
    y3, _ = cpu.conv2d_fwd(x, w, b, [2, 2], [1, 1], [1, 1], 1, p, ids)
    y3_ref, _ = reference.conv2d_fwd(x, w, b, [2, 2], [1, 1], [1, 1], 1, p, ids)
    _assert_close(y3, y3_ref, torch.float32, "y after weight update")


def test_per_sample_chunks(monkeypatch):
    """A tiny chunk budget forces one instance per chunk: same result."""
    x, w, b = _conv_case(CONV_GEOMS["plain"], torch.float32)
    p = _params(CONFIGS["add"], "per_sample")
    y_ref, _ = reference.conv2d_fwd(x, w, b, [2, 2], [1, 1], [1, 1], 1, p, torch.tensor(3))
    monkeypatch.setenv("NOISYOPS_CPU_CHUNK_MB", "0.0001")
    y, _ = cpu.conv2d_fwd(x, w, b, [2, 2], [1, 1], [1, 1], 1, p, torch.tensor(3))
    _assert_close(y, y_ref, torch.float32, "y")


# ---- linear --------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg_name", ["add", "mixed_clip_wq", "quant_tiles", "outnoise_clean_grad", "clean"])
@pytest.mark.parametrize("sampling", ["per_call", "per_sample", "per_instance"])
@pytest.mark.parametrize("shape", [(5, 64), (3, 2, 64)])
def test_linear_vs_reference(cfg_name, sampling, shape):
    g0 = torch.Generator().manual_seed(3)
    x = torch.randn(*shape, generator=g0)
    w = 0.2 * torch.randn(9, 64, generator=g0)
    b = torch.randn(9, generator=g0)
    p = _params(CONFIGS[cfg_name], sampling)
    inst = _ids(sampling, shape[0])
    y_ref, m_ref = reference.linear_fwd(x, w, b, p, inst)
    y, m = cpu.linear_fwd(x, w, b, p, inst)
    _assert_close(y, y_ref, torch.float32, "y", level=_level(p), frac=0.01)
    g = torch.randn(y_ref.shape, generator=g0)
    gx_ref, gw_ref = reference.linear_bwd(g, x, w, p, inst, m_ref, list(y_ref.stride()))
    gx, gw = cpu.linear_bwd(g, x, w, p, inst, m_ref, list(y_ref.stride()))
    _assert_close(gx, gx_ref, torch.float32, "grad_x")
    _assert_close(gw, gw_ref, torch.float32, "grad_w")


def test_linear_1d_and_fp64():
    x = torch.randn(64, dtype=torch.float64)
    w = 0.2 * torch.randn(9, 64, dtype=torch.float64)
    p = _params(CONFIGS["quant_tiles"], "per_call")
    y_ref, m_ref = reference.linear_fwd(x, w, None, p, torch.tensor(0))
    y, m = cpu.linear_fwd(x, w, None, p, torch.tensor(0))
    _assert_close(y, y_ref, torch.float64, "y", level=_level(p), frac=0.2)
    g = torch.randn(9, dtype=torch.float64)
    gx_ref, gw_ref = reference.linear_bwd(g, x, w, p, torch.tensor(0), m_ref, list(y_ref.stride()))
    gx, gw = cpu.linear_bwd(g, x, w, p, torch.tensor(0), m_ref, list(y_ref.stride()))
    _assert_close(gx, gx_ref, torch.float64, "grad_x")
    _assert_close(gw, gw_ref, torch.float64, "grad_w")


# ---- end to end through the custom ops ------------------------------------------------------------
def test_functional_autograd_runs_cpu_backend(backend_env):
    backend_env("cpu")
    dispatch.reset_counts()
    cfg = LayerConfig(eta=0.04, in_bits=8, in_range=(-3.0, 3.0), out_bits=8, out_range=(-6.0, 6.0))
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    w = (0.2 * torch.randn(5, 3, 3, 3)).requires_grad_()
    b = torch.randn(5, requires_grad=True)
    y = functional.noisy_conv2d(x, w, b, padding=1, config=cfg, seed=1, instance=4)
    y.square().sum().backward()
    lin = functional.noisy_linear(torch.randn(4, 6), torch.randn(3, 6), config=cfg, seed=1)
    counts = dispatch.backend_counts()
    assert counts.get(("conv2d_fwd", "cpu")) == 1 and counts.get(("conv2d_bwd", "cpu")) == 1
    assert counts.get(("linear_fwd", "cpu")) == 1
    assert not any(k[1] == "reference" for k in counts)
    assert x.grad is not None and w.grad is not None and b.grad is not None and lin.shape == (4, 3)


def test_default_dispatch_prefers_cpu():
    dispatch.reset_counts()
    functional.noisy_linear(torch.randn(4, 6), torch.randn(3, 6), config=LayerConfig(eta=0.1), seed=1)
    assert dispatch.last_backend("linear_fwd") == "cpu"


@pytest.mark.parametrize("sampling", ["per_call", "per_instance"])
def test_opcheck_conv_and_linear(backend_env, sampling):
    from noisyops import ops
    backend_env("cpu")
    cfg = LayerConfig(eta=0.05, in_bits=8, in_range=(-2.0, 2.0), out_bits=6, out_range=(-4.0, 4.0),
                      tile_rows=9, sampling=sampling)
    p = resolve(cfg, seed=3, layer_key=1)
    f, i = p.to_op_args()
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    w = (0.3 * torch.randn(3, 4, 3, 3)).requires_grad_()
    b = torch.randn(3, requires_grad=True)
    inst = torch.tensor([1, 0]) if sampling == "per_instance" else torch.tensor(2)
    torch.library.opcheck(ops.noisy_conv2d_op, (x, w, b, [1, 1], [1, 1], [1, 1], 1, f, i, inst))
    xl = torch.randn(2, 8, requires_grad=True)
    wl = torch.randn(5, 8, requires_grad=True)
    torch.library.opcheck(ops.noisy_linear_op, (xl, wl, None, f, i, inst))


def test_op_keeps_no_chip_state():
    """``w.data`` edits do not bump ``_version``; the op holds no cache, so it sees them anyway."""
    x, w, b = _conv_case(CONV_GEOMS["plain"], torch.float32)
    p = _params(CONFIGS["add"], "per_instance")
    ids = torch.tensor([0, 1, 2])
    cpu.conv2d_fwd(x, w, b, [1, 1], [0, 0], [1, 1], 1, p, ids)
    w.data[0, 0, 0, 0] += 0.5
    y, _ = cpu.conv2d_fwd(x, w, b, [1, 1], [0, 0], [1, 1], 1, p, ids)
    y_ref, _ = reference.conv2d_fwd(x, w, b, [1, 1], [0, 0], [1, 1], 1, p, ids)
    _assert_close(y, y_ref, torch.float32, "y after .data edit")
