"""The traceable decomposition that ``torch.compile`` sees (`noisyops.decomposition`): which calls
take it, and that compiled and eager give the same noise, outputs and gradients on the cpu backend.

``aot_eager`` runs the traced graph (dynamo + AOT autograd, the decomposition's autograd formulas)
with eager kernels, so it must match the eager op exactly; inductor (C++ codegen) reorders sums in
the batch-norm backward, so its gradients are compared with float32 tolerances.
"""
import pytest
import torch
from torch import nn

import noisyops
from noisyops import LayerConfig, decomposition, dispatch, stream
from noisyops.functional import noisy_conv2d, noisy_linear
from noisyops.params import resolve

torch._dynamo.config.cache_size_limit = 64

ADC_DAC = LayerConfig(eta=0.04, in_bits=8, in_range=(-1.5, 1.5), out_bits=8, out_range=(-2.0, 2.0))
CLIP_MUL = LayerConfig(eta=0.05, eta_mul=0.03, w_range=(-0.2, 0.2), w_bits=6)
STD_RANGE = LayerConfig(eta=0.05, w_range=2.0, in_bits=6, in_range=(-1.0, 1.0))
OUT_NOISE = LayerConfig(eta=0.02, out_noise=0.05)
OUT_NOISE_ADC = LayerConfig(out_noise=0.05, out_bits=8, out_range=(-2.0, 2.0))
TILES_NO_ADC = LayerConfig(eta=0.04, tile_rows=9, in_bits=8, in_range=(-1.5, 1.5))
CONFIGS = {"adc_dac": ADC_DAC, "clip_mul": CLIP_MUL, "std_range": STD_RANGE, "out_noise": OUT_NOISE,
           "out_noise_adc": OUT_NOISE_ADC, "tiles_no_adc": TILES_NO_ADC}


def _route(cfg, cin_g=4, k=9):
    return decomposition.route(resolve(cfg, seed=1, layer_key=0), cin_g, k)


def test_route_table():
    assert _route(ADC_DAC) == decomposition.DECOMPOSED
    assert _route(OUT_NOISE_ADC) == decomposition.DECOMPOSED
    assert _route(TILES_NO_ADC) == decomposition.DECOMPOSED  # tiles change nothing without an ADC
    assert _route(ADC_DAC.replace(tile_rows=512), cin_g=4) == decomposition.DECOMPOSED  # one tile
    assert _route(ADC_DAC.replace(clean_grad_input=True, eta=0.0)) == decomposition.DECOMPOSED
    assert "per_sample" in _route(ADC_DAC.replace(sampling="per_sample"))
    assert "per_instance" in _route(ADC_DAC.replace(sampling="per_instance"))
    assert "tiles" in _route(ADC_DAC.replace(tile_rows=9))
    assert "tiles" in _route(OUT_NOISE.replace(tile_rows=9))
    assert "clean_grad_input" in _route(ADC_DAC.replace(clean_grad_input=True))


def _graph_ops(fn, *args):
    """The call targets of the FX graph dynamo hands to its backend."""
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return seen


def test_compiled_graph_is_decomposed_or_opaque_as_routed():
    x, w = torch.randn(2, 4, 6, 6), torch.randn(5, 4, 3, 3)
    decomposed = _graph_ops(lambda x, w: noisy_conv2d(x, w, config=ADC_DAC, seed=3, instance=2), x, w)
    assert any("noisyops.noisy_weights" in t for t in decomposed), decomposed
    assert any("conv2d" in t for t in decomposed) and not any("noisy_conv2d" in t for t in decomposed)
    opaque = _graph_ops(lambda x, w: noisy_conv2d(x, w, config=ADC_DAC.replace(tile_rows=9), seed=3,
                                                  instance=2), x, w)
    assert any("noisyops.noisy_conv2d" in t for t in opaque), opaque
    clean = _graph_ops(lambda x, w: noisy_conv2d(x, w, config=LayerConfig(), seed=3), x, w)
    assert not any("noisyops" in t for t in clean), clean  # every option off: plain F.conv2d


# gradients: summation order differs (eager sums the bias gradient itself; aten's conv backward
# sums it in its own order), so they are compared to the dtype's rounding, outputs bit for bit
GRAD_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-14)}


