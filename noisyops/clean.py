"""The ``clean`` route: a call with every option off is exactly ``F.conv2d`` / ``F.linear``.

`noisyops.dispatch` runs these for a plan whose route is ``clean`` (`noisyops.plan.is_clean`), on
whichever backend was chosen or forced: forward ``F.conv2d`` / ``F.linear`` (bit for bit what torch
computes), backward ``aten.convolution_backward`` / the two matmuls of ``F.linear``'s autograd.
Signatures are those of the four kernels (`noisyops.reference`), plus the plan.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .plan import CallPlan


def _no_mask(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty((0,), dtype=torch.int32)


def conv2d_fwd(plan: CallPlan, x, weight, bias, *_):
    """``F.conv2d(x, weight, bias, ...)`` and an empty out mask."""
    stride, padding, dilation, groups = plan.conv_args
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups), _no_mask(x)


def conv2d_bwd(plan: CallPlan, grad_y, x, weight, *args):
    """``(grad_x or None, grad_w or None)`` of ``F.conv2d`` by ``aten.convolution_backward``."""
    need_x, need_w = args[-2], args[-1]
    stride, padding, dilation, groups = plan.conv_args
    gx, gw, _ = torch.ops.aten.convolution_backward(grad_y, x, weight, None, stride, padding, dilation,
                                                    False, [0, 0], groups, [need_x, need_w, False])
    return gx, gw


def linear_fwd(plan: CallPlan, x, weight, bias, *_):
    """``F.linear(x, weight, bias)`` and an empty out mask."""
    return F.linear(x, weight, bias), _no_mask(x)


def linear_bwd(plan: CallPlan, grad_y, x, weight, *args):
    """``grad_x = g @ W``, ``grad_w = gᵀ x`` over the flattened rows (as F.linear's autograd)."""
    need_x, need_w = args[-2], args[-1]
    gx = gw = None
    if need_x:
        gx = (grad_y.reshape(-1, grad_y.shape[-1]) @ weight).reshape(x.shape)
    if need_w:
        gw = grad_y.reshape(-1, grad_y.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
    return gx, gw
