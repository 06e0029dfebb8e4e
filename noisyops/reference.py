"""Pure-torch reference kernels of the noisy ops: the oracle every fast path is tested against.

Readable before fast. Every function follows SPEC sections 1-3 literally:

    xq  = Q(x; in_lo, in_hi, in_bits)                            (DAC, optional)
    Wc  = clamp(W, w_lo, w_hi)                                   (only with w_clip)
    Wq  = Q(Wc; w_lo, w_hi, w_bits)                              (optional)
    Wn  = Wq·(1 + eta_mul·ε') + σ·ε,  σ = eta·(w_hi − w_lo)       (ε, ε' from the noise stream)
    y_t = conv(xq, Wn restricted to tile t) + out_noise·ε''_t     (one partial sum per tile)
    y   = Σ_t Q(y_t; out_lo, out_hi, out_bits) + b

Compute dtype: float64 for float64 inputs, float32 otherwise (half inputs are upcast, the result is
cast back). Output-quantizer straight-through masks are returned bit-packed (`pack_mask`), so the
autograd formula and every backend share one format.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from . import stream
from .params import OpParams, sample_instance_ids, tile_bounds
from .plan import memory_format_of  # noqa: F401  (re-exported: the kernels import it from here)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- quantizer and masks ------------------------------------------------------------------------
def quantize(v: torch.Tensor, lo: float, hi: float, bits: int) -> torch.Tensor:
    """``Q(v; lo, hi, bits)`` in ``v``'s dtype: ``lo + round((clamp(v) − lo)/Δ)·Δ``, half-to-even,
    ``Δ = (hi − lo)/(2^bits − 1)`` computed in that dtype; identity for ``bits = 0``. On the empty
    range ``lo = hi`` (only all-zero weights measure one, see `OpParams.weight_range`) it is the
    clamp to ``lo``. NaN and ±Inf propagate: ``Q(NaN) = NaN``, ``Q(±Inf) = ±Inf``."""
    if bits <= 0:
        return v
    lo_t = torch.tensor(lo, dtype=v.dtype, device=v.device)
    hi_t = torch.tensor(hi, dtype=v.dtype, device=v.device)
    if not hi > lo:
        return clip(v, lo, hi)
    delta = (hi_t - lo_t) / torch.tensor(float((1 << bits) - 1), dtype=v.dtype, device=v.device)
    q = lo_t + torch.round((torch.minimum(torch.maximum(v, lo_t), hi_t) - lo_t) / delta) * delta
    return torch.where(is_inf(v), v, q)


def clip(v: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """``clamp(v, lo, hi)`` that lets NaN and ±Inf through (a fault is never made finite)."""
    lo_t = torch.tensor(lo, dtype=v.dtype, device=v.device)
    hi_t = torch.tensor(hi, dtype=v.dtype, device=v.device)
    return torch.where(is_inf(v), v, torch.minimum(torch.maximum(v, lo_t), hi_t))


def is_inf(v: torch.Tensor) -> torch.Tensor:
    """``torch.isinf(v)`` written as ``|v| == inf``: the same mask, but inductor's C++ backend
    vectorises ``abs`` and ``eq`` while it runs ``isinf`` as a scalar loop inside every fused kernel
    (``python benchmarks/compile_cpu.py --quantizer``, docs/compile_cpu.md)."""
    return v.abs() == float("inf")


def in_range_mask(v: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Straight-through mask: True where ``lo <= v <= hi`` (the gradient passes)."""
    lo_t = torch.tensor(lo, dtype=v.dtype, device=v.device)
    hi_t = torch.tensor(hi, dtype=v.dtype, device=v.device)
    return (v >= lo_t) & (v <= hi_t)


