"""Property-based differential fuzzing (hypothesis): every backend that runs here equals the
pure-torch reference on outputs, straight-through masks and all gradients, for random shapes,
layouts, dtypes and every `LayerConfig` option and sampling mode.

What is drawn: batch 0-4; 1-9 spatial; kernels 1-5 (non-square); stride 1-3; padding 0-2 or
"same"; dilation 1-2; groups (plain, grouped, depthwise); input layouts (contiguous, channels-last,
strided and transposed views); gradient layouts (dense, expanded from a broadcast, channels-last);
float64, float32, bfloat16, float16; every config field; per_call / per_sample / per_instance;
conv and linear on 1-D / 2-D / 3-D inputs. Backends: ``cpu`` (C++), and ``triton`` under
TRITON_INTERPRET=1 on small shapes (float32 / float16: the interpreter's bf16 ``tl.dot`` is garbage,
and float64 is declined by design).

How the comparison works (one example):

1. forward op on the reference and on the backend: outputs within a dtype-tied tolerance, except
   (not in float64) a few elements one output-quantizer level apart (a pre-quantizer value on a
   rounding boundary: normals agree to a few ulp, sums run in another order); packed out masks
   equal bit for bit in float64, a few bits apart otherwise;
2. backward op on both with the same inputs and the reference's mask: every gradient within the
   dtype tolerance;
3. the public API on the backend (autograd, the drawn input and gradient layouts) equals its own
   ops bit for bit, and in float64 the public API equals the reference's end to end.

Profiles: the default run is fast (derandomized, no example database: CI sees the same examples
every run; about a minute on two cores); ``-m slow`` runs the deep profile
(``NOISYOPS_FUZZ_EXAMPLES``, default 2000 examples per test; ``NOISYOPS_FUZZ_RANDOM=1`` draws new
examples instead of the fixed derandomized set) before a release.
"""
import contextlib
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from noisyops import LayerConfig, dispatch, stream
from noisyops.functional import noisy_conv2d, noisy_linear
from noisyops.ops import (noisy_conv2d_backward_op, noisy_conv2d_op, noisy_linear_backward_op,
                          noisy_linear_op)
from noisyops.params import resolve, tile_bounds

_COMMON = dict(deadline=None, derandomize=True, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.filter_too_much])
DEEP_EXAMPLES = int(os.environ.get("NOISYOPS_FUZZ_EXAMPLES", "2000"))
# NOISYOPS_FUZZ_RANDOM=1: the deep profile explores new examples (random seed) instead of the fixed set
settings.register_profile("noisyops-deep", max_examples=DEEP_EXAMPLES,
                          **dict(_COMMON, derandomize=os.environ.get("NOISYOPS_FUZZ_RANDOM") != "1"))


def fast(n):
    return settings(max_examples=n, **_COMMON)


deep = settings.get_profile("noisyops-deep")

CPU_OK = dispatch.backend("cpu").status()[0]
TRITON_OK = os.environ.get("TRITON_INTERPRET") == "1" and dispatch.backend("triton").status()[0]
ALL_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
TRITON_DTYPES = (torch.float32, torch.float16)
# (rtol, atol relative to the reference's magnitude, elements allowed one quantizer level apart)
TOL = {torch.float64: (1e-9, 1e-9, 0), torch.float32: (1e-4, 1e-4, 2),
       torch.bfloat16: (3e-2, 3e-2, 0.05), torch.float16: (5e-3, 5e-3, 0.05)}
SAMPLING = ("per_call", "per_sample", "per_instance")


