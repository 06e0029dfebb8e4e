"""The Triton kernels under TRITON_INTERPRET=1 (conftest sets it before any import) against
`noisyops.reference`: noise words/uniforms exactly, normals within ulps, outputs and gradients
within dtype-tied tolerances, and the whole public API forced onto the ``triton`` backend.

Interpreter limits: it does not emulate tf32, and bf16 ``tl.dot`` gives garbage, so the bf16
and tf32 paths' logic (identical code, only the dot's input dtype/precision differs) is tested
in fp32; fp16 runs as fp16. Shapes are small and the interpreter config uses big tiles.
"""
import os

import pytest
import torch

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover - conftest sets it
    pytest.skip("needs TRITON_INTERPRET=1 before triton is imported", allow_module_level=True)

from noisyops import LayerConfig, dispatch, reference  # noqa: E402
from noisyops import functional as F  # noqa: E402
from noisyops import stream as rstream  # noqa: E402
from noisyops.params import OpParams  # noqa: E402
from noisyops.kernels import noisy_conv2d as kconv  # noqa: E402
from noisyops.kernels import noisy_conv2d_backward as kconvb  # noqa: E402
from noisyops.kernels import noisy_linear as klin  # noqa: E402
from noisyops.kernels import quantize as kq  # noqa: E402
from noisyops.kernels import stream as kstream  # noqa: E402
from noisyops.kernels import weight_prepass as kpre  # noqa: E402

FULL = dict(eta=0.05, eta_mul=0.1, w_std_k=0.0, w_lo=-1.5, w_hi=1.5, w_clip=1, w_bits=4,
            in_bits=4, in_lo=-1.0, in_hi=1.0, out_bits=5, out_lo=-3.0, out_hi=3.0, out_noise=0.2,
            seed_lo=0x9ABCDEF1, seed_hi=0x12345, layer_key=3)


def _ulps(a, b):
    """Distance in float32 ulps of b."""
    spacing = torch.abs(torch.nextafter(b, torch.full_like(b, float("inf"))) - b)
    return ((a - b).abs() / spacing).max().item()


def _close_q(y, yr, step, tol):
    """Outputs of a quantizer: equal within ``tol`` except (rarely) one level ``step`` apart, where
    the pre-quantizer value sat on a rounding boundary (float sums in another order)."""
    d = (y.double() - yr.double()).abs()
    off = d > tol
    assert off.float().mean().item() <= 0.01, f"{off.sum().item()} of {d.numel()} differ"
    assert (d[off] <= step * 1.001 + tol).all(), d.max()


# ---- stream and quantizer ----------------------------------------------------------------------
@pytest.mark.parametrize("seed,layer_key,purpose,instance,start", [
    (0, 0, 0, 0, 0), (2**64 - 1, 2**30 - 1, 3, 2**63 - 1, 2**33 - 100), (12345, 7, 2, 5 * 2**24 + 3, 999)])
def test_stream_words_uniforms_exact_normals_ulps(seed, layer_key, purpose, instance, start):
    n = 300
    words, unif, norm = kstream.stream_values(seed, layer_key, purpose, instance, start, n)
    e = torch.arange(start, start + n, dtype=torch.int64)
    w4 = torch.stack(rstream.counter_words(seed, layer_key, purpose, instance, e >> 2))
    assert torch.equal(words, w4[e & 3, torch.arange(n)])
    assert torch.equal(unif, rstream.uniforms_at(seed, layer_key, purpose, instance, e))
    ref = rstream.normals_at(seed, layer_key, purpose, instance, e)
    assert _ulps(norm, ref) <= 4 or torch.allclose(norm, ref, rtol=1e-5, atol=1e-6)


def test_stream_matches_tl_randint4x_words():
    """instance = layer_key = purpose = 0 is Triton's own randint4x(seed, element >> 2)."""
    import triton
    import triton.language as tl

    @triton.jit
    def k(out, seed, BLOCK: tl.constexpr):
        o = tl.arange(0, BLOCK)
        a, b, c, d = tl.randint4x(seed, o)
        tl.store(out + 4 * o, a.to(tl.int32, bitcast=True))
        tl.store(out + 4 * o + 1, b.to(tl.int32, bitcast=True))
        tl.store(out + 4 * o + 2, c.to(tl.int32, bitcast=True))
        tl.store(out + 4 * o + 3, d.to(tl.int32, bitcast=True))

    out = torch.empty(4 * 64, dtype=torch.int32)
    k[(1,)](out, 987654, BLOCK=64)
    words, _, _ = kstream.stream_values(987654, 0, 0, 0, 0, 256)
    assert torch.equal(out.to(torch.int64) & 0xFFFFFFFF, words)


