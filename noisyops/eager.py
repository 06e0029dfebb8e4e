"""The eager fast path of the noisy ops: the same plan and backend kernels, without the custom-op
machinery around them (issue 12 item 3, per-call overhead).

The custom ops of `noisyops.ops` are what ``torch.compile``, fake tensors, ``opcheck``, export,
vmap and tensor subclasses see; in plain eager mode their dispatch (``torch.library``'s Python
wrappers, ``fill_defaults``, the generated autograd function, a redispatch per op, and a second
plan for the backward op) costs several hundred µs per call on a tiny layer. When a call is
`eligible` (below), `noisyops.functional.conv2d_with_params` / ``linear_with_params`` run it here
instead:

    plan = conv2d_plan(x, weight, ..., chip_weights)         built once per call (its layout-
                                                             derived part once per layout)
    y, out_mask = dispatch.run("conv2d_fwd", plan, ...)      the op's forward, same arguments
    backward: dispatch.run("conv2d_bwd", plan, ...)          the op's backward, the forward's plan
              bias gradient: aten.convolution_backward       as the op's autograd formula

i.e. exactly the kernels the custom op runs, on the same arguments, so outputs, out masks,
gradients and noise words are bit-identical (tests/test_eager.py compares both paths). The
backward reuses the forward's plan instead of building a second one (the same plan: the backward
op rebuilds it from the same saved ``x`` / ``weight`` / ``instance``, without ``chip_weights``,
which are dropped here too). Without a gradient to record (``torch.no_grad``, inference mode, or
no input requiring grad) the forward kernel is called directly, without an autograd node.

A call is eligible when nothing could observe the difference: not compiling, not tracing
(``torch.jit``), no Python dispatch mode (fake tensors, functionalization, proxy tracing,
``opcheck``'s modes) and no ``__torch_function__`` mode, no functorch transform (vmap, grad),
no autocast (the op's autocast kernel casts the inputs; those calls take the op), plain tensors
(``torch.Tensor`` / ``nn.Parameter``, no subclass) on a ``cpu`` or ``cuda`` device.
``NOISYOPS_EAGER=0`` (read at import) or ``noisyops.eager.ENABLED = False`` turns the fast path
off: every call takes the custom op (for comparisons).

Which path ran is counted: `noisyops.dispatch.path_counts` (``{(kernel, "eager" | "custom_op"):
calls}``), next to the backend counts. Under ``torch.profiler`` the fast path records a
``noisyops::noisy_conv2d (eager)`` / ``noisyops::noisy_linear (eager)`` range (and
``..._backward (eager)``), so traces still name the op. A ``create_graph=True`` backward takes the
backward custom op, as the op's autograd formula does (which has no double backward either).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

import torch
from torch import Tensor

from . import dispatch
from .params import OpParams
from .plan import CallPlan, conv2d_plan_cached, linear_plan_cached

_PLAIN = (Tensor, torch.nn.Parameter)
_DEVICES = ("cpu", "cuda")
_record = torch.autograd.profiler.record_function
_profiling = torch.autograd._profiler_enabled
_grad_enabled = torch.is_grad_enabled
_is_compiling = torch.compiler.is_compiling
_is_tracing = torch.jit.is_tracing
_dispatch_modes = torch._C._len_torch_dispatch_stack
_function_modes = torch._C._len_torch_function_stack
_functorch_level = torch._C._functorch.peek_interpreter_stack
_any_autocast = torch._C._is_any_autocast_enabled


# False: every call takes the custom op (``NOISYOPS_EAGER=0`` at import; tests and benchmarks set it).
ENABLED = os.environ.get("NOISYOPS_EAGER", "1").strip() != "0"


def eligible(x: Tensor, weight: Tensor, bias: Optional[Tensor], instance: Tensor,
             chip_weights: Optional[Tensor]) -> bool:
    """Whether this call may bypass the custom op (see the module docstring). Reads no value."""
    if (_is_compiling() or _is_tracing() or _dispatch_modes() or _function_modes()
            or _functorch_level() is not None or _any_autocast()):
        return False
    if type(x) not in _PLAIN or type(weight) not in _PLAIN or type(instance) is not Tensor:
        return False
    if (bias is not None and type(bias) not in _PLAIN) or (
            chip_weights is not None and type(chip_weights) is not Tensor):
        return False
    return ENABLED and x.device.type in _DEVICES


def _needs_graph(*tensors) -> bool:
    return _grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _backward_plan(plan: CallPlan) -> CallPlan:
    """The plan the backward op would build: the forward's, without the caller's chip weights."""
    return plan if plan.chip_weights is None else dataclasses.replace(plan, chip_weights=None)


def _dense(t: Tensor, fmt: torch.memory_format) -> Tensor:
    """``t`` made dense in ``fmt``, as `noisyops.ops` does with incoming gradients."""
    return t.contiguous(memory_format=fmt)


# ---- conv2d -----------------------------------------------------------------------------------
def _conv_fwd(plan: CallPlan, x, weight, bias, stride, padding, dilation, groups, p, instance):
    return dispatch.run("conv2d_fwd", plan, x.device.type, x, weight, bias, stride, padding,
                        dilation, groups, p, instance, path="eager")


class _Conv2d(torch.autograd.Function):
    """The noisy conv with the op's autograd formula (`noisyops.ops._conv_backward`)."""

    @staticmethod
    def forward(ctx, x, weight, bias, plan, instance, geometry):
        stride, padding, dilation, groups = geometry
        y, out_mask = _conv_fwd(plan, x, weight, bias, stride, padding, dilation, groups, plan.p,
                                instance)
        ctx.save_for_backward(x, weight, instance, out_mask)
        ctx.plan, ctx.geometry = plan, geometry
        ctx.y_stride = list(y.stride())
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, instance, out_mask = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geometry
        plan = ctx.plan
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        prof = _profiling()
        rec = _record("noisyops::noisy_conv2d_backward (eager)") if prof else None
        if rec is not None:
            rec.__enter__()
        try:
            grad_y = _dense(grad_y, plan.memory_format)
            gx = gw = gb = None
            if need_x or need_w:
                if _grad_enabled():  # create_graph: the backward op, as the op's formula
                    from .ops import noisy_conv2d_backward_op
                    gx, gw = noisy_conv2d_backward_op(grad_y, x, weight, stride, padding, dilation,
                                                      groups, *plan.p.to_op_args(), instance,
                                                      out_mask, ctx.y_stride, bool(need_x), bool(need_w))
                else:
                    gx, gw = dispatch.run("conv2d_bwd", _backward_plan(plan), x.device.type, grad_y, x,
                                          weight, stride, padding, dilation, groups, plan.p, instance,
                                          out_mask, ctx.y_stride, bool(need_x), bool(need_w),
                                          path="eager")
                gx = gx if need_x else None
                gw = gw if need_w else None
            if ctx.has_bias and need_b:  # as F.conv2d's autograd computes it (bit for bit)
                gb = torch.ops.aten.convolution_backward(grad_y, x, weight, [weight.shape[0]], stride,
                                                         padding, dilation, False, [0, 0], groups,
                                                         [False, False, True])[2]
        finally:
            if rec is not None:
                rec.__exit__(None, None, None)
        return gx, gw, gb, None, None, None


def conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: list, padding: list,
           dilation: list, groups: int, p: OpParams, instance: Tensor,
           chip_weights: Optional[Tensor] = None) -> Tensor:
    """``noisyops::noisy_conv2d(...)[0]`` for an `eligible` call, bit for bit (module docstring).
    ``stride`` / ``padding`` / ``dilation``: lists of two ints, as the op takes them."""
    rec = _record("noisyops::noisy_conv2d (eager)") if _profiling() else None
    if rec is not None:
        rec.__enter__()
    try:
        plan = conv2d_plan_cached(x, weight, stride, padding, dilation, groups, p, instance,
                                  chip_weights=chip_weights)
        if not _needs_graph(x, weight, bias):
            return _conv_fwd(plan, x, weight, bias, stride, padding, dilation, groups, p, instance)[0]
        return _Conv2d.apply(x, weight, bias, plan, instance, (stride, padding, dilation, groups))
    finally:
        if rec is not None:
            rec.__exit__(None, None, None)


# ---- linear -----------------------------------------------------------------------------------
def _linear_fwd(plan: CallPlan, x, weight, bias, p, instance):
    return dispatch.run("linear_fwd", plan, x.device.type, x, weight, bias, p, instance, path="eager")


class _Linear(torch.autograd.Function):
    """The noisy linear with the op's autograd formula (`noisyops.ops._linear_backward`)."""

    @staticmethod
    def forward(ctx, x, weight, bias, plan, instance):
        y, out_mask = _linear_fwd(plan, x, weight, bias, plan.p, instance)
        ctx.save_for_backward(x, weight, instance, out_mask)
        ctx.plan = plan
        ctx.y_stride = list(y.stride())
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, instance, out_mask = ctx.saved_tensors
        plan = ctx.plan
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        prof = _profiling()
        rec = _record("noisyops::noisy_linear_backward (eager)") if prof else None
        if rec is not None:
            rec.__enter__()
        try:
            grad_y = grad_y.contiguous()
            gx = gw = gb = None
            if need_x or need_w:
                if _grad_enabled():  # create_graph: the backward op, as the op's formula
                    from .ops import noisy_linear_backward_op
                    gx, gw = noisy_linear_backward_op(grad_y, x, weight, *plan.p.to_op_args(), instance,
                                                      out_mask, ctx.y_stride, bool(need_x), bool(need_w))
                else:
                    gx, gw = dispatch.run("linear_bwd", _backward_plan(plan), x.device.type, grad_y, x,
                                          weight, plan.p, instance, out_mask, ctx.y_stride,
                                          bool(need_x), bool(need_w), path="eager")
                gx = gx if need_x else None
                gw = gw if need_w else None
            if ctx.has_bias and need_b:
                gb = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
        finally:
            if rec is not None:
                rec.__exit__(None, None, None)
        return gx, gw, gb, None, None


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], p: OpParams, instance: Tensor,
           chip_weights: Optional[Tensor] = None) -> Tensor:
    """``noisyops::noisy_linear(...)[0]`` for an `eligible` call, bit for bit (module docstring)."""
    rec = _record("noisyops::noisy_linear (eager)") if _profiling() else None
    if rec is not None:
        rec.__enter__()
    try:
        plan = linear_plan_cached(x, weight, p, instance, chip_weights=chip_weights)
        if not _needs_graph(x, weight, bias):
            return _linear_fwd(plan, x, weight, bias, p, instance)[0]
        return _Linear.apply(x, weight, bias, plan, instance)
    finally:
        if rec is not None:
            rec.__exit__(None, None, None)
