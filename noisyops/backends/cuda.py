"""The ``cuda`` backend: CUDA pre-pass and quantizer kernels around cuDNN / cuBLAS products.

Forward (per call)::

    xq = Q(x; in)                                   CUDA quantizer kernel (x's dtype, x's layout)
    Wn[k] = Wq·(1 + eta_mul·ε'_k) + σ·ε_k           CUDA weight pre-pass, one row per distinct
                                                    instance k of the batch, in x's dtype
    y_t = conv2d / linear (xq[samples of k], Wn[k][:, tile t])    cuDNN / cuBLAS (+ bias when untiled)
    y   = Σ_t Q(y_t + out_noise·ε''_t; out) + b     CUDA output-tile kernel: noise, quantizer,
                                                    bit-packed STE mask, tile sum, bias

Backward: the same pre-pass regenerates Wn (or Wq with ``clean_grad_input``); the CUDA STE kernels
mask the gradient (output mask bits, input/weight ranges); torch's convolution backward
(``torch.nn.grad.conv2d_input`` / ``conv2d_weight``, cuDNN) or matmuls compute the gradients per
tile and instance. The backward products run in the input dtype (fp32 accumulate), as the forward
product: identical to the reference (which computes them in float32) for float32 inputs, within
half-precision tolerance for float16/bfloat16; sums over tiles/instances are float32.

RNG contract: identical to `noisyops.reference` (SPEC section 3): weight noise at the flat
row-major weight index, output noise at ``t·numel(y) + logical NCHW index`` with the sample's
instance id. Half inputs: quantizers and noise in float32, product in the input dtype. float64
inputs are declined (``NotImplemented``: the reference runs them).

Crossbar tiles are computed on channel slices of x and W (no masked copies of W); a tile's
partial sum equals the reference's masked-weight product up to float summation order.

`DEVICES` is ``("cuda",)``; the compiled kernels also accept CPU tensors (host loops over the
same ``__host__ __device__`` code), which is how tests on a machine without a GPU call the kernel
functions of this module directly. Importing this module never touches CUDA.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .. import _ext
from .. import reference as _reference
from . import gpu_cost
from ..params import PER_CALL, PER_INSTANCE, PER_SAMPLE, OpParams
from ..plan import CallPlan, conv2d_plan, linear_plan, memory_format_of

DEVICES = ("cuda",)
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Largest pre-pass batch (instances x weight elements) materialised at once (shared with the model).
MAX_PREPASS_ELEMENTS = gpu_cost.MAX_PREPASS_ELEMENTS


def available() -> Tuple[bool, str]:
    """``(True, what)`` when ``noisyops._C_cuda`` is built and a CUDA device exists, else why not."""
    mod, why = _ext.cuda()
    if mod is None:
        return False, why
    if not torch.cuda.is_available():
        return False, "no CUDA device (torch.cuda.is_available() is False); noisyops._C_cuda is built"
    return True, "noisyops._C_cuda: CUDA weight pre-pass and quantizers around cuDNN/cuBLAS"


def _C():
    mod, why = _ext.cuda()
    if mod is None:
        raise RuntimeError(why)
    return mod


# ---- geometry: what differs between conv and linear --------------------------------------------------
class _Geom:
    """Products, gradients and channel slicing of one layer type. ``c0:c1`` are input channels
    within a group (a crossbar tile); the full range is ``0:in_per_group``."""

    def __init__(self, product: Callable, grad_input: Callable, grad_weight: Callable, x_slice: Callable,
                 x_slice_view: Callable, in_per_group: int, kernel_numel: int, out_shape_info: Callable,
                 channel_dim: int, groups: int):
        self.product, self.grad_input, self.grad_weight = product, grad_input, grad_weight
        self.x_slice = x_slice            # x -> dense copy/view of its tile channels
        self.x_slice_view = x_slice_view  # x -> writable view of its tile channels
        self.in_per_group, self.kernel_numel = in_per_group, kernel_numel
        self.out_shape_info = out_shape_info  # y -> (channels, hw, channels_last)
        self.channel_dim, self.groups = channel_dim, groups
        self.grouped_product = self.grouped_grad_input = None  # conv only (chip-interleaved batches)

    def tile_shape(self, shape: Sequence[int], c0: int, c1: int) -> List[int]:
        """Shape of x restricted to the tile's input channels (every group)."""
        shape = list(shape)
        shape[self.channel_dim] = self.groups * (c1 - c0)
        return shape