import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _grouped_normals_kernel(out_ptr, ref_ptr, start, k0_, k1_, c3_, ROWS: tl.constexpr,
                            BM: tl.constexpr, BN: tl.constexpr):
    """Tile element (i, j) is stream element ``start + i·BN + j`` (ROWS=0: columns consecutive) or
    ``start + j·BM + i`` (ROWS=1: rows consecutive); writes the grouped draw and `normal_at`."""
    k0 = k0_.to(tl.uint32, bitcast=True)
    k1 = k1_.to(tl.uint32, bitcast=True)
    c3 = c3_.to(tl.uint32, bitcast=True)
    zero = tl.zeros((), tl.uint32)
    i = tl.arange(0, BM)[:, None]
    j = tl.arange(0, BN)[None, :]
    if ROWS:
        elem = start + j * BM + i
        first = start + j * BM + 4 * tl.arange(0, BM // 4)[:, None]
        got = kstream.normals_rows4(first, k0, k1, zero + 5, zero, c3, BM, BN)
    else:
        elem = start + i * BN + j
        first = start + i * BN + 4 * tl.arange(0, BN // 4)[None, :]
        got = kstream.normals_cols4(first, k0, k1, zero + 5, zero, c3, BM, BN)
    tl.store(out_ptr + i * BN + j, got)
    tl.store(ref_ptr + i * BN + j, kstream.normal_at(elem, k0, k1, zero + 5, zero, c3))


@pytest.mark.parametrize("rows", [0, 1])
def test_grouped_output_noise_equals_normal_at_bit_for_bit(rows):
    """The epilogue's one-Philox-call-per-four-outputs draws (`normals_rows4` / `normals_cols4`)
    are exactly the per-element stream `normal_at` gives, and the reference's."""
    out, ref = torch.empty(16, 32), torch.empty(16, 32)
    _grouped_normals_kernel[(1,)](out, ref, 1 << 20, kstream.u32_as_i32(0x9ABCDEF1), 0x12345, 14,
                                  ROWS=rows, BM=16, BN=32)
    assert torch.equal(out, ref)
    i, j = torch.meshgrid(torch.arange(16), torch.arange(32), indexing="ij")
    elem = (1 << 20) + (j * 16 + i if rows else i * 32 + j)
    want = rstream.normals_at(0x123459ABCDEF1, 3, 2, 5, elem.reshape(-1)).reshape(16, 32)
    assert _ulps(out, want.float()) <= 4


def test_quantize_exact_with_ties():
    x = torch.cat([torch.linspace(-1.5, 1.5, 1001), torch.tensor([-1.0, 1.0, 0.0, 1 / 3])])
    for lo, hi, bits in ((-1.0, 1.0, 2), (-1.0, 1.0, 4), (-0.3, 0.7, 8)):
        assert torch.equal(kq.quantize_tensor(x, lo, hi, bits), reference.quantize(x, lo, hi, bits))
    h = x.half()
    assert torch.equal(kq.quantize_tensor(h, -1.0, 1.0, 3), reference.quantize(h.float(), -1.0, 1.0, 3).half())


def test_weight_prepass_matches_reference():
    w = torch.randn(6, 4, 3, 3)
    p = OpParams(**FULL)
    wa = kpre.weight_args(p, w)
    out = kpre.prepass(w, p, wa, [7, 2**40 + 1], torch.float32)
    for row, inst in zip(out, (7, 2**40 + 1)):
        wq, sigma, _ = reference.weight_quantized(w, p, torch.float32)
        ref = reference.weight_noisy(wq, sigma, p, inst).reshape(-1)
        torch.testing.assert_close(row, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape,groups", [((6, 4, 3, 3), 2), ((6, 4, 3, 3), 1), ((5, 7), 1)])
def test_weight_prepass_k_major_is_the_same_noise_relaid(shape, groups):
    """The GEMMs' K-major pre-pass ``[slots, groups, KH·KW·Cg, Cout_g]`` holds bit for bit the
    flat pre-pass's noisy weights at `k_major` positions (the noise stays indexed by the flat
    weight element)."""
    w = torch.randn(shape)
    p = OpParams(**FULL)
    wa = kpre.weight_args(p, w)
    flat = kpre.prepass(w, p, wa, [7, 2**40 + 1], torch.float32)
    km = kpre.prepass(w, p, wa, [7, 2**40 + 1], torch.float32, groups=groups)
    for s in range(2):
        assert torch.equal(km[s], kpre.k_major(flat[s].view(shape), groups))
    w4 = w.reshape(shape[0], -1, 1, 1) if w.dim() == 2 else w
    g = kpre.k_major(w, groups)  # row (r*KW + s)*Cg + ci, column co_l
    co_l, ci, r, sx = 1, 2 % w4.shape[1], w4.shape[2] - 1, w4.shape[3] - 1
    row = (r * w4.shape[3] + sx) * w4.shape[1] + ci
    assert g[groups - 1, row, co_l] == w4[(groups - 1) * (shape[0] // groups) + co_l, ci, r, sx]


# ---- conv2d kernels --------------------------------------------------------------------------
CONV_CASES = [  # (shape x, weight, stride, padding, dilation, groups, channels_last)
    ((2, 4, 6, 6), (6, 2, 2, 3), [2, 1], [1, 1], [1, 2], 2, True),
    ((2, 3, 6, 5), (5, 3, 1, 1), [1, 1], [0, 0], [1, 1], 1, False),
    ((1, 4, 5, 5), (4, 1, 3, 3), [1, 2], [2, 0], [1, 1], 4, True),  # depthwise
    ((2, 2, 5, 5), (4, 2, 2, 2), [2, 1], [1, 0], [1, 2], 1, True),  # small: regen under the interpreter
    ((1, 3, 4, 4), (64, 3, 3, 3), [1, 1], [1, 1], [1, 1], 1, True),  # C_out % 32 == 0: mask words in registers
]


def _conv_args(case, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs, ws, st, pad, dil, groups, cl = case
    x = torch.randn(xs, generator=g).to(dtype)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(ws, generator=g).to(dtype)
    b = torch.randn(ws[0], generator=g).to(dtype)
    return x, w, b, (st, pad, dil, groups)


@pytest.mark.parametrize("case", range(len(CONV_CASES)))
def test_conv_fwd_clean_and_bias(case):
    x, w, b, geo = _conv_args(CONV_CASES[case])
    p = OpParams()
    y, m = kconv.conv2d_fwd(x, w, b, *geo, p, torch.tensor(0))
    yr, _ = reference.conv2d_fwd(x, w, b, *geo, p, torch.tensor(0))
    assert y.stride() == yr.stride() and m.numel() == 0
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampling,tile_rows,strategy,case", [
    (0, 4, "regen", 3), (0, 0, "prepass", 0), (1, 4, "regen", 3), (2, 6, "prepass", 0),
    (0, 9, "prepass", 4), (1, 18, "regen", 4)])
def test_conv_fwd_bwd_all_options(sampling, tile_rows, strategy, case, monkeypatch):
    """Every option on: quantizers, clip, both weight noises, output noise, crossbar tiles
    (regenerate-on-chip on a small shape: the interpreter runs Philox op by op)."""
    monkeypatch.setenv("NOISYOPS_TRITON_WEIGHTS", strategy)
    x, w, b, geo = _conv_args(CONV_CASES[case], seed=sampling)
    p = OpParams(**FULL, tile_rows=tile_rows, sampling=sampling)
    inst = torch.tensor([5, 2**33 + 1]) if sampling == 2 else torch.tensor(3)
    y, m = kconv.conv2d_fwd(x, w, b, *geo, p, inst)
    yr, mr = reference.conv2d_fwd(x, w, b, *geo, p, inst)
    assert y.stride() == yr.stride() and m.shape == mr.shape
    step = (p.out_hi - p.out_lo) / 31
    _close_q(y, yr, step, 1e-4)
    assert (m != mr).sum().item() <= 2  # bits differ only where y_t sits on a range edge
    g = torch.randn_like(yr)
    gx, gw = kconvb.conv2d_bwd(g, x, w, *geo, p, inst, mr, yr.stride())
    gxr, gwr = reference.conv2d_bwd(g, x, w, *geo, p, inst, mr, yr.stride())
    assert gx.stride() == x.stride()
    torch.testing.assert_close(gx, gxr, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gw, gwr, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tile", ["16,64,16", "32,128,32"])
@pytest.mark.parametrize("case,strategy", [(4, "prepass"), (0, "regen")])
def test_conv_fwd_wide_tiles(tile, case, strategy, monkeypatch):
    """Tiles of the GPU configs' widths (BN 64 / 128: several mask words per tile row, column
    tiles past Cout_g): outputs, masks and gradients as the reference, for aligned (mask words in
    registers) and unaligned (atomic) masks."""
    monkeypatch.setenv("NOISYOPS_INTERPRET_TILE", tile)
    test_conv_fwd_bwd_all_options(0, 9 if case == 4 else 4, strategy, case, monkeypatch)


@pytest.mark.parametrize("tile_rows,case,strategy", [(4, 3, "regen"), (9, 4, "prepass"), (0, 0, "prepass"),
                                                     (6, 0, "regen")])
def test_conv_fwd_split_tiles_equal_the_loop_bit_for_bit(tile_rows, case, strategy, monkeypatch):
    """The tile-parallel crossbar forward (one crossbar tile per program, ADC codes summed by
    `_tile_sum_kernel`; T = 1 writes y directly) gives the looped kernel's y and mask bit for bit,
    NaN / ±Inf outputs included."""
    monkeypatch.setenv("NOISYOPS_TRITON_WEIGHTS", strategy)
    x, w, b, geo = _conv_args(CONV_CASES[case], seed=7)
    x[0, 0, 0, 0], x[0, 0, 0, -1], x[-1, 0, -1, -1] = float("nan"), float("inf"), -float("inf")
    p = OpParams(**FULL, tile_rows=tile_rows, sampling=0)
    T, _ = kconv.tiling(p, w.shape[1], w.shape[2] * w.shape[3])
    assert (T > 1) == (tile_rows in (4, 9, 6))
    out = {}
    for mode in ("split", "loop"):
        monkeypatch.setenv(kconv.CROSSBAR_FWD_ENV, mode)
        out[mode] = kconv.conv2d_fwd(x, w, b, *geo, p, torch.tensor(3))
    (ys, ms), (yl, ml) = out["split"], out["loop"]
    assert ys.stride() == yl.stride()
    assert torch.equal(ys.isnan(), yl.isnan()) and ys.isnan().any()
    assert torch.equal(ys.nan_to_num(), yl.nan_to_num()) and torch.equal(ms, ml)
    assert ys.isinf().any() or tile_rows == 0
    yr, _ = reference.conv2d_fwd(x, w, b, *geo, p, torch.tensor(3))  # tiles see only their channels
    assert torch.equal(ys.isnan(), yr.isnan()) and torch.equal(ys.isinf(), yr.isinf())


def test_crossbar_fwd_mode_is_checked(monkeypatch):
    adc = OpParams(out_bits=8, out_lo=-1.0, out_hi=1.0)
    monkeypatch.setenv(kconv.CROSSBAR_FWD_ENV, "fast")
    with pytest.raises(ValueError, match="NOISYOPS_TRITON_CROSSBAR_FWD='fast'"):
        kconv.crossbar_split(adc, 1)
    monkeypatch.setenv(kconv.CROSSBAR_FWD_ENV, "split")
    assert not kconv.crossbar_split(OpParams(out_noise=0.1, tile_rows=4), 3)  # no ADC: the loop
    assert kconv.crossbar_split(adc, 5)
    monkeypatch.delenv(kconv.CROSSBAR_FWD_ENV)  # auto: one tile splits, several keep the loop
    assert kconv.crossbar_split(adc, 1) and not kconv.crossbar_split(adc, 2)
    monkeypatch.setenv(kconv.CROSSBAR_FWD_ENV, "loop")
    assert not kconv.crossbar_split(adc, 1)


def test_tile_codes_rebuild_the_quantizer_values():
    """`quantize_code` → `code_level` is `quantize` bit for bit, NaN / ±Inf / saturation included."""
    v = torch.tensor([0.1, -0.37, 5.0, -5.0, 0.5 / 31, float("nan"), float("inf"), -float("inf"),
                      1e-30, -0.0] + torch.randn(500, generator=torch.Generator().manual_seed(1)).tolist())
    lo, hi, delta = kq.qparams(-1.0, 1.0, 5)
    q = kq.quantize_tensor(v, -1.0, 1.0, 5)
    codes = torch.empty(v.shape, dtype=torch.int32)
    back = torch.empty_like(v)
    _code_roundtrip_kernel[(1,)](v, codes, back, v.numel(), lo, hi, delta,
                                 BLOCK=triton.next_power_of_2(v.numel()))
    assert codes.min() == -3 and codes.max() == 31
    assert torch.equal(back.isnan(), q.isnan()) and torch.equal(back.nan_to_num(), q.nan_to_num())


@triton.jit
def _code_roundtrip_kernel(v_ptr, c_ptr, out_ptr, n, lo, hi, delta, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    ok = offs < n
    tl.store(c_ptr + offs, kq.quantize_code(tl.load(v_ptr + offs, mask=ok, other=0.0), lo, hi, delta), mask=ok)
    tl.store(out_ptr + offs, kq.code_level(tl.load(c_ptr + offs, mask=ok, other=0), lo, delta), mask=ok)


@pytest.mark.parametrize("case", [1, 2])
def test_conv_bwd_geometries_clean_grad_input(case):
    x, w, b, geo = _conv_args(CONV_CASES[case], seed=1)
    p = OpParams(eta=0.1, w_std_k=2.0, in_bits=3, in_lo=-1.0, in_hi=1.0, clean_grad_input=1)
    yr, mr = reference.conv2d_fwd(x, w, b, *geo, p, torch.tensor(1))
    g = torch.randn_like(yr)
    gx, gw = kconvb.conv2d_bwd(g, x, w, *geo, p, torch.tensor(1), mr, yr.stride())
    gxr, gwr = reference.conv2d_bwd(g, x, w, *geo, p, torch.tensor(1), mr, yr.stride())
    torch.testing.assert_close(gx, gxr, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gw, gwr, rtol=1e-4, atol=1e-4)


def test_conv_fp16():
    x, w, b, geo = _conv_args(CONV_CASES[0], dtype=torch.float16)
    p = OpParams(eta=0.05, w_std_k=2.0, in_bits=6, in_lo=-2.0, in_hi=2.0, seed_lo=9)
    y, _ = kconv.conv2d_fwd(x, w, b, *geo, p, torch.tensor(0))
    yr, mr = reference.conv2d_fwd(x, w, b, *geo, p, torch.tensor(0))
    assert y.dtype == torch.float16
    torch.testing.assert_close(y, yr, rtol=2e-2, atol=2e-2)
    g = torch.randn_like(yr)
    gx, gw = kconvb.conv2d_bwd(g, x, w, *geo, p, torch.tensor(0), mr, yr.stride())
    gxr, gwr = reference.conv2d_bwd(g, x, w, *geo, p, torch.tensor(0), mr, yr.stride())
    torch.testing.assert_close(gx, gxr, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gw, gwr, rtol=2e-2, atol=5e-2)


# ---- linear kernels ---------------------------------------------------------------------------
@pytest.mark.parametrize("xshape,sampling", [((5, 16), 0), ((3, 2, 16), 1), ((16,), 0), ((4, 16), 2)])
def test_linear_fwd_bwd(xshape, sampling):
    g = torch.Generator().manual_seed(len(xshape) + sampling)
    x = torch.randn(xshape, generator=g)
    w = torch.randn(8, 16, generator=g)
    b = torch.randn(8, generator=g)
    p = OpParams(**FULL, tile_rows=5, sampling=sampling)
    n = 1 if x.dim() == 1 else x.shape[0]
    inst = torch.arange(n) % 2 + 7 if sampling == 2 else torch.tensor(4)
    y, m = klin.linear_fwd(x, w, b, p, inst)
    yr, mr = reference.linear_fwd(x, w, b, p, inst)
    assert y.shape == yr.shape and m.shape == mr.shape
    _close_q(y, yr, 6 / 31, 1e-4)
    gy = torch.randn_like(yr)
    gx, gw = klin.linear_bwd(gy, x, w, p, inst, mr, yr.stride())
    gxr, gwr = reference.linear_bwd(gy, x, w, p, inst, mr, yr.stride())
    torch.testing.assert_close(gx, gxr, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gw, gwr, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tile", ["16,128,32", "16,128,64"])
@pytest.mark.parametrize("sampling", [1, 2])
def test_linear_per_sample_tiny_tiles(tile, sampling, monkeypatch):
    """The 16-row tiles of one-row segments (`configs._TINY_PRE` / `_TINY_REGEN`): per_sample and
    per_instance linear, forward and backward, as the reference."""
    monkeypatch.setenv("NOISYOPS_INTERPRET_TILE", tile)
    test_linear_fwd_bwd((4, 16), sampling)


# ---- the public API on the triton backend ------------------------------------------------------
API_CONFIGS = [
    LayerConfig(),
    LayerConfig(eta=0.05, eta_mul=0.05, w_range=2.0, w_bits=4, in_bits=5, in_range=(-2.0, 2.0),
                out_bits=6, out_range=(-6.0, 6.0), out_noise=0.1, tile_rows=4, sampling="per_call"),
    LayerConfig(eta=0.1, w_range=(-1.0, 1.0), out_noise=0.05, sampling="per_sample",
                clean_grad_input=True),
    LayerConfig(eta=0.1, eta_mul=0.02, out_bits=4, out_range=(-5.0, 5.0), sampling="per_instance"),
]


def _run_api(op, cfg, backend_env, name, args, inst):
    backend_env(name)
    leaves = [a.detach().clone().requires_grad_(True) for a in args]
    y = op(*leaves, cfg, inst)
    (y * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum().backward()
    return y.detach(), [a.grad for a in leaves]


@pytest.mark.parametrize("ci", range(len(API_CONFIGS)))
def test_public_api_on_triton_backend(ci, backend_env):
    cfg = API_CONFIGS[ci]
    g = torch.Generator().manual_seed(ci)
    x = torch.randn(2, 4, 6, 6, generator=g).contiguous(memory_format=torch.channels_last)
    w = torch.randn(4, 2, 2, 2, generator=g) * 0.5
    b = torch.randn(4, generator=g)
    xl = torch.randn(3, 8, generator=g)
    wl = torch.randn(5, 8, generator=g)
    inst_c = torch.tensor([3, 1]) if cfg.sampling == "per_instance" else 2
    inst_l = torch.tensor([0, 4, 0]) if cfg.sampling == "per_instance" else 2

    def conv(x, w, b, cfg, inst):
        return F.noisy_conv2d(x, w, b, stride=2, padding=1, groups=2, config=cfg, seed=77,
                              layer_key=1, instance=inst)

    def lin(x, w, cfg, inst):
        return F.noisy_linear(x, w, None, config=cfg, seed=77, layer_key=2, instance=inst)

    dispatch.reset_counts()
    y, grads = _run_api(conv, cfg, backend_env, "triton", (x, w, b), inst_c)
    yl, gradsl = _run_api(lin, cfg, backend_env, "triton", (xl, wl), inst_l)
    counts = dispatch.backend_counts()
    for k in ("conv2d_fwd", "conv2d_bwd", "linear_fwd", "linear_bwd"):
        assert counts.get((k, "triton"), 0) >= 1, counts
    yr, gradsr = _run_api(conv, cfg, backend_env, "reference", (x, w, b), inst_c)
    ylr, gradslr = _run_api(lin, cfg, backend_env, "reference", (xl, wl), inst_l)
    assert y.is_contiguous(memory_format=torch.channels_last)
    step = 12.0 / 63 if cfg.out_bits == 6 else (10.0 / 15 if cfg.out_bits else 0.0)
    _close_q(y, yr, step, 1e-4)
    _close_q(yl, ylr, step, 1e-4)
    for a, r in zip(grads + gradsl, gradsr + gradslr):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)


def test_float64_declined_and_forced_raises(backend_env):
    x = torch.randn(2, 3, dtype=torch.float64)
    w = torch.randn(4, 3, dtype=torch.float64)
    assert klin.linear_fwd(x, w, None, OpParams(), torch.tensor(0)) is NotImplemented
    backend_env("triton")
    with pytest.raises(RuntimeError, match="triton: declined"):
        F.noisy_linear(x, w, config=LayerConfig(), seed=0)


def test_backend_reports_devices():
    from noisyops.backends import triton as tb
    ok, why = tb.available()
    assert ok, why
    assert "cpu" in tb.DEVICES and "cuda" in tb.DEVICES


def test_api_fp16_linear_and_string_padding(backend_env):
    """fp16 through the public API (product in fp16, fp32 accumulation), 'same' padding."""
    g = torch.Generator().manual_seed(5)
    cfg = LayerConfig(eta=0.05, in_bits=6, in_range=(-2.0, 2.0), sampling="per_sample")
    x = torch.randn(2, 3, 5, 5, generator=g).half()
    w = (torch.randn(4, 3, 3, 3, generator=g) * 0.3).half()
    xl = torch.randn(2, 8, generator=g).half()
    wl = torch.randn(3, 8, generator=g).half()
    out = {}
    for name in ("triton", "reference"):
        backend_env(name)
        out[name] = (F.noisy_conv2d(x, w, padding="same", config=cfg, seed=3, instance=1),
                     F.noisy_linear(xl, wl, config=cfg, seed=3, instance=1))
        assert dispatch.last_backend("conv2d_fwd") == name
        assert dispatch.last_backend("linear_fwd") == name
    for a, r in zip(out["triton"], out["reference"]):
        assert a.dtype == torch.float16 and a.shape == r.shape
        torch.testing.assert_close(a, r, rtol=2e-2, atol=2e-2)


def test_gpu_policy_declines_to_cuda_backend(monkeypatch):
    """On CUDA tensors the backend defers to gpu_policy.use_cuda_path when it says True."""
    import sys
    import types
    from noisyops.backends import triton as tb
    calls = []
    fake = types.ModuleType("noisyops.backends.gpu_policy")
    fake.use_cuda_path = lambda kind, p, x, w: calls.append(kind) or kind == "conv2d_fwd"
    monkeypatch.setitem(sys.modules, "noisyops.backends.gpu_policy", fake)
    cuda_like = types.SimpleNamespace(device=types.SimpleNamespace(type="cuda"))
    assert tb.conv2d_fwd(cuda_like, None, None, [1, 1], [0, 0], [1, 1], 1, OpParams(), None) is NotImplemented
    assert tb._policy_declines("linear_fwd", OpParams(), cuda_like, None) is False
    assert calls == ["conv2d_fwd", "linear_fwd"]
    monkeypatch.setenv("NOISYOPS_BACKEND", "triton")  # forced: the policy is not consulted
    assert tb._policy_declines("conv2d_fwd", OpParams(), cuda_like, None) is False
    monkeypatch.delenv("NOISYOPS_BACKEND")
    cpu = torch.zeros(1)
    assert tb._policy_declines("conv2d_fwd", OpParams(), cpu, None) is False  # CPU: never consulted
    assert calls == ["conv2d_fwd", "linear_fwd"]


# ---- autotune keys and config pruning (host side, no compile) ----------------------------------
def test_autotune_key_has_every_switch_stride_and_padding():
    key = kconv.autotune_key(kconv._conv_fwd_kernel, dict(HAS_BIAS=True, IN_Q=False, W_PRE=True,
                                                           OUT_Q=True, DOT_PREC="ieee"))
    for name in ("sxn", "sxh", "sxw", "sxc", "syc", "stride_h", "stride_w", "pad_h", "pad_w",
                 "dil_h", "dil_w", "Cg", "Cout_g", "KH", "KW", "SEG", "T", "per_tile",
                 "HAS_BIAS", "IN_Q", "W_PRE", "OUT_Q", "DOT_PREC"):
        assert name in key, name
    assert not {"k0_", "k1_", "c3_", "x_ptr", "sigma", "out_lo", "BM"} & set(key)
    keyb = kconv.autotune_key(kconvb._conv_bwd_w_kernel, dict(IN_Q=True, HAS_OMASK=False))
    assert {"rows_per_split", "sgc", "sxc", "pad_w", "IN_Q", "HAS_OMASK"} <= set(keyb)


def test_config_families_and_pruning():
    from noisyops.kernels import configs
    assert configs.family("GEMM", dict(W_PRE=True, NOISE_ADD=True)) == "GEMM"
    assert configs.family("GEMM", dict(W_PRE=False, NOISE_ADD=True)) == "GEMM_REGEN"
    assert configs.family("GEMM", dict(W_PRE=True, OUT_Q=True)) == "GEMM_EPI"
    assert configs.family("GEMM", dict(W_PRE=True, HAS_OMASK=True)) == "GEMM_OMASK"
    assert configs.family("GEMM", dict(W_PRE=True, OUT_NOISE=True, NOISE4=2)) == "GEMM_SMALL"
    assert configs.family("GEMM", dict(W_PRE=False, W_CLIP=True, OUT_NOISE=True)) == "GEMM_RNG"
    assert configs.family("GEMM", dict(W_PRE=False, NOISE_MUL=True, HAS_OMASK=True)) == "GEMM_RNG"
    for w_pre in (True, False):  # a word-aligned out mask: one word per row and K step
        assert configs.family("GEMM", dict(W_PRE=w_pre, NOISE_MUL=True, HAS_OMASK=True,
                                           MASK_ALIGNED=True)) == "GEMM_OMASK_WORDS"
    assert configs.family("GEMM", dict(W_PRE=True, OUT_Q=True, MASK_ALIGNED=True)) == "GEMM_EPI"
    # the tile-parallel crossbar forward: one accumulator, 128x128 (BK 16 with regenerated weights)
    assert configs.family("GEMM", dict(W_PRE=True, OUT_Q=True, SPLIT_T=True)) == "GEMM_EPI1"
    assert configs.family("GEMM", dict(W_PRE=False, W_CLIP=True, OUT_Q=True, SPLIT_T=True)) == "GEMM_RNG1"
    assert configs.family("GEMM", dict(W_PRE=True, OUT_Q=True, OUT_NOISE=True, NOISE4=2,
                                       SPLIT_T=True)) == "GEMM_EPI1_COLS"
    assert configs.family("GEMM", dict(W_PRE=True, OUT_Q=True, SPLIT_T=True), elem_bytes=4) == "GEMM_SMALL"
    for fam in configs.FAMILIES:  # every family has configs for both archs
        assert all(getattr(configs, fam)[arch] for arch in configs.ARCHS)
    for arch in configs.ARCHS:  # >= 128x128 where the compile report shows it spill-free
        for fam in ("GEMM", "GEMM_REGEN", "GEMM_OMASK_WORDS", "GEMM_EPI1", "GEMM_RNG1"):
            assert max(c["BM"] * c["BN"] for c in getattr(configs, fam)[arch]) >= 128 * 128
    assert configs.family("WGRAD", dict(IN_Q=True)) == "WGRAD"
    assert configs.family("WGRAD", dict(IN_Q=True, HAS_OMASK=True)) == "WGRAD_Q"  # gathered gate
    assert configs.family("WGRAD", dict(IN_Q=True, HAS_OMASK=True, MASK_ALIGNED=True)) == "WGRAD"
    for arch in configs.ARCHS:
        big = configs.pruned("GEMM", arch, dict(SEG=50176, Cout_g=256, Cg=256, numel_y=1))
        assert big == [c for c in configs.GEMM[arch] if c["rows_max"] is None]
        for fam in ("GEMM", "GEMM_REGEN"):  # one row per sample (per_sample linear): 16-row tiles
            one = configs.pruned(fam, arch, dict(SEG=1, Cout_g=1000, Cg=2048, numel_y=1))
            assert one and all(c["BM"] == 16 and c["rows_max"] == 16 for c in one)
        narrow = configs.pruned("GEMM", arch, dict(SEG=50176, Cout_g=64, Cg=64, numel_y=1))
        assert narrow and all(c["BN"] <= 64 for c in narrow)
        tiny = configs.pruned("GEMM", arch, dict(SEG=3, Cout_g=5, Cg=2, numel_y=1))
        assert len(tiny) == 1  # nothing fits: the smallest config is kept


def test_calls_past_int32_offsets_are_declined():
    """Element offsets are int32 in the kernels: a tensor of >= 2^31 elements is declined (the
    next backend runs; forced triton raises), never silently wrapped."""
    p = OpParams()
    x = torch.empty(1, 1, 2**16, 2**15, device="meta")  # 2^31 elements
    w = torch.empty(1, 1, 1, 1, device="meta")
    assert kconv.conv2d_fwd(x, w, None, [1, 1], [0, 0], [1, 1], 1, p, torch.tensor(0)) is NotImplemented
    xs = torch.empty(2**16, 2**6, device="meta")
    wl = torch.empty(2**15 + 1, 2**6, device="meta")  # output [2^16, 2^15 + 1] passes 2^31
    assert klin.linear_fwd(xs, wl, None, p, torch.tensor(0)) is NotImplemented
    g = torch.empty(2**16, 2**15 + 1, device="meta")
    assert klin.linear_bwd(g, xs, wl, p, torch.tensor(0), torch.empty(0), g.stride()) is NotImplemented


def test_fp32_operands_take_the_small_families():
    from noisyops.kernels import configs
    assert configs.family("GEMM", dict(W_PRE=True), elem_bytes=4) == "GEMM_SMALL"
    assert configs.family("WGRAD", dict(), elem_bytes=4) == "WGRAD_SMALL"
    assert configs.family("WGRAD", dict(HAS_OMASK=True), elem_bytes=4) == "WGRAD_SMALL"
    assert configs.family("WGRAD", dict(), elem_bytes=2) == "WGRAD"


def test_autotune_off_launches_the_first_pruned_config(monkeypatch):
    """NOISYOPS_TRITON_AUTOTUNE=0 (the GPU check's correctness part) launches one config, the
    first `configs.pruned` keeps, with its warps/stages/maxnreg (host logic; a fake kernel)."""
    import types
    from noisyops.kernels import configs
    launched = []

    class FakeKernel:
        arg_names = ["x_ptr", "SEG", "Cg", "Cout_g", "numel_y"]

        def __getitem__(self, grid):
            return lambda *a, **kw: launched.append((grid, a, kw))

    monkeypatch.setenv("NOISYOPS_TRITON_AUTOTUNE", "0")
    monkeypatch.setattr(configs, "interpret", lambda: False)
    monkeypatch.setattr(configs, "arch_of", lambda device: 90)
    cuda = types.SimpleNamespace(type="cuda")
    args = (None, 4096, 64, 64, 1)
    kconv.launch_gemm("t", FakeKernel(), lambda m: (m["BM"],), args, dict(W_PRE=True, OUT_Q=False),
                      cuda)
    want = configs.pruned("GEMM", 90, dict(SEG=4096, Cg=64, Cout_g=64, numel_y=1))[0]
    (grid, a, kw), = launched
    assert a == args and grid == (want["BM"],)
    assert (kw["BM"], kw["BN"], kw["BK"], kw["num_warps"], kw["num_stages"]) == (
        want["BM"], want["BN"], want["BK"], want["num_warps"], want["num_stages"])
    assert kw["W_PRE"] is True and ("maxnreg" in kw) == bool(want.get("maxnreg"))