@contextlib.contextmanager
def forced(name):
    old = os.environ.get("NOISYOPS_BACKEND")
    os.environ["NOISYOPS_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("NOISYOPS_BACKEND", None)
        else:
            os.environ["NOISYOPS_BACKEND"] = old


# ---- strategies ------------------------------------------------------------------------------------
@st.composite
def configs(draw, sampling=None):
    wr = draw(st.sampled_from(["none", "k", "pair"]))
    w_range = {"none": None, "k": draw(st.sampled_from([1.0, 2.0, 3.0])),
               "pair": (-draw(st.sampled_from([0.3, 0.8, 1.5])), draw(st.sampled_from([0.4, 1.0])))}[wr]
    in_bits = draw(st.one_of(st.none(), st.integers(1, 8)))
    out_bits = draw(st.one_of(st.none(), st.integers(1, 8)))
    return LayerConfig(
        eta=draw(st.sampled_from([0.0, 0.0, 0.02, 0.1])),
        eta_mul=draw(st.sampled_from([0.0, 0.0, 0.05])),
        w_range=w_range,
        w_bits=draw(st.one_of(st.none(), st.integers(1, 8))) if w_range is not None else None,
        in_bits=in_bits, in_range=(-draw(st.sampled_from([0.5, 1.5])), draw(st.sampled_from([1.0, 2.0])))
        if in_bits else None,
        out_bits=out_bits, out_range=(-draw(st.sampled_from([1.0, 4.0])), draw(st.sampled_from([2.0, 5.0])))
        if out_bits else None,
        out_noise=draw(st.sampled_from([0.0, 0.0, 0.05])),
        tile_rows=draw(st.one_of(st.none(), st.integers(1, 20))),
        sampling=sampling or draw(st.sampled_from(SAMPLING)),
        clean_grad_input=draw(st.booleans()))


def _instance(draw, cfg, n):
    if cfg.sampling == "per_instance":
        ids = draw(st.lists(st.sampled_from([0, 1, 3, 2**40 + 1]), min_size=n, max_size=n))
        return torch.tensor(ids, dtype=torch.int64)
    return draw(st.integers(0, 1000))


@st.composite
def conv_cases(draw, max_batch=4, max_hw=9, max_c=3, dtypes=ALL_DTYPES):
    n = draw(st.integers(0, max_batch))
    kind = draw(st.sampled_from(["plain", "grouped", "depthwise"]))
    if kind == "depthwise":
        groups = draw(st.integers(1, 4))
        cin_g, cout_g = 1, draw(st.integers(1, 2))
    else:
        groups = 1 if kind == "plain" else draw(st.integers(2, 3))
        cin_g, cout_g = draw(st.integers(1, max_c)), draw(st.integers(1, max_c))
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    eff = (dilation[0] * (kh - 1), dilation[1] * (kw - 1))
    if draw(st.integers(0, 3)) == 0 and eff[0] % 2 == 0 and eff[1] % 2 == 0:
        stride, padding, pad_num = (1, 1), "same", (eff[0] // 2, eff[1] // 2)
    else:
        stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
        padding = pad_num = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    h = draw(st.integers(max(1, eff[0] + 1 - 2 * pad_num[0]), max(max_hw, eff[0] + 1 - 2 * pad_num[0])))
    w = draw(st.integers(max(1, eff[1] + 1 - 2 * pad_num[1]), max(max_hw, eff[1] + 1 - 2 * pad_num[1])))
    cfg = draw(configs())
    return dict(kind="conv", n=n, cin=cin_g * groups, cout=cout_g * groups, cin_g=cin_g, groups=groups,
                kernel=(kh, kw), stride=stride, padding=padding, dilation=dilation, hw=(h, w),
                dtype=draw(st.sampled_from(dtypes)), cfg=cfg, bias=draw(st.booleans()),
                layout=draw(st.sampled_from(["contiguous", "channels_last", "strided", "transposed"])),
                grad_layout=draw(st.sampled_from(["dense", "expanded", "channels_last"])),
                seed=draw(st.integers(0, 2**64 - 1)), layer_key=draw(st.integers(0, 2**30 - 1)),
                instance=_instance(draw, cfg, n), data_seed=draw(st.integers(0, 2**31 - 1)))


@st.composite
def linear_cases(draw, max_batch=4, max_in=20, dtypes=ALL_DTYPES):
    rank = draw(st.sampled_from([1, 2, 3]))
    cfg = draw(configs(sampling="per_call" if rank == 1 else None))
    n = draw(st.integers(0, max_batch))
    lead = () if rank == 1 else (n,) if rank == 2 else (n, draw(st.integers(1, 3)))
    return dict(kind="linear", lead=lead, n=n if rank > 1 else 1, fin=draw(st.integers(1, max_in)),
                fout=draw(st.integers(1, 8)), dtype=draw(st.sampled_from(dtypes)), cfg=cfg,
                bias=draw(st.booleans()), layout=draw(st.sampled_from(["contiguous", "strided", "transposed"])),
                grad_layout=draw(st.sampled_from(["dense", "expanded"])),
                seed=draw(st.integers(0, 2**64 - 1)), layer_key=draw(st.integers(0, 2**30 - 1)),
                instance=_instance(draw, cfg, n) if rank > 1 else draw(st.integers(0, 1000)),
                data_seed=draw(st.integers(0, 2**31 - 1)))


# ---- building tensors --------------------------------------------------------------------------------
def _laid_out(t, layout):
    """``t``'s values in the drawn memory layout (a view where the layout is a view)."""
    if layout == "channels_last" and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # every other element of a wider tensor
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    if layout == "transposed" and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    return t


def _tensors(c):
    g = torch.Generator().manual_seed(c["data_seed"])
    dt = c["dtype"]
    if c["kind"] == "conv":
        x = torch.randn(c["n"], c["cin"], *c["hw"], generator=g, dtype=torch.float64)
        w = torch.randn(c["cout"], c["cin_g"], *c["kernel"], generator=g, dtype=torch.float64) * 0.5
        b = torch.randn(c["cout"], generator=g, dtype=torch.float64) if c["bias"] else None
    else:
        x = torch.randn(*c["lead"], c["fin"], generator=g, dtype=torch.float64)
        w = torch.randn(c["fout"], c["fin"], generator=g, dtype=torch.float64) * 0.5
        b = torch.randn(c["fout"], generator=g, dtype=torch.float64) if c["bias"] else None
    x = _laid_out(x.to(dt), c["layout"])
    return x, w.to(dt), (None if b is None else b.to(dt)), g


def _grad_like(y, c, g):
    """The incoming gradient in the drawn layout (expanded: a broadcast view with zero strides)."""
    if c["grad_layout"] == "expanded" and y.dim() >= 1:
        return torch.randn(1, *y.shape[1:], generator=g, dtype=torch.float64).to(y.dtype).expand(y.shape) \
            if y.dim() > 1 else torch.randn((), generator=g, dtype=torch.float64).to(y.dtype).expand(y.shape)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)
    if c["grad_layout"] == "channels_last" and y.dim() == 4:
        gy = gy.contiguous(memory_format=torch.channels_last)
    return gy


def _conv_geometry(c):
    pad = c["padding"]
    if pad == "same":
        pad = [c["dilation"][i] * (c["kernel"][i] - 1) // 2 for i in range(2)]
    return list(c["stride"]), list(pad), list(c["dilation"]), c["groups"]


# ---- comparison ----------------------------------------------------------------------------------------
def _tiles(c):
    p = resolve(c["cfg"], seed=0, layer_key=0)
    if not p.tiled:
        return 1
    if c["kind"] == "conv":
        return len(tile_bounds(c["cin_g"], c["kernel"][0] * c["kernel"][1], p.tile_rows))
    return len(tile_bounds(c["fin"], 1, p.tile_rows))


def _assert_close(got, want, c, what, quant_step=0.0):
    rtol, atol, flips = TOL[c["dtype"]]
    assert got.shape == want.shape, (what, got.shape, want.shape)
    g, w = got.double(), want.double()
    assert torch.equal(torch.isnan(g), torch.isnan(w)), f"{what}: NaN pattern differs"
    scale = max(1.0, float(w.abs().max())) if w.numel() else 1.0
    d = (g - w).abs()
    bad = d > atol * scale + rtol * w.abs()
    if quant_step and bad.any():
        allowed = flips if flips >= 1 else max(2, int(flips * d.numel()))
        assert int(bad.sum()) <= allowed, f"{what}: {int(bad.sum())} of {d.numel()} elements differ"
        assert bool((d[bad] <= quant_step * 1.001 + atol * scale).all()), \
            f"{what}: max difference {float(d.max())} > one quantizer level {quant_step}"
        return
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {d.numel()} elements differ, max "
                           f"{float(d.max())} (scale {scale}) in {c['dtype']}")


def _assert_masks(got, want, c):
    assert got.shape == want.shape, ("out_mask", got.shape, want.shape)
    diff = got ^ want
    nbits = sum(bin(int(v) & 0xFFFFFFFF).count("1") for v in diff.reshape(-1).tolist())
    _, _, flips = TOL[c["dtype"]]
    allowed = flips if flips >= 1 or flips == 0 else max(2, int(flips * 32 * got.numel()))
    assert nbits <= allowed, f"out_mask: {nbits} bits differ"


def _op_args(c, x, w, b):
    p = resolve(c["cfg"], seed=c["seed"], layer_key=c["layer_key"])
    fp, ip = p.to_op_args()
    inst = c["instance"]
    inst = inst if isinstance(inst, torch.Tensor) else torch.tensor(inst, dtype=torch.int64)
    return fp, ip, inst


def _forward_op(c, x, w, b):
    fp, ip, inst = _op_args(c, x, w, b)
    if c["kind"] == "conv":
        return noisy_conv2d_op(x, w, b, *_conv_geometry(c), fp, ip, inst)
    return noisy_linear_op(x, w, b, fp, ip, inst)


def _backward_op(c, gy, x, w, mask, y_stride):
    fp, ip, inst = _op_args(c, x, w, None)
    if c["kind"] == "conv":
        return noisy_conv2d_backward_op(gy, x, w, *_conv_geometry(c), fp, ip, inst, mask, y_stride, True, True)
    return noisy_linear_backward_op(gy, x, w, fp, ip, inst, mask, y_stride, True, True)


def _public(c, x, w, b, gy):
    """y and (grad_x, grad_w, grad_b) through the public API and autograd."""
    xl, wl = x.detach().requires_grad_(), w.detach().requires_grad_()
    bl = None if b is None else b.detach().requires_grad_()
    kw = dict(config=c["cfg"], seed=c["seed"], layer_key=c["layer_key"], instance=c["instance"])
    if c["kind"] == "conv":
        y = noisy_conv2d(xl, wl, bl, c["stride"], c["padding"], c["dilation"], c["groups"], **kw)
    else:
        y = noisy_linear(xl, wl, bl, **kw)
    y.backward(gy)
    return y.detach(), xl.grad, wl.grad, None if bl is None else bl.grad


def _torch_public(c, x, w, b, gy):
    """As `_public` through torch's own F.conv2d / F.linear (what a clean config must equal)."""
    xl, wl = x.detach().requires_grad_(), w.detach().requires_grad_()
    bl = None if b is None else b.detach().requires_grad_()
    if c["kind"] == "conv":
        y = F.conv2d(xl, wl, bl, c["stride"], c["padding"], c["dilation"], c["groups"])
    else:
        y = F.linear(xl, wl, bl)
    y.backward(gy)
    return y.detach(), xl.grad, wl.grad, None if bl is None else bl.grad


def _same_layout(a, b) -> bool:
    """Equal strides on every dim of size > 1 (a size-1 dim's stride carries no layout)."""
    return all(sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()) if n > 1)


