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


def _layer(kind, cfg):
    torch.manual_seed(0)
    base = torch.nn.Conv2d(3, 4, 3, padding=1) if kind == "conv" else torch.nn.Linear(6, 5)
    x = torch.randn(2, 3, 6, 6) if kind == "conv" else torch.randn(2, 6)
    return noisyops.convert(torch.nn.Sequential(base), cfg, seed=3), x


def _with_eager(on, fn):
    old, eager.ENABLED = eager.ENABLED, on
    dispatch.reset_counts()
    try:
        out = fn()
    finally:
        eager.ENABLED = old
    return out, {p for (_, p) in dispatch.path_counts()}


def _train(kind, cfg, on):
    model, x = _layer(kind, cfg)
    m, x = model[0], x.requires_grad_()

    def step():
        ys = [m(x) for _ in range(2)]
        sum(y.square().sum() for y in ys).backward()
        return [y.detach() for y in ys], x.grad, m.weight.grad, m.bias.grad
    return _with_eager(on, step)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_eager_equals_custom_op(backend_env, backend, kind, name):
    backend_env(backend)
    fast, fast_paths = _train(kind, CONFIGS[name], True)
    op, op_paths = _train(kind, CONFIGS[name], False)
    assert fast_paths == {"eager"} and op_paths == {"custom_op"}
    for a, b in zip(fast[0], op[0]):
        assert torch.equal(a, b)
    for a, b in zip(fast[1:], op[1:]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_eager_no_grad_and_chips_equal_custom_op(backend_env, kind):
    """No autograd node (no_grad) and the chips path (chip weights from the store) agree too."""
    backend_env("cpu")

    def evaluate():  # a fresh model each time: the call counter starts at 0
        model, x = _layer(kind, CONFIGS["dac_adc"])
        with torch.no_grad():
            plain = model(x)
            many = noisyops.run_chips(model, x, 3)
        return plain, many
    (p1, c1), fast_paths = _with_eager(True, evaluate)
    (p2, c2), op_paths = _with_eager(False, evaluate)
    assert fast_paths == {"eager"} and op_paths == {"custom_op"}
    assert torch.equal(p1, p2) and torch.equal(c1, c2)
    assert not torch.equal(c1[0], c1[1])  # the chips really differ


def test_eager_steps_aside_under_fake_tensors_and_autocast():
    """The fast path steps aside where something could observe the op (a dispatch mode, autocast)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    x, w = torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3)
    inst = torch.zeros((), dtype=torch.int64)
    assert eager.eligible(x, w, None, inst, None)
    with FakeTensorMode():
        assert not eager.eligible(x, w, None, inst, None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not eager.eligible(x, w, None, inst, None)
