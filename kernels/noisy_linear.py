"""Noisy linear (forward and backward) on the implicit-GEMM kernels, as a 1x1 convolution.

``x [*, in]`` is viewed as ``N = x.shape[0]`` samples of ``R = numel/(N·in)`` rows (``[N, R, 1, in]``
NHWC), ``weight [out, in]`` as ``[out, in, 1, 1]``. The GEMM is then exactly ``xq @ Wnᵀ`` per row;
per_sample / per_instance segments are the R rows of one sample. ``y [*, out]`` is row-major, so the
out-mask storage offset and the output-noise logical index are both ``row·out + col``.
A 1-D ``x [in]`` is one sample, as in `noisyops.reference.linear_fwd`.
"""
from __future__ import annotations

import torch

from .noisy_conv2d import conv_geometry, gemm_forward, nhwc_strides, supported
from .noisy_conv2d_backward import gemm_grad_input, gemm_grad_weight

_ONE = ([1, 1], [0, 0], [1, 1], 1)


def _rows_view(t2: torch.Tensor, n: int) -> torch.Tensor:
    """``[M, C]`` row-major → NCHW-shaped ``[N, C, R, 1]`` view with NHWC strides."""
    m, c = t2.shape
    return t2.view(n, m // n, 1, c).permute(0, 3, 1, 2)


def linear_fwd(x, weight, bias, p, instance):
    """Signature of `noisyops.reference.linear_fwd`: ``(y [*, out], out_mask)``."""
    if x.dim() == 1:
        out = linear_fwd(x.unsqueeze(0), weight, bias, p, instance)
        return out if out is NotImplemented else (out[0].squeeze(0), out[1])
    if not supported(x, weight, x.numel() // x.shape[-1] * weight.shape[0]):
        return NotImplemented
    n, k = x.shape[0], x.shape[-1]
    out_f = weight.shape[0]
    x2 = x.reshape(-1, k).contiguous()
    x4 = _rows_view(x2, n)
    w4 = weight.view(out_f, k, 1, 1)
    geo = conv_geometry(x4, w4, *_ONE)
    y2 = torch.empty((x2.shape[0], out_f), dtype=x.dtype, device=x.device)
    y4 = _rows_view(y2, n)
    ys = nhwc_strides(y4)
    b = bias.detach().contiguous() if bias is not None else None
    mask = gemm_forward(x4, nhwc_strides(x4), w4, b, geo, y4, ys, ys, p, instance, geo.OH * geo.OW)
    return y2.view(*x.shape[:-1], out_f), mask


def linear_bwd(grad_y, x, weight, p, instance, out_mask, y_stride, needs_input_grad=True,
               needs_weight_grad=True):
    """Signature of `noisyops.reference.linear_bwd`: ``(grad_x|None, grad_w|None)``."""
    if x.dim() == 1:
        out = linear_bwd(grad_y.unsqueeze(0), x.unsqueeze(0), weight, p, instance, out_mask,
                         (0,) + tuple(y_stride), needs_input_grad, needs_weight_grad)
        if out is NotImplemented:
            return out
        return (out[0].squeeze(0) if out[0] is not None else None), out[1]
    if not supported(x, weight, grad_y.numel()) or grad_y.dtype != x.dtype:
        return NotImplemented
    shape = tuple(grad_y.shape)
    dense = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        dense[i] = dense[i + 1] * shape[i + 1]
    if p.out_bits and any(s != d for s, d, n in zip(y_stride, dense, shape) if n > 1):
        return NotImplemented  # the out mask is defined on a row-major y
    n, k = x.shape[0], x.shape[-1]
    out_f = weight.shape[0]
    x2 = x.reshape(-1, k).contiguous()
    g2 = grad_y.reshape(-1, out_f).contiguous()
    x4, g4 = _rows_view(x2, n), _rows_view(g2, n)
    w4 = weight.view(out_f, k, 1, 1)
    geo = conv_geometry(x4, w4, *_ONE)
    ys = nhwc_strides(g4)
    gx = gw = None
    if needs_input_grad:
        gx2 = torch.empty_like(x2)
        gemm_grad_input(g4, ys, x4, nhwc_strides(x4), w4, geo, ys, p, instance, geo.H * geo.W,
                        out_mask, _rows_view(gx2, n), nhwc_strides(_rows_view(gx2, n)))
        gx = gx2.view(x.shape)
    if needs_weight_grad:
        gw = gemm_grad_weight(g4, ys, x4, nhwc_strides(x4), w4, geo, ys, p, out_mask).view(weight.shape)
    return gx, gw
