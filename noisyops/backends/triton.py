"""The ``triton`` backend: fused Triton kernels (`noisyops.kernels`) for CUDA tensors.

Devices: ``cuda``; plus ``cpu`` when ``TRITON_INTERPRET=1`` (the Triton interpreter runs the same
kernels on CPU tensors — a correctness tool, so dispatch only uses it there when forced with
``NOISYOPS_BACKEND=triton``). Float64 calls are declined (``NotImplemented``: the next backend runs).

On CUDA tensors, if `noisyops.backends.gpu_policy.use_cuda_path(kind, p, x, weight)` exists and
says True (the call's route is not ``fused``: cuDNN + the CUDA weight pre-pass runs it, see
docs/routing.md), the call is declined so the ``cuda`` backend runs it; dispatch records which
backend ran. ``NOISYOPS_BACKEND=triton`` bypasses the policy. Clean calls never get here (dispatch
runs `noisyops.clean` for them). The kernels build their own launch geometry from the arguments;
the ``plan=`` dispatch passes is accepted at this interface.

An empty batch (or an empty input, ``x.numel() == 0``) has no work for a kernel: these calls return
the reference's result (empty outputs, zero weight gradients), so they run forced as well.
"""
from __future__ import annotations

import importlib
import os

import torch

from .. import reference as _reference

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = ("cuda", "cpu") if _INTERPRET else ("cuda",)
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # = kernels.noisy_conv2d.SUPPORTED_DTYPES


def available():
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return False, f"triton cannot be imported: {type(exc).__name__}: {exc}"
    try:
        importlib.import_module("noisyops.kernels.noisy_conv2d")
    except Exception as exc:
        return False, f"noisyops.kernels failed to import: {type(exc).__name__}: {exc}"
    if _INTERPRET:
        return True, f"triton {triton.__version__} (TRITON_INTERPRET=1: also runs on CPU tensors)"
    return True, f"triton {triton.__version__}"


def _policy_declines(kind: str, p, x, weight) -> bool:
    """True when the GPU policy module routes this call to the ``cuda`` backend (never when
    ``NOISYOPS_BACKEND=triton`` forces this backend: a forced backend cannot fall back)."""
    if x.device.type != "cuda":
        return False
    if os.environ.get("NOISYOPS_BACKEND", "").strip().lower() == "triton":
        return False
    try:
        policy = importlib.import_module("noisyops.backends.gpu_policy")
    except ImportError:
        return False
    fn = getattr(policy, "use_cuda_path", None)
    return bool(fn(kind, p, x, weight)) if fn is not None else False


def conv2d_fwd(x, weight, bias, stride, padding, dilation, groups, p, instance, plan=None):
    if _policy_declines("conv2d_fwd", p, x, weight):
        return NotImplemented
    if x.numel() == 0:
        return _reference.conv2d_fwd(x, weight, bias, stride, padding, dilation, groups, p, instance)
    from ..kernels import noisy_conv2d
    return noisy_conv2d.conv2d_fwd(x, weight, bias, stride, padding, dilation, groups, p, instance)


def conv2d_bwd(grad_y, x, weight, stride, padding, dilation, groups, p, instance, out_mask, y_stride,
               needs_input_grad=True, needs_weight_grad=True, plan=None):
    if _policy_declines("conv2d_bwd", p, x, weight):
        return NotImplemented
    if x.numel() == 0:
        return _reference.conv2d_bwd(grad_y, x, weight, stride, padding, dilation, groups, p, instance,
                                     out_mask, y_stride, needs_input_grad, needs_weight_grad)
    from ..kernels import noisy_conv2d_backward
    return noisy_conv2d_backward.conv2d_bwd(grad_y, x, weight, stride, padding, dilation, groups, p,
                                            instance, out_mask, y_stride, needs_input_grad,
                                            needs_weight_grad)


def linear_fwd(x, weight, bias, p, instance, plan=None):
    if _policy_declines("linear_fwd", p, x, weight):
        return NotImplemented
    if x.numel() == 0:
        return _reference.linear_fwd(x, weight, bias, p, instance)
    from ..kernels import noisy_linear
    return noisy_linear.linear_fwd(x, weight, bias, p, instance)


def linear_bwd(grad_y, x, weight, p, instance, out_mask, y_stride, needs_input_grad=True,
               needs_weight_grad=True, plan=None):
    if _policy_declines("linear_bwd", p, x, weight):
        return NotImplemented
    if x.numel() == 0:
        return _reference.linear_bwd(grad_y, x, weight, p, instance, out_mask, y_stride,
                                     needs_input_grad, needs_weight_grad)
    from ..kernels import noisy_linear
    return noisy_linear.linear_bwd(grad_y, x, weight, p, instance, out_mask, y_stride,
                                   needs_input_grad, needs_weight_grad)
