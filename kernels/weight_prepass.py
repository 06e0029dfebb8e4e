"""Weight perturbation: the device function every GEMM uses on-chip, and the pre-pass kernel.

For a weight element with flat row-major index ``e`` (into ``[C_out, C_in/groups, kh, kw]`` or
``[out, in]``) and the noise instance ``i`` of the row tile:

    Wc = clamp(W, w_lo, w_hi)                 (W_CLIP)
    Wq = Q(Wc; w_lo, w_hi, w_bits)            (W_Q, only together with W_CLIP, as the reference)
    Wn = Wq·(1 + eta_mul·ε'(e, i)) + σ·ε(e, i)   ε' purpose 1, ε purpose 0

all in float32. The *regenerate* strategy calls `perturb_weight` on every weight tile a GEMM
program loads; the *pre-pass* strategy runs `_prepass_kernel` once per call and instance, writing
``Wn`` in the product dtype to a buffer ``[slots, numel(W)]`` that the GEMM reads instead.
`use_prepass` picks one per call from the one GPU cost model (`noisyops.backends.gpu_cost`).
"""
from __future__ import annotations

import dataclasses
import os
from typing import List

import torch
import triton
import triton.language as tl

from . import configs
from .quantize import qparams, quantize
from .stream import normal_at, u32_as_i32


@dataclasses.dataclass(frozen=True)
class WeightArgs:
    """Per-call weight scalars in float32, and the constexpr switches."""

    lo: float
    hi: float
    delta: float
    eta_mul: float
    sigma: float
    clip: bool
    quant: bool
    noise_mul: bool
    noise_add: bool


def weight_args(p, weight: torch.Tensor, noise: bool = True) -> WeightArgs:
    """Resolve ``p``'s weight range for this call (`OpParams.weight_range`) into kernel scalars.
    ``noise=False`` gives ``Wq`` only (clean_grad_input)."""
    lo, hi = p.weight_range(weight)
    sigma = p.sigma(lo, hi)
    # the empty range (0, 0) of all-zero weights: the quantizer is the clamp (no 0/0 step)
    bits = p.w_bits if p.w_clip and (hi > lo or hi != hi) else 0
    flo, fhi, delta = qparams(lo, hi, bits)
    f32 = lambda v: float(torch.tensor(v, dtype=torch.float32))  # noqa: E731
    return WeightArgs(lo=flo, hi=fhi, delta=delta, eta_mul=f32(p.eta_mul), sigma=f32(sigma),
                      clip=bool(p.w_clip), quant=bits > 0,
                      noise_mul=noise and p.eta_mul > 0, noise_add=noise and p.eta > 0)


def use_prepass(p, geo, instances: int, device, train: bool = False) -> bool:
    """True when the fused GEMM should read pre-passed weights rather than regenerate them:
    `noisyops.backends.gpu_cost.best_fused` (the one GPU cost model, a prediction until the GPU
    check calibrates it; the buffer capped by ``PREPASS_BUDGET_BYTES``) for this conv/linear
    geometry ``geo`` (`noisy_conv2d.Geometry`), ``instances`` distinct noise instances, on the
    modelled GPU of ``device``'s arch. ``NOISYOPS_TRITON_WEIGHTS=regen|prepass`` overrides it."""
    forced = os.environ.get("NOISYOPS_TRITON_WEIGHTS", "").strip().lower()
    if forced == "regen" or not (p.has_weight_noise or p.w_clip):
        return False
    if forced == "prepass":
        return True
    from noisyops.backends import gpu_cost, gpu_policy
    major = torch.cuda.get_device_capability(device)[0] if device.type == "cuda" else None
    layer = gpu_cost.Layer("call", "conv", geo.N, geo.C_in, geo.H, geo.W, geo.C_out, geo.KH, geo.KW,
                           geo.OH, geo.OW, groups=geo.groups)
    noise = gpu_policy.noise_of(p, layer, geo.N, instances)
    return gpu_cost.best_fused(layer, noise, train, gpu_cost.gpu_for_arch(major)) == "fused_prepass"


@triton.jit
def perturb_weight(w, e, w_lo, w_hi, w_delta, eta_mul, sigma, k0, k1, i0, i1, c3_base,
                   W_CLIP: tl.constexpr, W_Q: tl.constexpr, NOISE_MUL: tl.constexpr,
                   NOISE_ADD: tl.constexpr):
    """``Wn`` (float32) from ``W`` (float32 block) at flat weight indices ``e`` (int block),
    instance words ``(i0, i1)``, key ``(k0, k1)``, ``c3_base = 4·layer_key`` (uint32)."""
    if W_CLIP:
        w_c = tl.minimum(tl.maximum(w, w_lo, propagate_nan=tl.PropagateNan.ALL), w_hi,
                         propagate_nan=tl.PropagateNan.ALL)  # a NaN weight stays NaN
        w = tl.where(tl.abs(w) == float("inf"), w, w_c)  # and so does ±Inf
    if W_Q:
        w = quantize(w, w_lo, w_hi, w_delta)
    if NOISE_MUL:
        w = w * (1.0 + eta_mul * normal_at(e, k0, k1, i0, i1, c3_base + 1))
    if NOISE_ADD:
        w = w + sigma * normal_at(e, k0, k1, i0, i1, c3_base)
    return w