def _conv_geom(weight, stride, padding, dilation, groups) -> _Geom:
    cin_g, kh, kw = weight.shape[1], weight.shape[2], weight.shape[3]

    def x_slice_view(x, c0, c1):
        if c0 == 0 and c1 == cin_g:
            return x
        return x.unflatten(1, (groups, cin_g))[:, :, c0:c1]

    def x_slice(x, c0, c1):
        if c0 == 0 and c1 == cin_g:
            return x
        return x_slice_view(x, c0, c1).flatten(1, 2).contiguous(memory_format=memory_format_of(x))

    def grad_input(shape, w, g):
        return torch.nn.grad.conv2d_input(shape, w, g, stride, padding, dilation, groups)

    def grad_weight(x, wshape, g):
        return torch.nn.grad.conv2d_weight(x, wshape, g, stride, padding, dilation, groups)

    def info(y):
        return y.shape[1], y.shape[2] * y.shape[3], memory_format_of(y) == torch.channels_last

    geom = _Geom(lambda x, w, b: F.conv2d(x, w, b, stride, padding, dilation, groups), grad_input, grad_weight,
                 x_slice, x_slice_view, cin_g, kh * kw, info, 1, groups)

    # Chip-interleaved batches (sample s on chip s mod K, NCHW): the K chips' convolutions are ONE
    # grouped convolution on free views, x [N, C, H, W] -> [N/K, K*C, H, W], Wn [K, Cout, ...] ->
    # [K*Cout, ...], groups*K; y [N/K, K*Cout, Ho, Wo] is y [N, Cout, Ho, Wo]. No gathers, no copies.
    def grouped_product(x, wn_all, b):
        K, cout = wn_all.shape[0], wn_all.shape[1]
        n, c, h, w = x.shape
        bg = b.repeat(K) if b is not None else None
        y = F.conv2d(x.view(n // K, K * c, h, w), wn_all.reshape((K * cout,) + tuple(wn_all.shape[2:])), bg,
                     stride, padding, dilation, groups * K)
        return y.view(n, cout, y.shape[2], y.shape[3])

    def grouped_grad_input(shape, wn_all, g):
        K, cout = wn_all.shape[0], wn_all.shape[1]
        n, c, h, w = shape
        gx = torch.nn.grad.conv2d_input((n // K, K * c, h, w),
                                        wn_all.reshape((K * cout,) + tuple(wn_all.shape[2:])),
                                        g.reshape(n // K, K * cout, g.shape[2], g.shape[3]),
                                        stride, padding, dilation, groups * K)
        return gx.view(n, c, h, w)

    geom.grouped_product, geom.grouped_grad_input = grouped_product, grouped_grad_input
    return geom


def _linear_geom(weight) -> _Geom:
    fin = weight.shape[1]

    def x_slice_view(x, c0, c1):
        return x if (c0 == 0 and c1 == fin) else x[..., c0:c1]

    def x_slice(x, c0, c1):
        return x if (c0 == 0 and c1 == fin) else x[..., c0:c1].contiguous()

    def grad_weight(x, wshape, g):
        return g.reshape(-1, g.shape[-1]).t() @ x.reshape(-1, x.shape[-1])

    return _Geom(lambda x, w, b: F.linear(x, w, b), lambda shape, w, g: (g @ w).reshape(shape), grad_weight,
                 x_slice, x_slice_view, fin, 1, lambda y: (y.shape[-1], 1, False), -1, 1)


# ---- building blocks ------------------------------------------------------------------------------
def _quantize(x: torch.Tensor, lo: float, hi: float, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """``Q(x; lo, hi, bits)`` cast to ``dtype`` by the CUDA quantizer kernel (x dense, layout kept)."""
    out = torch.empty_like(x, dtype=dtype)
    _C().quantize(x, out, lo, hi, bits)
    return out


def _count(samples) -> int:
    return samples.stop - samples.start if isinstance(samples, slice) else len(samples)


def _product_groups(plan: CallPlan, noisy: bool = True):
    """``([samples per group], instance ids int64 [K] on the device)``: the sample groups that
    share one weight copy. Without weight noise (or ``noisy=False``) one group, the whole batch.
    per_call / per_sample build the ids on the device (no host read); per_instance reads the chip
    ids on the host to group them (the one read this path keeps, docs/routing.md)."""
    p, n = plan.p, plan.batch
    if not (noisy and p.has_weight_noise) or p.sampling == PER_CALL:
        return [slice(0, n)], plan.instance.reshape(-1)[:1]
    if p.sampling == PER_SAMPLE:
        return [slice(s, s + 1) for s in range(n)], plan.prepass_ids()
    groups = plan.host_groups()
    ids = torch.tensor([i for i, _ in groups], dtype=torch.int64).to(plan.instance.device)
    return [samples for _, samples in groups], ids


def _prepass(weight, plan: CallPlan, inst: torch.Tensor, dtype, noisy=True) -> torch.Tensor:
    """The noisy weights of the instances ``inst`` (int64 [K], device) in one pre-pass:
    ``[K, *wshape]`` in ``dtype`` (``noisy=False``: Wq, clip + quantize only, K = 1)."""
    p = plan.p
    lo, hi = (plan.w_lo, plan.w_hi) if plan.w_lo is not None else (0.0, 0.0)
    return _weights_prepass(weight, p, inst, dtype, lo, hi, plan.sigma, noisy)


def _weights_prepass(weight, p: OpParams, inst: torch.Tensor, dtype, lo: float, hi: float,
                     sigma: float, noisy: bool = True) -> torch.Tensor:
    """The CUDA weight pre-pass: ``[K, *wshape]`` in ``dtype`` for the K instance ids ``inst``
    (int64, device: read there, no host sync); ``noisy=False`` or no weight noise: Wq, K = 1."""
    add, mul = noisy and p.eta > 0, noisy and p.eta_mul > 0
    w32 = weight.detach().to(torch.float32).contiguous()
    if not (add or mul):
        inst = inst[:1]
    out = torch.empty((inst.numel(),) + tuple(w32.shape), dtype=dtype, device=w32.device)
    _C().weight_prepass(w32, out, inst.contiguous(), p.seed, p.layer_key, lo, hi, sigma, p.eta_mul,
                        bool(p.w_clip), _w_bits(p, lo, hi), add, mul)
    return out


def noisy_weights_on_device(weight: torch.Tensor, p: OpParams, instance: torch.Tensor,
                            lo: float, hi: float) -> torch.Tensor:
    """``Wn`` of one call (the decomposition's pre-pass op on CUDA): `_weights_prepass` for the
    counter ``instance`` (0-d/1-element int64) on the device. Same shape and dtype as ``weight``;
    ``(lo, hi)`` the call's weight range. Noise index = flat row-major."""
    inst = instance.reshape(1).to(device=weight.device, dtype=torch.int64, non_blocking=True)
    return _weights_prepass(weight, p, inst, weight.dtype, lo, hi, p.sigma(lo, hi))[0]


def _w_bits(p: OpParams, lo: float, hi: float) -> int:
    """Weight quantizer bits for the pre-pass: off without a clip, and on the empty range (0, 0)
    of all-zero weights (the clamp alone; no 0/0 step), as `noisyops.reference.quantize`."""
    return p.w_bits if p.w_clip and (hi > lo or hi != hi) else 0


def _all_weights(weight, plan: CallPlan, inst: torch.Tensor, dtype) -> torch.Tensor:
    """The noisy weights of every instance of ``inst`` in one pre-pass (the interleaved-chip path)."""
    return _prepass(weight, plan, inst, dtype)


def _weights(weight, plan: CallPlan, inst: torch.Tensor, dtype, noisy: bool = True):
    """Yield ``(k, W_k)`` for ``k in range(K)``: the noisy weights of instance ``inst[k]`` in
    ``dtype`` (``noisy=False``: Wq). The pre-pass writes at most `MAX_PREPASS_ELEMENTS` weights at
    once; without noise Wq is instance-free (one pre-pass, or none when nothing changes W)."""
    p = plan.p
    K = inst.numel()
    if not (p.w_clip or (noisy and p.has_weight_noise)):
        w = weight.detach().to(dtype)
        for k in range(K):
            yield k, w
        return
    if not (noisy and p.has_weight_noise):
        wq = _prepass(weight, plan, inst, dtype, noisy=False)[0]
        for k in range(K):
            yield k, wq
        return
    chunk = max(1, MAX_PREPASS_ELEMENTS // max(1, weight.numel()))
    for start in range(0, K, chunk):
        out = _prepass(weight, plan, inst[start:start + chunk], dtype)
        for j in range(out.shape[0]):
            yield start + j, out[j]


def _interleaved_chips(geom: _Geom, plan: CallPlan, groups, x: torch.Tensor, w_numel: int,
                       noisy: bool = True) -> int:
    """K > 1 when one grouped conv can serve every chip: weight noise on, sample s in group
    ``s mod K`` (K groups), N divisible by K, x contiguous NCHW, one tile; else 0."""
    p = plan.p
    if (geom.grouped_product is None or plan.tiled or not (noisy and p.has_weight_noise)
            or not x.is_contiguous()):
        return 0
    K, n = len(groups), plan.batch
    if K < 2 or n % K or K * w_numel > MAX_PREPASS_ELEMENTS:
        return 0
    for k, samples in enumerate(groups):
        idx = list(range(samples.start, samples.stop)) if isinstance(samples, slice) else list(samples)
        if idx != list(range(k, n, K)):
            return 0
    return K


# ---- forward ---------------------------------------------------------------------------------
def _forward(geom: _Geom, plan: CallPlan, x, weight, bias):
    if x.dtype not in SUPPORTED_DTYPES:
        return NotImplemented
    p, fmt, cd = plan.p, plan.memory_format, torch.float32
    x = x.contiguous(memory_format=fmt)
    xq = _quantize(x, p.in_lo, p.in_hi, p.in_bits, x.dtype) if p.in_bits else x
    batch = x.shape[0]
    tiles = plan.tiles
    tiled = p.tiled
    fused_bias = None if tiled or bias is None else bias.to(x.dtype)

    parts: List[Optional[torch.Tensor]] = [None] * len(tiles)
    groups, inst = _product_groups(plan)
    K = _interleaved_chips(geom, plan, groups, xq, weight.numel())
    if K:
        parts[0] = geom.grouped_product(xq, _all_weights(weight, plan, inst, x.dtype), fused_bias)
    for k, wn in ([] if K else _weights(weight, plan, inst, x.dtype)):
        samples = groups[k]
        whole = _count(samples) == batch
        sel = xq if whole else xq[samples]
        for t, (c0, c1) in enumerate(tiles):
            w_t = wn if len(tiles) == 1 else wn[:, c0:c1]
            part = geom.product(geom.x_slice(sel, c0, c1), w_t, fused_bias)
            if whole:
                parts[t] = part
            else:
                if parts[t] is None:
                    parts[t] = part.new_empty((batch,) + tuple(part.shape[1:]))
                parts[t][samples] = part
    if not tiled:
        return parts[0].contiguous(memory_format=fmt), x.new_empty((0,), dtype=torch.int32)

    # partial sums stay in the product dtype: the output kernel reads them as float32 (exact widening)
    T = len(tiles)
    parts = [y_t.contiguous(memory_format=fmt) for y_t in parts]
    out = torch.empty_like(parts[0], dtype=x.dtype)
    acc = torch.empty_like(parts[0], dtype=cd) if T > 1 else out
    mask = (torch.empty(plan.mask_shape, dtype=torch.int32, device=x.device) if p.out_bits
            else x.new_empty((0,), dtype=torch.int32))
    channels, hw, channels_last = geom.out_shape_info(parts[0])
    bias32 = bias.to(cd).contiguous() if bias is not None else None
    # every sampling mode as per-sample ids built on the device (per_instance mode of the kernel:
    # instance = ids[s]), so the counter never comes back to the host
    ids_t = plan.sample_ids().contiguous()
    for t in range(T):
        _C().output_tile(parts[t], acc, out, mask[t] if p.out_bits else mask, bias32, t, t == 0, t == T - 1,
                         p.seed, p.layer_key, p.out_noise, p.out_lo, p.out_hi, p.out_bits, channels, hw, batch,
                         channels_last, PER_INSTANCE, 0, ids_t)
    return out, mask


# ---- backward --------------------------------------------------------------------------------
def _backward(geom: _Geom, plan: CallPlan, grad_y, x, weight, out_mask, y_stride,
              needs_input_grad: bool, needs_weight_grad: bool):
    if x.dtype not in SUPPORTED_DTYPES:
        return NotImplemented
    p, fmt, cd = plan.p, plan.memory_format, torch.float32
    x = x.contiguous(memory_format=fmt)
    dt = x.dtype  # products run in the input dtype (fp32 accumulate), masks and sums in float32
    # the gradient in y's storage order (the mask bits follow that order)
    if tuple(grad_y.stride()) == tuple(y_stride) and grad_y.dtype == dt:
        g = grad_y
    else:
        g = torch.empty_strided(tuple(grad_y.shape), tuple(y_stride), dtype=dt, device=grad_y.device)
        g.copy_(grad_y)
    batch = x.shape[0]
    tiles = plan.tiles
    if p.out_bits:
        g_tiles = []
        for t in range(len(tiles)):
            g_t = torch.empty_like(g)
            _C().ste_bits(g, out_mask[t].contiguous(), g_t)
            g_tiles.append(g_t)
    else:
        g_tiles = [g] * len(tiles)

    grad_x = grad_w = None
    if needs_input_grad:
        noisy = not p.clean_grad_input
        groups, inst = _product_groups(plan, noisy)
        K = _interleaved_chips(geom, plan, groups, x, weight.numel(), noisy)
        direct = len(tiles) == 1 and len(groups) == 1
        if K:
            grad_x = geom.grouped_grad_input(tuple(x.shape), _all_weights(weight, plan, inst, dt), g_tiles[0])
            direct = True
        elif not direct:
            grad_x = torch.zeros(x.shape, dtype=cd, device=x.device).contiguous(memory_format=fmt)
        for k, wn in ([] if K else _weights(weight, plan, inst, dt, noisy)):
            samples = groups[k]
            whole = _count(samples) == batch
            for (c0, c1), g_t in zip(tiles, g_tiles):
                w_t = wn if len(tiles) == 1 else wn[:, c0:c1]
                g_sel = g_t if whole else g_t[samples]
                shape = list(x.shape)
                if not whole:
                    shape[0] = _count(samples)
                if len(tiles) > 1:
                    shape = geom.tile_shape(shape, c0, c1)
                contrib = geom.grad_input(shape, w_t, g_sel)
                if direct:
                    grad_x = contrib.contiguous(memory_format=fmt)
                elif len(tiles) > 1:
                    _add_tile(geom, grad_x, contrib, c0, c1, None if whole else samples)
                elif whole:
                    grad_x += contrib
                else:
                    grad_x[samples] += contrib
        if p.in_bits:
            out = torch.empty_like(x)
            _C().ste_range(grad_x, x, out, p.in_lo, p.in_hi)
            grad_x = out
        else:
            grad_x = grad_x.to(dt)
    if needs_weight_grad:
        xq = _quantize(x, p.in_lo, p.in_hi, p.in_bits, dt) if p.in_bits else x
        if len(tiles) == 1:
            grad_w = geom.grad_weight(xq, tuple(weight.shape), g_tiles[0]).contiguous()
        else:
            grad_w = torch.zeros(weight.shape, dtype=cd, device=weight.device)
            for (c0, c1), g_t in zip(tiles, g_tiles):
                wshape = (weight.shape[0], c1 - c0) + tuple(weight.shape[2:])
                grad_w[:, c0:c1] += geom.grad_weight(geom.x_slice(xq, c0, c1), wshape, g_t)
        if p.w_clip:
            out = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
            _C().ste_range(grad_w, weight.detach().contiguous(), out, plan.w_lo, plan.w_hi)
            grad_w = out
        else:
            grad_w = grad_w.to(weight.dtype)
    return grad_x, grad_w


def _add_tile(geom: _Geom, grad_x, contrib, c0, c1, samples):
    """``grad_x[samples][tile channels] += contrib`` (contrib holds only the tile's channels)."""
    if samples is None:
        view = geom.x_slice_view(grad_x, c0, c1)
        view += contrib.reshape(view.shape) if contrib.shape != view.shape else contrib
        return
    sub = grad_x[samples]  # a view for a slice, a copy for an index list
    view = geom.x_slice_view(sub, c0, c1)
    view += contrib.reshape(view.shape) if contrib.shape != view.shape else contrib
    if not isinstance(samples, slice):
        grad_x[samples] = sub


# ---- the four kernels (signatures of noisyops.reference) --------------------------------------
def conv2d_fwd(x, weight, bias, stride, padding, dilation, groups, p: OpParams, instance, plan=None):
    """Noisy conv2d forward on the CUDA path; as `noisyops.reference.conv2d_fwd`."""
    if x.numel() == 0:  # an empty batch has no work: the reference's (empty) result
        return _reference.conv2d_fwd(x, weight, bias, stride, padding, dilation, groups, p, instance)
    plan = plan or conv2d_plan(x, weight, stride, padding, dilation, groups, p, instance)
    return _forward(_conv_geom(weight, stride, padding, dilation, groups), plan, x, weight, bias)


def conv2d_bwd(grad_y, x, weight, stride, padding, dilation, groups, p: OpParams, instance, out_mask,
               y_stride, needs_input_grad=True, needs_weight_grad=True, plan=None):
    """Straight-through backward on the CUDA path; as `noisyops.reference.conv2d_bwd`."""
    if x.numel() == 0:  # an empty batch has no work: the reference's (empty / zero) result
        return _reference.conv2d_bwd(grad_y, x, weight, stride, padding, dilation, groups, p, instance,
                                     out_mask, y_stride, needs_input_grad, needs_weight_grad)
    plan = plan or conv2d_plan(x, weight, stride, padding, dilation, groups, p, instance)
    return _backward(_conv_geom(weight, stride, padding, dilation, groups), plan, grad_y, x, weight,
                     out_mask, y_stride, needs_input_grad, needs_weight_grad)


def linear_fwd(x, weight, bias, p: OpParams, instance, plan=None):
    """Noisy linear forward on the CUDA path; as `noisyops.reference.linear_fwd` (1-D x = one sample)."""
    if x.numel() == 0:  # an empty batch has no work: the reference's (empty) result
        return _reference.linear_fwd(x, weight, bias, p, instance)
    plan = plan or linear_plan(x, weight, p, instance)
    if not plan.unbatched:
        return _forward(_linear_geom(weight), plan, x, weight, bias)
    out = _forward(_linear_geom(weight), plan, x.unsqueeze(0), weight, bias)
    return out if out is NotImplemented else (out[0].squeeze(0), out[1])


def linear_bwd(grad_y, x, weight, p: OpParams, instance, out_mask, y_stride, needs_input_grad=True,
               needs_weight_grad=True, plan=None):
    """Straight-through backward of `linear_fwd`; as `noisyops.reference.linear_bwd`."""
    if x.numel() == 0:  # an empty batch has no work: the reference's (empty / zero) result
        return _reference.linear_bwd(grad_y, x, weight, p, instance, out_mask, y_stride,
                                     needs_input_grad, needs_weight_grad)
    plan = plan or linear_plan(x, weight, p, instance)
    if plan.unbatched:
        grad_y, x = grad_y.unsqueeze(0), x.unsqueeze(0)
    out = _backward(_linear_geom(weight), plan, grad_y, x, weight, out_mask,
                    plan.batched_y_stride(y_stride), needs_input_grad, needs_weight_grad)
    if out is NotImplemented or not plan.unbatched:
        return out
    gx, gw = out
    return (gx.squeeze(0) if gx is not None else None), gw
