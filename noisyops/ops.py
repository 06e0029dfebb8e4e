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

The implementation of every op is `noisyops.dispatch.run`, which picks a backend (the pure-torch
reference serves every device; compiled backends are preferred where available). The backward op
regenerates the noise from ``(seed, layer_key, instance)``: nothing random is saved.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import dispatch
from .params import OpParams, tile_bounds


def _tiles_in_mask(p: OpParams, in_per_group: int, kernel_numel: int) -> int:
    if not p.out_bits:
        return 0
    return len(tile_bounds(in_per_group, kernel_numel, p.tile_rows))


def _mask_like(y: Tensor, tiles: int) -> Tensor:
    if tiles == 0:
        return y.new_empty((0,), dtype=torch.int32)
    return y.new_empty((tiles, (y.numel() + 31) // 32), dtype=torch.int32)


def _memory_format(x: Tensor) -> torch.memory_format:
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _dense(t: Tensor, like: Tensor) -> Tensor:
    """``t`` made dense in the memory format of ``like`` (incoming grads may be expanded)."""
    return t.contiguous(memory_format=_memory_format(like))


# ---- conv2d -----------------------------------------------------------------------------------
@torch.library.custom_op("noisyops::noisy_conv2d", mutates_args=())
def noisy_conv2d_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int],
                    padding: Sequence[int], dilation: Sequence[int], groups: int,
                    fparams: Sequence[float], iparams: Sequence[int], instance: Tensor
                    ) -> Tuple[Tensor, Tensor]:
    p = OpParams.from_op_args(fparams, iparams)
    return dispatch.run("conv2d_fwd", x.device.type, x, weight, bias, list(stride), list(padding),
                        list(dilation), groups, p, instance)


@noisy_conv2d_op.register_fake
def _(x, weight, bias, stride, padding, dilation, groups, fparams, iparams, instance):
    p = OpParams.from_op_args(fparams, iparams)
    n, _, h, w = x.shape
    c_out, cin_g, kh, kw = weight.shape
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    y = x.new_empty((n, c_out, ho, wo)).contiguous(memory_format=_memory_format(x))
    return y, _mask_like(y, _tiles_in_mask(p, cin_g, kh * kw))


@torch.library.custom_op("noisyops::noisy_conv2d_backward", mutates_args=())
def noisy_conv2d_backward_op(grad_y: Tensor, x: Tensor, weight: Tensor, stride: Sequence[int],
                             padding: Sequence[int], dilation: Sequence[int], groups: int,
                             fparams: Sequence[float], iparams: Sequence[int], instance: Tensor,
                             out_mask: Tensor, y_stride: Sequence[int], needs_input_grad: bool,
                             needs_weight_grad: bool) -> Tuple[Tensor, Tensor]:
    p = OpParams.from_op_args(fparams, iparams)
    gx, gw = dispatch.run("conv2d_bwd", x.device.type, grad_y, x, weight, list(stride), list(padding),
                          list(dilation), groups, p, instance, out_mask, list(y_stride),
                          needs_input_grad, needs_weight_grad)
    return (gx if gx is not None else x.new_empty(0)), (gw if gw is not None else weight.new_empty(0))


@noisy_conv2d_backward_op.register_fake
def _(grad_y, x, weight, stride, padding, dilation, groups, fparams, iparams, instance, out_mask,
      y_stride, needs_input_grad, needs_weight_grad):
    return (torch.empty_like(x) if needs_input_grad else x.new_empty(0),
            torch.empty_like(weight) if needs_weight_grad else weight.new_empty(0))


def _conv_setup_context(ctx, inputs, output):
    x, weight, bias, stride, padding, dilation, groups, fparams, iparams, instance = inputs
    y, out_mask = output
    ctx.save_for_backward(x, weight, instance, out_mask)
    ctx.conv = (list(stride), list(padding), list(dilation), groups)
    ctx.params = (list(fparams), list(iparams))
    ctx.y_stride = list(y.stride())
    ctx.has_bias = bias is not None


def _conv_backward(ctx, grad_y, _grad_mask):
    x, weight, instance, out_mask = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.conv
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    grad_y = _dense(grad_y, x)
    gx = gw = gb = None
    if need_x or need_w:
        gx, gw = noisy_conv2d_backward_op(grad_y, x, weight, stride, padding, dilation, groups,
                                          *ctx.params, instance, out_mask, ctx.y_stride,
                                          bool(need_x), bool(need_w))
        gx = gx if need_x else None
        gw = gw if need_w else None
    if ctx.has_bias and need_b:
        gb = grad_y.sum(dim=(0, 2, 3))
    return gx, gw, gb, None, None, None, None, None, None, None


torch.library.register_autograd("noisyops::noisy_conv2d", _conv_backward, setup_context=_conv_setup_context)


# ---- linear -----------------------------------------------------------------------------------
@torch.library.custom_op("noisyops::noisy_linear", mutates_args=())
def noisy_linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], fparams: Sequence[float],
                    iparams: Sequence[int], instance: Tensor) -> Tuple[Tensor, Tensor]:
    p = OpParams.from_op_args(fparams, iparams)
    return dispatch.run("linear_fwd", x.device.type, x, weight, bias, p, instance)


@noisy_linear_op.register_fake
def _(x, weight, bias, fparams, iparams, instance):
    p = OpParams.from_op_args(fparams, iparams)
    y = x.new_empty(tuple(x.shape[:-1]) + (weight.shape[0],))
    return y, _mask_like(y, _tiles_in_mask(p, weight.shape[1], 1))


@torch.library.custom_op("noisyops::noisy_linear_backward", mutates_args=())
def noisy_linear_backward_op(grad_y: Tensor, x: Tensor, weight: Tensor, fparams: Sequence[float],
                             iparams: Sequence[int], instance: Tensor, out_mask: Tensor,
                             y_stride: Sequence[int], needs_input_grad: bool,
                             needs_weight_grad: bool) -> Tuple[Tensor, Tensor]:
    p = OpParams.from_op_args(fparams, iparams)
    gx, gw = dispatch.run("linear_bwd", x.device.type, grad_y, x, weight, p, instance, out_mask,
                          list(y_stride), needs_input_grad, needs_weight_grad)
    return (gx if gx is not None else x.new_empty(0)), (gw if gw is not None else weight.new_empty(0))


@noisy_linear_backward_op.register_fake
def _(grad_y, x, weight, fparams, iparams, instance, out_mask, y_stride, needs_input_grad,
      needs_weight_grad):
    return (torch.empty_like(x) if needs_input_grad else x.new_empty(0),
            torch.empty_like(weight) if needs_weight_grad else weight.new_empty(0))


def _linear_setup_context(ctx, inputs, output):
    x, weight, bias, fparams, iparams, instance = inputs
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
    return gx, gw, gb, None, None, None


torch.library.register_autograd("noisyops::noisy_linear", _linear_backward, setup_context=_linear_setup_context)