def check_backend_equals_reference(c, backend):
    x, w, b, g = _tensors(c)
    cfg = c["cfg"]
    step = 0.0
    if cfg.out_bits:
        step = (cfg.out_range[1] - cfg.out_range[0]) / ((1 << cfg.out_bits) - 1) * _tiles(c)
    with forced("reference"):
        y_r, m_r = _forward_op(c, x, w, b)
    with forced(backend):
        dispatch.reset_counts()
        y_b, m_b = _forward_op(c, x, w, b)
        fwd_ran = dispatch.last_backend("conv2d_fwd" if c["kind"] == "conv" else "linear_fwd")
    assert fwd_ran == backend
    _assert_close(y_b, y_r, c, "y", quant_step=step)
    if y_r.numel():  # (an empty tensor's strides carry no layout)
        assert _same_layout(y_b, y_r), ("y layout", y_b.stride(), y_r.stride())
    _assert_masks(m_b, m_r, c)
    # backward ops: same inputs and the reference's mask
    gy = _grad_like(y_r, c, g)
    gy_dense = gy.contiguous(memory_format=torch.channels_last) if (
        y_r.dim() == 4 and y_r.is_contiguous(memory_format=torch.channels_last)
        and not y_r.is_contiguous()) else gy.contiguous()
    with forced("reference"):
        gx_r, gw_r = _backward_op(c, gy_dense, x, w, m_r, list(y_r.stride()))
    with forced(backend):
        gx_b, gw_b = _backward_op(c, gy_dense, x, w, m_r, list(y_r.stride()))
    _assert_close(gx_b, gx_r, c, "grad_x")
    _assert_close(gw_b, gw_r, c, "grad_w")
    # the public API on the backend (autograd, drawn layouts) equals its own ops bit for bit
    with forced(backend):
        y_p, gx_p, gw_p, gb_p = _public(c, x, w, b, gy)
        gx_m, gw_m = _backward_op(c, gy_dense, x, w, m_b, list(y_b.stride()))
    if cfg.is_clean:  # the clean route is torch's own op, autograd included (torch's matmul picks
        # its folding by grad mode, so the op called without autograd may round differently)
        y_t, gx_t, gw_t, _ = _torch_public(c, x, w, b, gy)
        pairs = ((y_p, y_t), (gx_p, gx_t), (gw_p, gw_t))
    else:
        pairs = ((y_p, y_b), (gx_p, gx_m), (gw_p, gw_m))
    for got, want in pairs:
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    if b is not None:
        g64 = gy.to(torch.float64)
        want_gb = g64 if g64.dim() == 1 else g64.sum((0, 2, 3) if c["kind"] == "conv" else tuple(range(g64.dim() - 1)))
        _assert_close(gb_p, want_gb.to(b.dtype), c, "grad_b")
    if c["dtype"] == torch.float64:  # end to end against the reference's public API
        with forced("reference"):
            y_q, gx_q, gw_q, gb_q = _public(c, x, w, b, gy)
        for name, got, want in (("y", y_p, y_q), ("grad_x", gx_p, gx_q), ("grad_w", gw_p, gw_q)):
            _assert_close(got, want, c, "public " + name)