def _grads(y, inputs):
    """Gradients for the upstream gradient ``randn(y.shape)`` (by index, whatever ``y``'s layout:
    compiled convs on the CPU may return channels-last where eager returns NCHW)."""
    torch.manual_seed(5)
    return torch.autograd.grad((y * torch.randn(y.shape, dtype=y.dtype)).sum(), inputs)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_conv_aot_eager_equals_eager(name, layout, monkeypatch):
    """Exact with the pre-pass writing row-major weights (eager's conv algorithm; NCHW inputs with
    channels-last weights take oneDNN's channels-last path: `test_conv_aot_eager_channels_last_weights`)."""
    monkeypatch.setattr(decomposition, "CHANNELS_LAST_WEIGHTS", False)
    cfg = CONFIGS[name]
    torch.manual_seed(0)
    x = torch.randn(3, 4, 7, 7, requires_grad=True)
    w = (0.15 * torch.randn(6, 4, 3, 3)).requires_grad_()
    b = torch.randn(6, requires_grad=True)
    xin = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x

    def f(x, w, b, inst):
        return noisy_conv2d(x, w, b, 2, 1, config=cfg, seed=11, layer_key=4, instance=inst)

    torch._dynamo.reset()
    comp = torch.compile(f, backend="aot_eager", fullgraph=True)
    for inst in (torch.tensor(0), torch.tensor(9)):
        dispatch.reset_counts()
        ye = f(xin, w, b, inst)
        assert dispatch.last_backend() == "cpu"
        yc = comp(xin, w, b, inst)
        assert torch.equal(ye, yc)
        for ge, gc in zip(_grads(ye, (x, w, b)), _grads(yc, (x, w, b))):
            torch.testing.assert_close(gc, ge, **GRAD_TOL[gc.dtype])


