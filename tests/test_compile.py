"""torch.compile on converted models: no graph breaks, no recompiles as counters advance, same
results as eager (forward and gradients).

The ``aot_eager`` backend traces exactly what inductor receives (dynamo + AOT autograd with the
custom ops' fake impls and autograd formulas) without running the C++ code generator, which
keeps these tests fast on a small shared CPU.
"""
import pytest
import torch
from torch import nn

import noisyops
from noisyops import LayerConfig

torch._dynamo.config.cache_size_limit = 64
CompileCounter = pytest.importorskip("torch._dynamo.testing").CompileCounterWithBackend

NOISY = LayerConfig(eta=0.05, eta_mul=0.02, w_range=2.0)


@pytest.fixture(autouse=True)
def _row_major_prepass_weights(monkeypatch):
    """Bit-for-bit comparisons with eager under ``aot_eager``: the pre-pass keeps row-major weights
    (with channels-last ones an NCHW input's conv takes oneDNN's channels-last path, whose float32
    sums round differently; tests/test_decomposition.py covers that option)."""
    monkeypatch.setattr(noisyops.decomposition, "CHANNELS_LAST_WEIGHTS", False)


def _pair(factory, cfg, seed=7):
    torch.manual_seed(0)
    base = factory()
    return noisyops.convert(base, cfg, seed=seed), noisyops.convert(base, cfg, seed=seed)


def _small_vit():
    tv = pytest.importorskip("torchvision.models.vision_transformer")
    m = tv.VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=32,
                             mlp_dim=64, num_classes=10)
    nn.init.normal_(m.heads.head.weight, std=0.05)
    return m


def test_compiled_matches_eager_without_recompiles():
    torch._dynamo.reset()
    eager, model = _pair(noisyops.models.lenet5, NOISY)
    cnt = CompileCounter("aot_eager")
    comp = torch.compile(model, backend=cnt, fullgraph=True)
    x = torch.randn(3, 1, 28, 28)
    outs = []
    for call in range(3):
        ye, yc = eager(x), comp(x)
        assert torch.equal(ye, yc), call
        assert int(model.conv1.calls) == call + 1  # the counter buffer advances under compile
        outs.append(yc)
    assert not torch.equal(outs[0], outs[1])  # and the noise follows it
    assert cnt.frame_count == 1  # one compile: the counter is a tensor, not a guarded constant
    eager(x).square().sum().backward()
    comp(x).square().sum().backward()
    for (n, pe), pc in zip(eager.named_parameters(), model.parameters()):
        assert torch.equal(pe.grad, pc.grad), n


def test_no_graph_breaks_in_resnet_and_vit():
    torch._dynamo.reset()
    for factory, x in [(noisyops.models.resnet20, torch.randn(1, 3, 32, 32)),
                       (_small_vit, torch.randn(2, 3, 16, 16))]:
        model = noisyops.convert(factory(), NOISY).eval()
        explained = torch._dynamo.explain(model)(x)
        assert explained.graph_break_count == 0, explained.break_reasons
        assert explained.graph_count == 1


def test_compiled_vit_matches_eager():
    torch._dynamo.reset()
    eager, model = _pair(_small_vit, NOISY)
    eager.eval(), model.eval()
    comp = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(eager(x), comp(x))


def test_compiled_per_instance_chip_ids():
    torch._dynamo.reset()
    cfg = NOISY.replace(sampling="per_instance")
    eager, model = _pair(noisyops.models.lenet5, cfg)
    ids = torch.tensor([0, 1, 1, 3])
    for m in (eager, model):
        for _, layer in noisyops.noisy_layers(m):
            layer.chip_ids = ids
    comp = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(eager(x), comp(x))
        assert int(model.conv1.calls) == 0


def test_inductor_saved_counter_is_not_the_buffer():
    """Inductor (default backend): forward AND input gradient equal eager. Regression: with
    ``inst = calls.clone(); calls += 1`` inductor saved the buffer itself for backward, so the
    backward regenerated the next call's noise."""
    torch._dynamo.reset()
    eager, model = _pair(lambda: nn.Sequential(nn.Linear(8, 4)), NOISY)
    comp = torch.compile(model, fullgraph=True)
    x = torch.randn(3, 8, requires_grad=True)
    ye, yc = eager(x), comp(x)
    assert torch.equal(ye, yc)
    gx_e, gw_e = torch.autograd.grad(ye.square().sum(), (x, eager[0].weight))
    gx_c, gw_c = torch.autograd.grad(yc.square().sum(), (x, model[0].weight))
    torch.testing.assert_close(gx_c, gx_e, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gw_c, gw_e, rtol=1e-6, atol=1e-7)
    assert int(model[0].calls) == 1


@pytest.mark.slow
def test_inductor_matches_eager():
    """The default backend (inductor, C++ codegen on CPU): about a minute on a busy 2-core box.

    Inductor sees the decomposed product (`noisyops.decomposition`) and lays the convolutions out
    channels-last (its layout optimisation, as for a clean model), so the products round
    differently: outputs are compared at float32 rounding. The noise itself is compared bit for
    bit in tests/test_decomposition.py."""
    torch._dynamo.reset()
    eager, model = _pair(noisyops.models.lenet5, NOISY)
    comp = torch.compile(model, fullgraph=True)
    x = torch.randn(2, 1, 28, 28)
    for _ in range(2):
        torch.testing.assert_close(comp(x), eager(x), rtol=1e-6, atol=1e-7)
    eager(x).square().sum().backward()
    comp(x).square().sum().backward()
    for pe, pc in zip(eager.parameters(), model.parameters()):
        torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-6, atol=1e-7)