# ---- the noise stream: words and uniforms bit-identical ---------------------------------------------
def check_words(seed, layer_key, purpose, instance, start, n, backends):
    e = torch.arange(start, start + n, dtype=torch.int64)
    want = torch.stack(stream.counter_words(seed, layer_key, purpose, instance, e >> 2), -1)[
        torch.arange(n), e & 3]
    want_u = stream.uniforms_at(seed, layer_key, purpose, instance, e)
    if "cpu" in backends:
        from noisyops import _ext
        C = _ext.cpu()[0]
        got = C.stream_words(seed, layer_key, purpose, instance, start + n)[start:]
        assert torch.equal(got, want)
        assert torch.equal(C.stream_uniforms(seed, layer_key, purpose, instance, start + n)[start:], want_u)
    if "triton" in backends:
        from noisyops.kernels import stream as kstream
        words, unif, _ = kstream.stream_values(seed, layer_key, purpose, instance, start, n)
        assert torch.equal(words, want) and torch.equal(unif, want_u)


words_args = dict(seed=st.integers(0, 2**64 - 1), layer_key=st.integers(0, 2**30 - 1),
                  purpose=st.integers(0, 3), instance=st.integers(0, 2**63 - 1),  # ids are int64 (SPEC 2)
                  start=st.integers(0, 2**20), n=st.integers(1, 64))