@pytest.mark.parametrize("name", ["adc_dac", "clip_mul"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_conv_aot_eager_channels_last_weights(name, layout, monkeypatch):
    """``CHANNELS_LAST_WEIGHTS``: the noisy weights come channels-last; the traced graph
    run on eager kernels equals the eager op to float32 rounding of the product (bit for bit after
    the ADC where it quantizes), gradients included; ``W.grad`` keeps ``W``'s layout."""
    monkeypatch.setattr(decomposition, "CHANNELS_LAST_WEIGHTS", True)
    cfg = CONFIGS[name]
    torch.manual_seed(0)
    x = torch.randn(3, 4, 7, 7, requires_grad=True)
    w = (0.15 * torch.randn(6, 4, 3, 3)).requires_grad_()
    b = torch.randn(6, requires_grad=True)
    xin = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x

    def f(x, w, b, inst):
        return noisy_conv2d(x, w, b, 2, 1, config=cfg, seed=11, layer_key=4, instance=inst)

    torch._dynamo.reset()
    comp = torch.compile(f, backend="aot_eager", fullgraph=True)
    ye, yc = f(xin, w, b, torch.tensor(3)), comp(xin, w, b, torch.tensor(3))
    torch.testing.assert_close(yc, ye, rtol=1e-5, atol=1e-5)
    grads_c = _grads(yc, (x, w, b))
    for ge, gc in zip(_grads(ye, (x, w, b)), grads_c):
        torch.testing.assert_close(gc, ge, **GRAD_TOL[gc.dtype])
    assert grads_c[1].stride() == w.stride()


@pytest.mark.parametrize("name", ["adc_dac", "clip_mul", "out_noise", "out_noise_adc"])
@pytest.mark.parametrize("shape", [(5,), (2, 5), (2, 3, 5), (2, 1, 1, 3, 5)])
def test_linear_aot_eager_equals_eager(name, shape):
    cfg = CONFIGS[name]
    torch.manual_seed(1)
    x = torch.randn(*shape, requires_grad=True)
    w = (0.3 * torch.randn(4, 5)).requires_grad_()
    b = torch.randn(4, requires_grad=True)

    def f(x, w, b):
        return noisy_linear(x, w, b, config=cfg, seed=2 ** 40 + 3, layer_key=7, instance=5)

    torch._dynamo.reset()
    ye, yc = f(x, w, b), torch.compile(f, backend="aot_eager", fullgraph=True)(x, w, b)
    assert torch.equal(ye, yc)
    for ge, gc in zip(_grads(ye, (x, w, b)), _grads(yc, (x, w, b))):
        torch.testing.assert_close(gc, ge, **GRAD_TOL[gc.dtype])


def test_float64_decomposition_equals_eager():
    torch.manual_seed(2)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    w = (0.2 * torch.randn(4, 3, 3, 3, dtype=torch.float64)).requires_grad_()
    cfg = CLIP_MUL.replace(out_noise=0.03, out_bits=8, out_range=(-1.0, 1.0))

    def f(x, w):
        return noisy_conv2d(x, w, None, 1, 1, config=cfg, seed=9, instance=1)

    torch._dynamo.reset()
    ye, yc = f(x, w), torch.compile(f, backend="aot_eager", fullgraph=True)(x, w)
    assert torch.equal(ye, yc)
    for ge, gc in zip(_grads(ye, (x, w)), _grads(yc, (x, w))):
        torch.testing.assert_close(gc, ge, **GRAD_TOL[gc.dtype])


def test_noisy_weights_op_bits_and_straight_through_gradient():
    """The pre-pass writes the eager op's noisy weights bit for bit; its gradient is the clip mask."""
    torch.manual_seed(3)
    w = (0.15 * torch.randn(6, 4, 3, 3)).requires_grad_()
    p = resolve(CLIP_MUL, seed=21, layer_key=2)
    wn, bounds = decomposition.noisy_weights_op(w, *p.to_op_args(), torch.tensor(4))
    from noisyops.backends import cpu as cpu_backend
    lo, hi = p.weight_range(w)
    ws = cpu_backend._Weights(w, p, torch.float32, torch.float32, lo, hi, p.sigma(lo, hi))
    assert torch.equal(wn, ws.make([4])[0])
    assert tuple(bounds.tolist()) == (-0.2, 0.2)
    g = torch.randn_like(w)
    (gw,) = torch.autograd.grad((wn * g).sum(), w)
    inside = (w.detach() >= -0.2) & (w.detach() <= 0.2)
    assert 0 < int((~inside).sum()) and torch.equal(gw, torch.where(inside, g, torch.zeros_like(g)))
    torch.library.opcheck(decomposition.noisy_weights_op, (w, *p.to_op_args(), torch.tensor(4)))
    y = torch.randn(2, 3, 4, 4, requires_grad=True)
    q = resolve(OUT_NOISE, seed=21, layer_key=2)
    torch.library.opcheck(decomposition.add_output_noise_op, (y, *q.to_op_args(), torch.tensor(4)))


def test_traced_output_noise_words_identical():
    """The pure-torch output-noise stream compiled by inductor: words and uniforms identical to the
    eager stream, normals within a few float32 ulp of the C++ kernel the decomposition uses."""
    elem = torch.arange(4 * 1031, dtype=torch.int64)
    inst = torch.tensor(2 ** 33 + 5)
    words = torch.compile(lambda e, i: torch.stack(stream.counter_words(3, 7, stream.PURPOSE_OUT, i, e >> 2)),
                          fullgraph=True)
    torch._dynamo.reset()
    assert torch.equal(words(elem, inst), torch.stack(stream.counter_words(3, 7, stream.PURPOSE_OUT, inst, elem >> 2)))
    p = resolve(LayerConfig(out_noise=1.0), seed=3, layer_key=7)
    y = torch.zeros(2, 3, 5, 7)
    traced = torch.compile(lambda y, i: decomposition.output_noise_traced(y, p, i), fullgraph=True)(y, inst)
    op = decomposition.add_output_noise_op(y, *p.to_op_args(), inst)
    torch.testing.assert_close(traced, op, rtol=1e-5, atol=1e-6)


def _small_net(cfg, seed=7):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    return noisyops.convert(base, cfg, seed=seed), noisyops.convert(base, cfg, seed=seed)


def test_inductor_train_step_matches_eager():
    """Inductor (C++ codegen): the noise and the forward equal eager bit for bit (the quantizers
    compile to the same float32 operations); gradients within float32 summation-order tolerance."""
    eager, model = _small_net(ADC_DAC.replace(out_noise=0.02))
    torch._dynamo.reset()
    comp = torch.compile(model, fullgraph=True)
    x = torch.randn(4, 3, 8, 8)
    for call in range(2):
        ye, yc = eager(x), comp(x)
        torch.testing.assert_close(yc, ye, rtol=1e-5, atol=1e-5)
        ye.square().sum().backward()
        yc.square().sum().backward()
        for (n, pe), pc in zip(eager.named_parameters(), model.parameters()):
            torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-4, atol=1e-5, msg=n)
            pe.grad = pc.grad = None
    assert int(model[0].calls) == 2


def test_inductor_quantizer_kernels_are_vectorised():
    """Inductor's C++ kernels that hold a quantizer (forward) or its straight-through mask
    (backward) run fully vectorised: no scalar fallback loop (``tmpbuf_out[i] = ...``), which is
    what ``torch.isinf`` compiled to inside every fused kernel (noisyops uses ``|v| == inf``)."""
    from torch._inductor.utils import run_and_get_code
    _, model = _small_net(ADC_DAC)
    torch._dynamo.reset()
    comp = torch.compile(model, fullgraph=True)
    x = torch.randn(4, 3, 8, 8)

    def step():
        comp(x).square().sum().backward()

    _, codes = run_and_get_code(step)
    code = "\n".join(codes)
    assert ".round()" in code, "no vectorised quantizer in the generated code"
    assert "tmpbuf_out[i] =" not in code, [line.strip() for line in code.splitlines()
                                            if "tmpbuf_out[i] =" in line]


@pytest.mark.parametrize("shape", [(6, 4, 3, 3), (40, 7, 3, 3), (64, 3, 7, 7), (16, 8, 1, 1),
                                   (12, 1, 3, 3), (130, 33, 3, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_noisy_weights_op_channels_last_same_values(shape, dtype):
    """``channels_last=True``: the same noisy weights bit for bit (element index = flat row-major
    index of W, SPEC section 3), laid out with exactly the strides of the fake (channels-last, also
    where that layout is ambiguous: 1x1 filters, one input channel); blocks of the kernel that
    straddle filters (40·7·9 > 1024) included. float64 takes the converted path."""
    torch.manual_seed(5)
    w = (0.15 * torch.randn(shape, dtype=dtype)).requires_grad_()
    p = resolve(CLIP_MUL, seed=21, layer_key=2)
    args = (w, *p.to_op_args(), torch.tensor(4))
    flat, b_flat = decomposition.noisy_weights_op(*args)
    cl, b_cl = decomposition.noisy_weights_op(*args, True)
    assert flat.is_contiguous()
    assert cl.stride() == torch.empty_like(w, memory_format=torch.channels_last).stride()
    assert torch.equal(cl, flat) and torch.equal(b_cl, b_flat)
    g = torch.randn(shape, dtype=dtype)
    (g_cl,) = torch.autograd.grad((cl * g).sum(), w)
    (g_flat,) = torch.autograd.grad((flat * g).sum(), w)
    assert torch.equal(g_cl, g_flat) and g_cl.stride() == w.stride()
    if shape == (40, 7, 3, 3):
        torch.library.opcheck(decomposition.noisy_weights_op, args + (True,))


def test_inductor_convs_take_the_pre_pass_weights_without_a_copy(monkeypatch):
    """On the CPU inductor runs convolutions channels-last; the pre-pass writes the noisy weights in
    that layout, so the compiled graph has no layout-copy kernel for them (each was a
    ``transpose_mxn`` kernel per conv per call). Input already channels-last: no transpose at all."""
    from torch._inductor.utils import run_and_get_code
    assert not decomposition.inductor_conv_channels_last(torch.empty(1))  # off by default
    monkeypatch.setattr(decomposition, "CHANNELS_LAST_WEIGHTS", True)
    assert decomposition.inductor_conv_channels_last(torch.empty(1))
    _, model = _small_net(ADC_DAC)
    torch._dynamo.reset()
    comp = torch.compile(model, fullgraph=True)
    x = torch.randn(4, 3, 8, 8).to(memory_format=torch.channels_last)
    with torch.no_grad():
        _, codes = run_and_get_code(comp, x)
    code = "\n".join(codes)
    assert "torch.ops.noisyops.noisy_weights" in code
    assert "transpose_mxn" not in code


@pytest.mark.parametrize("recompute", [True, False])
def test_inductor_train_forward_saves_no_bool_masks(recompute, monkeypatch):
    """`RECOMPUTE_STE` (default on the CPU): the compiled train step's forward allocates no bool
    masks for the backward (the partitioner keeps the quantizer inputs and the backward recomputes
    the STE and ReLU masks); off, the partitioner saves them as bools. Gradients equal eager's."""
    import re
    from torch._inductor.utils import run_and_get_code
    monkeypatch.setattr(decomposition, "RECOMPUTE_STE", recompute)
    eager, model = _small_net(ADC_DAC)
    torch._dynamo.reset()
    comp = torch.compile(model, fullgraph=True)
    x = torch.randn(4, 3, 8, 8)

    def step():
        comp(x).square().sum().backward()

    _, codes = run_and_get_code(step)
    forward = codes[0][codes[0].find("def call("):]
    bools = len(re.findall(r"empty_strided_cpu\([^\n]*torch\.bool\)", forward))
    assert (bools == 0) if recompute else (bools > 0), bools
    eager(x).square().sum().backward()
    for (n, pe), pc in zip(eager.named_parameters(), model.parameters()):
        torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-4, atol=1e-5, msg=n)
    torch._dynamo.reset()
