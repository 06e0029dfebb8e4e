"""The noisy ops as torch custom ops: schemas, fake tensors and autograd, in one place.

Four ops, all in the ``noisyops`` namespace:

* ``noisyops::noisy_conv2d(x, weight, bias, stride, padding, dilation, groups, fparams, iparams,
  instance) -> (y, out_mask)`` and its backward ``noisyops::noisy_conv2d_backward``;
* ``noisyops::noisy_linear(x, weight, bias, fparams, iparams, instance) -> (y, out_mask)`` and
  ``noisyops::noisy_linear_backward``.

``fparams``/``iparams`` are an `OpParams` flattened (`OpParams.to_op_args`). ``instance`` is an
int64 tensor: 0-d (the call counter, for ``per_call``/``per_sample``) or ``[N]`` (chip ids, for
``per_instance``); a tensor rather than an int so a module's advancing counter does not recompile
a ``torch.compile``d graph. ``out_mask`` is the bit-packed straight-through mask of the output
quantizer (`noisyops.reference.pack_mask`), empty when the quantizer is off.

``chip_weights`` (optional, forward ops only): ``[K, *weight.shape]`` noisy weights of the K
distinct per_instance chip ids in first-seen order, exactly as the op would generate them, made
and owned by the caller (`noisyops.chip_store`: the modules inside `noisyops.chips`). A backend may
use them instead of generating (the ``cpu`` backend does) or ignore them; the op keeps no cache.

The implementation of every op is `noisyops.dispatch.run`, which picks a backend (the pure-torch
reference serves every device; compiled backends are preferred where available). The backward op
regenerates the noise from ``(seed, layer_key, instance)``: nothing random is saved.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import dispatch
from .params import OpParams
from .plan import conv2d_plan, linear_plan, memory_format_of


def _mask_like(y: Tensor, mask_shape) -> Tensor:
    return y.new_empty(tuple(mask_shape), dtype=torch.int32)


def _dense(t: Tensor, fmt: torch.memory_format) -> Tensor:
    """``t`` made dense in memory format ``fmt`` (incoming grads may be expanded)."""
    return t.contiguous(memory_format=fmt)


# ---- conv2d -----------------------------------------------------------------------------------
@torch.library.custom_op("noisyops::noisy_conv2d", mutates_args=())
def noisy_conv2d_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int],
                    padding: Sequence[int], dilation: Sequence[int], groups: int,
                    fparams: Sequence[float], iparams: Sequence[int], instance: Tensor,
                    chip_weights: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    p = OpParams.from_op_args(fparams, iparams)
    plan = conv2d_plan(x, weight, stride, padding, dilation, groups, p, instance, chip_weights=chip_weights)
    return dispatch.run("conv2d_fwd", plan, x.device.type, x, weight, bias, list(stride), list(padding),
                        list(dilation), groups, p, instance)


@noisy_conv2d_op.register_fake
def _(x, weight, bias, stride, padding, dilation, groups, fparams, iparams, instance, chip_weights=None):
    plan = conv2d_plan(x, weight, stride, padding, dilation, groups,
                       OpParams.from_op_args(fparams, iparams), instance, measure=False)
    y = x.new_empty(plan.out_shape).contiguous(memory_format=plan.memory_format)
    return y, _mask_like(y, plan.mask_shape)


@torch.library.custom_op("noisyops::noisy_conv2d_backward", mutates_args=())
def noisy_conv2d_backward_op(grad_y: Tensor, x: Tensor, weight: Tensor, stride: Sequence[int],
                             padding: Sequence[int], dilation: Sequence[int], groups: int,
                             fparams: Sequence[float], iparams: Sequence[int], instance: Tensor,
                             out_mask: Tensor, y_stride: Sequence[int], needs_input_grad: bool,
                             needs_weight_grad: bool) -> Tuple[Tensor, Tensor]:
    p = OpParams.from_op_args(fparams, iparams)
    plan = conv2d_plan(x, weight, stride, padding, dilation, groups, p, instance)
    gx, gw = dispatch.run("conv2d_bwd", plan, x.device.type, grad_y, x, weight, list(stride), list(padding),
                          list(dilation), groups, p, instance, out_mask, list(y_stride),
                          needs_input_grad, needs_weight_grad)
    return (gx if gx is not None else x.new_empty(0)), (gw if gw is not None else weight.new_empty(0))


@noisy_conv2d_backward_op.register_fake
def _(grad_y, x, weight, stride, padding, dilation, groups, fparams, iparams, instance, out_mask,
      y_stride, needs_input_grad, needs_weight_grad):
    return (torch.empty_like(x) if needs_input_grad else x.new_empty(0),
            torch.empty_like(weight) if needs_weight_grad else weight.new_empty(0))


def _conv_setup_context(ctx, inputs, output):
    x, weight, bias, stride, padding, dilation, groups, fparams, iparams, instance, _chip_weights = inputs
    y, out_mask = output
    ctx.save_for_backward(x, weight, instance, out_mask)
    ctx.conv = (list(stride), list(padding), list(dilation), groups)
    ctx.memory_format = memory_format_of(x)
    ctx.params = (list(fparams), list(iparams))
    ctx.y_stride = list(y.stride())
    ctx.has_bias = bias is not None


def _conv_backward(ctx, grad_y, _grad_mask):
    x, weight, instance, out_mask = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.conv
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    grad_y = _dense(grad_y, ctx.memory_format)
    gx = gw = gb = None
    if need_x or need_w:
        gx, gw = noisy_conv2d_backward_op(grad_y, x, weight, stride, padding, dilation, groups,
                                          *ctx.params, instance, out_mask, ctx.y_stride,
                                          bool(need_x), bool(need_w))
        gx = gx if need_x else None
        gw = gw if need_w else None
    if ctx.has_bias and need_b:  # as F.conv2d's autograd computes it (bit for bit)
        gb = torch.ops.aten.convolution_backward(grad_y, x, weight, [weight.shape[0]], stride, padding,
                                                 dilation, False, [0, 0], groups, [False, False, True])[2]
    return gx, gw, gb, None, None, None, None, None, None, None, None


torch.library.register_autograd("noisyops::noisy_conv2d", _conv_backward, setup_context=_conv_setup_context)


# ---- linear -----------------------------------------------------------------------------------
@torch.library.custom_op("noisyops::noisy_linear", mutates_args=())
def noisy_linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], fparams: Sequence[float],
                    iparams: Sequence[int], instance: Tensor,
                    chip_weights: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    p = OpParams.from_op_args(fparams, iparams)
    return dispatch.run("linear_fwd", linear_plan(x, weight, p, instance, chip_weights=chip_weights),
                        x.device.type, x, weight, bias, p, instance)


@noisy_linear_op.register_fake
def _(x, weight, bias, fparams, iparams, instance, chip_weights=None):
    plan = linear_plan(x, weight, OpParams.from_op_args(fparams, iparams), instance, measure=False)
    y = x.new_empty(plan.out_shape)
    return y, _mask_like(y, plan.mask_shape)


@torch.library.custom_op("noisyops::noisy_linear_backward", mutates_args=())
def noisy_linear_backward_op(grad_y: Tensor, x: Tensor, weight: Tensor, fparams: Sequence[float],
                             iparams: Sequence[int], instance: Tensor, out_mask: Tensor,
                             y_stride: Sequence[int], needs_input_grad: bool,
                             needs_weight_grad: bool) -> Tuple[Tensor, Tensor]:
    p = OpParams.from_op_args(fparams, iparams)
    gx, gw = dispatch.run("linear_bwd", linear_plan(x, weight, p, instance), x.device.type, grad_y, x,
                          weight, p, instance, out_mask,
                          list(y_stride), needs_input_grad, needs_weight_grad)
    return (gx if gx is not None else x.new_empty(0)), (gw if gw is not None else weight.new_empty(0))


@noisy_linear_backward_op.register_fake
def _(grad_y, x, weight, fparams, iparams, instance, out_mask, y_stride, needs_input_grad,
      needs_weight_grad):
    return (torch.empty_like(x) if needs_input_grad else x.new_empty(0),
            torch.empty_like(weight) if needs_weight_grad else weight.new_empty(0))


def _linear_setup_context(ctx, inputs, output):
    x, weight, bias, fparams, iparams, instance, _chip_weights = inputs
    y, out_mask = output
    ctx.save_for_backward(x, weight, instance, out_mask)
    ctx.params = (list(fparams), list(iparams))
    ctx.y_stride = list(y.stride())
    ctx.has_bias = bias is not None


def _linear_backward(ctx, grad_y, _grad_mask):
    x, weight, instance, out_mask = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    grad_y = grad_y.contiguous()
    gx = gw = gb = None
    if need_x or need_w:
        gx, gw = noisy_linear_backward_op(grad_y, x, weight, *ctx.params, instance, out_mask,
                                          ctx.y_stride, bool(need_x), bool(need_w))
        gx = gx if need_x else None
        gw = gw if need_w else None
    if ctx.has_bias and need_b:
        gb = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
    return gx, gw, gb, None, None, None, None


torch.library.register_autograd("noisyops::noisy_linear", _linear_backward, setup_context=_linear_setup_context)


# ---- autocast ---------------------------------------------------------------------------------
# Under torch.autocast the forward ops run their product in the autocast dtype (bf16 / fp16): the
# floating inputs x, weight, bias are cast to it (float64 is left alone, as torch's own autocast
# does), above autograd, so gradients reach fp32 parameters in fp32. Noise and quantizers then
# run in the compute dtype the plan gives half inputs (float32, SPEC section 4); the output is in
# the autocast dtype, as F.conv2d / F.linear under autocast. A clean call is therefore exactly
# F.conv2d / F.linear under autocast. The backward ops run outside autocast (autograd's default),
# on the already-cast saved tensors.
AUTOCAST_DEVICES = ("cpu", "cuda")
_autocast_lib = torch.library.Library("noisyops", "IMPL")


def _autocast_kernel(op, device_type: str):
    key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    keyset = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

    def cast(a, dtype):
        if (isinstance(a, Tensor) and a.is_floating_point() and a.dtype != torch.float64
                and a.device.type == device_type):
            return a.to(dtype)
        return a

    def kernel(_keyset, *args):
        dtype = torch.get_autocast_dtype(device_type)
        with torch._C._ExcludeDispatchKeyGuard(keyset):
            return op(*(cast(a, dtype) for a in args))
    return key, kernel


for _name, _op in (("noisy_conv2d", noisy_conv2d_op), ("noisy_linear", noisy_linear_op)):
    for _dev in AUTOCAST_DEVICES:
        _key, _kernel = _autocast_kernel(_op._opoverload, _dev)
        _autocast_lib.impl(_name, _kernel, _key, with_keyset=True)