# ---- fast profile (default run) ------------------------------------------------------------------------
needs_cpu = pytest.mark.skipif(not CPU_OK, reason="the C++ cpu backend is not built")
needs_triton = pytest.mark.skipif(not TRITON_OK, reason="needs triton with TRITON_INTERPRET=1")


@needs_cpu
@fast(60)
@given(conv_cases())
def test_fuzz_conv_cpu(case):
    check_backend_equals_reference(case, "cpu")


@needs_cpu
@fast(60)
@given(linear_cases())
def test_fuzz_linear_cpu(case):
    check_backend_equals_reference(case, "cpu")


@needs_triton
@fast(6)
@given(conv_cases(max_batch=2, max_hw=5, max_c=2, dtypes=TRITON_DTYPES))
def test_fuzz_conv_triton_interpreter(case):
    check_backend_equals_reference(case, "triton")


@needs_triton
@fast(6)
@given(linear_cases(max_batch=2, max_in=12, dtypes=TRITON_DTYPES))
def test_fuzz_linear_triton_interpreter(case):
    check_backend_equals_reference(case, "triton")


@fast(30)
@given(**words_args)
def test_fuzz_noise_words_identical(seed, layer_key, purpose, instance, start, n):
    check_words(seed, layer_key, purpose, instance, start, n,
                [b for b, ok in (("cpu", CPU_OK), ("triton", TRITON_OK)) if ok])


# ---- deep profile (-m slow, before a release) -----------------------------------------------------------
@pytest.mark.slow
@needs_cpu
@deep
@given(conv_cases())
def test_fuzz_conv_cpu_deep(case):
    check_backend_equals_reference(case, "cpu")


@pytest.mark.slow
@needs_cpu
@deep
@given(linear_cases())
def test_fuzz_linear_cpu_deep(case):
    check_backend_equals_reference(case, "cpu")


@pytest.mark.slow
@needs_triton
@settings(deep, max_examples=max(1, DEEP_EXAMPLES // 20))
@given(conv_cases(max_batch=2, max_hw=6, max_c=2, dtypes=TRITON_DTYPES))
def test_fuzz_conv_triton_interpreter_deep(case):
    check_backend_equals_reference(case, "triton")


@pytest.mark.slow
@needs_triton
@settings(deep, max_examples=max(1, DEEP_EXAMPLES // 20))
@given(linear_cases(max_batch=2, max_in=16, dtypes=TRITON_DTYPES))
def test_fuzz_linear_triton_interpreter_deep(case):
    check_backend_equals_reference(case, "triton")


@pytest.mark.slow
@deep
@given(**words_args)
def test_fuzz_noise_words_identical_deep(seed, layer_key, purpose, instance, start, n):
    check_words(seed, layer_key, purpose, instance, start, n,
                [b for b, ok in (("cpu", CPU_OK), ("triton", TRITON_OK)) if ok])