def pack_mask(masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Pack T bool masks (one per tile, all alike) into int32 words ``[T, ceil(numel/32)]``.

    Bit ``i mod 32`` of word ``i // 32`` of tile t is element i of ``masks[t]`` in its *storage
    order* (its dense memory layout, e.g. channels-last), LSB first. Padding bits are 0.
    """
    flat = torch.stack([_storage_order(m) for m in masks])
    T, n = flat.shape
    if n == 0:  # an empty output (empty batch): no words
        return torch.zeros((T, 0), dtype=torch.int32, device=flat.device)
    pad = (-n) % 32
    bits = F.pad(flat.to(torch.int64), (0, pad)).view(T, -1, 32)
    words = (bits << torch.arange(32, device=flat.device, dtype=torch.int64)).sum(-1)
    return torch.where(words >= (1 << 31), words - (1 << 32), words).to(torch.int32)


def unpack_mask(words: torch.Tensor, size: Sequence[int], stride: Sequence[int]) -> torch.Tensor:
    """Inverse of `pack_mask`: bool ``[T, *size]`` with tile views strided like ``stride``."""
    T = words.shape[0]
    numel = 1
    for s in size:
        numel *= s
    bits = (words.to(torch.int64).unsqueeze(-1) >> torch.arange(32, device=words.device)) & 1
    flat = bits.view(T, -1)[:, :numel].bool()
    return torch.stack([torch.as_strided(flat[t], tuple(size), tuple(stride)) for t in range(T)])


def _storage_order(t: torch.Tensor) -> torch.Tensor:
    """Elements of a dense (non-overlapping) tensor in memory order, as a flat tensor."""
    perm = sorted(range(t.dim()), key=lambda d: -t.stride(d))
    return t.permute(perm).reshape(-1)


def dense_strides(t: torch.Tensor) -> Tuple[int, ...]:
    """Strides of ``t``'s memory format as a fresh dense tensor (what `unpack_mask` needs)."""
    return torch.empty_like(t).stride()


# ---- weights --------------------------------------------------------------------------------
def weight_quantized(weight: torch.Tensor, p: OpParams, cd: torch.dtype):
    """``Wq`` (clipped and quantized, noise-free), ``σ``, and the clip mask (or None)."""
    lo, hi = p.weight_range(weight)
    w = weight.detach().to(cd)
    mask = None
    if p.w_clip:
        mask = in_range_mask(w, lo, hi)
        w = clip(w, lo, hi)
        w = quantize(w, lo, hi, p.w_bits)
    return w, p.sigma(lo, hi), mask


def weight_noisy(wq: torch.Tensor, sigma: float, p: OpParams, instance: int) -> torch.Tensor:
    """``Wn = Wq·(1 + eta_mul·ε') + σ·ε`` for one instance id; the element index is the flat
    row-major index into the weight tensor."""
    if not p.has_weight_noise:
        return wq
    numel = wq.numel()
    wn = wq
    if p.eta_mul > 0:
        eps_m = stream.normals(p.seed, p.layer_key, stream.PURPOSE_MUL, instance, numel)
        wn = wn * (1 + p.eta_mul * eps_m.to(wq.device, wq.dtype).view_as(wq))
    if p.eta > 0:
        eps_a = stream.normals(p.seed, p.layer_key, stream.PURPOSE_ADD, instance, numel)
        wn = wn + sigma * eps_a.to(wq.device, wq.dtype).view_as(wq)
    return wn


def _groups_by_instance(ids: List[int]):
    """``{instance id: [sample indices]}`` in first-seen order."""
    out = {}
    for s, i in enumerate(ids):
        out.setdefault(i, []).append(s)
    return out


# ---- the generic layer (conv and linear share it) --------------------------------------------------
class _Layer:
    """What differs between conv and linear: the product, its two gradients, and the tiling."""

    def __init__(self, product: Callable, grad_input: Callable, grad_weight: Callable,
                 bias_view: Callable, kernel_numel: int, in_per_group: int, groups: int):
        self.product, self.grad_input, self.grad_weight = product, grad_input, grad_weight
        self.bias_view = bias_view
        self.kernel_numel, self.in_per_group, self.groups = kernel_numel, in_per_group, groups

    def input_tile_mask(self, m: torch.Tensor) -> torch.Tensor:
        return _input_tile_mask(m, self.groups)

    def tile_masks(self, p: OpParams, weight: torch.Tensor) -> List[Optional[torch.Tensor]]:
        """One 0/1 weight mask per tile selecting its input channels (None for a single tile)."""
        bounds = tile_bounds(self.in_per_group, self.kernel_numel, p.tile_rows)
        if len(bounds) == 1:
            return [None]
        masks = []
        for c0, c1 in bounds:
            m = torch.zeros_like(weight)
            m[:, c0:c1] = 1
            masks.append(m)
        return masks


def _input_tile_mask(m: torch.Tensor, groups: int) -> torch.Tensor:
    """Bool mask of the input channels of x that the tile with weight mask ``m`` reads: conv
    (``m`` 4-D) channel ``c`` when ``m[0, c % (C_in/groups)]`` is set, shape ``[1, C_in, 1, 1]``;
    linear (``m`` 2-D) the in-features of ``m[0]``, shape ``[in]``."""
    sel = m[0].reshape(m.shape[1], -1)[:, 0].bool()
    if m.dim() == 4:
        return sel.repeat(groups).view(1, -1, 1, 1)
    return sel


def _forward(layer: _Layer, x, weight, bias, p: OpParams, instance):
    cd = compute_dtype(x.dtype)
    xq = quantize(x.to(cd), p.in_lo, p.in_hi, p.in_bits).to(x.dtype)
    wq, sigma, _ = weight_quantized(weight, p, cd)
    batch = x.shape[0]
    ids = sample_instance_ids(p, batch, instance)
    tiles = layer.tile_masks(p, wq) if p.tiled else [None]
    fused_bias = None if p.tiled or bias is None else bias.to(x.dtype)
    fmt = memory_format_of(x)
    y_tiles = [None] * len(tiles)
    # an empty batch still runs one (empty) product, so y has its shape and layout
    for inst, samples in (_groups_by_instance(ids) or {0: []}).items():
        wn = weight_noisy(wq, sigma, p, inst)
        sel = xq if len(samples) == batch else xq[samples]
        for t, m in enumerate(tiles):
            if m is None:
                part = layer.product(sel, wn.to(x.dtype), fused_bias).to(cd)
            else:  # tile t sees only its own channels: zeros elsewhere (never inf·0 = NaN)
                zero = sel.new_zeros(())
                part = layer.product(torch.where(layer.input_tile_mask(m), sel, zero),
                                     torch.where(m.bool(), wn, wn.new_zeros(())).to(x.dtype),
                                     fused_bias).to(cd)
            if len(samples) == batch:
                y_tiles[t] = part
            else:
                if y_tiles[t] is None:
                    y_tiles[t] = part.new_zeros((batch,) + part.shape[1:])
                y_tiles[t][samples] = part
    y_tiles = [y.contiguous(memory_format=fmt) for y in y_tiles]
    if p.out_noise > 0 and y_tiles[0].numel():
        numel = y_tiles[0].numel()
        per_sample = numel // batch
        inst_of = torch.tensor(ids, dtype=torch.int64).repeat_interleave(per_sample)
        elem = torch.arange(numel, dtype=torch.int64)
        for t in range(len(tiles)):
            eps = stream.normals_at(p.seed, p.layer_key, stream.PURPOSE_OUT, inst_of, t * numel + elem)
            y_tiles[t] = y_tiles[t] + p.out_noise * eps.to(x.device, cd).view(y_tiles[t].shape)
    if p.out_bits:
        mask = pack_mask([in_range_mask(y, p.out_lo, p.out_hi) for y in y_tiles])
        y_tiles = [quantize(y, p.out_lo, p.out_hi, p.out_bits) for y in y_tiles]
    else:
        mask = torch.empty(0, dtype=torch.int32, device=x.device)
    y = y_tiles[0]
    for y_t in y_tiles[1:]:
        y = y + y_t
    if bias is not None and fused_bias is None:
        y = y + layer.bias_view(bias.to(cd))
    return y.to(x.dtype).contiguous(memory_format=fmt), mask


def _backward(layer: _Layer, grad_y, x, weight, p: OpParams, instance, out_mask, y_stride,
              needs_input_grad: bool, needs_weight_grad: bool):
    cd = compute_dtype(x.dtype)
    g = grad_y.to(cd)
    xc = x.to(cd)
    wq, sigma, wmask = weight_quantized(weight, p, cd)
    batch = x.shape[0]
    ids = sample_instance_ids(p, batch, instance)
    tiles = layer.tile_masks(p, wq) if p.tiled else [None]
    if p.out_bits:
        omask = unpack_mask(out_mask, g.shape, y_stride)
        g_tiles = [g * omask[t].to(cd) for t in range(len(tiles))]
    else:
        g_tiles = [g] * len(tiles)
    grad_x = grad_w = None
    if needs_input_grad:
        grad_x = torch.zeros_like(xc)
        for inst, samples in _groups_by_instance(ids).items():
            wn = wq if p.clean_grad_input else weight_noisy(wq, sigma, p, inst)
            for g_t, m in zip(g_tiles, tiles):
                w_t = wn if m is None else wn * m
                if len(samples) == batch:
                    grad_x = grad_x + layer.grad_input(xc.shape, w_t, g_t)
                else:
                    sub_shape = (len(samples),) + tuple(xc.shape[1:])
                    grad_x[samples] += layer.grad_input(sub_shape, w_t, g_t[samples])
        if p.in_bits:
            grad_x = grad_x * in_range_mask(xc, p.in_lo, p.in_hi).to(cd)
        grad_x = grad_x.to(x.dtype)
    if needs_weight_grad:
        xq = quantize(xc, p.in_lo, p.in_hi, p.in_bits)
        grad_w = torch.zeros_like(wq)
        for g_t, m in zip(g_tiles, tiles):
            g_w = layer.grad_weight(xq, wq.shape, g_t)
            grad_w = grad_w + (g_w if m is None else g_w * m)
        if wmask is not None:
            grad_w = grad_w * wmask.to(cd)
        grad_w = grad_w.to(weight.dtype)
    return grad_x, grad_w


# ---- conv2d ---------------------------------------------------------------------------------
def _conv_layer(weight, stride, padding, dilation, groups) -> _Layer:
    kh, kw = weight.shape[2], weight.shape[3]
    return _Layer(
        product=lambda x, w, b: F.conv2d(x, w, b, stride, padding, dilation, groups),
        grad_input=lambda shape, w, g: torch.nn.grad.conv2d_input(shape, w, g, stride, padding, dilation, groups),
        grad_weight=lambda x, wshape, g: torch.nn.grad.conv2d_weight(x, wshape, g, stride, padding, dilation, groups),
        bias_view=lambda b: b.view(1, -1, 1, 1),
        kernel_numel=kh * kw, in_per_group=weight.shape[1], groups=groups)


def conv2d_fwd(x, weight, bias, stride, padding, dilation, groups, p: OpParams, instance):
    """Noisy conv2d forward. ``x [N, C_in, H, W]``, ``weight [C_out, C_in/groups, kh, kw]``,
    ``bias [C_out]`` or None, ``instance`` int64 0-d (call counter) or ``[N]`` (chip ids).
    Returns ``(y [N, C_out, H', W'], out_mask int32 [T, ceil(numel(y)/32)] or [0])``."""
    y, mask = _forward(_conv_layer(weight, stride, padding, dilation, groups), x, weight, bias, p, instance)
    return y, mask


def conv2d_bwd(grad_y, x, weight, stride, padding, dilation, groups, p: OpParams, instance, out_mask,
               y_stride, needs_input_grad=True, needs_weight_grad=True):
    """Straight-through backward of `conv2d_fwd`: ``(grad_x or None, grad_w or None)``; the noisy
    weights are regenerated from (seed, layer_key, instance), never stored."""
    return _backward(_conv_layer(weight, stride, padding, dilation, groups), grad_y, x, weight, p,
                     instance, out_mask, y_stride, needs_input_grad, needs_weight_grad)


# ---- linear ---------------------------------------------------------------------------------
def _linear_layer(weight) -> _Layer:
    def grad_weight(x, wshape, g):
        return g.reshape(-1, g.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
    return _Layer(
        product=lambda x, w, b: F.linear(x, w, b),
        grad_input=lambda shape, w, g: (g @ w).reshape(shape),
        grad_weight=grad_weight,
        bias_view=lambda b: b, kernel_numel=1, in_per_group=weight.shape[1], groups=1)


def linear_fwd(x, weight, bias, p: OpParams, instance):
    """Noisy linear forward. ``x [*, in]`` (per_sample / per_instance: sample = index along dim 0),
    ``weight [out, in]``, ``bias [out]`` or None. Returns ``(y [*, out], out_mask)`` as `conv2d_fwd`.
    A 1-D ``x [in]`` is one sample."""
    if x.dim() == 1:
        y, mask = _forward(_linear_layer(weight), x.unsqueeze(0), weight, bias, p, instance)
        return y.squeeze(0), mask
    return _forward(_linear_layer(weight), x, weight, bias, p, instance)


def linear_bwd(grad_y, x, weight, p: OpParams, instance, out_mask, y_stride,
               needs_input_grad=True, needs_weight_grad=True):
    """Straight-through backward of `linear_fwd`, as `conv2d_bwd`."""
    if x.dim() == 1:
        gx, gw = _backward(_linear_layer(weight), grad_y.unsqueeze(0), x.unsqueeze(0), weight, p,
                           instance, out_mask, (0,) + tuple(y_stride), needs_input_grad, needs_weight_grad)
        return (gx.squeeze(0) if gx is not None else None), gw
    return _backward(_linear_layer(weight), grad_y, x, weight, p, instance, out_mask, y_stride,
                     needs_input_grad, needs_weight_grad)
