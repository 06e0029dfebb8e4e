"""The eager fast path (`noisyops.eager`) against the custom-op path: bit-identical outputs and
gradients, and the path counts say which ran."""
import pytest
import torch

import noisyops
from noisyops import LayerConfig, dispatch, eager

Q = dict(w_range=(-1.0, 1.0), in_bits=8, in_range=(-3.0, 3.0), out_bits=8, out_range=(-8.0, 8.0))
CONFIGS = {"clean": LayerConfig(), "dac_adc": LayerConfig(eta=0.04, **Q),
           "tiles_noise": LayerConfig(eta=0.04, eta_mul=0.02, out_noise=0.05, tile_rows=18, **Q),
           "per_sample": LayerConfig(eta=0.04, sampling="per_sample", **Q)}


def _run(kind, cfg, on):
    torch.manual_seed(0)
    base = torch.nn.Conv2d(3, 4, 3, padding=1) if kind == "conv" else torch.nn.Linear(6, 5)
    m = noisyops.convert(torch.nn.Sequential(base), cfg, seed=3)[0]
    x = (torch.randn(2, 3, 6, 6) if kind == "conv" else torch.randn(2, 6)).requires_grad_()
    old, eager.ENABLED = eager.ENABLED, on
    dispatch.reset_counts()
    try:
        ys = [m(x) for _ in range(2)]
        sum(y.square().sum() for y in ys).backward()
    finally:
        eager.ENABLED = old
    paths = {p for (_, p) in dispatch.path_counts()}
    return [y.detach() for y in ys], x.grad, m.weight.grad, m.bias.grad, paths


@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_eager_equals_custom_op(backend_env, kind, name):
    backend_env("cpu")
    fast = _run(kind, CONFIGS[name], True)
    op = _run(kind, CONFIGS[name], False)
    assert fast[-1] == {"eager"} and op[-1] == {"custom_op"}
    for a, b in zip(fast[0], op[0]):
        assert torch.equal(a, b)
    for a, b in zip(fast[1:4], op[1:4]):
        assert torch.equal(a, b)