def k_major(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """``W [C_out, Cg, KH, KW]`` (or ``[out, in]``) re-laid K-major as ``[groups, KH·KW·Cg,
    C_out/groups]``: row ``k = (r·KW + s)·Cg + ci`` of group g holds ``W[g·Cout_g + :, ci, r, s]``,
    so a GEMM's ``BK x BN`` weight tile is one 2-D block, contiguous along the out channels."""
    w = weight.detach()
    w4 = w.reshape(w.shape[0], w.shape[1], 1, 1) if w.dim() == 2 else w
    C_out, Cg, KH, KW = w4.shape
    return (w4.reshape(groups, C_out // groups, Cg, KH, KW).permute(0, 3, 4, 2, 1)
            .reshape(groups, KH * KW * Cg, C_out // groups).contiguous())


@triton.jit
def _prepass_kernel(w_ptr, out_ptr, inst_ptr, numel, Cg, Cout_g, KK, w_lo, w_hi, w_delta, eta_mul,
                    sigma, k0_, k1_, c3_, W_CLIP: tl.constexpr, W_Q: tl.constexpr,
                    NOISE_MUL: tl.constexpr, NOISE_ADD: tl.constexpr, K_MAJOR: tl.constexpr,
                    BLOCK: tl.constexpr):
    """Grid ``(cdiv(numel, BLOCK), slots)``: slot s perturbs W with instance ``inst_ptr[s]``.
    Output element ``o`` of a slot is the flat row-major weight index (``K_MAJOR`` off), or the
    `k_major` index ``(g·KK·Cg + (rs·Cg + ci))·Cout_g + co_l`` whose noise is that of the weight
    element ``e = ((g·Cout_g + co_l)·Cg + ci)·KK + rs`` (coalesced stores, gathered loads)."""
    slot = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    if K_MAJOR:
        co_l = offs % Cout_g
        row = offs // Cout_g
        kidx = row % (KK * Cg)
        grp = row // (KK * Cg)
        e = ((grp * Cout_g + co_l) * Cg + kidx % Cg) * KK + kidx // Cg
    else:
        e = offs
    inst = tl.load(inst_ptr + slot)
    i0 = inst.to(tl.uint32)
    i1 = (inst >> 32).to(tl.uint32)
    k0 = k0_.to(tl.uint32, bitcast=True)
    k1 = k1_.to(tl.uint32, bitcast=True)
    c3 = c3_.to(tl.uint32, bitcast=True)
    w = tl.load(w_ptr + e, mask=ok, other=0.0).to(tl.float32)
    wn = perturb_weight(w, e, w_lo, w_hi, w_delta, eta_mul, sigma, k0, k1, i0, i1, c3,
                        W_CLIP, W_Q, NOISE_MUL, NOISE_ADD)
    tl.store(out_ptr + slot.to(tl.int64) * numel + offs, wn.to(out_ptr.dtype.element_ty), mask=ok)


def prepass(weight: torch.Tensor, p, wa: WeightArgs, instances: List[int],
            dtype: torch.dtype, groups: int = 0) -> torch.Tensor:
    """Launcher: ``Wn`` for each instance in ``instances`` in ``dtype`` (the product dtype):
    ``[len(instances), numel(W)]`` flat row-major like ``weight`` (``groups=0``), or with
    ``groups >= 1`` each slot laid out as `k_major` ``[groups, KH·KW·Cg, Cout_g]`` (the GEMMs)."""
    w = weight.detach().contiguous()
    numel = w.numel()
    w4 = w.reshape(w.shape[0], -1, 1, 1) if w.dim() == 2 else w
    C_out, Cg, KH, KW = w4.shape
    inst = torch.tensor(instances, dtype=torch.int64, device=w.device)
    shape = (len(instances), max(groups, 1), KH * KW * Cg, C_out // max(groups, 1)) if groups else \
        (len(instances), numel)
    out = torch.empty(shape, dtype=dtype, device=w.device)
    block = configs.ELEMENTWISE_BLOCK
    _prepass_kernel[(triton.cdiv(numel, block), len(instances))](
        w, out, inst, numel, Cg, C_out // max(groups, 1), KH * KW, wa.lo, wa.hi, wa.delta,
        wa.eta_mul, wa.sigma, u32_as_i32(p.seed_lo), u32_as_i32(p.seed_hi), u32_as_i32(4 * p.layer_key),
        W_CLIP=wa.clip, W_Q=wa.quant, NOISE_MUL=wa.noise_mul, NOISE_ADD=wa.noise_add,
        K_MAJOR=groups > 0, BLOCK=block)
    return out
