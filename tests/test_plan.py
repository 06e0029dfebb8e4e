"""The call plan (`noisyops.plan`) and routing by construction (docs/routing.md).

* the plan's numbers (output shape / memory format, mask shape, tiles, weight range, instance ids);
* routes: clean / prepass / fused for every sampling mode × option;
* every option off: exactly F.conv2d / F.linear (forward and gradients, bit for bit) on every
  backend that runs here, forced or not — the triton backend under the interpreter in a subprocess.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from noisyops import LayerConfig, dispatch
from noisyops import functional as nf
from noisyops.params import PER_CALL, PER_INSTANCE, PER_SAMPLE, SAMPLE_STRIDE, OpParams, resolve
from noisyops.plan import conv2d_plan, linear_plan, route_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _p(cfg: LayerConfig) -> OpParams:
    return resolve(cfg, seed=3, layer_key=1)


def test_conv_plan_numbers():
    x = torch.randn(2, 4, 9, 8).contiguous(memory_format=torch.channels_last)
    w = torch.randn(6, 2, 3, 3)
    p = _p(LayerConfig(eta=0.1, w_range=(-1.0, 1.0), out_bits=4, out_range=(-2.0, 2.0), tile_rows=9))
    plan = conv2d_plan(x, w, [2, 1], [1, 0], [1, 1], 2, p, torch.tensor(7))
    assert plan.out_shape == (2, 6, 5, 6)
    assert plan.memory_format == torch.channels_last
    assert plan.out_strides == torch.empty(plan.out_shape).contiguous(memory_format=torch.channels_last).stride()
    assert plan.tiles == ((0, 1), (1, 2)) and plan.route == "fused"
    assert plan.mask_shape == (2, (2 * 6 * 5 * 6 + 31) // 32)
    assert (plan.w_lo, plan.w_hi) == (-1.0, 1.0) and plan.sigma == pytest.approx(0.2)
    assert plan.compute_dtype == torch.float32 and plan.product_dtype == torch.float32
    assert plan.sample_ids().tolist() == [7, 7]


def test_linear_plan_unbatched_strides():
    """One y_stride rule for a 1-D linear input (the cuda backend used to differ from the cpu one)."""
    p = _p(LayerConfig(out_bits=4, out_range=(-2.0, 2.0)))
    plan = linear_plan(torch.randn(5), torch.randn(3, 5), p, torch.tensor(0))
    assert plan.unbatched and plan.batch == 1 and plan.out_shape == (3,)
    assert plan.batched_y_stride((1,)) == (3, 1)
    plan2 = linear_plan(torch.randn(4, 2, 5), torch.randn(3, 5), p, torch.tensor(0))
    assert plan2.batched_y_stride((6, 3, 1)) == (6, 3, 1) and plan2.mask_shape == (1, 1)


def test_instance_ids_on_device_and_groups():
    x, w = torch.randn(3, 4), torch.randn(2, 4)
    ps = _p(LayerConfig(eta=0.1, sampling="per_sample"))
    plan = linear_plan(x, w, ps, torch.tensor(5))
    assert plan.sample_ids().tolist() == [5 * SAMPLE_STRIDE + s for s in range(3)]
    assert torch.equal(plan.prepass_ids(), plan.sample_ids())
    pi = _p(LayerConfig(eta=0.1, sampling="per_instance"))
    plan = linear_plan(x, w, pi, torch.tensor([4, 4, 9]))
    assert plan.host_groups() == [(4, slice(0, 2)), (9, slice(2, 3))]
    plan = linear_plan(x, w, pi, torch.tensor([4, 9, 4]))
    assert plan.host_groups() == [(4, [0, 2]), (9, slice(1, 2))]
    assert plan.host_ids() == [4, 9, 4]


@pytest.mark.parametrize("sampling", ["per_call", "per_sample", "per_instance"])
def test_routes(sampling):
    """The routing table of docs/routing.md."""
    base = LayerConfig(sampling=sampling)
    q = dict(in_bits=8, in_range=(-1.0, 1.0), out_bits=8, out_range=(-4.0, 4.0))
    assert route_of(_p(base), 1) == "clean"
    weight_noise = route_of(_p(base.replace(eta=0.04)), 1)
    assert weight_noise == ("fused" if sampling == "per_sample" else "prepass")
    assert route_of(_p(base.replace(eta_mul=0.04)), 1) == weight_noise
    assert route_of(_p(base.replace(**q)), 1) == "prepass"  # pointwise quantizers
    assert route_of(_p(base.replace(out_noise=0.1)), 1) == "prepass"  # untiled output noise
    assert route_of(_p(base.replace(w_range=(-1.0, 1.0))), 1) == "prepass"  # clip only
    assert route_of(_p(base.replace(eta=0.04, **q)), 4) == "fused"  # crossbar tiles
    assert route_of(_p(base.replace(tile_rows=16)), 1) == "clean"  # tiles without ADC change nothing


def _clean_grads(backend: str):
    """noisy ops with every option off against F.conv2d / F.linear: forward + three gradients."""
    os.environ["NOISYOPS_BACKEND"] = backend
    try:
        torch.manual_seed(0)
        for fmt in (torch.contiguous_format, torch.channels_last):
            x = torch.randn(2, 4, 9, 9).contiguous(memory_format=fmt)
            w, b = torch.randn(6, 2, 3, 3), torch.randn(6)
            args = [t.clone().requires_grad_() for t in (x, w, b)]
            want = [t.clone().requires_grad_() for t in (x, w, b)]
            y = nf.noisy_conv2d(*args, stride=2, padding=1, groups=2, config=LayerConfig(), seed=1)
            y2 = F.conv2d(*want, 2, 1, 1, 2)
            g = torch.randn_like(y2)
            y.backward(g)
            y2.backward(g)
            assert torch.equal(y, y2) and y.stride() == y2.stride(), (backend, fmt)
            for a, r in zip(args, want):
                assert torch.equal(a.grad, r.grad), (backend, fmt)
        for shape in ((3, 5, 7), (7,)):
            args = [torch.randn(*shape).requires_grad_(), torch.randn(4, 7).requires_grad_(),
                    torch.randn(4).requires_grad_()]
            want = [t.detach().clone().requires_grad_() for t in args]
            y = nf.noisy_linear(*args, config=LayerConfig(), seed=1)
            y2 = F.linear(*want)
            g = torch.randn_like(y2)
            y.backward(g)
            y2.backward(g)
            assert torch.equal(y, y2), (backend, shape)
            for a, r in zip(args, want):
                assert torch.equal(a.grad, r.grad), (backend, shape)
    finally:
        del os.environ["NOISYOPS_BACKEND"]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_clean_is_exactly_torch_forced(backend):
    dispatch.reset_counts()
    _clean_grads(backend)
    assert set(dispatch.route_counts()) == {(k, "clean") for k in dispatch.KERNELS}
    assert {b for _, b in dispatch.backend_counts()} == {backend}  # the forced backend ran it


def test_clean_is_exactly_torch_default_dispatch():
    dispatch.reset_counts()
    x, w = torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3)
    assert torch.equal(nf.noisy_conv2d(x, w, padding=1, config=LayerConfig(), seed=0),
                       F.conv2d(x, w, padding=1))
    assert dispatch.route_counts() == {("conv2d_fwd", "clean"): 1}


def test_noisy_calls_do_not_take_the_clean_route():
    dispatch.reset_counts()
    nf.noisy_linear(torch.randn(2, 4), torch.randn(3, 4), config=LayerConfig(eta=0.1), seed=0)
    nf.noisy_linear(torch.randn(2, 4), torch.randn(3, 4), seed=0,
                    config=LayerConfig(eta=0.1, out_bits=4, out_range=(-1.0, 1.0), tile_rows=2))
    assert dispatch.route_counts() == {("linear_fwd", "prepass"): 1, ("linear_fwd", "fused"): 1}


def test_clean_is_exactly_torch_forced_triton():
    """The forced triton backend (interpreter, own process: TRITON_INTERPRET must precede imports)."""
    pytest.importorskip("triton")
    code = textwrap.dedent("""
        import sys
        sys.path.insert(0, %r)
        sys.path.insert(0, %r)
        import test_plan
        from noisyops import dispatch
        test_plan._clean_grads("triton")
        assert {b for _, b in dispatch.backend_counts()} == {"triton"}, dispatch.backend_counts()
        print("ok")
    """ % (ROOT, os.path.join(ROOT, "tests")))
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("NOISYOPS_BACKEND", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0 and "ok" in out.stdout, out.stdout + out.stderr


def test_cuda_backend_unbatched_linear_matches_reference():
    """The 1-D linear input through the cuda backend's host build (CPU tensors) with an ADC: the
    plan's y_stride rule, and the mask / gradients of the reference."""
    from noisyops import reference as R
    from noisyops.backends import cuda
    mod = pytest.importorskip("noisyops._C_cuda")  # noqa: F841
    p = _p(LayerConfig(eta=0.05, out_bits=4, out_range=(-2.0, 2.0), tile_rows=3))
    x, w = torch.randn(7), torch.randn(5, 7) * 0.3
    inst = torch.tensor(2)
    yr, mr = R.linear_fwd(x, w, None, p, inst)
    yc, mc = cuda.linear_fwd(x, w, None, p, inst)
    torch.testing.assert_close(yc, yr, rtol=1e-5, atol=1e-5)
    assert torch.equal(mc, mr)
    g = torch.randn_like(yr)
    for a, r in zip(cuda.linear_bwd(g, x, w, p, inst, mc, list(yc.stride())),
                    R.linear_bwd(g, x, w, p, inst, mr, list(yr.stride()))):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)
