"""The noisy ops as a traceable decomposition, for ``torch.compile`` (inductor fuses the quantizers).

Eager calls run the opaque custom ops of `noisyops.ops`. Under ``torch.compile`` an opaque op hides
its pointwise quantizers from inductor, which then cannot fuse them into the neighbouring
batch-norm / ReLU / add kernels. `noisyops.functional.conv2d_with_params` / `linear_with_params`
therefore trace this decomposition instead, whenever `route` says it is exact:

    Wn, bounds = noisyops::noisy_weights(W, params, counter)   custom op: the backend's weight pre-pass
                                                                (clip, quantize, Philox noise), one copy,
                                                                written channels-last on the CPU (the
                                                                layout inductor's convolutions take)
    xq  = Q_in(x)                                               pointwise, STE: grad·[in_lo <= x <= in_hi]
    y   = aten.convolution(xq, Wn, b?) / aten.linear(xq, Wn, b?)
    y   = noisyops::add_output_noise(y, params, counter)       custom op: y + out_noise·ε'', ε'' the SPEC
                                                                section 3 stream (purpose 2, element =
                                                                flat row-major (NCHW) index of y)
    y   = Q_out(y) + b                                          pointwise, STE: grad·[out_lo <= y <= out_hi]

Backward (straight-through, SPEC section 1): ``aten.convolution``'s own backward gives the input
gradient through the saved ``Wn`` (the same noisy weights the eager backward regenerates) and the
weight gradient with respect to ``Wn``; the pre-pass's autograd passes that gradient to the clean
``W``, zeroed where the clip saturated (identity inside, also through ``w_bits`` and the noise).

RNG contract: ``Wn`` and the output noise come from the kernels the eager op uses on that device
(cpu backend: ``_C.cpu_noisy_weights_`` and ``_C.cpu_out_noise_``; float64 noise and other devices:
the pure-torch stream of `noisyops.stream`): bit-identical to eager wherever eager runs the cpu or
the reference backend; on CUDA the eager op's own kernels give the same words and uniforms, normals
within a few ulp (SPEC section 3; not run here, no GPU). The output noise
is a custom op rather than the stream traced into the graph because that measured cheaper on the
CPU (`output_noise_traced`, docs/compile_cpu.md).

Which calls take which path (`route`):

| call | path |
| --- | --- |
| ``per_call`` sampling, one product (no tiles, or tiles without ADC / output noise) | decomposed |
| ``per_sample`` / ``per_instance`` sampling (one weight draw per sample / chip) | opaque custom op |
| ``tile_rows`` splitting K into > 1 tile with ``out_bits`` or ``out_noise`` (an ADC per tile) | opaque custom op |
| ``clean_grad_input`` with weight noise (the input gradient must use the noise-free weights) | opaque custom op |

Set ``NOISYOPS_COMPILE_DECOMPOSE=0`` (read at import) or `ENABLED` = False to trace the opaque op
everywhere (for comparisons).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import dispatch, reference, stream
from .params import PER_CALL, OpParams, tile_bounds

ENABLED = os.environ.get("NOISYOPS_COMPILE_DECOMPOSE", "1").strip() not in ("0", "false", "no")

DECOMPOSED = "decomposed"

# True: the CPU pre-pass writes conv weights channels-last (`inductor_conv_channels_last`), so
# inductor's graph has no per-call layout copy of them (ResNet-18: 17 -> 1 layout-copy kernels). Off by
# default: side by side it measured no faster (docs/compile_cpu.md, 2026-12-06), and under backends
# that run eager kernels on the traced graph (``aot_eager``) an NCHW input's conv would take oneDNN's
# channels-last path, whose float32 sums round differently from eager's.
CHANNELS_LAST_WEIGHTS = False


def route(p: OpParams, in_channels_per_group: int, kernel_numel: int) -> str:
    """``"decomposed"`` when the traceable decomposition computes this call exactly, else the reason
    it keeps the opaque custom op (see the module docstring's table)."""
    if not ENABLED:
        return "opaque: NOISYOPS_COMPILE_DECOMPOSE=0"
    if p.sampling != PER_CALL:
        return "opaque: per_sample / per_instance sampling needs one weight draw per sample or chip"
    if p.tiled and len(tile_bounds(in_channels_per_group, kernel_numel, p.tile_rows)) > 1:
        return "opaque: crossbar tiles with an ADC or output noise per tile"
    if p.clean_grad_input and p.has_weight_noise:
        return "opaque: clean_grad_input (input gradient through the noise-free weights)"
    return DECOMPOSED


# ---- the weight pre-pass: a custom op (Philox noise stays in the backend's C++/CUDA kernel) --------
def _cpu_backend_runs(device_type: str) -> bool:
    """Whether eager calls on this device run the cpu backend (so the pre-pass must use its kernel)."""
    if device_type != "cpu":
        return False
    for name in dispatch.candidates(device_type):
        be = dispatch.backend(name)
        if be.status()[0] and device_type in be.devices():
            return name == "cpu"
    return False


@torch.library.custom_op("noisyops::noisy_weights", mutates_args=())
def noisy_weights_op(weight: Tensor, fparams: Sequence[float], iparams: Sequence[int],
                     instance: Tensor, channels_last: bool = False) -> Tuple[Tensor, Tensor]:
    """``Wn = Q_w(clip(W))·(1 + eta_mul·ε') + σ·ε`` for the call counter ``instance`` (0-d int64).

    Shapes: ``weight`` ``[C_out, C_in/groups, kh, kw]`` or ``[out, in]``; returns ``Wn`` (same shape,
    ``weight``'s dtype; contiguous, or channels-last for a 4-D weight with ``channels_last``) and
    ``bounds`` float64 ``[2]`` = the ``(w_lo, w_hi)`` of this call (fixed, or ``±w_std_k·std(W)``
    measured here). Element index = flat row-major index of W, whatever the layout.
    """
    fmt = _weight_format(weight, channels_last)
    p = OpParams.from_op_args(fparams, iparams)
    cd = reference.compute_dtype(weight.dtype)
    if weight.device.type == "cuda" and weight.dtype != torch.float64:
        from .backends import cuda as cuda_backend
        if cuda_backend.available()[0]:  # the CUDA pre-pass reads the counter on the device
            lo, hi = p.weight_range(weight)
            wn = cuda_backend.noisy_weights_on_device(weight, p, instance, lo, hi)
            return (_laid_out(wn, fmt),
                    torch.tensor([lo, hi], dtype=torch.float64, device=weight.device))
    counter = int(instance)
    if _cpu_backend_runs(weight.device.type):
        from .backends import cpu as cpu_backend
        lo, hi = p.weight_range(weight)
        ws = cpu_backend._Weights(weight, p, cd, weight.dtype, lo, hi, p.sigma(lo, hi))
        wn = ws.make_channels_last(counter) if fmt == torch.channels_last else ws.make([counter])[0]
    else:
        wq, sigma, _ = reference.weight_quantized(weight, p, cd)
        lo, hi = p.weight_range(weight)
        wn = reference.weight_noisy(wq, sigma, p, counter).to(weight.dtype)
    if wn.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr():
        wn = wn.clone()  # a custom op's output may not alias its input
    return _laid_out(wn, fmt), torch.tensor([lo, hi], dtype=torch.float64, device=weight.device)


def _weight_format(weight: Tensor, channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last and weight.dim() == 4 else torch.contiguous_format


def _laid_out(t: Tensor, fmt: torch.memory_format) -> Tensor:
    """``t`` with exactly the strides ``empty_like(t, memory_format=fmt)`` has (the fake's): where
    a layout is ambiguous (1x1 filters, one channel) ``contiguous(memory_format=...)`` keeps other
    strides, which would fail inductor's check of the op's output."""
    want = torch.empty_like(t, memory_format=fmt)
    return t if t.stride() == want.stride() else want.copy_(t)


@noisy_weights_op.register_fake
def _(weight, fparams, iparams, instance, channels_last=False):
    return (torch.empty_like(weight, memory_format=_weight_format(weight, channels_last)),
            weight.new_empty((2,), dtype=torch.float64))


def _noisy_weights_setup(ctx, inputs, output):
    weight, fparams, iparams = inputs[:3]
    ctx.clip = bool(OpParams.from_op_args(fparams, iparams).w_clip)
    ctx.format = (torch.channels_last if weight.dim() == 4 and not weight.is_contiguous()
                  and weight.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format)
    ctx.save_for_backward(weight if ctx.clip else None, output[1] if ctx.clip else None)


def _noisy_weights_backward(ctx, grad_wn, _grad_bounds):
    """Straight-through: ``grad_W = grad_Wn · [w_lo <= W <= w_hi]`` with the clip, else ``grad_Wn``;
    in ``W``'s layout (``Wn`` may be channels-last), so the gradient accumulates into ``W.grad``
    without another copy (under inductor the change of layout fuses into the mask)."""
    if not ctx.clip:
        return grad_wn.contiguous(memory_format=ctx.format), None, None, None, None
    weight, bounds = ctx.saved_tensors
    cd = reference.compute_dtype(weight.dtype)
    w = weight.to(cd)
    b = bounds.to(cd)
    inside = (w >= b[0]) & (w <= b[1])
    grad_w = torch.where(inside, grad_wn, torch.zeros_like(grad_wn))
    return grad_w.contiguous(memory_format=ctx.format), None, None, None, None


torch.library.register_autograd("noisyops::noisy_weights", _noisy_weights_backward,
                                setup_context=_noisy_weights_setup)


def noisy_weights(weight: Tensor, p: OpParams, instance: Tensor, channels_last: bool = False) -> Tensor:
    """The call's noisy (or only clipped/quantized) weights; ``weight`` itself when nothing changes it.
    ``channels_last``: a 4-D weight comes laid out channels-last (`noisy_weights_op`)."""
    if not (p.has_weight_noise or p.w_clip):
        return weight
    fparams, iparams = p.to_op_args()
    wn, _ = noisy_weights_op(weight, fparams, iparams, instance, channels_last)
    return wn


def inductor_conv_channels_last(x: Tensor) -> bool:
    """Whether inductor will run the convolutions of a graph with this input channels-last: on the CPU
    with oneDNN, its layout optimisation always does (``GraphLowering.decide_layout_opt``) and
    otherwise copies every conv weight to that layout on each call. The pre-pass then writes the noisy
    weights in that layout itself. Elsewhere (CUDA: a per-graph heuristic) False. Read at import
    (``torch.backends.mkldnn`` flags set later are not seen; the layout is then only a copy less or
    more, never a different result)."""
    return CHANNELS_LAST_WEIGHTS and x.device.type == "cpu" and _MKLDNN_CPU


# read once: dynamo does not trace torch.backends.mkldnn's functions (a graph break per conv)
_MKLDNN_CPU = bool(torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)


# ---- pointwise quantizer with the straight-through estimator ---------------------------------------
class QuantizeSTE(torch.autograd.Function):
    """``Q(v; lo, hi, bits)`` (`noisyops.reference.quantize`) whose gradient is
    ``grad · [lo <= v <= hi]`` (zero where it saturated, identity inside). Pointwise both ways, so
    inductor fuses it into the neighbouring kernels."""

    @staticmethod
    def forward(v: Tensor, lo: float, hi: float, bits: int) -> Tensor:
        return reference.quantize(v, lo, hi, bits)

    @staticmethod
    def setup_context(ctx, inputs, output):
        v, lo, hi, _ = inputs
        ctx.lo, ctx.hi = lo, hi
        ctx.save_for_backward(v)

    @staticmethod
    def backward(ctx, grad):
        (v,) = ctx.saved_tensors
        inside = reference.in_range_mask(v, ctx.lo, ctx.hi)
        return torch.where(inside, grad, torch.zeros_like(grad)), None, None, None


# True: on the CPU a quantizer whose input needs a gradient runs as an activation-checkpoint region
# (`torch.utils.checkpoint`, non-reentrant), so under torch.compile the backward keeps its input ``v``
# (or what ``v`` is recomputed from) and recomputes ``Q(v)`` and the STE mask inside its fused
# kernels. Without it AOT's partitioner saves the cheapest tensors by bytes: bool masks computed in
# the forward (the STE's ``lo <= v <= hi`` and the preceding ReLU's ``v <= 0``, since ``v`` itself is
# not needed once ``Q(v)`` is), and inductor's C++ backend stores bool tensors ~20x slower than float
# ones (docs/compile_cpu.md, 2026-12-06). Same values and gradients either way; GPUs (Triton stores
# bools at full speed) keep the partitioner's choice.
RECOMPUTE_STE = True


def quantize_ste(v: Tensor, lo: float, hi: float, bits: int) -> Tensor:
    """`QuantizeSTE` computed in the spec's compute dtype (float32, float64 for float64 ``v``),
    returned in that dtype; identity for ``bits = 0``. On the CPU with `RECOMPUTE_STE`, wrapped in a
    non-reentrant checkpoint (same result, the backward recomputes instead of saving masks)."""
    if bits <= 0:
        return v
    cd = reference.compute_dtype(v.dtype)
    if RECOMPUTE_STE and v.requires_grad and v.device.type == "cpu":
        return torch.utils.checkpoint.checkpoint(QuantizeSTE.apply, v.to(cd), lo, hi, bits, use_reentrant=False)
    return QuantizeSTE.apply(v.to(cd), lo, hi, bits)


def output_noise_traced(y: Tensor, p: OpParams, instance: Tensor) -> Tensor:
    """``out_noise·ε''`` for an untiled output ``y`` (any shape, any layout) in pure torch: float32
    normals of the stream ``(seed, layer_key, purpose 2, instance = counter, element = flat
    row-major index of y)``, in ``y``'s dtype. Traceable (inductor fuses the Philox rounds into the
    consumer of ``y``), but on the CPU slower than `add_output_noise_op` (docs/compile_cpu.md), so the
    decomposition does not use it; kept for that comparison and for devices without a kernel."""
    element = torch.arange(y.numel(), dtype=torch.int64, device=y.device).view(y.shape)
    eps = stream.normals_at(p.seed, p.layer_key, stream.PURPOSE_OUT, instance, element)
    return p.out_noise * eps.to(y.dtype)


@torch.library.custom_op("noisyops::add_output_noise", mutates_args=())
def add_output_noise_op(y: Tensor, fparams: Sequence[float], iparams: Sequence[int],
                        instance: Tensor) -> Tensor:
    """``y + out_noise·ε''`` for an untiled ``per_call`` output ``y`` (float32/float64, dense, 1- to
    sample index = dim 0), ``instance`` the 0-d call counter. The stream is SPEC section 3's
    (purpose 2, element = flat row-major index of y within the batch, tile 0), written by the eager
    op's own kernel on the cpu backend (``_C.cpu_out_noise_``; float64 from the torch stream, as
    eager), else by the torch stream. Autograd: identity."""
    p = OpParams.from_op_args(fparams, iparams)
    out = y.clone()
    if _cpu_backend_runs(y.device.type) and y.dtype == torch.float32 and y.dim() >= 1:
        from .backends import cpu as cpu_backend
        # as the eager op lays it out: samples along dim 0 (a 1-D linear output is one sample)
        view = out.view(1, -1) if out.dim() == 1 else out if out.dim() <= 4 else out.view(out.shape[0], -1)
        ids = instance.reshape(1).expand(view.shape[0]).contiguous()
        cpu_backend._C().cpu_out_noise_(view, ids, 0, p.out_noise, p.seed, p.layer_key)
        return out
    element = torch.arange(y.numel(), dtype=torch.int64, device=y.device).view(y.shape)
    eps = stream.normals_at(p.seed, p.layer_key, stream.PURPOSE_OUT, instance.cpu(), element.cpu())
    return out.add_(p.out_noise * eps.to(device=y.device, dtype=y.dtype))


@add_output_noise_op.register_fake
def _(y, fparams, iparams, instance):
    return torch.empty_like(y)


torch.library.register_autograd("noisyops::add_output_noise", lambda ctx, g: (g, None, None, None),
                                setup_context=lambda ctx, inputs, output: None)


# ---- the decomposed layers ----------------------------------------------------------------------------
# The bias is fused into the product (so the forward equals the eager op's fused-bias product bit for
# bit). A conv's bias gradient is then aten's conv backward's, as the eager op's; a linear's is the
# broadcast sum of grad_y, as the eager op computes it: ``y = conv(x, W, b.detach()) + (b − b.detach())``
# (the second term is exactly 0 in the forward; inductor folds it into the consumer of y).
def _value(bias: Optional[Tensor]) -> Optional[Tensor]:
    return None if bias is None else bias.detach()


def _bias_grad_path(bias: Tensor) -> Tensor:
    return bias - bias.detach()


def _epilogue(y: Tensor, bias: Optional[Tensor], bias_view, p: OpParams, instance: Tensor,
              out_dtype: torch.dtype) -> Tensor:
    """Output noise, ADC and bias of the product ``y`` (bias not yet added), as the eager op."""
    cd = reference.compute_dtype(out_dtype)
    y = y.to(cd)
    if p.out_noise > 0:
        fparams, iparams = p.to_op_args()
        y = add_output_noise_op(y, fparams, iparams, instance)
    if p.out_bits:
        y = quantize_ste(y, p.out_lo, p.out_hi, p.out_bits)
    if bias is not None:
        y = y + bias_view(bias.to(cd))
    return y.to(out_dtype)


def conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding, dilation, groups: int,
           p: OpParams, instance: Tensor) -> Tensor:
    """The noisy conv2d (SPEC section 1) as traceable ops; only for calls `route` accepts.

    Shapes: ``x [N, C_in, H, W]``, ``weight [C_out, C_in/groups, kh, kw]``, ``bias [C_out]`` or
    None, ``instance`` 0-d int64 (the call counter). Returns ``[N, C_out, H', W']``.
    """
    xq = quantize_ste(x, p.in_lo, p.in_hi, p.in_bits).to(x.dtype) if p.in_bits else x
    wn = noisy_weights(weight, p, instance, channels_last=inductor_conv_channels_last(x))
    if not (p.out_bits or p.out_noise > 0):
        # the eager op's bias gradient is aten's conv backward's own (bit for bit), as here
        return F.conv2d(xq, wn, bias, stride, padding, dilation, groups)
    y = F.conv2d(xq, wn, None, stride, padding, dilation, groups)
    return _epilogue(y, bias, lambda b: b.view(1, -1, 1, 1), p, instance, x.dtype)


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], p: OpParams, instance: Tensor) -> Tensor:
    """The noisy linear (SPEC section 1) as traceable ops; only for calls `route` accepts.

    Shapes: ``x [*, in]``, ``weight [out, in]``, ``bias [out]`` or None, ``instance`` 0-d int64.
    Returns ``[*, out]``.
    """
    xq = quantize_ste(x, p.in_lo, p.in_hi, p.in_bits).to(x.dtype) if p.in_bits else x
    wn = noisy_weights(weight, p, instance)
    if not (p.out_bits or p.out_noise > 0):
        y = F.linear(xq, wn, _value(bias))
        return y if bias is None else y + _bias_grad_path(bias)
    y = F.linear(xq, wn, None)
    return _epilogue(y, bias, lambda b: b, p, instance, x.dtype)
